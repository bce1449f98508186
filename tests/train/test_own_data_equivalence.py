"""A run on your own JSONL prompts with your own ``fn:`` reward is the built-in task run, step for step.

The arith task's rows written to JSONL files (train and held-out) and scored by
``examples/own_data/arith_reward.py:score`` (TRL's signature, reading the ``answer`` column) must give
the same rewards, losses and gradient norms, at every step, as ``--task arith --reward verify:math``
with the same seed: the rows, their order, the sampling and the scores are the same. The tiny
random model never answers right, so a regex format reward on both sides gives the steps a signal
(the gradient then depends on which rows were drawn); the bundled-model run of the same comparison,
where the math reward is not zero, is in docs/rewards.md.
"""

import json
from pathlib import Path

import pytest

from rlhfkit.data.tasks import get_task
from rlhfkit.train import grpo

REWARD_FILE = Path(__file__).resolve().parents[2] / "examples" / "own_data" / "arith_reward.py"
KEYS = ("reward/mean", "loss/policy", "optim/grad_norm", "rollout/length")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"messages": r["messages"], "answer": r["answer"], "id": r["id"]}) + "\n"
                            for r in rows))
    return path


def run(tmp_path: Path, name: str, **kw) -> list[dict]:
    cfg = grpo.GRPOConfig(model="tiny", output_dir=str(tmp_path / name), seed=3, max_steps=2, prompts_per_step=2,
                          samples_per_prompt=4, max_new_tokens=8, eval_every=0, sample_every=0, progress=False,
                          lr=1e-3, **kw)
    grpo.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in KEYS} for r in rows if "loss/policy" in r]


@pytest.mark.slow
def test_own_jsonl_and_fn_reward_equal_the_builtin_task(tmp_path):
    task = get_task("arith")
    train = write_jsonl(tmp_path / "train.jsonl", task.prompt_rows("train"))
    held = write_jsonl(tmp_path / "held.jsonl", task.prompt_rows("heldout")[:8])
    builtin = run(tmp_path, "builtin", task="arith", reward="verify:math,verify:regex=an@0.5")
    own = run(tmp_path, "own", prompts=str(train), eval_prompts_data=str(held), reward=f"fn:{REWARD_FILE}:score,verify:regex=an@0.5")
    assert len(builtin) == 2
    # the format reward gives the random model some signal, so the gradients depend on the rows
    assert any(0 < r["reward/mean"] < 0.5 for r in builtin) and all(r["optim/grad_norm"] > 0 for r in builtin)
    assert own == builtin
