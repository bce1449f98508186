"""A simulated annotator: preferences drawn from a task's hidden gold reward, with human-like noise.

AlpacaFarm (Dubois et al. 2023, §3.2) showed that simulated annotators with injected noise rank
methods the way humans do, and that the noise matters: without it, over-optimisation never shows.
For a pair with gold scores g_a, g_b this annotator

1. calls a tie when |g_a - g_b| < ``tie_threshold`` (the difference is below what a reader notices);
2. otherwise draws a Bradley–Terry preference, P(a ≻ b) = σ((g_a - g_b) / ``temperature``)
   (``temperature = 0``: always the higher gold);
3. then flips that choice with probability ``flip_prob`` (AlpacaFarm flips 25% of its training
   labels to match the ~25% disagreement between human annotators).

Randomness is drawn per pair from ``(seed, pair id)``, so a pair gets the same label whatever file
it sits in and in whatever order. The gold scores and the draw are kept in each record's metadata.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from rlhfkit.data.records import ComparisonPair, PreferenceRecord
from rlhfkit.data.tasks import Task, get_task


def pair_gold_scores(pairs: list[ComparisonPair], task: Task | None = None) -> tuple[list[float], list[float]]:
    """Gold scores of the two sides of each pair, by ``task`` or else each pair's own ``task`` field.

    Raises ValueError naming the pair when neither says which task's gold to use.
    """
    by_task: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        name = task.name if task is not None else p.task
        if name is None:
            raise ValueError(f"pair {p.id!r} has no task, so there is no gold reward to label it by; pass --task NAME "
                             "(built-in tasks: see `rlhfkit tasks`)")
        by_task.setdefault(name, []).append(i)
    ga, gb = [0.0] * len(pairs), [0.0] * len(pairs)
    for name, idx in by_task.items():
        t = task if task is not None else get_task(name)
        prompts = [pairs[i].prompt for i in idx]
        for i, a, b in zip(idx, t.gold(prompts, [pairs[i].a["content"] for i in idx]),
                           t.gold(prompts, [pairs[i].b["content"] for i in idx])):
            ga[i], gb[i] = a, b
    return ga, gb


def gold_winner(g_a: float, g_b: float, tie_threshold: float) -> str:
    """'a', 'b' or 'tie' (|g_a - g_b| < tie_threshold) by the gold scores alone."""
    if abs(g_a - g_b) < tie_threshold:
        return "tie"
    return "a" if g_a > g_b else "b"


@dataclass
class SimulatedAnnotator:
    """Labels pairs from gold scores: tie threshold, then a Bradley–Terry draw, then a random flip."""

    task: Task | None = None
    """Task whose gold reward is used; None: each pair's own ``task`` field."""
    temperature: float = 0.05
    """Bradley–Terry temperature in gold units: a gold gap of one temperature is preferred with
    probability σ(1) = 0.73. 0 = always prefer the higher gold (before flips)."""
    flip_prob: float = 0.25
    """Probability of flipping the drawn preference (AlpacaFarm's 25% label noise)."""
    tie_threshold: float = 0.02
    """Gold gaps below this are ties (2% of the [0, 1] gold range)."""
    seed: int = 0
    """Seed combined with each pair's id."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.tie_threshold < 0:
            raise ValueError(f"tie_threshold must be >= 0, got {self.tie_threshold}")

    @property
    def annotator_id(self) -> str:
        return f"simulated(T={self.temperature:g},flip={self.flip_prob:g},tie={self.tie_threshold:g},seed={self.seed})"

    def prob_a(self, g_a: float, g_b: float) -> float:
        """P(a ≻ b) before the flip: σ((g_a - g_b) / temperature)."""
        d = g_a - g_b
        if self.temperature == 0:
            return 1.0 if d > 0 else 0.0 if d < 0 else 0.5
        return 1.0 / (1.0 + math.exp(-max(min(d / self.temperature, 700.0), -700.0)))

    def decide(self, pair_id: str, g_a: float, g_b: float) -> dict:
        """The label of one pair and how it was drawn: winner, p_a, drawn (before flip), flipped."""
        if abs(g_a - g_b) < self.tie_threshold:
            return {"winner": "tie", "p_a": 0.5, "drawn": "tie", "flipped": False}
        rng = np.random.default_rng([self.seed, zlib.crc32(pair_id.encode())])
        u_draw, u_flip = rng.random(2)
        p_a = self.prob_a(g_a, g_b)
        drawn = "a" if u_draw < p_a else "b"
        flipped = bool(u_flip < self.flip_prob)
        winner = {"a": "b", "b": "a"}[drawn] if flipped else drawn
        return {"winner": winner, "p_a": p_a, "drawn": drawn, "flipped": flipped}

    def label(self, pairs: list[ComparisonPair]) -> list[PreferenceRecord]:
        ga, gb = pair_gold_scores(pairs, self.task)
        out = []
        for p, a, b in zip(pairs, ga, gb):
            d = self.decide(p.id, a, b)
            chosen_gold, rejected_gold = (b, a) if d["winner"] == "b" else (a, b)
            out.append(p.label(d["winner"], source="simulated", annotator_id=self.annotator_id, metadata={
                "gold_a": a, "gold_b": b, "gold_chosen": chosen_gold, "gold_rejected": rejected_gold,
                "gold_winner": gold_winner(a, b, self.tie_threshold), "p_a": d["p_a"], "flipped": d["flipped"],
                "task": self.task.name if self.task is not None else p.task,
            }))
        return out

    def expected_agreement(self, g_a: float, g_b: float) -> float:
        """P(the label agrees with the gold order) for a non-tie pair: the accuracy ceiling a perfect
        reward model can reach on this annotator's labels."""
        q = self.prob_a(max(g_a, g_b), min(g_a, g_b))
        return (1 - self.flip_prob) * q + self.flip_prob * (1 - q)
