"""``rlhfkit eval``, ``rlhfkit report`` and ``rlhfkit compare``: parse, call ``rlhfkit.evaluate``, print.

``eval`` samples a policy and a reference on the same held-out prompts (``evaluate.policy.eval_policy``)
and writes ``eval.json`` plus a console table; ``report`` writes the HTML report of run directories;
``compare`` compares two groups of runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def eval_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlhfkit eval", description="win rate of a policy over a reference, with CIs")
    ap.add_argument("--policy", required=True, help="model dir/name, or bon:N:MODEL for best-of-N by --proxy")
    ap.add_argument("--reference", default="smollm2-135m-instruct", help="model dir/name (default: the bundled model)")
    ap.add_argument("--task", default=None, help="built-in task: held-out prompts and the gold reward (default "
                    "sentiment without --prompts; with --prompts it only adds its gold reward)")
    ap.add_argument("--prompts", default=None, metavar="PATH_OR_HUB_ID",
                    help="evaluate on your prompts, read as the trainers' --prompts read them (docs/rewards.md)")
    ap.add_argument("--split", default="all", choices=["all", "heldout", "train"],
                    help="with --prompts: every row, or the heldout / train side of the trainers' held-out split "
                    "(--eval-fraction)")
    ap.add_argument("--eval-fraction", type=float, default=None,
                    help="with --split heldout|train: the fraction held out, as `rlhfkit grpo --prompts PATH "
                    "--eval-fraction F` (default: the trainers' 0.1)")
    ap.add_argument("--judge", default=None, help="who decides each pair: gold, rm:PATH or lm:MODEL (default: gold "
                    "with a task, else none: the win rate comes from --reward/--proxy)")
    ap.add_argument("--proxy", default=None, help="proxy reward to report (and pick best-of-N): rm:PATH or gold")
    ap.add_argument("--reward", default=None, help="a trainer's reward spec (fn:, verify:, judge:MODEL[:pairwise], "
                    "rm:, gold; weighted list) scored on both sides, in the proxy's place (docs/rewards.md)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output dir for eval.json (default: the policy dir if it is one, else .)")
    args = ap.parse_args(argv)
    # torch and transformers load once the options parse (`rlhfkit eval --help` stays fast)
    from rlhfkit.data.records import DataError
    from rlhfkit.data.tasks import get_task
    from rlhfkit.evaluate.policy import default_eval_dir, eval_policy, eval_prompt_rows, parse_eval_specs
    from rlhfkit.evaluate.winrate import format_table
    from rlhfkit.feedback.judge import LMJudge, judge_prefs
    from rlhfkit.models.loading import ModelNotFoundError
    from rlhfkit.tracking import write_json

    if args.prompts is None and (args.split != "all" or args.eval_fraction is not None):
        ap.error("--split and --eval-fraction choose among --prompts; a task is evaluated on its held-out split")
    if args.eval_fraction is not None and args.split == "all":
        ap.error("--eval-fraction needs --split heldout or train")
    task_name = args.task or (None if args.prompts else "sentiment")
    judge = args.judge or ("gold" if task_name else None)
    try:
        task = get_task(task_name) if task_name else None
        parse_eval_specs(args.policy, judge, args.proxy, args.reward)
        if task is None and (judge == "gold" or args.proxy == "gold"):
            raise ValueError("gold needs --task; with your own prompts use --judge rm:PATH|lm:MODEL or --reward")
    except ValueError as e:
        ap.error(str(e))

    def lm_judge(prompts, a, b):  # the judge model loads only once both policies have been sampled
        return judge_prefs(LMJudge.from_name(judge[3:]), prompts, a, b)

    try:
        rows, meta = None, None
        if args.prompts is not None:
            from rlhfkit.train.online_config import (  # the trainers' held-out split
                DEFAULT_EVAL_FRACTION,
                SPLIT_SEED,
            )

            fraction = DEFAULT_EVAL_FRACTION if args.eval_fraction is None else args.eval_fraction
            rows = eval_prompt_rows(args.prompts, args.split, fraction, SPLIT_SEED)
            meta = {"prompts": args.prompts, "split": args.split,
                    **({"eval_fraction": fraction} if args.split != "all" else {})}
        result = eval_policy(args.policy, task, reference=args.reference, judge=judge, proxy=args.proxy,
                             num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed,
                             lm_judge=lm_judge if judge is not None and judge.startswith("lm:") else None,
                             prompt_rows=rows, reward=args.reward, meta=meta)
    except ValueError as e:
        # a bad prompt row (DataError), split or reward spec ('reward: ...': a missing function, a column
        # the rows lack) is the user's input: the message says which, no traceback; anything else is a bug
        if not isinstance(e, DataError) and not str(e).startswith(("reward", "--eval-fraction")):
            raise
        print(f"rlhfkit eval: error: {e}", file=sys.stderr)
        return 1
    except ModelNotFoundError as e:
        # a missing model or bad data is the user's input, and the message says which: no traceback
        print(f"rlhfkit eval: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else default_eval_dir(args.policy)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    print(format_table(result))
    print(f"wrote {out / 'eval.json'}")
    return 0


def report_main(argv: list[str]) -> int:
    from rlhfkit.evaluate.report import write_report

    ap = argparse.ArgumentParser(prog="rlhfkit report", description="one self-contained HTML report for runs")
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--out", default=None, help="HTML file (default: RUN/report.html for one run, else report.html)")
    ap.add_argument("--title", default="rlhfkit report")
    args = ap.parse_args(argv)
    for r in args.runs:
        if not Path(r).is_dir():
            ap.error(f"{r}: not a run directory")
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else Path("report.html"))
    print(write_report([Path(r) for r in args.runs], out, title=args.title))
    return 0


def compare_main(argv: list[str]) -> int:
    from rlhfkit.evaluate.compare import compare_runs, format_compare

    ap = argparse.ArgumentParser(prog="rlhfkit compare", usage="rlhfkit compare [--metric M] RUNS_A... -- RUNS_B...",
                                 description="IQM with stratified bootstrap CIs and P(A > B) over groups of runs "
                                 "(strata: each run's task)")
    ap.add_argument("runs_a", nargs="+")
    ap.add_argument("--metric", default="eval/gold", help="metric compared: its last value in each run")
    if "--" not in argv:
        ap.parse_args(argv)  # --help exits 0 here
        ap.error("separate the two groups of runs with --")
    i = argv.index("--")
    args = ap.parse_args(argv[:i])
    runs_b = argv[i + 1:]
    if not runs_b:
        ap.error("no runs after --")
    print(format_compare(compare_runs([Path(r) for r in args.runs_a], [Path(r) for r in runs_b], metric=args.metric)))
    return 0
