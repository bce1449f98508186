"""train/sharding.py: full parameters for generation under plain/DDP, FSDP2, FSDP1 and ZeRO-3.

accelerate (1.15) never picks FSDP on a CPU launch (docs/distributed.md), so the trainers cannot run
FSDP here; these tests wrap the tiny model with torch's FSDP themselves on gloo: in one process for
the dispatch and the errors, and in two processes (this file run as a torchrun worker, see
:func:`worker`) where each process really holds half of every parameter. DeepSpeed is not installed:
its branch is checked against a stand-in ``deepspeed`` module.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrun import run_two_processes

from rlhfkit.models import load_model
from rlhfkit.rollout.engine import Sampler, SamplingConfig
from rlhfkit.train.sharding import full_parameters, sharding_kind

PROMPTS = [[{"role": "user", "content": "Tell me about rivers."}], [{"role": "user", "content": "Hi"}]]


class StandInAccelerator:
    """What full_parameters reads from an Accelerator: ``unwrap_model`` and the prepared ``_models``."""

    def __init__(self, *models):
        self._models = list(models)

    def unwrap_model(self, model):
        return getattr(model, "module", model)


@pytest.fixture
def gloo_group():
    """A one-process gloo group (FSDP and DDP need one), destroyed after the test."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_plain_model_is_yielded_as_it_is():
    net = small_net()
    with full_parameters(None, net) as full:
        assert full is net
    assert sharding_kind(None, net) == "none"


def test_ddp_yields_the_unwrapped_module(gloo_group):
    net = small_net()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    acc = StandInAccelerator(ddp)
    assert sharding_kind(acc, ddp) == "none"
    with full_parameters(acc, ddp) as full:
        assert full is net


def test_zero3_gathers_every_parameter_through_deepspeed(monkeypatch):
    """A module whose parameters carry DeepSpeed's ``ds_id`` is gathered with
    ``deepspeed.zero.GatheredParameters(list(params))`` for the block, entered before and left after."""
    events = []

    class GatheredParameters:
        def __init__(self, params):
            events.append(("gather", [id(p) for p in params]))

        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    net = small_net()
    for i, p in enumerate(net.parameters()):
        p.ds_id = i
    engine = types.SimpleNamespace(module=net)  # DeepSpeedEngine's .module is the model
    acc = StandInAccelerator(engine)
    assert sharding_kind(acc, engine) == "zero3"
    with full_parameters(acc, engine) as full:
        assert full is net and events[-1] == "enter"
    assert events == [("gather", [id(p) for p in net.parameters()]), "enter", "exit"]


def test_fsdp2_unshards_for_the_block_and_restores(gloo_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    net = small_net()
    fully_shard(net[0])
    fully_shard(net, reshard_after_forward=True)
    assert sharding_kind(None, net) == "fsdp2"
    before = [g.post_forward_mesh_info for g in net._get_fsdp_state()._fsdp_param_groups]
    with full_parameters(None, net) as full:
        assert full is net
        assert not any(isinstance(p, DTensor) for p in net.parameters())
        for _ in range(2):  # a second forward finds the weights still unsharded
            full(torch.ones(1, 4))
            assert not isinstance(net[2].weight, DTensor)
    assert all(isinstance(p, DTensor) for p in net.parameters())
    assert [g.post_forward_mesh_info for g in net._get_fsdp_state()._fsdp_param_groups] == before
    net(torch.ones(1, 4)).sum().backward()  # training still runs on the shards


def test_fsdp1_root_wrapper_is_summoned(gloo_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = FullyShardedDataParallel(small_net(), device_id=torch.device("cpu"), use_orig_params=True)
    assert sharding_kind(None, root) == "fsdp1"
    expect = small_net()(torch.ones(1, 4))
    with full_parameters(StandInAccelerator(root), root.module) as full:  # the sampler's unwrapped module
        assert full is root.module
        assert torch.allclose(full(torch.ones(1, 4)), expect)


def test_fsdp1_errors_name_what_to_do(gloo_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    root = FullyShardedDataParallel(small_net(), device_id=torch.device("cpu"), use_orig_params=True)
    with pytest.raises(ValueError, match="root wrapper is not known: pass the model acc.prepare returned"):
        with full_parameters(None, root.module):
            pass
    nested = FullyShardedDataParallel(small_net(), auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
                                      device_id=torch.device("cpu"), use_orig_params=True)
    with pytest.raises(NotImplementedError, match="nested FSDP units.*fsdp_version: 2"):
        with full_parameters(None, nested):
            pass


# --- two processes: each holds half of every parameter ----------------------------------------------


@pytest.mark.slow
def test_two_process_fsdp_generation_matches_the_whole_model(tmp_path):
    """Each process generates a different number of tokens from its FSDP2-sharded tiny model (and from
    an FSDP1 root wrapper) inside full_parameters: same ids and log-probs as the unsharded model, no
    deadlock, and the model is sharded again afterwards (the worker asserts; it writes what it saw)."""
    run_two_processes(Path(__file__), tmp_path, timeout=180)
    record = json.loads((tmp_path / "fsdp.json").read_text())
    assert record["world_size"] == 2 and record["shard_fraction"] == pytest.approx(0.5, abs=0.01)
    assert record["new_tokens"] == [8, 20]


def worker(out_dir: str) -> None:
    """Run by torchrun with two processes (see the test above)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    whole, tok = load_model("tiny", seed=0)
    sharded = copy.deepcopy(whole)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    local = sum(p.to_local().numel() for p in sharded.parameters())
    fraction = local / sum(p.numel() for p in whole.parameters())
    assert 0.4 < fraction < 0.6, fraction  # this process really holds about half of the model
    # uneven forwards: rank 1 generates 20 tokens, rank 0 stops at 8 (a per-forward all-gather would hang)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8 + 12 * rank)
    want = Sampler(whole, tok, sampling).sample([PROMPTS[rank]], seed=rank)
    with full_parameters(None, sharded) as full:
        got = Sampler(full, tok, sampling).sample([PROMPTS[rank]], seed=rank)
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert torch.allclose(got.logps, want.logps, atol=1e-5)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    sharded(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()  # training forward still works
    root = FullyShardedDataParallel(copy.deepcopy(whole), device_id=torch.device("cpu"), use_orig_params=True)
    with full_parameters(StandInAccelerator(root), root.module) as full:
        got1 = Sampler(full, tok, sampling).sample([PROMPTS[rank]], seed=rank)
    assert torch.equal(got1.completion_ids, want.completion_ids)
    if rank == 0:
        record = {"world_size": dist.get_world_size(), "shard_fraction": fraction}
        lengths = [None, None]
        dist.all_gather_object(lengths, want.completion_ids.shape[1])
        record["new_tokens"] = lengths
        (Path(out_dir) / "fsdp.json").write_text(json.dumps(record))
    else:
        dist.all_gather_object([None, None], want.completion_ids.shape[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
