"""What every online RL method (PPO, GRPO, RLOO, REINFORCE++, CMPO) shares, in the order its
``train()`` calls it (torchtune's PPO recipe reads the same way)::

    s = online.start(cfg, reward_fn, task)          # 1. accelerator, seeds, task, policy + reference, reward
    ...the method's optimizer, sampler, extra models...
    loop, state = online.begin(cfg, s, "grpo", opt, sched, eval_hook, sampler)  # resume, run dir, step-0 eval
    while loop.step < loop.total:
        r = online_rollout.generate_and_score(s, sampler, loop.step, cfg)   # 2. generate and score
        adv = ...the method's own math...                                    # 3. rewards, advantages
        metrics = online.optimize(models, opt, r, adv, loss_fn, cfg, s.acc, loop.step)   # 4. optimize
        if online.end_of_step(loop, r, metrics, seconds, models, state):    # 5. log, eval, checkpoint
            break
    return online.finish(loop)

The generate-and-score phase is in online_rollout.py, the eval hook in online_eval.py. No math here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from rlhfkit.data.prompt_data import PromptRow, load_prompt_rows, split_held_out
from rlhfkit.data.tasks import get_task
from rlhfkit.models import load_model
from rlhfkit.models.lora import is_lora, load_policy, reference_model
from rlhfkit.ops import exact_div
from rlhfkit.rollout import rewards
from rlhfkit.rollout.engine import Rollout
from rlhfkit.rollout.reward_components import ReferenceReplies
from rlhfkit.train import runtime, sharding
from rlhfkit.train.online_config import (  # noqa: F401  online.OnlineConfig, online.require, ... for the methods
    DEFAULT_EVAL_FRACTION,
    DEFAULT_TASK,
    LR_SCHEDULES,
    SPLIT_SEED,
    OnlineConfig,
    require,
    variant,
)
from rlhfkit.train.online_eval import HeldOutEval
from rlhfkit.train.online_rollout import (
    PromptStream,
    rollout_metrics,
    sample_rows,
    sampler_gap_metrics,
)

# --- 1. start: what every method builds before its loop ----------------------------------------------


@dataclass
class Start:
    """What every online method builds before its loop, made by :func:`start`."""

    acc: object
    ckpt: object
    task: object
    """The task (its gold reward), or None when the prompts come from data without a task."""
    policy: object
    ref: object
    """The reference: a frozen copy of the starting model, or with LoRA the policy itself (run it through
    ``lora.reference_model(ref)``, which disables the adapter)."""
    tok: object
    reward: object
    total: int
    local_prompts: int
    stream: PromptStream
    held_out: HeldOutEval


def task_rows(task, split: str) -> list[PromptRow]:
    """A task's prompts as rows (conversational). A task with ``prompt_rows(split)`` (the built-in ones)
    gives its rows' other fields as columns (``id``, ``category``; ``answer`` for arith, which
    ``verify:math`` reads); another object (Python API) gives ``prompts(split)`` without columns."""
    name = getattr(task, "name", type(task).__name__)
    if hasattr(task, "prompt_rows"):
        rows = [dict(r) for r in task.prompt_rows(split)]
        return [PromptRow(messages=r["messages"], prompt=r.pop("messages"), columns=r, where=f"task {name} {split} prompt {i}")
                for i, r in enumerate(rows)]
    return [PromptRow(messages=p, prompt=p, where=f"task {name} {split} prompt {i}") for i, p in enumerate(task.prompts(split))]


def prompt_sets(cfg: OnlineConfig, task=None, prompts=None) -> tuple[object, list[PromptRow], list[PromptRow]]:
    """(task or None, train rows, held-out rows). ``task``/``prompts`` (Python API) take the place of
    ``cfg.task``/``cfg.prompts``; ``prompts`` may be a path, a ``datasets.Dataset`` or a list of dicts."""
    source = prompts if prompts is not None else cfg.prompts
    if source is None:  # checked here, not in validate(): the Python API's prompts= may supply them
        for name in ("eval_prompts_data", "eval_fraction"):
            require(cfg, name, getattr(cfg, name) is None, "None without `prompts` (a task has its held-out split)")
    if task is None and (cfg.task is not None or source is None):
        task = get_task(cfg.task or DEFAULT_TASK)
    if source is None:
        return task, task_rows(task, "train"), task_rows(task, "heldout")[:cfg.eval_prompts]
    rows = load_prompt_rows(source)
    if cfg.eval_prompts_data is not None:
        held = load_prompt_rows(cfg.eval_prompts_data)
    else:
        fraction = DEFAULT_EVAL_FRACTION if cfg.eval_fraction is None else cfg.eval_fraction
        rows, held = split_held_out(rows, fraction, SPLIT_SEED)
    return task, rows, held[:cfg.eval_prompts]


def start(cfg: OnlineConfig, reward_fn=None, task=None, prompts=None) -> Start:
    """Accelerator and per-process seed (N details #12), the checkpoint to resume from, the prompts
    (``prompts`` or ``cfg.prompts``, else the task's) and the held-out prompts, the reward source
    (``reward_fn`` replaces ``cfg.reward``: a ``reward_fn(rollout)`` or TRL-style function(s)), checked
    against the prompt rows' columns before any model loads, the policy (from the checkpoint when
    resuming) and a frozen reference copy of the *starting* model on the device (with LoRA: the policy
    itself, whose adapter-disabled self is the starting model), step count, this process's share of the
    prompts, the prompt stream and the held-out eval hook."""
    cfg.validate()  # again: a field may have been set after construction
    acc = runtime.make_accelerator(cfg.mixed_precision)
    sharding.check_process_split(cfg, acc.num_processes, getattr(acc, "distributed_type", None))  # before any model loads
    runtime.seed_everything(cfg.seed + acc.process_index)
    ckpt = runtime.find_checkpoint(cfg.resume, cfg.output_dir)
    task, train_rows, held_rows = prompt_sets(cfg, task, prompts)
    # bad data and a missing column fail here, before the models load and the run directory opens
    reward = rewards.make_reward(cfg.reward, reward_fn, task, acc.device)
    reward.check(train_rows + held_rows)
    if cfg.lora_r and cfg.rollout_backend not in ("hf", "auto"):  # fast, vLLM, remote copy plain weights
        raise ValueError(f"lora_r > 0 needs rollout_backend 'hf' or 'auto', got {cfg.rollout_backend!r} (the fast, "
                         "vLLM and remote backends read plain weights and do not apply a LoRA adapter yet)")
    policy, tok = load_policy(cfg, ckpt)  # LoRA-wrapped when lora_r > 0 (models/lora.py)
    runtime.sparse_tied_embedding_grad(policy, acc)
    reward.tokenizer = tok  # an rm: sharing the policy's vocabulary scores the sampled ids as they are
    # The reference is always there: the KL penalty needs it when beta > 0, the eval hook reports KL. With
    # LoRA it is the policy itself, run with its adapter off (lora.reference_model): no second copy.
    if is_lora(policy):
        ref = policy
    else:
        ref, _ = load_model(cfg.model, seed=cfg.seed)
        ref.eval().requires_grad_(False).to(acc.device)
    if reward.needs_reference:  # judge:MODEL:pairwise compares with the reference's greedy reply to each prompt
        replies = ReferenceReplies(ref, tok, cfg.max_new_tokens, cfg.max_prompt_length)

        def reference_replies(prompts, replies=replies):
            with reference_model(ref):  # LoRA: generated by the policy with its adapter off
                return replies(prompts)
        reward.attach_reference(reference_replies)
    held_out = HeldOutEval(ref, reward, task, held_rows, cfg)
    held_out.acc = acc  # FSDP1: the eval finds the sampler's root wrapper through the accelerator
    return Start(acc=acc, ckpt=ckpt, task=task, policy=policy, ref=ref, tok=tok, reward=reward, total=cfg.steps(),
                 local_prompts=exact_div(cfg.prompts_per_step, acc.num_processes, "prompts_per_step / processes"),
                 stream=PromptStream(train_rows, cfg.seed), held_out=held_out)


@dataclass
class Loop:
    """The run's progress between steps: made by :func:`begin`, advanced by :func:`end_of_step`."""

    cfg: OnlineConfig
    acc: object
    tok: object
    opt: object
    sched: object
    run: object
    eval_hook: Callable[[], dict]
    budget: Budget
    total: int
    step: int
    result: dict
    metrics: dict = field(default_factory=dict)
    sampler: object = None  # its engine's own state (FastBackend's statistics) goes into each checkpoint


def begin(cfg: OnlineConfig, s: Start, method: str, opt, sched, eval_hook: Callable[[], dict],
          sampler=None) -> tuple[Loop, dict]:
    """Resume (optimizer, scheduler, RNG, step, and ``sampler``'s engine state), open the run directory,
    and evaluate the starting policy with ``eval_hook()`` (the method's eval callable, also run by
    :func:`end_of_step`) unless resuming. Returns the loop and the rest of the checkpoint's trainer state
    (the method's own)."""
    step, state = runtime.restore(s.ckpt, opt, sched, s.acc.process_index)
    restore_sampler(sampler, s.ckpt, s.acc.process_index)
    run = runtime.open_run(cfg, method, s.acc, s.total)
    run.advance(step)
    loop = Loop(cfg=cfg, acc=s.acc, tok=s.tok, opt=opt, sched=sched, run=run, eval_hook=eval_hook,
                budget=Budget(cfg.max_minutes), total=s.total, step=step, result={"run_dir": str(run.path)},
                sampler=sampler)
    if step == 0 and cfg.eval_every:
        loop.result["eval_start"] = eval_hook()
        if loop.result["eval_start"]:  # empty without held-out prompts (eval_fraction 0)
            run.log(0, loop.result["eval_start"])
    return loop, state


# --- 4. optimize: epochs -> mini-batches -> micro-batches --------------------------------------------

TRAINING_LOGPS = "_training_logps"
"""Metrics key under which a loss returns the micro-batch's detached per-token log-probs when the
rollout was sampled without them (``r.logps is None``); ``optimize`` stores them back into ``r.logps``."""


def shuffle_seed(seed: int, step: int) -> int:
    """Seed of :func:`optimize`'s mini-batch shuffle at ``step``: a function of (seed, step) only, so a
    resumed run shuffles step N exactly as the uninterrupted run did. Its own stream (the trailing 1 in
    the seed sequence), unrelated to the prompt stream's ``[seed, epoch]``. Every process draws the
    same permutation of its own (different) rows."""
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0])


def optimize(models: list, opt, r: Rollout, adv: torch.Tensor, loss_fn, cfg: OnlineConfig, acc, step: int) -> dict:
    """``epochs_per_step`` passes over one rollout batch (this process's B rows)::

        for epoch in epochs_per_step:                   shuffle the B rows (shuffle_seed(seed, step))
            for mini-batch of mini_batch_size rows:     one optimizer update
                for micro-batch of micro_batch_size:    one forward + backward, loss x rows/mini-batch rows
                clip the gradient norm, opt.step(), zero_grad

    ``loss_fn(micro_batch, adv[rows])`` returns the micro-batch's loss as a mean over its rows and its
    metrics. Weighting each by its share of the mini-batch's rows makes the accumulated gradient the
    mini-batch's mean-over-rows gradient whatever the micro-batch size (1 x 8 == 8 x 1, tested in
    tests/train/test_online.py). A loss averaged over tokens (aggregation 'token_mean') accumulates
    exactly only when the micro-batches hold equal token counts (``rlhfkit.ops.aggregate_loss``).
    Returns the metrics: micro-batch metrics weighted like the loss within an update, then averaged
    over the updates, plus ``optim/grad_norm`` (before clipping, when clipping is on).

    Unscored rows (``r.extras['scored']`` False: no reward component scored them) are left out of every
    loss: a mini-batch's mean runs over its scored rows only. A mini-batch without any still runs one
    zero-weighted micro-batch, so every process makes the same backward calls (DDP) and the same
    optimizer step (the mini-batch then changes the weights only through AdamW's decay and momentum).
    """
    n = r.completion_ids.shape[0]
    mini = cfg.mini_batch_size or n
    exact_div(n, mini, "rollout batch per process / mini_batch_size")
    device = r.completion_ids.device
    params = [p for m in models for p in m.parameters()]
    fresh = torch.zeros(r.completion_ids.shape, device=device) if r.logps is None else None
    scored = r.extras.get("scored")
    scored = torch.ones(n, dtype=torch.bool) if scored is None else scored.cpu().bool()
    if fresh is not None and not bool(scored.all()):  # unscored rows get no training pass: their log-probs now
        with torch.no_grad():
            left_out = (~scored).nonzero().flatten()
            fresh[left_out.to(device)] = cfg.logps(models[0], r.select(left_out.to(device))).float()
    gen = torch.Generator().manual_seed(shuffle_seed(cfg.seed, step))
    totals: dict[str, float] = {}
    updates = 0
    for _epoch in range(cfg.epochs_per_step):
        order = torch.randperm(n, generator=gen)
        for first in range(0, n, mini):
            rows = order[first:first + mini]
            kept = rows[scored[rows]]
            rows, zero = (kept, False) if len(kept) else (rows[:1], True)
            micros = rows.split(cfg.micro_batch_size)
            update: dict[str, float] = {}
            for j, micro in enumerate(micros):
                micro = micro.to(device)
                weight = 0.0 if zero else len(micro) / len(rows)
                with contextlib.ExitStack() as stack:
                    if j < len(micros) - 1:  # DDP: all-reduce the gradients once, on the last micro-batch
                        for m in models:
                            stack.enter_context(acc.no_sync(m))
                    loss, metrics = loss_fn(r.select(micro), adv[micro])
                    acc.backward(loss * weight)
                if TRAINING_LOGPS in metrics:
                    fresh[micro] = metrics.pop(TRAINING_LOGPS).float()
                for k, v in metrics.items():
                    update[k] = update.get(k, 0.0) + weight * float(v)
            if cfg.grad_clip > 0:
                update["optim/grad_norm"] = float(acc.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in update.items():
                totals[k] = totals.get(k, 0.0) + v
            updates += 1
    if fresh is not None:  # the sampling-time log-probs, taken from the training pass (for the KL metrics)
        r.logps = fresh
    return {**{k: v / updates for k, v in totals.items()}, **sampler_gap_metrics(cfg, r)}



# --- 5. end of step: log, eval, samples, checkpoint ---------------------------------------------------


class Budget:
    """``max_minutes`` as a check the loop makes after each step."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def spent(self, acc) -> bool:
        """True on every process once any process is past the deadline (all must stop at one step)."""
        over = self.deadline is not None and time.monotonic() > self.deadline
        if acc.num_processes > 1:
            over = acc.reduce(torch.tensor(float(over), device=acc.device), "max").item() > 0
        return over


def end_of_step(loop: Loop, r: Rollout, metrics: dict, seconds: float, models: dict, state: dict) -> bool:
    """Close one step: count it, log ``metrics`` + the batch's rollout metrics (means over processes)
    + perf and LR, run the eval hook every ``eval_every`` steps and at the end, write sample
    completions, and checkpoint every ``save_every`` steps and at the end: ``models`` by name (the
    policy at the top, others such as ``value`` or ``prior`` in sub-folders) and the method's extra
    trainer ``state``. Returns True when the run stops here (last step or ``max_minutes`` spent)."""
    cfg, acc, run = loop.cfg, loop.acc, loop.run
    loop.step += 1
    step = loop.step
    last = step == loop.total or loop.budget.spent(acc)
    # every process logged its own share of the prompts: all-reduce to the mean before writing
    metrics = {**metrics, **rollout_metrics(r)}
    metrics = {k: acc.reduce(torch.tensor(float(v), device=acc.device), "mean").item() for k, v in metrics.items()}
    metrics.update(runtime.perf_metrics(int(r.completion_mask.sum()) * acc.num_processes, seconds, acc))
    metrics["optim/lr"] = loop.sched.get_last_lr()[0]
    if cfg.eval_every and (step % cfg.eval_every == 0 or last):
        metrics.update(loop.eval_hook())
        loop.result["eval_end"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    if step % cfg.log_every == 0 or last:
        run.log(step, metrics)
    if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
        run.log_samples(step, sample_rows(r))
    run.advance()
    if (cfg.save_every and step % cfg.save_every == 0) or last:
        loop.result["checkpoint"] = str(runtime.save_checkpoint(acc, run, step, models, loop.tok, loop.opt,
                                                                loop.sched, state, sampler_state(loop.sampler)))
    loop.metrics = metrics
    return last


def sampler_state(sampler) -> dict:
    """The per-process state a checkpoint keeps of ``sampler``'s backend: the int8 engine's smoothing
    statistics (its samples depend on every prompt it has seen); {} for backends without history."""
    state_dict = getattr(getattr(sampler, "backend", None), "state_dict", None)
    return {"sampler": state_dict()} if state_dict is not None else {}


def restore_sampler(sampler, ckpt, rank: int) -> None:
    """Give ``sampler``'s backend the state saved with checkpoint ``ckpt`` by process ``rank`` (nothing
    when there is none: a fresh run, a checkpoint from an 'hf' run or from before engines saved theirs)."""
    load = getattr(getattr(sampler, "backend", None), "load_state_dict", None)
    saved = runtime.load_process_state(ckpt, rank).get("sampler") if ckpt else None
    if load is not None and saved is not None:
        load(saved, source=f"{ckpt}/{runtime.PROCESS_FILE.format(rank=rank)}")


def finish(loop: Loop) -> dict:
    """Close the run directory; the run's result: run_dir, steps, last metrics, eval_start/eval_end, checkpoint."""
    loop.run.close()
    loop.result["steps"] = loop.step
    loop.result["last"] = loop.metrics
    return loop.result
