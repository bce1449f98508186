"""``rlhfkit label PAIRS --labeler simulated|judge|rm --out PREFS``: turn comparison pairs into preferences.

Every labeler is scored on the same pairs against the gold labels of the pairs' task (AlpacaEval's
annotator table: agreement with the reference labels, plus length and position biases), printed as
a table and written as JSON next to the output (``--report``).

Agreement: over pairs whose gold gap is at least ``--gold-tie-threshold``, the fraction the labeler
calls for the gold winner, a labeler tie counting ½ (as a coin flip would score).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlhfkit.data.records import ComparisonPair, DataError, PreferenceRecord

LABELERS = ("simulated", "judge", "rm")


def agreement_stats(pairs: list[ComparisonPair], records: list[PreferenceRecord], gold: tuple[list, list] | None,
                    gold_tie_threshold: float) -> dict:
    """Agreement with the gold labels, tie rate and preference for the longer reply."""
    from rlhfkit.feedback.simulated import gold_winner

    winners = [_winner(p, r) for p, r in zip(pairs, records)]
    n = len(pairs)
    out: dict = {"pairs": n, "tie_rate": sum(w == "tie" for w in winners) / max(n, 1)}
    longer = [(w, len(p.a["content"]) > len(p.b["content"])) for p, w in zip(pairs, winners)
              if w != "tie" and len(p.a["content"]) != len(p.b["content"])]
    out["prefers_longer"] = sum((w == "a") == a_longer for w, a_longer in longer) / len(longer) if longer else None
    if gold is None:
        out.update(agreement=None, gold_decided=0, gold_prefers_longer=None)
        return out
    gw = [gold_winner(a, b, gold_tie_threshold) for a, b in zip(*gold)]
    decided = [(w, g) for w, g in zip(winners, gw) if g != "tie"]
    out["gold_decided"] = len(decided)
    out["agreement"] = (sum(1.0 if w == g else 0.5 if w == "tie" else 0.0 for w, g in decided) / len(decided)
                        if decided else None)
    glonger = [(g, len(p.a["content"]) > len(p.b["content"])) for p, g in zip(pairs, gw)
               if g != "tie" and len(p.a["content"]) != len(p.b["content"])]
    out["gold_prefers_longer"] = sum((g == "a") == al for g, al in glonger) / len(glonger) if glonger else None
    return out


def _winner(pair: ComparisonPair, rec: PreferenceRecord) -> str:
    if rec.tie:
        return "tie"
    return "a" if rec.chosen["content"] == pair.a["content"] else "b"


def format_table(rows: list[dict]) -> str:
    cols = [("labeler", "labeler", "{}"), ("pairs", "pairs", "{}"), ("agreement", "agree w/ gold", "{:.3f}"),
            ("tie_rate", "ties", "{:.3f}"), ("prefers_longer", "prefers longer", "{:.3f}"),
            ("position_bias_rate", "position bias", "{:.3f}"), ("seconds_per_1000", "s / 1000 pairs", "{:.1f}")]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
    from rlhfkit.data.io import load_pairs, save_preferences
    from rlhfkit.data.tasks import get_task
    from rlhfkit.feedback.simulated import SimulatedAnnotator, gold_scores

    try:
        task = get_task(args.task) if args.task else None
        pairs = load_pairs(args.pairs)
    except (DataError, ValueError) as e:
        raise SystemExit(f"rlhfkit label: {e}") from None
    if not pairs:
        raise SystemExit(f"rlhfkit label: {args.pairs}: no pairs")
    _check_unique_ids(pairs, args.pairs)

    # gold scores for the agreement column (any labeler), when a task is known for every pair
    try:
        gold = gold_scores(pairs, task) if task is not None or all(p.task for p in pairs) else None
    except ValueError as e:
        raise SystemExit(f"rlhfkit label: {e}") from None
    row: dict = {"labeler": args.labeler}
    t0 = time.perf_counter()
    if args.labeler == "simulated":
        if gold is None:
            missing = next(p for p in pairs if not p.task)
            raise SystemExit(f"rlhfkit label: pair {missing.id!r} in {args.pairs} has no task, so the simulated "
                             "annotator has no gold reward to label it by; pass --task NAME")
        tie = 0.02 if args.tie_threshold is None else args.tie_threshold
        try:
            annotator = SimulatedAnnotator(task=task, temperature=args.temperature, flip_prob=args.flip_prob,
                                           tie_threshold=tie, seed=args.seed)
        except ValueError as e:
            parser.error(str(e))
        records = annotator.label(pairs)
        row["labeler"] = annotator.annotator_id
        row["flip_rate"] = sum(r.metadata["flipped"] for r in records) / len(records)
    elif args.labeler == "judge":
        from rlhfkit.feedback.judge import LMJudge, judge_pairs, position_stats

        try:
            judge = LMJudge.from_name(args.judge_model, labels=args.judge_labels, batch_size=args.batch_size)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"rlhfkit label: {e}") from None
        records = judge_pairs(pairs, judge, annotator_id=f"judge:{args.judge_model}")
        row["labeler"] = f"judge ({args.judge_model})"
        row.update(position_stats(records))
    else:
        from rlhfkit.feedback.rm import label_with_rm
        from rlhfkit.models.heads import RewardModel

        if not args.rm:
            parser.error("--labeler rm needs --rm PATH (a reward model directory from `rlhfkit reward train`)")
        try:
            rm = RewardModel.load(args.rm)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"rlhfkit label: {e}") from None
        tie = 0.1 if args.tie_threshold is None else args.tie_threshold
        records = label_with_rm(pairs, rm, tie_threshold=tie, batch_size=args.batch_size, annotator_id=f"rm:{args.rm}")
        row["labeler"] = f"rm ({args.rm})"
    seconds = time.perf_counter() - t0
    row.update(agreement_stats(pairs, records, gold, args.gold_tie_threshold))
    row["seconds_per_1000"] = seconds / len(pairs) * 1000

    save_preferences(args.out, records)
    report_path = Path(args.report) if args.report else Path(args.out).with_suffix(".report.json")
    report = {"pairs_file": args.pairs, "out": args.out, "labeler": args.labeler, **row}
    report_path.write_text(json.dumps(report, indent=2))
    print(format_table([row]))
    print(json.dumps(report))
    return 0


def _check_unique_ids(pairs: list[ComparisonPair], path: str) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(pairs, 1):
        if p.id in seen:
            raise SystemExit(f"rlhfkit label: {path}: pair id {p.id!r} appears twice (rows {seen[p.id]} and {i}); "
                             "ids must be unique so labels can be traced back to their pair")
        seen[p.id] = i


if __name__ == "__main__":
    import sys

    sys.exit(main())
