"""Label comparison pairs with one of the labelers and score it against the gold labels.

Every labeler is scored on the same pairs against the gold labels of the pairs' task (AlpacaEval's
annotator table: agreement with the reference labels, plus length and position biases).

Agreement: over pairs whose gold gap is at least ``gold_tie_threshold``, the fraction the labeler
calls for the gold winner, a labeler tie counting ½ (as a coin flip would score). ``rlhfkit label``
(``rlhfkit/cli/label.py``) and the demo call ``label_pairs`` and ``write_labels``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhfkit.data.io import save_preferences
from rlhfkit.data.records import ComparisonPair, DataError, PreferenceRecord
from rlhfkit.data.tasks import Task
from rlhfkit.feedback.judge import LMJudge, judge_pairs, position_stats
from rlhfkit.feedback.rm import label_with_rm
from rlhfkit.feedback.simulated import SimulatedAnnotator, gold_winner, pair_gold_scores
from rlhfkit.models.heads import RewardModel

LABELERS = ("simulated", "judge", "rm")
SIMULATED_TIE_THRESHOLD = 0.02
"""Default tie threshold of the simulated annotator, in gold units (2% of the [0, 1] range)."""
RM_TIE_THRESHOLD = 0.1
"""Default tie threshold of the reward-model labeler, in normalised score units."""


class LabelerOptionError(ValueError):
    """A labeler's option is missing or out of range (a usage error, not a problem with the data)."""


def label_pairs(pairs: list[ComparisonPair], labeler: str, *, task: Task | None = None, source: str = "the pairs",
                seed: int = 0, temperature: float = 0.05, flip_prob: float = 0.25, tie_threshold: float | None = None,
                gold_tie_threshold: float = 0.02, judge_model: str = "smollm2-135m-instruct", judge_labels: str = "AB",
                rm_path: str | None = None, batch_size: int = 8) -> tuple[list[PreferenceRecord], dict]:
    """Label ``pairs`` with ``labeler`` (simulated, judge or rm); returns the records and the labeler's
    row of the annotator table (agreement with gold, ties, length and position biases, speed).

    ``task``: whose gold reward labels (simulated) or scores the labels (all labelers); None: each
    pair's own task. ``source`` names the pairs in error messages. ``tie_threshold``: simulated, the
    gold gap below which a pair is a tie (default 0.02); rm, the score gap (default 0.1).
    """
    check_unique_ids(pairs, source)
    # gold scores for the agreement column (any labeler), when a task is known for every pair
    gold = pair_gold_scores(pairs, task) if task is not None or all(p.task for p in pairs) else None
    row: dict = {"labeler": labeler}
    t0 = time.perf_counter()
    if labeler == "simulated":
        if gold is None:
            missing = next(p for p in pairs if not p.task)
            raise ValueError(f"pair {missing.id!r} in {source} has no task, so the simulated annotator has no gold "
                             "reward to label it by; pass --task NAME")
        tie = SIMULATED_TIE_THRESHOLD if tie_threshold is None else tie_threshold
        try:
            annotator = SimulatedAnnotator(task=task, temperature=temperature, flip_prob=flip_prob,
                                           tie_threshold=tie, seed=seed)
        except ValueError as e:
            raise LabelerOptionError(str(e)) from None
        records = annotator.label(pairs)
        row["labeler"] = annotator.annotator_id
        row["flip_rate"] = sum(r.metadata["flipped"] for r in records) / len(records)
    elif labeler == "judge":
        judge = LMJudge.from_name(judge_model, labels=judge_labels, batch_size=batch_size)
        records = judge_pairs(pairs, judge, annotator_id=f"judge:{judge_model}")
        row["labeler"] = f"judge ({judge_model})"
        row.update(position_stats(records))
    elif labeler == "rm":
        if not rm_path:
            raise LabelerOptionError("--labeler rm needs --rm PATH (a reward model directory from `rlhfkit reward "
                                     "train`)")
        rm = RewardModel.load(rm_path)
        tie = RM_TIE_THRESHOLD if tie_threshold is None else tie_threshold
        records = label_with_rm(pairs, rm, tie_threshold=tie, batch_size=batch_size, annotator_id=f"rm:{rm_path}")
        row["labeler"] = f"rm ({rm_path})"
    else:
        raise LabelerOptionError(f"unknown labeler {labeler!r}; choose from {', '.join(LABELERS)}")
    seconds = time.perf_counter() - t0
    row.update(agreement_stats(pairs, records, gold, gold_tie_threshold))
    row["seconds_per_1000"] = seconds / len(pairs) * 1000
    return records, row


def write_labels(out: str | Path, records: list[PreferenceRecord], row: dict, *, pairs_file: str, labeler: str,
                 report: str | Path | None = None) -> dict:
    """Save the records to ``out`` and the annotator-table row as JSON to ``report`` (default: OUT with
    the suffix .report.json); returns that report."""
    save_preferences(out, records)
    report_path = Path(report) if report else Path(out).with_suffix(".report.json")
    content = {"pairs_file": str(pairs_file), "out": str(out), "labeler": labeler, **row}
    report_path.write_text(json.dumps(content, indent=2))
    return content


def check_unique_ids(pairs: list[ComparisonPair], source: str) -> None:
    """Labels are traced back to their pair by id: two pairs with one id are an error."""
    seen: dict[str, int] = {}
    for i, p in enumerate(pairs, 1):
        if p.id in seen:
            raise DataError(f"{source}: pair id {p.id!r} appears twice (rows {seen[p.id]} and {i}); ids must be "
                            "unique so labels can be traced back to their pair")
        seen[p.id] = i


def agreement_stats(pairs: list[ComparisonPair], records: list[PreferenceRecord], gold: tuple[list, list] | None,
                    gold_tie_threshold: float) -> dict:
    """Agreement with the gold labels, tie rate and preference for the longer reply."""
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


def annotator_table(rows: list[dict]) -> str:
    """The annotator table, one row per labeler, for the console."""
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
