"""Evaluation: rliable statistics (stats), head-to-head win rates (winrate), overoptimization fits
(overopt), multi-seed comparison (compare), gold-reward measurement (gold), `rlhfkit eval` (policy),
reward-model reports (reward_model) and the HTML report (report, report_html, report_plots).

Import from the module that holds a function (``from rlhfkit.evaluate.report import write_report``):
the package itself imports nothing, so that a trainer reaching for ``evaluate.gold`` does not load
matplotlib and every other evaluation module with it. See docs/evaluation.md for what each statistic
means and where it comes from.
"""
