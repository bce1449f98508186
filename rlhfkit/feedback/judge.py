"""An LM judge as a labeler: a pairwise judging prompt to any chat model, asked in both orders.

The scoring core (the prompt template and the read-out of the answer labels' next-token log-probs,
:class:`LMJudge`) lives in ``rlhfkit.rollout.judge_core``, below this layer, so the ``judge:`` reward
components share it; this module turns its log-odds into preference labels. LM judges favour a
position (Zheng et al. 2023, "Judging LLM-as-a-judge", §3.3: position bias); asking with the replies swapped and keeping only
verdicts that survive the swap cancels it. When the two orders disagree the pair is a tie, and the
fraction of such pairs is reported as the judge's position-bias rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from rlhfkit.data.records import ComparisonPair, PreferenceRecord
from rlhfkit.rollout.judge_core import ANSWER_PREFIX, JUDGE_SYSTEM, JUDGE_TEMPLATE, LABEL_SETS, LMJudge

__all__ = ["ANSWER_PREFIX", "JUDGE_SYSTEM", "JUDGE_TEMPLATE", "LABEL_SETS", "LMJudge", "Scorer", "judge_pairs",
           "judge_prefs", "position_stats"]

# items: (prompt messages, reply shown first, reply shown second) -> (N,) log p(first) - log p(second)
Scorer = Callable[[Sequence[tuple[list[dict], str, str]]], torch.Tensor]


def judge_pairs(pairs: list[ComparisonPair], scorer: Scorer, annotator_id: str = "judge") -> list[PreferenceRecord]:
    """Label each pair by asking ``scorer`` with a shown first, then with b shown first.

    With s_ab = log-odds of the first position when a is first and s_ba the same when b is first:
    order 1 votes a iff s_ab > 0, order 2 votes a iff s_ba < 0. Both agree → that side wins; they
    disagree → tie (the verdict followed the position, not the reply). ``p_a`` = ½[σ(s_ab) + σ(-s_ba)].
    """
    items = [(p.prompt, p.a["content"], p.b["content"]) for p in pairs]
    items += [(p.prompt, p.b["content"], p.a["content"]) for p in pairs]
    s = scorer(items)
    if s.shape != (2 * len(pairs),):
        raise ValueError(f"the scorer returned shape {tuple(s.shape)} for {2 * len(pairs)} questions")
    s_ab, s_ba = s[:len(pairs)].tolist(), s[len(pairs):].tolist()
    out = []
    for p, x, y in zip(pairs, s_ab, s_ba):
        vote1, vote2 = ("a" if x > 0 else "b"), ("a" if y < 0 else "b")
        winner = vote1 if vote1 == vote2 else "tie"
        p_a = 0.5 * (_sigmoid(x) + _sigmoid(-y))
        out.append(p.label(winner, source="judge", annotator_id=annotator_id, metadata={
            "judge_logodds_ab": x, "judge_logodds_ba": y, "p_a": p_a, "position_consistent": vote1 == vote2,
            "first_position_votes": int(x > 0) + int(y > 0),
        }))
    return out


def judge_prefs(scorer: Scorer, prompts: list[list[dict]], a: list[str], b: list[str]) -> list[float]:
    """Per-prompt preference for ``a[i]`` over ``b[i]``: 1, 0, or 0.5 for a tie (the two orders disagreed).
    Identical or empty replies leave nothing to judge and count as ties without asking."""
    prefs = [0.5] * len(prompts)
    pairs = [ComparisonPair(id=str(i), prompt=p, a={"role": "assistant", "content": x},
                            b={"role": "assistant", "content": y})
             for i, (p, x, y) in enumerate(zip(prompts, a, b)) if x != y and x.strip() and y.strip()]
    for pair, rec in zip(pairs, judge_pairs(pairs, scorer)):
        prefs[int(pair.id)] = 0.5 if rec.tie else 1.0 if rec.chosen["content"] == pair.a["content"] else 0.0
    return prefs


def position_stats(records: list[PreferenceRecord]) -> dict:
    """Position-bias rate (fraction of pairs whose verdict flipped with the order) and the fraction of
    single verdicts that chose whichever reply was shown first (0.5 = no preference for a position)."""
    n = len(records)
    if n == 0:
        return {"position_bias_rate": None, "first_position_rate": None}
    inconsistent = sum(not r.metadata["position_consistent"] for r in records)
    first = sum(r.metadata["first_position_votes"] for r in records)
    return {"position_bias_rate": inconsistent / n, "first_position_rate": first / (2 * n)}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 700.0), -700.0)))
