"""rlhfkit.rollout.rewards: the `reward` spec grammar and its errors, the fn:/verify:/judge: sources, None
and per-component scores (reward-model scoring itself: tests/test_reward_model.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.data.prompt_data import load_prompt_rows
from rlhfkit.data.records import DataError
from rlhfkit.rollout.rewards import (
    CustomReward,
    FunctionReward,
    RewardSource,
    is_rollout_fn,
    load_function,
    make_reward,
    parse_reward_spec,
)


def test_parse_reward_spec():
    assert parse_reward_spec("gold") == [("gold", 1.0, None)]
    assert parse_reward_spec(" rm:runs/rm@1.5 , gold@-0.5 ") == [("rm", 1.5, "runs/rm"), ("gold", -0.5, None)]


@pytest.mark.parametrize("spec,match", [("", "empty spec"), (" , ", "empty spec"), ("bleu", "unknown source 'bleu'"),
                                        ("rm:", "unknown source 'rm:'"), ("gold@x", "bad weight 'x'"),
                                        ("gold@inf", "not finite")])
def test_bad_reward_specs_name_the_field(spec, match):
    with pytest.raises(ValueError, match=f"^reward: .*{match}"):
        parse_reward_spec(spec)


def test_gold_source_scores_with_the_task_and_custom_reward_returns_float_cpu():
    task = SimpleNamespace(gold=lambda prompts, completions: [len(c) for c in completions])
    r = SimpleNamespace(prompts=[[], []], completions=["ab", "abcd"])
    source = RewardSource("gold@0.5", task, torch.device("cpu"))
    assert source.uses_gold_only and source(r).tolist() == [1.0, 2.0]
    out = CustomReward(lambda r: [1, 2])(r)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and not CustomReward.uses_gold_only


# --- the new sources: fn:, verify:, judge:; None; per-component scores --------------------------------

CPU = torch.device("cpu")


def test_parse_the_new_sources_and_a_regex_with_commas_and_at():
    assert parse_reward_spec("fn:my.mod:score@2, verify:math@0.5, judge:smollm2-135m-instruct") == [
        ("fn", 2.0, "my.mod:score"), ("verify", 0.5, "math"), ("judge", 1.0, "smollm2-135m-instruct")]
    assert parse_reward_spec("fn:rewards/my.py:f") == [("fn", 1.0, "rewards/my.py:f")]
    assert parse_reward_spec(r"verify:regex=^\d{1,3}$@0.2,gold") == [("verify", 0.2, r"regex=^\d{1,3}$"),
                                                                       ("gold", 1.0, None)]
    assert parse_reward_spec("verify:regex=a@b") == [("verify", 1.0, "regex=a@b")]   # '@b' is not a weight


@pytest.mark.parametrize("spec,match", [("fn:score", "not fn:MODULE:NAME"), ("fn:m:1x", "not fn:MODULE:NAME"),
                                        ("verify:maths", "unknown source 'verify:maths'"),
                                        ("verify:regex=(", "bad pattern"), ("judge:", "unknown source 'judge:'")])
def test_bad_new_specs_name_the_field(spec, match):
    with pytest.raises(ValueError, match=f"^reward: .*{match}"):
        parse_reward_spec(spec)


def rollout(rows, completions):
    """A Rollout stand-in: K=1, one completion per row, token ids 1..n."""
    n = len(completions)
    return SimpleNamespace(prompts=[r.messages for r in rows], completions=completions, extras={"rows": rows},
                           completion_ids=torch.arange(1, 3 * n + 1).view(n, 3),
                           completion_mask=torch.tensor([[True, True, False]] * n))


ROWS = [{"prompt": "What is 2+2?", "answer": "4", "id": "q1"},
        {"prompt": [{"role": "user", "content": "3+3?"}], "answer": "6", "category": "easy"}]


def test_a_trl_function_gets_prompts_completions_ids_and_columns_as_trl_passes_them():
    seen = {}

    def score(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [1.0, None]

    r = rollout(load_prompt_rows(ROWS), ["four", "six"])
    assert FunctionReward(score)(r).tolist()[0] == 1.0 and math.isnan(FunctionReward(score)(r).tolist()[1])
    assert seen["prompts"] == ["What is 2+2?", [{"role": "user", "content": "3+3?"}]]         # as the rows gave them
    assert seen["completions"] == ["four", [{"role": "assistant", "content": "six"}]]         # conversational: a message
    assert seen["completion_ids"] == [[1, 2], [4, 5]]                                          # padding dropped
    assert seen["answer"] == ["4", "6"] and seen["id"] == ["q1", None] and seen["category"] == [None, "easy"]


def test_a_function_without_kwargs_gets_only_what_it_names():
    def exact(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    r = rollout(load_prompt_rows([{"prompt": "a", "answer": "x"}, {"prompt": "b", "answer": "y"}]), ["x", "z"])
    assert FunctionReward(exact)(r).tolist() == [1.0, 0.0]
    assert FunctionReward(exact).needs() == {"answer"}


def test_weighted_total_sums_the_components_that_scored_and_none_everywhere_is_unscored(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def half(prompts, completions, **kw):\n    return [0.5, None, None]\n"
        "def ones(prompts, completions, **kw):\n    return [1, 1, None]\n")
    source = make_reward(f"fn:{tmp_path}/my_rewards.py:half@2,fn:{tmp_path}/my_rewards.py:ones@-1", None, None, CPU)
    r = rollout(load_prompt_rows([{"prompt": p} for p in "abc"]), ["x", "y", "z"])
    total, parts = source.score(r)
    # sample 0: 2 x 0.5 - 1 x 1 = 0; sample 1: only 'ones' scored it: -1; sample 2: no component: NaN (unscored)
    assert total[:2].tolist() == [0.0, -1.0] and math.isnan(total[2])
    assert list(parts) == ["half", "ones"] and parts["ones"][:2].tolist() == [1.0, 1.0]


def test_fn_by_module_path_and_missing_module_file_or_function(tmp_path, monkeypatch):
    (tmp_path / "pkg_rewards").mkdir()
    (tmp_path / "pkg_rewards" / "__init__.py").write_text("")
    (tmp_path / "pkg_rewards" / "math_rw.py").write_text("def score(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_function("pkg_rewards.math_rw:score", "fn:pkg_rewards.math_rw:score").__name__ == "score"
    with pytest.raises(ValueError, match=r"'fn:nope_mod:score': cannot import module 'nope_mod'"):
        make_reward("fn:nope_mod:score", None, None, CPU)
    with pytest.raises(ValueError, match=r"'fn:pkg_rewards.math_rw:scor': no function 'scor' in module "
                                         r"pkg_rewards.math_rw .*it defines: score"):
        make_reward("fn:pkg_rewards.math_rw:scor", None, None, CPU)
    with pytest.raises(ValueError, match=r"'fn:nowhere/r.py:score': file not found: .*nowhere/r.py"):
        make_reward("fn:nowhere/r.py:score", None, None, CPU)


def test_a_function_that_raises_is_named_with_the_row_that_fails():
    def picky(prompts, completions, answer, **kw):
        return [float(int(a) > 0) for a in answer]

    rows = load_prompt_rows([{"prompt": "a", "answer": "1", "id": "ok"}, {"prompt": "b", "answer": "x", "id": "bad"}])
    with pytest.raises(RuntimeError, match=r"reward function 'picky' raised ValueError: invalid literal .* on prompt 1 "
                                           r"of the batch, the row at prompts: row 1 \(id 'bad'\)"):
        FunctionReward(picky)(rollout(rows, ["c", "d"]))


@pytest.mark.parametrize("out,match", [([1.0], "returned 1 scores for 2 completions"),
                                       ([1.0, "high"], r"returned 'high' \(str\) for completion 1"),
                                       ([1.0, float("nan")], r"returned nan \(float\) for completion 1"),
                                       (3.0, "returned float, expected a list")])
def test_wrong_length_or_non_numbers_are_named(out, match):
    def bad(prompts, completions, **kw):
        return out

    with pytest.raises(ValueError, match=f"reward function 'bad' {match}"):
        FunctionReward(bad)(rollout(load_prompt_rows([{"prompt": "a"}, {"prompt": "b"}]), ["c", "d"]))


def test_verifiers_score_and_a_missing_answer_column_is_named_at_start_up():
    rows = load_prompt_rows(ROWS)
    source = make_reward(r"verify:math,verify:regex=^\w+$@0.5", None, None, CPU)
    source.check(rows)
    total, parts = source.score(rollout(rows, ["so \\boxed{4}", "five"]))
    assert parts["verify_math"].tolist() == [1.0, 0.0] and parts["verify_regex"].tolist() == [0.0, 1.0]
    assert total.tolist() == [1.0, 0.5]
    with pytest.raises(DataError, match=r"prompts: row 1: field 'answer': reward 'verify:math' needs the 'answer' column"):
        source.check(load_prompt_rows([{"prompt": "a", "answer": "1"}, {"prompt": "b"}]))


def test_gold_without_a_task_is_an_error():
    with pytest.raises(ValueError, match="'gold' needs a task"):
        make_reward("gold", None, None, CPU)


def test_a_rollout_function_and_trl_functions_are_told_apart():
    assert is_rollout_fn(lambda r: r) and not is_rollout_fn(lambda prompts, completions, **kw: [])
    assert not is_rollout_fn([lambda prompts, completions: []]) and not is_rollout_fn(lambda **kw: [])


def test_judge_scores_in_zero_one_from_yes_no_log_probs(tiny):
    from rlhfkit.rollout.rewards import PointwiseJudge

    judge = PointwiseJudge("tiny", CPU)
    rows = load_prompt_rows([{"prompt": "Say hi."}, {"prompt": "Name a colour."}])
    s = judge(rollout(rows, ["Hi!", "Blue."]))
    assert s.shape == (2,) and bool(((s > 0) & (s < 1)).all())
    # by hand for the first reply: sigmoid(logsumexp log p(Yes variants) - logsumexp log p(No variants))
    enc = judge.tok([judge.render(rows[0].messages, "Hi!")], add_special_tokens=False, return_tensors="pt")
    logp = judge.model(**enc).logits[0, -1].log_softmax(-1)
    expected = torch.sigmoid(logp[judge.yes].logsumexp(-1) - logp[judge.no].logsumexp(-1))
    assert s[0].item() == pytest.approx(expected.item(), abs=1e-5)
