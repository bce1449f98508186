"""``rlhfkit tasks``: list the built-in tasks; with ``--measure``, a model's starting gold score on each."""

from __future__ import annotations

import argparse
import json

from rlhfkit.data.tasks import TASKS, get_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit tasks", description="List the built-in tasks (prompts + hidden gold "
                                "reward); with --measure, score a model's samples on each.")
    p.add_argument("--measure", action="store_true", help="sample from --model and report its mean gold score")
    p.add_argument("--model", default="smollm2-135m-instruct", help="policy to measure (default: the bundled model)")
    p.add_argument("--task", action="append", help="measure only this task (repeatable)")
    p.add_argument("--num-prompts", type=int, default=48, help="prompts per task (seeded subset of the split)")
    p.add_argument("--split", default="heldout", choices=["train", "heldout"])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        tasks = [get_task(n) for n in (args.task or TASKS)]
    except ValueError as e:
        p.error(str(e))
    rows = [{"task": t.name, "train": len(t.prompt_rows("train")), "heldout": len(t.prompt_rows("heldout")),
             "description": t.description} for t in tasks]
    if args.measure:
        # torch and transformers load only when a model is sampled: the listing stays instant
        from rlhfkit.evaluate.gold import measure
        from rlhfkit.models import load_model

        model, tok = load_model(args.model, seed=args.seed)
        model.eval()
        for row, t in zip(rows, tasks):
            row.update(measure(t, model, tok, num_prompts=args.num_prompts, split=args.split,
                               temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, seed=args.seed), model=args.model)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        line = f"{r['task']:<12} {r['train']:>4} train / {r['heldout']:>3} heldout prompts  {r['description']}"
        if args.measure:
            line += (f"\n{'':<12} {r['model']}: gold {r['gold_mean']:.3f} ± {r['gold_sem']:.3f} (sem) on {r['n']} "
                     f"{r['split']} prompts, T={r['temperature']}, {r['max_new_tokens']} new tokens, "
                     f"{r['ended_frac']:.0%} ended with EOS")
        print(line)
    return 0
