"""``rlhfkit.evaluate.policy`` from Python: the spec checks run before any model loads.
(Sampling and judging end to end are tests/cli/test_eval_cli.py's.)"""

from __future__ import annotations

import pytest

from rlhfkit.data.tasks import get_task
from rlhfkit.evaluate.policy import default_eval_dir, eval_policy, parse_eval_specs, parse_policy


def test_policy_specs():
    assert parse_policy("tiny") == ("tiny", 1) and parse_policy("bon:4:runs/x") == ("runs/x", 4)
    assert parse_eval_specs("bon:2:tiny", judge="lm:tiny", proxy="rm:rm") == ("tiny", 2)
    for spec, kwargs, message in [
        ("bon:0:tiny", {}, "best-of-N needs bon:N:MODEL with N >= 1"),
        ("bon:2:", {}, "best-of-N needs bon:N:MODEL"),
        ("bon:2:tiny", {}, "best-of-N needs --proxy"),
        ("tiny", {"judge": "human"}, "--judge human: use gold, rm:PATH or lm:MODEL"),
        ("tiny", {"proxy": "lm:tiny"}, "--proxy lm:tiny: use gold or rm:PATH"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_eval_specs(spec, **kwargs)


def test_an_lm_judge_must_be_passed_in():
    """evaluate/ may not import feedback/ (a sibling): the caller builds the LM judge."""
    with pytest.raises(ValueError, match="pass lm_judge"):
        eval_policy("tiny", get_task("sentiment"), judge="lm:tiny")


def test_default_eval_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    assert default_eval_dir("ckpt") == default_eval_dir("bon:3:ckpt") == tmp_path.joinpath("ckpt").relative_to(tmp_path)
    assert str(default_eval_dir("tiny")) == "."
