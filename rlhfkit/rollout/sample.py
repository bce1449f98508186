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
import re
import time
from pathlib import Path

import numpy as np
import torch

from rlhfkit.data.prompt_data import load_prompt_rows, split_held_out
from rlhfkit.data.records import ComparisonPair
from rlhfkit.data.tasks import get_task
from rlhfkit.models.loading import load_model, resolve
from rlhfkit.rollout.engine import Sampler, SamplingConfig
from rlhfkit.rollout.fast import SUPPORTED_MODEL_TYPES, FastBackend

BUNDLED = ("smollm2-135m-instruct", "tiny")
"""Model names recorded as given; any other model is recorded by its resolved directory."""
BATCH_SEED_STRIDE = 1_000_003
"""Generation batch b is seeded ``seed * BATCH_SEED_STRIDE + b``: a prime larger than any batch count,
so the batches of two different seeds never share a generator seed."""


def prompt_file_rows(source, split: str | None = None, eval_fraction: float = 0.1, split_seed: int = 0) -> list:
    """A user's prompt dataset read exactly as the trainers read ``--prompts``
    (:func:`rlhfkit.data.prompt_data.load_prompt_rows`: a file, a ``save_to_disk`` folder or a hub id;
    ``prompt`` text, a message-list ``prompt`` or ``messages``; the other columns kept).

    ``split`` None or 'all': every row; 'train' / 'heldout': the two sides of the trainers' held-out
    split by prompt (:func:`~rlhfkit.data.prompt_data.split_held_out` with ``eval_fraction`` and the
    trainers' ``split_seed``), so ``--split heldout --eval-fraction F`` gives the prompts a run with
    ``--prompts`` and ``eval_fraction F`` held out. Returns PromptRows; DataError on a bad row."""
    rows = load_prompt_rows(source)
    if split in (None, "all"):
        return rows
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be all, train or heldout, got {split!r}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1) to split the prompts, got {eval_fraction}")
    train, held = split_held_out(rows, eval_fraction, split_seed)
    if split == "heldout" and not held:
        raise ValueError(f"--eval-fraction {eval_fraction} holds out no prompt of {source}")
    return train if split == "train" else held


def sample_row(row, source) -> dict:
    """A PromptRow as ``sample_pairs`` takes it: ``{"id", "category", "messages"}``; the id is the row's
    ``id`` column, else ``<file stem>:<line>`` (JSONL, 1-based) or ``<stem>:<row>`` (tables, 0-based)."""
    pid = row.columns.get("id")
    if pid is None:
        place = re.search(r"(\d+)$", row.where)
        pid = f"{Path(str(source)).stem}:{place.group(1) if place else row.where}"
    return {"id": str(pid), "category": row.columns.get("category"), "messages": row.messages}


def load_prompt_file(path, split: str | None = None, eval_fraction: float = 0.1, split_seed: int = 0) -> list[dict]:
    """:func:`prompt_file_rows` as ``{"id", "category", "messages"}`` dicts (:func:`sample_row`)."""
    return [sample_row(r, path) for r in prompt_file_rows(path, split, eval_fraction, split_seed)]


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


def select_prompts(task: str | None = None, prompts: str | None = None, split: str | None = None,
                   num_prompts: int | None = None, seed: int = 0, eval_fraction: float = 0.1,
                   split_seed: int = 0) -> list[dict]:
    """The prompt rows to sample: a built-in ``task``'s ``split`` (default train) or a ``prompts``
    dataset (exactly one; ``split`` default all, else :func:`prompt_file_rows`), reduced to a seeded
    subset of ``num_prompts``."""
    if (task is None) == (prompts is None):
        raise ValueError("give exactly one of task and prompts")
    if prompts:
        rows = load_prompt_file(prompts, split, eval_fraction, split_seed)
    elif split == "all":
        raise ValueError("--split all is for --prompts; a task has train and heldout splits")
    else:
        rows = get_task(task).prompt_rows(split or "train")
    return pick(rows, num_prompts, seed)


def sample_pairs(model_name: str, rows: list[dict], *, task: str | None = None, split: str | None = None, k: int = 4,
                 sampling: SamplingConfig | None = None, max_prompt_length: int = 512, batch_size: int = 16,
                 seed: int = 0, backend: str = "hf") -> tuple[list[ComparisonPair], dict]:
    """Sample ``k`` completions of each prompt row from ``model_name`` and pair them (``make_pairs``).

    Returns the pairs and a summary (prompts, completions, pairs, skipped duplicates, EOS rate,
    tokens/s). ``task`` and ``split`` (a task's split, or a prompt dataset's: None = all rows) are
    recorded in each pair; progress is printed per batch. ``backend``: 'hf' (transformers' generate, the
    model itself), 'fast' (the int8 CPU engine, rlhfkit/rollout/fast.py: 2-3x faster, samples from a
    quantized copy of the model: docs/generation.md) or 'auto' ('fast' for a Llama model on a CPU).
    """
    sampling = sampling or SamplingConfig(temperature=1.0, max_new_tokens=48)
    if k < 2:
        raise ValueError(f"k must be at least 2 to make pairs, got {k}")
    if sampling.temperature <= 0:
        raise ValueError("the temperature must be > 0: greedy decoding gives K identical completions")
    model, tok = load_model(model_name, seed=seed)
    model.eval()
    if backend not in ("hf", "fast", "auto"):
        raise ValueError(f"backend must be 'hf', 'fast' or 'auto', got {backend!r}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if backend == "auto":
        backend = "fast" if on_cpu and model.config.model_type in SUPPORTED_MODEL_TYPES else "hf"
    engine = FastBackend(model, tok) if backend == "fast" else None  # None: the Sampler's HFBackend
    sampler = Sampler(model, tok, sampling, backend=engine, max_prompt_length=max_prompt_length)
    checkpoint = model_name if model_name in BUNDLED else str(Path(resolve(model_name)))
    meta = {"model": model_name, "checkpoint": checkpoint, "seed": seed, "task": task,
            "split": split, "k": k, "backend": backend,
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
