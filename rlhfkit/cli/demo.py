"""``rlhfkit demo``: the command line of ``rlhfkit.pipelines.demo`` (the whole RLHF loop, offline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhfkit.pipelines import demo
from rlhfkit.tracking import default_run_dir


def build_parser() -> argparse.ArgumentParser:
    d = demo.DemoOptions()
    ap = argparse.ArgumentParser(prog="rlhfkit demo", description=demo.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default=d.task, help="built-in task with a hidden gold reward (`rlhfkit tasks`)")
    ap.add_argument("--methods", default=d.methods, help=f"comma list of {', '.join(demo.METHODS)}")
    ap.add_argument("--quick", action="store_true", help="small sizes (<= 3 min), e.g. for CI")
    ap.add_argument("--resume", metavar="DIR", help="continue an interrupted demo run directory")
    ap.add_argument("--output-dir", help="run directory (default runs/demo-<time>)")
    ap.add_argument("--model", default=d.model, help="starting policy")
    ap.add_argument("--lr", type=float, default=d.lr, help="learning rate of the RL methods")
    ap.add_argument("--rollout-backend", default=d.rollout_backend, choices=("hf", "fast", "auto"),
                    help="generation backend of the RL methods (docs/generation.md)")
    ap.add_argument("--seed", type=int, default=d.seed)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    options = demo.DemoOptions(task=args.task, methods=args.methods, quick=args.quick, model=args.model, lr=args.lr,
                               rollout_backend=args.rollout_backend, seed=args.seed)
    try:
        options.method_list()
    except ValueError as e:
        ap.error(str(e))
    root = Path(args.resume or args.output_dir or default_run_dir("demo"))
    if args.resume and not (root / "state.json").exists():
        ap.error(f"--resume {root}: not a demo run directory (no state.json)")
    return demo.run(options, root, resume=bool(args.resume))
