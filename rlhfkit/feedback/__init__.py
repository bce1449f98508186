"""Labelers that turn comparison pairs into preference records: a simulated annotator with a hidden
gold reward and human-like noise (``simulated``), an LM judge read from answer-token log-probs and
asked in both orders (``judge``), and a trained reward model (``rm``). ``labeling`` runs one of them and
scores it against the gold labels; ``rlhfkit label`` is ``rlhfkit/cli/label.py``."""

from rlhfkit.feedback.judge import LMJudge, judge_pairs, judge_prefs, position_stats
from rlhfkit.feedback.labeling import LABELERS, label_pairs, write_labels
from rlhfkit.feedback.simulated import SimulatedAnnotator, gold_winner, pair_gold_scores

__all__ = ["LABELERS", "LMJudge", "SimulatedAnnotator", "gold_winner", "judge_pairs", "judge_prefs", "label_pairs",
           "pair_gold_scores", "position_stats", "write_labels"]
