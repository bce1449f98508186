"""``rlhfkit label PAIRS --labeler simulated|judge|rm --out PREFS``: turn comparison pairs into preferences.

The command line of ``rlhfkit.feedback.labeling``: every labeler is scored on the same pairs against
the gold labels of the pairs' task, printed as a table and written as JSON next to the output
(``--report``).
"""

from __future__ import annotations

import argparse
import json

from rlhfkit.data.io import load_pairs
from rlhfkit.data.records import DataError
from rlhfkit.data.tasks import get_task
from rlhfkit.feedback.labeling import LABELERS, LabelerOptionError, annotator_table, label_pairs, write_labels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfkit label", description="Label comparison pairs (from `rlhfkit sample`) "
                                "with a simulated annotator, an LM judge or a reward model.")
    p.add_argument("pairs", help="comparison pairs file (.jsonl/.json/.parquet) as written by `rlhfkit sample`")
    p.add_argument("--labeler", required=True, choices=LABELERS)
    p.add_argument("--out", required=True, help="output preference records (.jsonl or .parquet)")
    p.add_argument("--report", help="annotator-table JSON (default: OUT with suffix .report.json)")
    p.add_argument("--task", help="task whose gold reward labels (simulated) or scores the labels (all labelers); "
                   "default: each pair's own task")
    p.add_argument("--seed", type=int, default=0, help="simulated: random seed")
    p.add_argument("--temperature", type=float, default=0.05, help="simulated: Bradley-Terry temperature (gold units)")
    p.add_argument("--flip-prob", type=float, default=0.25, help="simulated: probability of flipping a preference")
    p.add_argument("--tie-threshold", type=float, default=None,
                   help="simulated: gold gap below which a pair is a tie (default 0.02); rm: score gap in "
                        "normalised units (default 0.1)")
    p.add_argument("--gold-tie-threshold", type=float, default=0.02,
                   help="gold gap below which a pair has no gold winner and is left out of the agreement")
    p.add_argument("--judge-model", default="smollm2-135m-instruct", help="judge: causal chat LM")
    p.add_argument("--judge-labels", default="AB", choices=["AB", "12"], help="judge: answer labels")
    p.add_argument("--rm", help="rm: reward model directory (from `rlhfkit reward train`)")
    p.add_argument("--batch-size", type=int, default=8, help="judge/rm: sequences per forward pass")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        task = get_task(args.task) if args.task else None
        pairs = load_pairs(args.pairs)
    except (DataError, ValueError) as e:
        raise SystemExit(f"rlhfkit label: {e}") from None
    if not pairs:
        raise SystemExit(f"rlhfkit label: {args.pairs}: no pairs")
    try:
        records, row = label_pairs(
            pairs, args.labeler, task=task, source=args.pairs, seed=args.seed, temperature=args.temperature,
            flip_prob=args.flip_prob, tie_threshold=args.tie_threshold, gold_tie_threshold=args.gold_tie_threshold,
            judge_model=args.judge_model, judge_labels=args.judge_labels, rm_path=args.rm, batch_size=args.batch_size)
    except LabelerOptionError as e:
        parser.error(str(e))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rlhfkit label: {e}") from None
    report = write_labels(args.out, records, row, pairs_file=args.pairs, labeler=args.labeler, report=args.report)
    print(annotator_table([row]))
    print(json.dumps(report))
    return 0
