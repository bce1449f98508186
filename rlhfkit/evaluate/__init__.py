"""Evaluation: rliable statistics, head-to-head win rates, overoptimization fits, HTML report.

See docs/evaluation.md for what each statistic means and where it comes from.
"""

from rlhfkit.evaluate.compare import compare_runs, final_value, format_compare
from rlhfkit.evaluate.overopt import (
    bon_kl,
    find_turnover,
    fit_bon,
    fit_rl,
    gold_bon,
    gold_rl,
    overopt_summary,
)
from rlhfkit.evaluate.report import write_report
from rlhfkit.evaluate.stats import (
    Estimate,
    bootstrap_ci,
    iqm,
    performance_profile,
    probability_of_improvement,
    probability_of_improvement_ci,
    stratified_bootstrap_ci,
)
from rlhfkit.evaluate.winrate import (
    distinct_n,
    evaluate_pairs,
    format_table,
    length_controlled_win_rate,
    length_stats,
    sequence_kl_estimate,
    win_rate,
)

__all__ = [
    "Estimate",
    "bootstrap_ci",
    "bon_kl",
    "compare_runs",
    "distinct_n",
    "evaluate_pairs",
    "final_value",
    "find_turnover",
    "fit_bon",
    "fit_rl",
    "format_compare",
    "format_table",
    "gold_bon",
    "gold_rl",
    "iqm",
    "length_controlled_win_rate",
    "length_stats",
    "overopt_summary",
    "performance_profile",
    "probability_of_improvement",
    "probability_of_improvement_ci",
    "sequence_kl_estimate",
    "stratified_bootstrap_ci",
    "win_rate",
    "write_report",
]
