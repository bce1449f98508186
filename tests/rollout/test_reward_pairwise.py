"""``judge:MODEL:pairwise``: the judge compares the policy's reply with the reference policy's reply to
the same prompt in both orders; the reward is P(policy's reply preferred), the two orders averaged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhfkit.rollout.reward_components import PairwiseJudge, ReferenceReplies, judge_mode, pairwise_scores
from rlhfkit.rollout.rewards import RewardSource, parse_reward_spec

CPU = torch.device("cpu")
P1 = [{"role": "user", "content": "Say hi."}]
P2 = [{"role": "user", "content": "Name a colour."}]


class BiasedJudge:
    """Log-odds of the reply shown first = len(first) - len(second) + 1.5: prefers longer replies and,
    by 1.5 nats, whichever is shown first (a position bias the two orders must cancel). Records every item."""

    def __init__(self):
        self.items = []

    def __call__(self, items):
        self.items += list(items)
        return torch.tensor([len(a) - len(b) + 1.5 for _, a, b in items])


def test_the_spec_parses_and_bad_specs_error():
    assert parse_reward_spec("judge:tiny:pairwise@0.5, judge:tiny") == [
        ("judge", 0.5, "tiny:pairwise"), ("judge", 1.0, "tiny")]
    assert judge_mode("tiny:pairwise") == ("tiny", "pairwise")
    assert judge_mode("org/model") == ("org/model", "pointwise")
    assert judge_mode("tiny:pointwise") == ("tiny", "pointwise")
    with pytest.raises(ValueError, match=r"^reward: 'judge:tiny:pairwsie': unknown judge mode 'pairwsie'"):
        parse_reward_spec("judge:tiny:pairwsie")
    with pytest.raises(ValueError, match=r"^reward: 'judge::pairwise': no judge model"):
        parse_reward_spec("judge::pairwise")


def test_both_orders_are_asked_and_the_score_averages_them_by_hand():
    """Reply 'abcd' vs reference 'ab': reply first s1 = 4 - 2 + 1.5 = 3.5, reference first s2 = 2 - 4 + 1.5
    = -0.5; score = ½[σ(3.5) + σ(0.5)] = ½[0.970688 + 0.622459] = 0.796574."""
    judge = BiasedJudge()
    s = pairwise_scores(judge, [P1], ["abcd"], ["ab"])
    assert judge.items == [(P1, "abcd", "ab"), (P1, "ab", "abcd")]
    assert s.item() == pytest.approx(0.5 * (torch.sigmoid(torch.tensor(3.5)) + torch.sigmoid(torch.tensor(0.5))).item(),
                                     abs=1e-6)
    assert s.item() == pytest.approx(0.796574, abs=1e-5)


def test_the_score_is_symmetric_in_the_swap_and_an_equal_reply_scores_one_half():
    judge = BiasedJudge()
    replies, refs = ["abcd", "x", "same"], ["ab", "longer one", "same"]
    forward = pairwise_scores(judge, [P1, P2, P1], replies, refs)
    swapped = pairwise_scores(judge, [P1, P2, P1], refs, replies)
    torch.testing.assert_close(forward + swapped, torch.ones(3))
    assert forward[2].item() == pytest.approx(0.5)  # the position bias alone cancels exactly
    # one order only would have favoured the first position: σ(1.5) = 0.82 for the equal pair
    assert forward[0] > 0.5 > forward[1]


def test_the_component_uses_the_attached_reference_and_errors_without_one():
    judge = BiasedJudge()
    component = PairwiseJudge("fake", CPU, judge=judge)
    r = SimpleNamespace(prompts=[P1, P2], completions=["hello there", "red"])
    with pytest.raises(RuntimeError, match="judge:fake:pairwise needs the reference policy's replies"):
        component(r)
    component.attach_reference(lambda prompts: ["hi" if p is P1 else "a colour" for p in prompts])
    s = component(r)
    assert judge.items[:2] == [(P1, "hello there", "hi"), (P2, "red", "a colour")]
    assert judge.items[2:] == [(P1, "hi", "hello there"), (P2, "a colour", "red")]
    assert s[0] > 0.5 > s[1]


def test_reference_replies_are_greedy_and_cached_per_prompt(tiny):
    model, tok = tiny
    refs = ReferenceReplies(model, tok, max_new_tokens=6)
    calls = []
    sample = refs.sampler.sample
    refs.sampler.sample = lambda prompts, **kw: calls.append(len(prompts)) or sample(prompts, **kw)
    first = refs([P1, P2, P1])
    assert calls == [2] and first[0] == first[2]  # the repeated prompt is generated once
    again = refs([P2, P1])
    assert calls == [2] and again == [first[1], first[0]]  # from the cache
    fresh = ReferenceReplies(model, tok, max_new_tokens=6)([P1, P2])
    assert fresh == first[:2]  # greedy: the same replies every time


def test_pairwise_reward_source_with_the_tiny_model(tiny):
    """End to end: the spec builds a PairwiseJudge over the tiny judge; attach_reference((model, tok, n))
    makes greedy reference replies; scores in (0, 1); the reference's own reply scores exactly 0.5."""
    model, tok = tiny
    source = RewardSource("judge:tiny:pairwise", None, CPU)
    assert source.needs_reference and source.names == ["judge_pairwise"]
    source.attach_reference((model, tok, 6))
    ref_replies = ReferenceReplies(model, tok, max_new_tokens=6)([P1, P2])
    r = SimpleNamespace(prompts=[P1, P2], completions=["Hello! How can I help?", ref_replies[1]],
                        completion_ids=None, extras={})
    total, parts = source.score(r)
    assert total.shape == (2,) and bool(((total > 0) & (total < 1)).all())
    assert total[1].item() == pytest.approx(0.5, abs=1e-6)
    assert not RewardSource("judge:tiny", None, CPU).needs_reference


def test_attach_reference_is_a_no_op_without_a_pairwise_judge():
    """A trainer may attach its reference to any reward: a spec without judge:...:pairwise and a
    reward_fn(rollout) ignore it (nothing is built, nothing is called)."""
    from rlhfkit.rollout.rewards import CustomReward

    called = []
    source = RewardSource("verify:regex=^a", None, CPU)
    source.attach_reference(lambda prompts: called.append(prompts))
    custom = CustomReward(lambda r: [1.0])
    custom.attach_reference(lambda prompts: called.append(prompts))
    assert not source.needs_reference and not custom.needs_reference
    assert source(SimpleNamespace(prompts=[P1], completions=["abc"], extras={})).tolist() == [1.0] and not called
