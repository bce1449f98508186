"""Labelers that turn comparison pairs into preference records: a simulated annotator with a hidden
gold reward and human-like noise (``simulated``), an LM judge read from answer-token log-probs and
asked in both orders (``judge``), and a trained reward model (``rm``). ``rlhfkit label`` is ``cli``."""

from rlhfkit.feedback.judge import LMJudge, judge_pairs, position_stats
from rlhfkit.feedback.simulated import SimulatedAnnotator, gold_scores, gold_winner

__all__ = ["LMJudge", "SimulatedAnnotator", "gold_scores", "gold_winner", "judge_pairs", "position_stats"]
