"""GRPO's advantage variants (rlhfkit.train.grpo.ADVANTAGES): each name runs its own estimator from
rlhfkit.losses.advantages, the KL goes into the reward only when asked, and an unknown name is an
error (it used to fall through to REINFORCE++). Learning and resume: tests/train/test_online.py."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.losses.advantages import group_advantages, leave_one_out_advantages, reinforce_pp_advantages
from rlhfkit.losses.kl import kl_shaped_rewards
from rlhfkit.rollout.engine import Rollout
from rlhfkit.train import dynamic_sampling, grpo

SCORES = torch.tensor([1.0, 0.0, 2.0, 2.0])  # two groups of K = 2
MASK = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])


def rollout(logps=None, ref_logps=None) -> Rollout:
    return Rollout(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
                   completion_ids=torch.zeros(4, 3, dtype=torch.long), completion_mask=MASK, scores=SCORES,
                   logps=logps, ref_logps=ref_logps)


def test_the_table_names_exactly_the_documented_variants():
    assert list(grpo.ADVANTAGES) == ["group", "dr_grpo", "loo", "reinforce_pp"]


@pytest.mark.parametrize("name,expected", [
    # group 1: scores (1, 0): mean 0.5, std 0.7071 -> ±0.5 / (0.7071 + 1e-4); group 2: equal scores -> 0
    ("group", group_advantages(SCORES, 2, scale=True)),
    ("dr_grpo", torch.tensor([0.5, -0.5, 0.0, 0.0])),
    ("loo", torch.tensor([1.0, -1.0, 0.0, 0.0])),
])
def test_sequence_variants_broadcast_their_estimator_over_the_tokens(name, expected):
    adv = grpo.compute_advantages(rollout(), grpo.GRPOConfig(advantage=name, samples_per_prompt=2, beta=0.0))
    torch.testing.assert_close(adv, expected[:, None].expand(4, 3) * MASK)


def test_reinforce_pp_whitens_the_returns_of_the_scores():
    adv = grpo.compute_advantages(rollout(), grpo.GRPOConfig(advantage="reinforce_pp", beta=0.0))
    rewards = kl_shaped_rewards(SCORES, torch.zeros(4, 3), MASK, 0.0)
    torch.testing.assert_close(adv, reinforce_pp_advantages(rewards, MASK))


def test_kl_in_reward_penalises_each_sequence_by_its_summed_kl():
    """k1 KL per token = logp - ref = 0.5 on every real token: sequences of 3, 2, 1, 3 tokens lose beta x
    (1.5, 1.0, 0.5, 1.5) = (0.15, 0.1, 0.05, 0.15) of their score before the leave-one-out baseline;
    padding (ref -inf there) never counts."""
    logps = torch.zeros(4, 3)
    ref = torch.where(MASK, torch.full((4, 3), -0.5), torch.full((4, 3), float("-inf")))
    cfg = grpo.GRPOConfig(advantage="loo", samples_per_prompt=2, kl_in_reward=True, beta=0.1, kl_estimator="k1")
    adv = grpo.compute_advantages(rollout(logps, ref), cfg)
    penalised = SCORES - torch.tensor([0.15, 0.1, 0.05, 0.15])
    torch.testing.assert_close(adv, leave_one_out_advantages(penalised, 2)[:, None].expand(4, 3) * MASK)


def test_an_unknown_advantage_is_an_error_not_reinforce_pp():
    with pytest.raises(ValueError, match="advantage must be one of group, dr_grpo, loo, reinforce_pp, got 'typo'"):
        grpo.GRPOConfig(advantage="typo")
    cfg = grpo.GRPOConfig(samples_per_prompt=2)
    cfg.advantage = "typo"  # set after construction: the table lookup still refuses it
    with pytest.raises(ValueError, match="advantage must be one of"):
        grpo.compute_advantages(rollout(), cfg)


# --- the policy loss by name, DAPO's dynamic sampling and overlong shaping ----------------------------

def test_an_unknown_loss_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="loss must be one of ppo_clip, gspo, cispo, got 'grpo'"):
        grpo.GRPOConfig(loss="grpo")


@pytest.mark.parametrize("kw,message", [
    (dict(dynamic_sampling=True, samples_per_prompt=1, advantage="reinforce_pp"),
     "dynamic_sampling needs samples_per_prompt >= 2"),
    (dict(dynamic_sampling_rounds=-1), "dynamic_sampling_rounds must be >= 0, got -1"),
    (dict(overlong_buffer=49, max_new_tokens=48), r"overlong_buffer must be in \[0, max_new_tokens=48\], got 49"),
    (dict(overlong_buffer=-1), "overlong_buffer must be in"),
    (dict(overlong_penalty=-0.5), "overlong_penalty must be >= 0, got -0.5"),
])
def test_dapo_fields_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        grpo.GRPOConfig(**kw)


def fake_round(scores, width, tag):
    """A scored rollout of len(scores) rows, prompts of `width` tokens (tag-filled), completions of
    width + 1 tokens, the last row's completion one token shorter (padding to check)."""
    B = len(scores)
    cmask = torch.ones(B, width + 1, dtype=torch.bool)
    cmask[-1, -1] = False
    return Rollout(prompt_ids=torch.full((B, width), tag), prompt_mask=torch.ones(B, width, dtype=torch.bool),
                   completion_ids=torch.where(cmask, tag, 0), completion_mask=cmask,
                   prompts=[f"p{tag}.{i}" for i in range(B)], completions=[f"c{tag}.{i}" for i in range(B)],
                   ended=torch.ones(B, dtype=torch.bool), scores=torch.tensor(scores),
                   logps=torch.full((B, width + 1), -1.0), extras={"raw_scores": torch.tensor(scores)})


def test_dynamic_sampling_drops_equal_groups_and_refills_in_order():
    """K = 2, 3 groups wanted. Round 0: (1,1) dropped, (0,1) kept, (0,0) dropped; round 1: (1,0) kept,
    (1,1) dropped, (0,1) kept -> 3 kept, stop. Dropped 3 of 6 groups; 1 refill round; no filler;
    raw mean over all 12 samples = (3 + 4) / 12."""
    rounds = [fake_round([1., 1., 0., 1., 0., 0.], 2, 7), fake_round([1., 0., 1., 1., 0., 1.], 3, 8),
              fake_round([0., 1.] * 3, 1, 9)]
    calls = []
    r, m = dynamic_sampling.fill(lambda j: calls.append(j) or rounds[j], groups=3, k=2, rounds=3, pad_id=5)
    assert calls == [0, 1]
    assert r.prompts == ["p7.2", "p7.3", "p8.0", "p8.1", "p8.4", "p8.5"]
    assert r.scores.tolist() == [0., 1., 1., 0., 0., 1.]
    assert m == {"sampling/dropped_frac": 0.5, "sampling/rounds": 1.0, "sampling/filler_frac": 0.0,
                 "sampling/reward_all": pytest.approx(7 / 12)}
    # the padded layout: prompts left-padded to 3 with the pad id, completions right-padded to 4
    assert r.prompt_ids[0].tolist() == [5, 7, 7] and r.prompt_mask[0].tolist() == [False, True, True]
    assert r.completion_ids[1].tolist() == [7, 7, 7, 5] and r.completion_mask[1].tolist() == [True, True, True, False]
    assert r.completion_mask[5].tolist() == [True, True, True, False]
    assert r.logps[0].tolist() == [-1.0, -1.0, -1.0, 0.0]


def test_dynamic_sampling_tops_up_with_dropped_groups_when_the_rounds_run_out():
    """Every group equal: after round 0 and the 1 allowed refill the batch is the first dropped groups."""
    rounds = [fake_round([1., 1., 0., 0.], 2, 7), fake_round([3., 3., 2., 2.], 2, 8)]
    r, m = dynamic_sampling.fill(lambda j: rounds[j], groups=2, k=2, rounds=1, pad_id=0)
    assert r.prompts == ["p7.0", "p7.1", "p7.2", "p7.3"]
    assert m["sampling/dropped_frac"] == 1.0 and m["sampling/filler_frac"] == 1.0 and m["sampling/rounds"] == 1.0


def test_refill_rounds_have_their_own_positions_and_seeds():
    rounds = 3
    seen = {dynamic_sampling.refill_index(step, j, rounds) for step in range(50) for j in range(1, rounds + 1)}
    assert len(seen) == 150 and min(seen) == 0  # distinct for every (step, round)
    assert dynamic_sampling.REFILL_OFFSET > 100_000  # past any real step of a run
    assert dynamic_sampling.refill_seed(0) != dynamic_sampling.refill_seed(1)


# --- learning: the new losses move the toy reward up, and down on the negated reward -------------------

@pytest.fixture(scope="module")
def token_set():
    from toy_rl import make_token_set

    return make_token_set()


def toy_run(tmp_path, name, token_set, sign, **kw):
    from toy_rl import ToyTask, frac_in_set

    base = dict(model="tiny:0.5", task="toy", total_steps=12, prompts_per_step=4, samples_per_prompt=4,
                max_new_tokens=8, temperature=1.0, missing_eos_penalty=None, eval_every=0, progress=False,
                lr=5e-2, beta=0.0, output_dir=str(tmp_path / f"{name}{sign:+d}"), rollout_backend="hf")
    grpo.train(grpo.GRPOConfig(**{**base, **kw}), reward_fn=lambda r: sign * frac_in_set(token_set, r), task=ToyTask())
    return [json.loads(line) for line in open(tmp_path / f"{name}{sign:+d}" / "metrics.jsonl")]


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
def test_gspo_and_cispo_learn_the_toy_reward_and_its_negation(tmp_path, token_set, loss):
    """Two epochs over mini-batches of 8, so the policy moves away from the sampler within a step and
    the ratio differs from 1 (where the three losses would coincide). The run on the negated reward
    must move the other way: a flipped sign fails one of the two."""
    kw = dict(loss=loss, epochs_per_step=2, mini_batch_size=8, aggregation="seq_mean")
    up = [r["reward/mean"] for r in toy_run(tmp_path, loss, token_set, +1, **kw)]
    down = [-r["reward/mean"] for r in toy_run(tmp_path, loss, token_set, -1, **kw)]
    start = (up[0] + down[0]) / 2
    assert sum(up[-3:]) / 3 > start + 0.25, up
    assert sum(down[-3:]) / 3 < start - 0.05, down


def test_dynamic_sampling_and_overlong_shaping_run_and_log(tmp_path, token_set):
    """A 0/1 reward (more than half the tokens in S) leaves some groups all equal: they are dropped and
    refilled, the batch keeps its 16 rows, and the sampling/ and overlong metrics are logged."""
    from toy_rl import ToyTask, frac_in_set

    cfg = grpo.GRPOConfig(model="tiny:0.5", task="toy", total_steps=2, prompts_per_step=4, samples_per_prompt=4,
                          max_new_tokens=8, temperature=1.0, missing_eos_penalty=None, eval_every=0, progress=False,
                          lr=1e-2, beta=0.0, dynamic_sampling=True, dynamic_sampling_rounds=2, overlong_buffer=4,
                          overlong_penalty=0.5, output_dir=str(tmp_path / "ds"), rollout_backend="hf")
    grpo.train(cfg, reward_fn=lambda r: (frac_in_set(token_set, r) > 0.5).float(), task=ToyTask())
    rows = [json.loads(line) for line in open(tmp_path / "ds" / "metrics.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= row["sampling/dropped_frac"] <= 1.0 and row["sampling/rounds"] in (0.0, 1.0, 2.0)
        assert -0.5 <= row["reward/overlong_penalty"] <= 0.0
        assert row["reward/score_mean"] == pytest.approx(row["reward/mean"] + row["reward/overlong_penalty"], abs=1e-5)
    assert any(row["sampling/dropped_frac"] > 0 for row in rows), rows


def test_dynamic_sampling_resume_refills_as_the_uninterrupted_run(tmp_path, token_set):
    """Refill prompts and seeds are functions of (seed, step, round): stop after 1 step, resume to 2,
    and step 2 drops, refills and scores exactly as in 2 steps straight."""
    from toy_rl import ToyTask, frac_in_set

    def run(out, steps, resume=None):
        cfg = grpo.GRPOConfig(model="tiny:0.5", task="toy", total_steps=2, max_steps=steps, prompts_per_step=2,
                              samples_per_prompt=4, max_new_tokens=6, temperature=1.0, missing_eos_penalty=None,
                              eval_every=0, progress=False, lr=1e-2, beta=0.0, lr_schedule="constant",
                              dynamic_sampling=True, dynamic_sampling_rounds=2, output_dir=str(out), resume=resume,
                              rollout_backend="hf")
        grpo.train(cfg, reward_fn=lambda r: (frac_in_set(token_set, r) > 0.5).float(), task=ToyTask())

    run(tmp_path / "straight", 2)
    run(tmp_path / "split", 1)
    run(tmp_path / "split", 2, resume="auto")
    rows = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl")]  # noqa: E731
    straight, split = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2]
    for key in ("reward/mean", "sampling/dropped_frac", "sampling/rounds", "sampling/reward_all", "loss/policy"):
        assert straight[1][key] == pytest.approx(split[1][key], abs=1e-5), key
