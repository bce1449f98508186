"""The offline trainers' shared machinery (rlhfkit.train.offline): the epoch order and its prompt
groups, the held-out split, the step plan, and when the end-of-step tail evaluates, logs and saves.
The accumulation loop's invariance (1 x 8 == 8 x 1, two processes == one) is tested through each
trainer: tests/train/test_sft.py, test_dpo.py, test_reward.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from rlhfkit.train.offline import Steps, end_of_step, global_batches, plan, split_off_eval


def test_global_batches_are_a_seeded_permutation_with_the_tail_dropped():
    batches = global_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4, 4]  # 10 // 4 full batches; the last 2 examples wait
    order = np.concatenate(batches)
    assert len(set(order.tolist())) == 8 and set(order.tolist()) <= set(range(10))
    again = global_batches(10, 4, seed=3, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # every process, every resume
    assert not np.array_equal(order, np.concatenate(global_batches(10, 4, seed=3, epoch=1)))


def test_groups_stay_together_in_their_order():
    """Three prompts with 3, 1 and 2 pairs: the groups are shuffled, each group's pairs stay
    consecutive and in data order (the reward model's group_by_prompt)."""
    groups = ["a", "b", "a", "c", "a", "c"]
    (order,) = global_batches(6, 6, seed=0, epoch=0, groups=groups)
    runs = [groups[i] for i in order]
    assert sorted(runs) == sorted(groups)
    assert len([k for k, prev in zip(runs, [None] + runs) if k != prev]) == 3  # one run per group
    for key in "abc":
        members = [i for i in order.tolist() if groups[i] == key]
        assert members == sorted(members)


def test_split_off_eval_rounds_down_or_to_nearest():
    train, held = split_off_eval(list(range(10)), 0.25, seed=0)
    assert len(held) == 2 and len(train) == 8 and sorted(train + held) == list(range(10))
    _, held = split_off_eval(list(range(10)), 0.25, seed=0, rounding=round)
    assert len(held) == 2  # round(2.5) = 2 (banker's rounding), as the reward model always did
    _, held = split_off_eval(list(range(10)), 0.27, seed=0, rounding=round)
    assert len(held) == 3
    assert split_off_eval(list(range(10)), 0.0, seed=0) == (list(np.random.default_rng(0).permutation(10)), [])


def config(**kw):
    base = dict(data="d.jsonl", batch_size=8, epochs=2.0, max_steps=None, stop_at_step=None, eval_every=3,
                log_every=2, save_every=None)
    return SimpleNamespace(**{**base, **kw})


def test_plan_counts_steps_and_refuses_sizes_that_do_not_divide():
    steps = plan(20, config(), num_processes=2, what="pairs", micro_batch_size=2)
    assert (steps.local_batch_size, steps.accumulation, steps.per_epoch, steps.total, steps.last) == (4, 2, 2, 4, 4)
    assert plan(20, config(stop_at_step=3), 1, "pairs", None).last == 3
    assert plan(20, config(max_steps=7), 1, "pairs", None).total == 7
    with pytest.raises(ValueError, match="batch_size / processes"):
        plan(20, config(), num_processes=3, what="pairs", micro_batch_size=None)
    with pytest.raises(ValueError, match=r"batch_size / \(micro_batch_size x processes\)"):
        plan(20, config(), num_processes=2, what="pairs", micro_batch_size=3)
    with pytest.raises(ValueError, match="d.jsonl: 5 pairs, fewer than one batch of 8"):
        plan(5, config(), num_processes=1, what="pairs", micro_batch_size=None)


class FakeRun:
    def __init__(self):
        self.logged, self.advanced = [], 0

    def log(self, step, metrics):
        self.logged.append(step)

    def advance(self):
        self.advanced += 1


@pytest.mark.parametrize("save_last, saved_at", [(True, [4, 5]), (False, [4])])
def test_end_of_step_evaluates_logs_and_saves_when_due(save_last, saved_at):
    """Schedule of 6 steps stopped at 5: eval every 3 steps (and at the schedule's end, not reached),
    log every 2 and at the stop, save every 4 and at the stop unless save_last is False."""
    cfg = config(save_every=4)
    steps = Steps(batch_size=8, local_batch_size=8, accumulation=None, per_epoch=6, total=6, last=5)
    run, evals, saves = FakeRun(), [], []
    sched = SimpleNamespace(get_last_lr=lambda: [0.5])
    for step in range(1, 6):
        metrics = {}
        out = end_of_step(run, step, metrics, steps, cfg, sched, grad_norm=None,
                          evaluate=lambda: evals.append(step) or {"eval/x": 1.0},
                          save=lambda: saves.append(step) or f"ckpt-{step}", save_last=save_last)
        assert (out is not None) == (step in saved_at)
        assert metrics["optim/lr"] == 0.5 and metrics["train/epoch"] == step / 6
    assert evals == [3] and run.logged == [2, 4, 5] and run.advanced == 5 and saves == saved_at
