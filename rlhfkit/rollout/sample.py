"""K completions per prompt from a policy, paired into comparisons to label (``rlhfkit sample``).

Every pair of *distinct* completions of a prompt becomes one :class:`ComparisonPair` line (K
completions give up to K(K-1)/2 pairs, as InstructGPT's K-way rankings give K(K-1)/2 comparisons);
identical completions and empty ones are skipped and counted. Each line records how its replies were
made (model, checkpoint, seed, sampling settings, task, prompt id and category) so a labelled
dataset can always be traced back to the policy that produced it. The command line is
``rlhfkit/cli/sample.py``; this module does the work.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch

from rlhfkit.data.io import read_rows
from rlhfkit.data.records import ComparisonPair, DataError, check_messages
from rlhfkit.data.tasks import get_task
from rlhfkit.models.loading import load_model, resolve
from rlhfkit.rollout.engine import Sampler, SamplingConfig

BUNDLED = ("smollm2-135m-instruct", "tiny")
"""Model names recorded as given; any other model is recorded by its resolved directory."""
BATCH_SEED_STRIDE = 1_000_003
"""Generation batch b is seeded ``seed * BATCH_SEED_STRIDE + b``: a prime larger than any batch count,
so the batches of two different seeds never share a generator seed."""


def load_prompt_file(path: str) -> list[dict]:
    """Prompts from a file: rows with ``prompt`` (a string or a chat ending with a user turn) or
    ``messages``; optional ``id`` and ``category``. Returns ``{"id", "category", "messages"}`` dicts."""
    out = []
    for where, row in read_rows(path):
        key = "messages" if "messages" in row else "prompt"
        if key not in row:
            raise where.error("missing field; a prompt row needs 'prompt' (text or chat messages) or 'messages'",
                              "prompt")
        value = row[key]
        if isinstance(value, str):
            if not value.strip():
                raise where.error("empty prompt", key)
            value = [{"role": "user", "content": value}]
        messages = check_messages(value, where, key, must_end_with="user")
        pid = row.get("id")
        out.append({"id": str(pid) if pid is not None else f"{Path(path).stem}:{where.line}",
                    "category": row.get("category"), "messages": messages})
    if not out:
        raise DataError("no prompts in the file", path=path)
    return out


def make_pairs(row: dict, completions: list[str], info: list[dict], meta: dict, task: str | None
               ) -> tuple[list[ComparisonPair], int]:
    """All pairs of distinct, non-empty completions of one prompt; returns (pairs, duplicates skipped)."""
    kept: list[int] = []
    seen: set[str] = set()
    skipped = 0
    for i, c in enumerate(completions):
        key = c.strip()
        if not key or key in seen:
            skipped += 1
            continue
        seen.add(key)
        kept.append(i)
    pairs = []
    for i, j in itertools.combinations(kept, 2):
        pairs.append(ComparisonPair(
            id=f"{row['id']}#s{meta['seed']}:{i}-{j}", prompt=row["messages"],
            a={"role": "assistant", "content": completions[i]}, b={"role": "assistant", "content": completions[j]},
            task=task, metadata={**meta, "prompt_id": row["id"], "category": row.get("category"),
                                 "a_index": i, "b_index": j, "a_info": info[i], "b_info": info[j]},
        ))
    return pairs, skipped


def pick(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded subset of ``n`` rows, kept in file order (all rows when n is None or >= len)."""
    if n is None or n >= len(rows):
        return rows
    if n <= 0:
        raise ValueError(f"--num-prompts must be positive, got {n}")
    keep = sorted(np.random.default_rng(seed).choice(len(rows), n, replace=False).tolist())
    return [rows[i] for i in keep]


def select_prompts(task: str | None = None, prompts: str | None = None, split: str = "train",
                   num_prompts: int | None = None, seed: int = 0) -> list[dict]:
    """The prompt rows to sample: a built-in ``task``'s ``split`` or a ``prompts`` file (exactly one),
    reduced to a seeded subset of ``num_prompts``."""
    if (task is None) == (prompts is None):
        raise ValueError("give exactly one of task and prompts")
    rows = load_prompt_file(prompts) if prompts else get_task(task).prompt_rows(split)
    return pick(rows, num_prompts, seed)


def sample_pairs(model_name: str, rows: list[dict], *, task: str | None = None, split: str | None = None, k: int = 4,
                 sampling: SamplingConfig | None = None, max_prompt_length: int = 512, batch_size: int = 16,
                 seed: int = 0) -> tuple[list[ComparisonPair], dict]:
    """Sample ``k`` completions of each prompt row from ``model_name`` and pair them (``make_pairs``).

    Returns the pairs and a summary (prompts, completions, pairs, skipped duplicates, EOS rate,
    tokens/s). ``task`` and ``split`` are recorded in each pair; progress is printed per batch.
    """
    sampling = sampling or SamplingConfig(temperature=1.0, max_new_tokens=48)
    if k < 2:
        raise ValueError(f"k must be at least 2 to make pairs, got {k}")
    if sampling.temperature <= 0:
        raise ValueError("the temperature must be > 0: greedy decoding gives K identical completions")
    model, tok = load_model(model_name, seed=seed)
    model.eval()
    sampler = Sampler(model, tok, sampling, max_prompt_length=max_prompt_length)
    checkpoint = model_name if model_name in BUNDLED else str(Path(resolve(model_name)))
    meta = {"model": model_name, "checkpoint": checkpoint, "seed": seed, "task": task,
            "split": split if task else None, "k": k,
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                         "max_new_tokens": sampling.max_new_tokens}}

    # Each prompt repeated K times; a batch holds whole prompts where it can (batch_size >= K).
    flat = [(r, i) for r in rows for i in range(k)]
    completions: dict[str, list] = {r["id"]: [None] * k for r in rows}
    info: dict[str, list] = {r["id"]: [None] * k for r in rows}
    t0, new_tokens = time.perf_counter(), 0
    for b, s in enumerate(range(0, len(flat), batch_size)):
        chunk = flat[s:s + batch_size]
        out = sampler.sample([r["messages"] for r, _ in chunk], seed=seed * BATCH_SEED_STRIDE + b, with_logps=False)
        lengths = out.completion_mask.sum(1).tolist()
        new_tokens += sum(lengths)
        for (r, i), text, n, ended in zip(chunk, out.completions, lengths, out.ended.tolist()):
            completions[r["id"]][i] = text
            info[r["id"]][i] = {"tokens": int(n), "ended": bool(ended)}
        print(f"[rlhfkit] sample: {min(s + batch_size, len(flat))}/{len(flat)} completions, "
              f"{new_tokens / (time.perf_counter() - t0):.1f} tokens/s", flush=True)

    pairs, skipped = [], 0
    for r in rows:
        ps, sk = make_pairs(r, completions[r["id"]], info[r["id"]], meta, task)
        pairs += ps
        skipped += sk
    if not pairs:
        raise ValueError("every prompt's completions were identical or empty; no pairs written "
                         "(raise --temperature or --k)")
    summary = {"prompts": len(rows), "completions": len(flat), "pairs": len(pairs),
               "skipped_duplicate_or_empty": skipped,
               "ended_with_eos": float(np.mean([i["ended"] for v in info.values() for i in v])),
               "tokens_per_s": new_tokens / (time.perf_counter() - t0), "threads": torch.get_num_threads()}
    return pairs, summary
