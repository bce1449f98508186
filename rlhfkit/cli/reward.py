"""``rlhfkit reward train|eval``: train a Bradley–Terry reward model (``rlhfkit.train.reward``) and
evaluate one on preference records (``rlhfkit.evaluate.reward_model``). docs/reward.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhfkit.config import ConfigError, add_config_arguments, config_from_args
from rlhfkit.evaluate.reward_model import format_summary, reward_model_report
from rlhfkit.models.heads import RewardModel
from rlhfkit.train.reward import REPORT_FILE, RewardConfig, train
from rlhfkit.train.reward_data import read_preferences


def run_dir_of(rm_path: str) -> Path:
    """``runs/X`` for ``runs/X/checkpoints/step-N``, else the RM directory itself."""
    p = Path(rm_path)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit reward train", description="Train a Bradley–Terry reward model on "
                                f"preference records; writes checkpoints/step-N/ and {REPORT_FILE}.")
    add_config_arguments(p, RewardConfig)
    ns = p.parse_args(argv)
    try:
        cfg = config_from_args(RewardConfig, ns)
        if cfg.data is None:
            raise ConfigError("--data is required (preference records, e.g. the output of `rlhfkit label`)")
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    result = train(cfg, report=reward_model_report)
    print(json.dumps(result, indent=2, default=str))
    return 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit reward eval", description="Evaluate a reward model on preference records: "
                                "accuracy vs the labels and, where replies have a gold reward, vs gold, the label "
                                "ceiling and the best-of-K gain, each with a 95% CI over prompts; also accuracy per "
                                "task and category, calibration (ECE), length correlation.")
    p.add_argument("--rm", required=True, help="reward model directory (e.g. runs/X/checkpoints/step-N)")
    p.add_argument("--data", required=True, help="preference records to evaluate on")
    p.add_argument("--output-dir", help=f"where {REPORT_FILE} goes (default: the RM's run directory)")
    p.add_argument("--batch-size", type=int, default=16)
    ns = p.parse_args(argv)
    try:
        rm = RewardModel.load(ns.rm)
        records = [r for _, r in read_preferences(ns.data)]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rlhfkit reward eval: {e}") from None
    report = {"rm": ns.rm, "data": ns.data, **reward_model_report(rm, records, batch_size=ns.batch_size)}
    out_dir = Path(ns.output_dir) if ns.output_dir else run_dir_of(ns.rm)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "calibration"}, indent=2))
    print(format_summary(report))
    print(f"[rlhfkit] wrote {out_dir / REPORT_FILE}")
    return 0


ACTIONS = {"train": train_main, "eval": eval_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="rlhfkit reward", description="Train (Bradley–Terry) or evaluate a reward model.")
    top.add_argument("action", choices=list(ACTIONS))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    action = top.parse_args(argv[:1]).action
    return ACTIONS[action](argv[1:])
