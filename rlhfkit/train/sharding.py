"""Full parameters of a sharded policy for the passes that run outside the training forward/backward.

Generation (and the sampling-time log-prob pass inside it) calls the *unwrapped* policy: DDP's
wrapper only all-reduces gradients, so the unwrapped module is the whole model. Under FSDP or
DeepSpeed ZeRO-3 each process holds a shard of every parameter, and the unwrapped module would
generate from that shard (or hang: FSDP's forward hooks all-gather once per forward, and two
processes whose completions stop at different lengths make different numbers of forwards).
:func:`full_parameters` gathers the parameters for the length of a ``with`` block:

=====================  ==========================================================================
how it was prepared    what the block does
=====================  ==========================================================================
plain, DDP             nothing: yields ``acc.unwrap_model(model)``
FSDP2 (fully_shard)    ``unshard()`` every FSDP unit with resharding after forward turned off, so the
                       block's forwards make no collectives; ``reshard()`` and the setting restored after
FSDP1                  ``FullyShardedDataParallel.summon_full_params(root, writeback=False)``; only a
                       root-only wrapping (no nested FSDP units: their forward hooks would all-gather)
DeepSpeed ZeRO-3       ``deepspeed.zero.GatheredParameters(list(model.parameters()))``
=====================  ==========================================================================

Memory: inside the block every process holds the whole model (as in DDP), for the block only.
Every process must enter the block (the gather is a collective). Tested: tests/train/test_sharding.py.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Iterator

import torch

from rlhfkit.models.logps import SHARED_ROW_TOKENS

FSDP_FLATTENED = "_fsdp_flattened"
"""Attribute torch's FSDP1 sets on the parameters it flattened (torch.distributed.fsdp._common_utils,
checked on torch 2.13): how the unwrapped module shows that a wrapper it cannot see shards it."""


def sharding_kind(acc, model: torch.nn.Module) -> str:
    """'zero3', 'fsdp2', 'fsdp1' or 'none' (plain or DDP), read from the module itself (``acc`` only
    to unwrap): a model the accelerator never prepared (CMPO's prior, the reference) is 'none'."""
    inner = unwrap(acc, model)
    params = list(inner.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed's partitioned parameters carry a ds_id
        return "zero3"
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, FSDPModule) for m in inner.modules()):
        return "fsdp2"
    wrapped = isinstance(model, FullyShardedDataParallel) or any(isinstance(m, FullyShardedDataParallel)
                                                                 for m in inner.modules())
    if wrapped or any(getattr(p, FSDP_FLATTENED, False) for p in params):
        return "fsdp1"
    return "none"


def unwrap(acc, model: torch.nn.Module) -> torch.nn.Module:
    """``acc.unwrap_model(model)``; without an accelerator, the module inside a DDP or FSDP1 wrapper."""
    if acc is not None:
        return acc.unwrap_model(model)
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrappers = (torch.nn.parallel.DistributedDataParallel, FullyShardedDataParallel)
    return model.module if isinstance(model, wrappers) else model


@contextlib.contextmanager
def full_parameters(acc, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Yield the unwrapped ``model`` with its full parameters for the block (see the module doc).

    ``model`` is what ``acc.prepare`` returned or the unwrapped module (the sampler's); ``acc`` may be
    None where no accelerator is at hand (then FSDP1 needs ``model`` to be its root wrapper). The
    gathered parameters are read-only: nothing written in the block reaches the shards."""
    kind = sharding_kind(acc, model)
    inner = unwrap(acc, model)
    if kind == "none":
        yield inner
    elif kind == "fsdp2":
        with _fsdp2_unsharded(inner):
            yield inner
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = _fsdp1_root(acc, model, inner)
        with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True):
            yield inner
    else:  # zero3; deepspeed is optional (pip install deepspeed), imported only when it is in use
        deepspeed = importlib.import_module("deepspeed")
        with deepspeed.zero.GatheredParameters(list(inner.parameters())):
            yield inner


@contextlib.contextmanager
def _fsdp2_unsharded(inner: torch.nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of ``inner`` unsharded, with no resharding after forward, for the block.

    ``unshard()`` alone is not enough: a unit built with reshard_after_forward=True (accelerate's
    fsdp_reshard_after_forward) reshards after its first forward and all-gathers again at the next,
    which deadlocks once one process stops generating earlier (seen here, torch 2.13, gloo)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in inner.modules() if isinstance(m, FSDPModule)]
    # set_reshard_after_forward has no getter: keep each param group's setting (private, torch 2.13) to restore it
    saved = [[g.post_forward_mesh_info for g in u._get_fsdp_state()._fsdp_param_groups] for u in units]
    auto = [u._get_fsdp_state()._auto_reshard_after_forward for u in units]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
        for u, infos, a in zip(units, saved, auto):
            state = u._get_fsdp_state()
            state._auto_reshard_after_forward = a
            for g, info in zip(state._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info


def _fsdp1_root(acc, model: torch.nn.Module, inner: torch.nn.Module):
    """The FSDP1 root wrapper of ``inner``: ``model`` itself, or the prepared model of ``acc`` that wraps it."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    candidates = [model] + list(getattr(acc, "_models", []) if acc is not None else [])
    root = next((m for m in candidates if isinstance(m, FullyShardedDataParallel) and m.module is inner), None)
    if root is None:
        raise ValueError("full_parameters: the model is sharded by FSDP1 but its root wrapper is not known: pass "
                         "the model acc.prepare returned, or the accelerator that prepared it")
    if any(isinstance(m, FullyShardedDataParallel) for m in root.module.modules()):
        raise NotImplementedError(
            "generation under FSDP1 with nested FSDP units (an auto-wrap policy) is not supported: their "
            "forward hooks all-gather at every forward, which deadlocks when processes generate different "
            "lengths. Use FSDP2 (fsdp_version: 2, as in examples/accelerate/fsdp.yaml) or DeepSpeed ZeRO-3")
    return root


def check_process_split(cfg, num_processes: int, distributed_type=None) -> None:
    """Raise before any model loads unless the online batch splits evenly over ``num_processes``.

    Each process samples ``prompts_per_step / processes`` prompts and all ``samples_per_prompt``
    completions of each (a group never spans two processes), so ``prompts_per_step`` must divide by
    the process count; the process's rollout batch must then divide by ``mini_batch_size``. Under FSDP or
    DeepSpeed (``distributed_type``, the accelerator's), warns when the shared-prompt layout could make the
    processes run different numbers of training forwards: each forward all-gathers there. DDP's forwards
    make no collective (runtime.make_accelerator turns its buffer broadcast off), so it does not warn."""
    k = cfg.samples_per_prompt
    if cfg.prompts_per_step % num_processes:
        raise ValueError(
            f"prompts_per_step={cfg.prompts_per_step} does not divide by the process count ({num_processes}): each "
            f"process samples an equal share of the prompts and all samples_per_prompt={k} completions of each, so "
            f"the global batch of prompts_per_step x samples_per_prompt = {cfg.prompts_per_step * k} completions "
            f"splits by prompt; set prompts_per_step to a multiple of {num_processes}")
    local = cfg.prompts_per_step // num_processes * k
    if cfg.mini_batch_size is not None and local % cfg.mini_batch_size:
        raise ValueError(
            f"mini_batch_size={cfg.mini_batch_size} does not divide the rollout batch per process, prompts_per_step="
            f"{cfg.prompts_per_step} / {num_processes} processes x samples_per_prompt={k} = {local} completions; "
            f"choose a mini_batch_size that divides {local}")
    # the rows of one training forward pass: a micro-batch, within a mini-batch, within the process's batch
    rows = min(cfg.micro_batch_size, cfg.mini_batch_size or local, local)
    sharded = getattr(distributed_type, "value", distributed_type) in ("FSDP", "DEEPSPEED")
    if num_processes > 1 and sharded and cfg.share_prompts and rows * cfg.max_new_tokens > SHARED_ROW_TOKENS:
        warnings.warn(
            f"share_prompts with {num_processes} processes: a micro-batch's completions alone can reach {rows} x "
            f"max_new_tokens={cfg.max_new_tokens} = {rows * cfg.max_new_tokens} tokens, packed into rows of "
            f"{SHARED_ROW_TOKENS}: a count that depends on the lengths and can differ between processes, while each "
            "training forward is a collective under FSDP and DeepSpeed ZeRO-3 (an all-gather), so the run can hang "
            "(docs/distributed.md). Set share_prompts false, or lower micro_batch_size / max_new_tokens", stacklevel=2)
