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
    src.add_argument("--prompts", metavar="PATH_OR_HUB_ID", help="your prompts, read as the trainers' --prompts "
                     "(.jsonl/.json/.parquet, a save_to_disk folder or a hub id): rows with 'prompt' (text or "
                     "messages) or 'messages', optional 'id' and 'category' (docs/rewards.md)")
    p.add_argument("--split", default=None, choices=["train", "heldout", "all"],
                   help="a task's prompt split (default train); with --prompts: all rows (default), or the train / "
                   "heldout side of the trainers' held-out split by prompt (--eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=None,
                   help="with --prompts and --split train|heldout: the held-out fraction, split as `rlhfkit grpo "
                   "--prompts PATH --eval-fraction F` splits it (default: the trainers' 0.1)")
    p.add_argument("--num-prompts", type=int, default=None, help="a seeded subset of this many prompts (default all)")
    p.add_argument("--k", type=int, default=4, help="completions per prompt (>= 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts are an error")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call")
    p.add_argument("--backend", default="hf", choices=["hf", "fast", "auto"],
                   help="hf: transformers generate; fast: the int8 CPU engine (docs/generation.md); auto: fast on a CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output pairs file (.jsonl or .parquet)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.k < 2:
        raise SystemExit(f"rlhfkit sample: --k must be at least 2 to make pairs, got {args.k}")
    if args.temperature <= 0:
        raise SystemExit("rlhfkit sample: --temperature must be > 0: greedy decoding gives K identical completions")
    if args.eval_fraction is not None and not (args.prompts and args.split in ("train", "heldout")):
        raise SystemExit("rlhfkit sample: --eval-fraction splits a --prompts dataset; give --split train or heldout")
    # torch and transformers load only once the options are known to be valid
    from rlhfkit.data.io import save_pairs
    from rlhfkit.data.records import DataError
    from rlhfkit.rollout.engine import SamplingConfig
    from rlhfkit.rollout.sample import sample_pairs, select_prompts
    from rlhfkit.train.online_config import DEFAULT_EVAL_FRACTION, SPLIT_SEED  # the trainers' held-out split

    fraction = DEFAULT_EVAL_FRACTION if args.eval_fraction is None else args.eval_fraction
    try:
        rows = select_prompts(args.task, args.prompts, args.split, args.num_prompts, args.seed, fraction, SPLIT_SEED)
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  max_new_tokens=args.max_new_tokens)
        pairs, summary = sample_pairs(args.model, rows, task=args.task, split=args.split or ("train" if args.task else None), k=args.k,
                                      sampling=sampling,
                                      max_prompt_length=args.max_prompt_length, batch_size=args.batch_size,
                                      seed=args.seed, backend=args.backend)
    except (DataError, ValueError) as e:
        raise SystemExit(f"rlhfkit sample: {e}") from None
    save_pairs(args.out, pairs)
    print(json.dumps({"out": args.out, **summary}, indent=2))
    return 0
