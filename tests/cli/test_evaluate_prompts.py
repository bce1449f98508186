"""`rlhfkit eval --prompts PATH [--split heldout --eval-fraction F] --reward SPEC`: the user's prompts read
as the trainers read them, and the configured reward (fn:, verify:, judge:, judge:MODEL:pairwise) scored
on the policy's and the reference's replies, with the rows' columns."""

from __future__ import annotations

import json

import pytest

from rlhfkit.cli import main
from rlhfkit.data.prompt_data import load_prompt_rows, split_held_out
from rlhfkit.train.online_config import SPLIT_SEED

FAST = ["--policy", "tiny", "--reference", "tiny", "--max-new-tokens", "6"]


def prompts_file(tmp_path, n=4, answers=None):
    answers = answers or [str(i + 1) for i in range(n)]
    rows = [{"prompt": f"What is {i} + 1?", "answer": a} for i, a in enumerate(answers)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, *args) -> dict:
    out = tmp_path / "out"
    assert main(["eval", *FAST, *args, "--out", str(out)]) == 0
    return json.loads((out / "eval.json").read_text())


def test_a_function_reward_gets_the_columns_and_none_is_left_out(tmp_path, capsys):
    """score = the row's answer as a number, None for the row whose answer is 'skip': the policy's mean
    over the scored rows is (1 + 2 + 4) / 3 = 7/3 whatever the replies say; 1 of 4 unscored, so no
    paired proxy block (it needs every reply scored) and no win rate (no task, no judge)."""
    src = prompts_file(tmp_path, answers=["1", "2", "skip", "4"])
    fn = tmp_path / "my_reward.py"
    fn.write_text("def score(prompts, completions, answer, **kwargs):\n"
                  "    return [None if a == 'skip' else float(a) for a in answer]\n")
    d = run(tmp_path, "--prompts", str(src), "--reward", f"fn:{fn}:score")
    assert d["n_prompts"] == 4 and d["meta"]["task"] is None and d["meta"]["judge"] is None
    assert d["meta"]["prompts"] == str(src) and d["meta"]["split"] == "all" and d["meta"]["reward"] == f"fn:{fn}:score"
    for side in ("policy", "reference"):
        block = d["reward"][side]
        assert block["mean"] == pytest.approx(7 / 3) and block["unscored_frac"] == 0.25
        assert block["components"]["score"] == {"mean": pytest.approx(7 / 3), "none_frac": 0.25}
    assert d["proxy"] is None and d["win_rate"] is None and d["gold"] is None


def test_verify_math_fills_the_proxy_block_on_the_heldout_split(tmp_path, capsys):
    """--split heldout --eval-fraction 0.25 of 8 prompts: the 2 prompts the trainers' split holds out;
    verify:math scores every reply (0 or 1), so the proxy block and the win rate come from it."""
    src = prompts_file(tmp_path, n=8)
    _, held = split_held_out(load_prompt_rows(str(src)), 0.25, SPLIT_SEED)
    d = run(tmp_path, "--prompts", str(src), "--split", "heldout", "--eval-fraction", "0.25", "--reward", "verify:math")
    assert d["n_prompts"] == len(held) == 2
    assert d["meta"]["split"] == "heldout" and d["meta"]["eval_fraction"] == 0.25
    assert d["proxy"] is not None and d["win_rate"]["source"] == "proxy"
    assert 0 <= d["reward"]["policy"]["mean"] <= 1 and d["reward"]["policy"]["unscored_frac"] == 0


def test_pairwise_judge_reward_and_a_task_adds_gold(tmp_path, capsys):
    src = prompts_file(tmp_path, n=2)
    d = run(tmp_path, "--prompts", str(src), "--task", "concise", "--reward", "judge:tiny:pairwise@1,verify:math@0")
    assert d["meta"]["task"] == "concise" and d["meta"]["judge"] == "gold" and d["win_rate"]["source"] == "gold"
    parts = d["reward"]["policy"]["components"]
    assert set(parts) == {"judge_pairwise", "verify_math"} and 0 < parts["judge_pairwise"]["mean"] < 1


@pytest.mark.parametrize("args, message", [
    (["--reward", "fn:nowhere.py:score"], "reward: 'fn:nowhere.py:score': file not found"),
    (["--reward", "fn:PATH:nope"], "reward: 'fn:PATH:nope': no function 'nope'"),
])
def test_bad_rewards_exit_1_naming_the_spec(tmp_path, capsys, args, message):
    src = prompts_file(tmp_path)
    fn = tmp_path / "r.py"
    fn.write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    args = [a.replace("PATH", str(fn)) for a in args]
    assert main(["eval", *FAST, "--prompts", str(src), *args, "--out", str(tmp_path / "o")]) == 1
    assert message.replace("PATH", str(fn)) in capsys.readouterr().err


def test_a_verifier_without_answers_and_a_bad_row_exit_1(tmp_path, capsys):
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["eval", *FAST, "--prompts", str(src), "--reward", "verify:math", "--out", str(tmp_path / "o")]) == 1
    assert "reward 'verify:math' needs the 'answer' column" in capsys.readouterr().err
    src.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"messages": "hi"}) + "\n")
    assert main(["eval", *FAST, "--prompts", str(src), "--reward", "verify:regex=x", "--out", str(tmp_path / "o")]) == 1
    assert "q.jsonl:2: field 'messages'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--judge", "gold"], "gold needs --task"),
    (["--eval-fraction", "0.2"], "--eval-fraction needs --split heldout or train"),
    (["--reward", "judge:tiny:pairwize"], "unknown judge mode 'pairwize'"),
    (["--reward", "verify:math", "--proxy", "rm:x"], "give --proxy or --reward, not both"),
])
def test_bad_options_exit_2(tmp_path, capsys, args, message):
    src = prompts_file(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["eval", *FAST, "--prompts", str(src), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_split_without_prompts_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["eval", *FAST, "--split", "heldout"])
    assert "--split and --eval-fraction choose among --prompts" in capsys.readouterr().err


def test_best_of_n_picks_by_the_reward(tmp_path, capsys):
    """bon:2:tiny against tiny, same seed: the policy's first sample is the reference's sample, so picking
    the longer of two by the reward (reply length) can only match or beat it on every prompt."""
    src = prompts_file(tmp_path, n=4)
    fn = tmp_path / "length.py"
    fn.write_text("def length(completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "bon"
    assert main(["eval", "--policy", "bon:2:tiny", "--reference", "tiny", "--max-new-tokens", "6", "--prompts",
                 str(src), "--reward", f"fn:{fn}:length", "--out", str(out)]) == 0
    d = json.loads((out / "eval.json").read_text())
    assert d["meta"]["best_of_n"] == 2 and d["win_rate"]["source"] == "proxy" and d["win_rate"]["n_losses"] == 0
    assert d["reward"]["policy"]["mean"] >= d["reward"]["reference"]["mean"]
