"""``rlhfkit sample``: the command line of ``rlhfkit.rollout.sample`` (K completions per prompt, paired)."""

from __future__ import annotations

import argparse
import json


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
    # torch and transformers load only once the options are known to be valid
    from rlhfkit.data.io import save_pairs
    from rlhfkit.data.records import DataError
    from rlhfkit.rollout.engine import SamplingConfig
    from rlhfkit.rollout.sample import sample_pairs, select_prompts

    try:
        rows = select_prompts(args.task, args.prompts, args.split, args.num_prompts, args.seed)
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  max_new_tokens=args.max_new_tokens)
        pairs, summary = sample_pairs(args.model, rows, task=args.task, split=args.split, k=args.k, sampling=sampling,
                                      max_prompt_length=args.max_prompt_length, batch_size=args.batch_size,
                                      seed=args.seed)
    except (DataError, ValueError) as e:
        raise SystemExit(f"rlhfkit sample: {e}") from None
    save_pairs(args.out, pairs)
    print(json.dumps({"out": args.out, **summary}, indent=2))
    return 0
