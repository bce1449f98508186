"""Labelling by a trained reward model: the side with the higher score wins, small gaps are ties.

Used to relabel pairs cheaply once a reward model exists (e.g. to grow a preference dataset, or to
compare the RM as an annotator against the gold and the judge on the same pairs).
"""

from __future__ import annotations

from rlhfkit.data.records import ComparisonPair, PreferenceRecord
from rlhfkit.models.heads import RewardModel


def label_with_rm(pairs: list[ComparisonPair], rm: RewardModel, tie_threshold: float = 0.1, batch_size: int = 16,
                  annotator_id: str = "rm") -> list[PreferenceRecord]:
    """Δ = score(a) - score(b) in normalised units (starting-policy std = 1); |Δ| < ``tie_threshold``
    is a tie. An unnormalised RM compares raw head outputs (and warns once)."""
    if tie_threshold < 0:
        raise ValueError(f"tie_threshold must be >= 0, got {tie_threshold}")
    prompts = [p.prompt for p in pairs]
    sa = rm.score(prompts, [p.a["content"] for p in pairs], batch_size=batch_size).tolist()
    sb = rm.score(prompts, [p.b["content"] for p in pairs], batch_size=batch_size).tolist()
    out = []
    for p, a, b in zip(pairs, sa, sb):
        winner = "tie" if abs(a - b) < tie_threshold else ("a" if a > b else "b")
        out.append(p.label(winner, source="rm", annotator_id=annotator_id,
                           metadata={"rm_a": a, "rm_b": b, "rm_tie_threshold": tie_threshold}))
    return out
