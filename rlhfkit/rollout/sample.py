"""``rlhfkit sample``: K completions per prompt from a policy, written as comparison pairs to label.

Every pair of *distinct* completions of a prompt becomes one :class:`ComparisonPair` line (K
completions give up to K(K-1)/2 pairs, as InstructGPT's K-way rankings give K(K-1)/2 comparisons);
identical completions and empty ones are skipped and counted. Each line records how its replies were
made (model, checkpoint, seed, sampling settings, task, prompt id and category) so a labelled
dataset can always be traced back to the policy that produced it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from rlhfkit.data.records import ComparisonPair, DataError, check_messages


def load_prompt_file(path: str) -> list[dict]:
    """Prompts from a file: rows with ``prompt`` (a string or a chat ending with a user turn) or
    ``messages``; optional ``id`` and ``category``. Returns ``{"id", "category", "messages"}`` dicts."""
    from rlhfkit.data.io import read_rows

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfkit sample", description="Sample K completions per prompt from a policy "
                                "and write every pair of distinct completions as an unlabelled comparison.")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="policy: 'smollm2-135m-instruct', 'tiny', a checkpoint/HF directory or a hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="built-in task whose prompts to use (see `rlhfkit tasks`)")
    src.add_argument("--prompts", metavar="FILE", help="prompt file (.jsonl/.json/.parquet): rows with 'prompt' or "
                     "'messages', optional 'id' and 'category'")
    p.add_argument("--split", default="train", choices=["train", "heldout"], help="task prompt split")
    p.add_argument("--num-prompts", type=int, default=None, help="a seeded subset of this many prompts (default all)")
    p.add_argument("--k", type=int, default=4, help="completions per prompt (>= 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts are an error")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output pairs file (.jsonl or .parquet)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.k < 2:
        raise SystemExit(f"rlhfkit sample: --k must be at least 2 to make pairs, got {args.k}")
    if args.temperature <= 0:
        raise SystemExit("rlhfkit sample: --temperature must be > 0: greedy decoding gives K identical completions")
    import torch

    from rlhfkit.data.io import save_pairs
    from rlhfkit.data.tasks import get_task
    from rlhfkit.models.loading import load_model, resolve
    from rlhfkit.rollout.engine import Sampler, SamplingConfig

    try:
        if args.prompts:
            rows, task_name = load_prompt_file(args.prompts), None
        else:
            task_name = args.task
            rows = get_task(task_name).prompt_rows(args.split)
        rows = pick(rows, args.num_prompts, args.seed)
    except (DataError, ValueError) as e:
        raise SystemExit(f"rlhfkit sample: {e}") from None
    model, tok = load_model(args.model, seed=args.seed)
    model.eval()
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens)
    sampler = Sampler(model, tok, sampling, max_prompt_length=args.max_prompt_length)
    checkpoint = args.model if args.model in ("smollm2-135m-instruct", "tiny") else str(Path(resolve(args.model)))
    meta = {"model": args.model, "checkpoint": checkpoint, "seed": args.seed, "task": task_name,
            "split": args.split if task_name else None, "k": args.k,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                         "max_new_tokens": args.max_new_tokens}}

    # Each prompt repeated K times; a batch holds whole prompts where it can (batch_size >= K).
    flat = [(r, k) for r in rows for k in range(args.k)]
    completions: dict[str, list] = {r["id"]: [None] * args.k for r in rows}
    info: dict[str, list] = {r["id"]: [None] * args.k for r in rows}
    t0, new_tokens = time.perf_counter(), 0
    for b, s in enumerate(range(0, len(flat), args.batch_size)):
        chunk = flat[s:s + args.batch_size]
        try:
            out = sampler.sample([r["messages"] for r, _ in chunk], seed=args.seed * 1_000_003 + b, with_logps=False)
        except DataError as e:
            raise SystemExit(f"rlhfkit sample: {e}") from None
        lengths = out.completion_mask.sum(1).tolist()
        new_tokens += sum(lengths)
        for (r, k), text, n, ended in zip(chunk, out.completions, lengths, out.ended.tolist()):
            completions[r["id"]][k] = text
            info[r["id"]][k] = {"tokens": int(n), "ended": bool(ended)}
        print(f"[rlhfkit] sample: {min(s + args.batch_size, len(flat))}/{len(flat)} completions, "
              f"{new_tokens / (time.perf_counter() - t0):.1f} tokens/s", flush=True)

    pairs, skipped = [], 0
    for r in rows:
        ps, sk = make_pairs(r, completions[r["id"]], info[r["id"]], meta, task_name)
        pairs += ps
        skipped += sk
    if not pairs:
        raise SystemExit("rlhfkit sample: every prompt's completions were identical or empty; no pairs written "
                         "(raise --temperature or --k)")
    save_pairs(args.out, pairs)
    ended = np.mean([i["ended"] for v in info.values() for i in v])
    summary = {"out": args.out, "prompts": len(rows), "completions": len(flat), "pairs": len(pairs),
               "skipped_duplicate_or_empty": skipped, "ended_with_eos": float(ended),
               "tokens_per_s": new_tokens / (time.perf_counter() - t0), "threads": torch.get_num_threads()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
