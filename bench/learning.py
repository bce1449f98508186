"""Evidence of learning: one online method on a built-in task with the bundled model, within a
wall-clock budget, then the trained policy against the starting model on held-out prompts.

    python bench/learning.py --method ppo --task concise --minutes 15

Trains on the task's gold reward (`--reward gold`, or `rm:PATH`), then runs `rlhfkit eval` on
`--eval-prompts` held-out prompts judged by the gold reward. The last line is
`RESULT gold_gain=... ci_low=... ci_high=... win_rate=... kl=... steps=... minutes=...`, where the CI
is the 95% paired bootstrap CI over prompts of (trained − starting) mean gold reward.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULTS = {
    # method: (config class, overrides) — the same sample budget per step: 8 completions
    "ppo": ("rlhfkit.train.ppo:PPOConfig", dict(prompts_per_step=8, samples_per_prompt=1, epochs_per_step=2,
                                                mini_batch_size=4, lr=5e-6)),
    "grpo": ("rlhfkit.train.grpo:GRPOConfig", dict(prompts_per_step=2, samples_per_prompt=4, lr=5e-6)),
    "rloo": ("rlhfkit.train.grpo:RLOOConfig", dict(prompts_per_step=2, samples_per_prompt=4, lr=5e-6)),
    "cmpo": ("rlhfkit.train.cmpo:CMPOConfig", dict(prompts_per_step=2, samples_per_prompt=4, lr=5e-6)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=sorted(DEFAULTS), default="ppo")
    ap.add_argument("--task", default="concise")
    ap.add_argument("--reward", default="gold")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget (eval comes after)")
    ap.add_argument("--steps", type=int, default=200, help="LR schedule length; the budget usually stops first")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-prompts", type=int, default=70)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import importlib

    from rlhfkit.cli.evaluate import eval_main

    path, overrides = DEFAULTS[args.method]
    module_name, cls_name = path.split(":")
    module = importlib.import_module(module_name)
    out = Path(args.out or f"bench/out/learning-{args.method}-{args.task}-s{args.seed}")
    cfg = getattr(module, cls_name)(
        model=args.model, task=args.task, reward=args.reward, total_steps=args.steps, max_minutes=args.minutes,
        max_new_tokens=args.max_new_tokens, output_dir=str(out), seed=args.seed, eval_every=10, eval_prompts=24,
        progress=False, **{**overrides, **({"lr": args.lr} if args.lr else {})},
    )
    t0 = time.time()
    result = module.train(cfg)
    minutes = (time.time() - t0) / 60
    eval_main(["--policy", result["checkpoint"], "--reference", args.model, "--task", args.task, "--judge", "gold",
               "--num-prompts", str(args.eval_prompts), "--max-new-tokens", str(args.max_new_tokens),
               "--seed", str(args.seed + 1), "--out", str(out)])
    e = json.loads((out / "eval.json").read_text())
    d = e["gold"]["difference"]
    print(f"RESULT gold_gain={d['value']:.4f} ci_low={d['ci_low']:.4f} ci_high={d['ci_high']:.4f} "
          f"gold_start={e['gold']['reference']['value']:.4f} gold_end={e['gold']['policy']['value']:.4f} "
          f"win_rate={e['win_rate']['value']:.3f} kl={e['kl']['value']:.3f} steps={result['steps']} "
          f"minutes={minutes:.1f} method={args.method} task={args.task}")


if __name__ == "__main__":
    main()
