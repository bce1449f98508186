"""What the offline trainers (sft, dpo, reward) share: the held-out split, the step counts, the epoch
order cut into global batches, the accumulation loop, the end-of-step tail, and their configs' checks.

The methods keep their data, their micro-batch loss and their metrics; this file is plumbing only.

Batch vocabulary (one for every rlhfkit method): ``batch_size`` examples per optimizer step across
all processes; each process takes ``local_batch_size = batch_size / processes`` of them and runs them
in micro-batches (``micro_batch_size`` examples each for SFT and DPO; at most that many for the reward
model, whose rows keep a prompt's pairs together).

Loss normalisation: a step's loss is a *sum* over the global batch divided by one global denominator
(its example count, or for SFT its loss-token count), never a mean of micro-batch means. So
micro-batch 1 x accumulation 8 equals 8 x 1 and two processes equal one (the gradient-accumulation bug
TRL/transformers fixed in 2024 came from averaging per micro-batch).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhfkit.config import check_choice
from rlhfkit.ops import exact_div
from rlhfkit.train import runtime

LR_SCHEDULES = ("cosine", "linear", "constant")


# --- config checks ---------------------------------------------------------------------------------


def check_at_least(cfg, minimum: float, *names: str) -> None:
    """Raise ValueError naming the field for a value below ``minimum`` (None counts as unset)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def check_fraction(cfg, name: str, *, one_allowed: bool) -> None:
    """``name`` in [0, 1] (``one_allowed``) or [0, 1)."""
    value = getattr(cfg, name)
    if not (0 <= value <= 1 if one_allowed else 0 <= value < 1):
        raise ValueError(f"{name} must be in [0, 1{']' if one_allowed else ')'}, got {value!r}")


def check_offline_config(cfg) -> None:
    """The checks every offline config's ``validate`` shares: the schedule, sizes, rates and fractions."""
    check_choice(cfg, "lr_schedule", LR_SCHEDULES)
    check_at_least(cfg, 1, "batch_size", "micro_batch_size", "eval_every", "stop_at_step")
    check_positive(cfg, "epochs", "lr", "adam_eps")
    check_at_least(cfg, 0, "weight_decay", "grad_clip")
    check_fraction(cfg, "warmup_ratio", one_allowed=True)
    check_fraction(cfg, "eval_fraction", one_allowed=False)


# --- data split and step counts ----------------------------------------------------------------------


def split_off_eval(items: list, fraction: float, seed: int, rounding: Callable[[float], int] = int
                   ) -> tuple[list, list]:
    """(train, eval): ``rounding(len(items) x fraction)`` items, a seeded choice, held out for eval.
    SFT and DPO hold out examples and round down; the reward model holds out prompts, rounded to nearest."""
    n_eval = rounding(len(items) * fraction)
    perm = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in perm[n_eval:]], [items[i] for i in perm[:n_eval]]


def global_batches(n: int, batch_size: int, seed: int, epoch: int, groups: Sequence[Hashable] | None = None
                   ) -> list[np.ndarray]:
    """The epoch's example order, cut into global batches of ``batch_size`` (incomplete tail dropped).

    The order depends only on (seed, epoch): every process computes the same batches, and a resumed run
    the ones it would have seen. ``groups`` (one key per example): the groups are shuffled and each
    group's examples kept together in their original order (the reward model's ``group_by_prompt``).
    """
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        order = rng.permutation(n)
    else:
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(groups):
            members.setdefault(key, []).append(i)
        keys = list(members)
        order = np.array([i for g in rng.permutation(len(keys)) for i in members[keys[g]]], dtype=np.int64)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


@dataclass(frozen=True)
class Steps:
    """An offline run's step counts, made by :func:`plan`."""

    batch_size: int
    """Examples per optimizer step, all processes together."""
    local_batch_size: int
    """This process's share of them."""
    accumulation: int | None
    """Micro-batches per step per process; None where the method cuts its own (the reward model)."""
    per_epoch: int
    """Full global batches in one pass over the data."""
    total: int
    """Steps of the whole run, the LR schedule's length: max_steps, else ceil(epochs x per_epoch)."""
    last: int
    """Where this invocation stops: total, or stop_at_step (a run split into parts keeps its schedule)."""

    def global_batch(self, step: int, n: int, seed: int, groups: Sequence[Hashable] | None = None) -> np.ndarray:
        """The example indices of step ``step`` (0-based) out of ``n`` examples."""
        epoch, i = divmod(step, self.per_epoch)
        return global_batches(n, self.batch_size, seed, epoch, groups)[i]

    def local(self, global_batch: Sequence, rank: int) -> Sequence:
        """Process ``rank``'s consecutive share of a global batch."""
        return global_batch[rank * self.local_batch_size:(rank + 1) * self.local_batch_size]


def plan(num_examples: int, cfg, num_processes: int, what: str, micro_batch_size: int | None) -> Steps:
    """Step counts from the training set's size and ``cfg``'s batch sizes, epochs, max_steps and
    stop_at_step. Sizes that do not divide raise (``exact_div``); ``micro_batch_size`` None: the
    method cuts its own micro-batches. ``what`` names the examples in the too-little-data error."""
    local = exact_div(cfg.batch_size, num_processes, "batch_size / processes")
    accumulation = None
    if micro_batch_size is not None:
        accumulation = exact_div(local, micro_batch_size, "batch_size / (micro_batch_size x processes)")
    per_epoch = num_examples // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{cfg.data}: {num_examples} {what}, fewer than one batch of {cfg.batch_size}")
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    return Steps(cfg.batch_size, local, accumulation, per_epoch, total, min(total, cfg.stop_at_step or total))


# --- the optimizer and one step ----------------------------------------------------------------------


def start_optimizer(model, cfg, acc, steps: Steps, ckpt, params=None):
    """AdamW (on ``params``, default all of the model's) and its warmup + decay schedule over
    ``steps.total``, prepared by accelerate, with their state restored when resuming from ``ckpt``.
    Returns (model, optimizer, scheduler, the step to continue from); the model is left in train mode."""
    opt = runtime.adamw(model.parameters() if params is None else params, acc, cfg.lr, cfg.adam_eps,
                        cfg.weight_decay)
    sched = runtime.make_scheduler(opt, cfg.lr_schedule, int(cfg.warmup_ratio * steps.total), steps.total)
    model, opt = acc.prepare(model, opt)
    step, _ = runtime.restore(ckpt, opt, sched, acc.process_index)
    model.train()
    return model, opt, sched, step


def optimizer_step(model, opt, sched, acc, micro_batches: Sequence, micro_loss: Callable[[Any], tuple[torch.Tensor, Any]],
                   denominator: float, grad_clip: float) -> tuple[list, torch.Tensor | None]:
    """Forward/backward over this process's micro-batches, then clip, step and schedule.

    ``micro_loss(micro)`` returns the micro-batch's *summed* loss and whatever the method wants back
    (collected in order). Each sum is divided by ``denominator``, the global batch's count, the same on
    every process, so the gradients add up to those of the global mean however the batch is split.
    Returns the collected values and the gradient norm before clipping (None when grad_clip is 0).
    """
    outs = []
    for k, micro in enumerate(micro_batches):
        # DDP all-reduces gradients on every backward; no_sync skips it on all but the last micro-batch
        with acc.no_sync(model) if k < len(micro_batches) - 1 else contextlib.nullcontext():
            loss_sum, out = micro_loss(micro)
            # DDP averages gradients over processes: multiply back so the result is sum / denominator
            acc.backward(loss_sum / denominator * acc.num_processes)
        outs.append(out)
    grad_norm = acc.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return outs, grad_norm


def end_of_step(run, step: int, metrics: dict, steps: Steps, cfg, sched, grad_norm,
                evaluate: Callable[[], dict] | None = None, save: Callable[[], Any] | None = None,
                save_last: bool = True) -> Any:
    """The tail of every offline step (``step`` counted from 1): add the optim/ and train/ metrics,
    evaluate (every ``eval_every`` steps and at the end of the schedule), log (every ``log_every`` steps
    and where this invocation stops), advance the progress bar, and checkpoint (every ``save_every``
    steps, and where this invocation stops unless ``save_last`` is False: the reward model saves its
    last checkpoint after normalising). ``metrics`` is updated in place; returns what ``save`` returned,
    or None when no checkpoint was due."""
    metrics.update({"optim/lr": sched.get_last_lr()[0], "train/epoch": step / steps.per_epoch})
    if grad_norm is not None:
        metrics["optim/grad_norm"] = float(grad_norm)
    if evaluate is not None and (step % cfg.eval_every == 0 or step == steps.total):
        metrics.update(evaluate())
    if step % cfg.log_every == 0 or step == steps.last:
        run.log(step, metrics)
    run.advance()
    periodic = bool(cfg.save_every) and step % cfg.save_every == 0
    due = (periodic or step == steps.last) if save_last else (periodic and step != steps.last)
    return save() if save is not None and due else None
