"""The vLLM generation backend (rlhfkit.rollout.vllm_backend).

vLLM cannot be installed on a CPU machine, so most tests drive ``VLLMBackend`` with a fake ``llm``
(``VLLMBackend(..., llm=fake)``) whose ``generate`` returns objects shaped like vLLM's
``RequestOutput`` (``.outputs[0].token_ids``), and a fake ``vllm`` module for ``SamplingParams``.
They check the backend's own logic: prompts un-padded, outputs right-padded with pad, per-request
seeds, weight sync, and that a Rollout's log-probs come from the training model, never from vLLM.
The last test uses real vLLM and runs where ``vllm`` is importable (a CUDA machine with
``pip install rlhfkit[vllm]``).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from rlhfkit.models.batching import right_pad
from rlhfkit.models.logps import completion_logps
from rlhfkit.rollout.engine import Sampler, SamplingConfig
from rlhfkit.rollout.vllm_backend import VLLMBackend

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "You answer in full sentences."},
     {"role": "user", "content": "What do you think about rainy autumn afternoons, honestly?"}],
    [{"role": "user", "content": "Name a colour."}],
]


class FakeSamplingParams:
    """Records the keyword arguments ``vllm.SamplingParams`` was built with."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in ``vllm`` module (only ``SamplingParams``), whether or not the real one is installed."""
    module = types.ModuleType("vllm")
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list | None = None  # vLLM's own log-probs: the backend must not use them


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class FakeLLM:
    """``generate`` returns scripted token ids per request (cycled), or ``respond(prompt_ids, params)``."""

    scripted: list[list[int]] = field(default_factory=list)
    respond: object = None
    calls: list = field(default_factory=list)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params, use_tqdm))
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            ids = self.respond(p["prompt_token_ids"], sp) if self.respond else self.scripted[i % len(self.scripted)]
            outs.append(RequestOutput(p["prompt_token_ids"], [CompletionOutput(list(ids), logprobs=[-99.0] * len(ids))]))
        return outs


def test_prompts_are_unpadded_and_outputs_right_padded(fake_vllm, tiny):
    model, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    llm = FakeLLM(scripted=[[300, 301, eos], [302, 303, 304, 305, 306], [eos]])
    backend = VLLMBackend("unused", tok, llm=llm)
    sampler = Sampler(model, tok, SamplingConfig(max_new_tokens=5), backend=backend)
    prompt_ids, prompt_mask = sampler.encode_prompts(PROMPTS)
    assert not prompt_mask.all()  # the prompts differ in length: some rows are left-padded
    out = backend.generate(prompt_ids, prompt_mask, sampler.sampling, generator_seed=None)
    sent, _, use_tqdm = llm.calls[0]
    assert use_tqdm is False
    for request, p in zip(sent, PROMPTS):
        want = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert request == {"prompt_token_ids": want}  # no pad ids in front
    assert out.dtype == torch.long and out.device == prompt_ids.device
    assert out.tolist() == [[300, 301, eos, pad, pad], [302, 303, 304, 305, 306], [eos, pad, pad, pad, pad]]


def test_right_pad_keeps_one_column_for_empty_outputs():
    assert right_pad([[], []], 0)[0].tolist() == [[0], [0]]
    assert right_pad([[5], [], [6, 7]], 0)[0].tolist() == [[5, 0], [0, 0], [6, 7]]


def test_sampling_params_follow_the_sampling_config(fake_vllm, tokenizer):
    backend = VLLMBackend("unused", tokenizer, llm=FakeLLM())
    sp = backend.sampling_params(SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12), seed=4)
    assert sp.kwargs == dict(n=1, temperature=0.7, top_p=0.9, top_k=-1, max_tokens=12, seed=4,
                             stop_token_ids=[tokenizer.eos_token_id], skip_special_tokens=False)
    assert backend.sampling_params(SamplingConfig(top_k=20), seed=None).kwargs["top_k"] == 20


def test_each_request_gets_its_own_seed_so_group_copies_differ(fake_vllm, tiny):
    """vLLM seeds one generator per request from SamplingParams.seed: a GRPO group (the same prompt
    K times) sampled with one shared seed would be K identical completions. The fake LLM is
    deterministic in (prompt, seed), as vLLM is."""
    model, tok = tiny

    def respond(prompt_ids, sp):
        g = torch.Generator().manual_seed(hash((tuple(prompt_ids), sp.kwargs["seed"])) % 2**31)
        return torch.randint(300, 5000, (4,), generator=g).tolist() + [tok.eos_token_id]

    llm = FakeLLM(respond=respond)
    sampler = Sampler(model, tok, SamplingConfig(max_new_tokens=5), backend=VLLMBackend("unused", tok, llm=llm))
    group = [PROMPTS[0]] * 4
    r = sampler.sample(group, seed=10)
    params = llm.calls[-1][1]
    assert [p.kwargs["seed"] for p in params] == [10, 11, 12, 13]
    assert len({tuple(row) for row in r.completion_ids.tolist()}) == 4
    again = sampler.sample(group, seed=10)
    assert torch.equal(again.completion_ids, r.completion_ids)  # still reproducible for a given seed
    sampler.sample(group, seed=None)
    assert llm.calls[-1][1].kwargs["seed"] is None  # unseeded: one shared SamplingParams


def test_sampler_logps_come_from_the_training_model(fake_vllm, tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    llm = FakeLLM(scripted=[[300, 301, eos], [302, 303, 304, 305, 306], [eos]])
    sampler = Sampler(model, tok, SamplingConfig(temperature=0.8, max_new_tokens=5),
                      backend=VLLMBackend("unused", tok, llm=llm))
    r = sampler.sample(PROMPTS, seed=0)
    assert r.ended.tolist() == [True, False, True]
    assert r.completion_mask.sum(1).tolist() == [3, 5, 1]
    want = completion_logps(model, r, temperature=0.8)
    torch.testing.assert_close(r.logps, want, atol=0, rtol=0)
    assert (r.logps[r.completion_mask] > -50).all()  # not the fake engine's -99 log-probs
    assert r.completions[0] == tok.decode([300, 301])


def test_sync_weights_streams_the_state_dict(fake_vllm, tiny):
    model, tok = tiny

    class V1LLM(FakeLLM):
        def collective_rpc(self, fn, args=()):
            self.rpc = (fn, args)

    v1 = V1LLM()
    VLLMBackend("unused", tok, llm=v1).sync_weights(model)
    fn, (weights,) = v1.rpc
    names = dict(weights)
    # every state-dict tensor is sent, a tied one once (the embedding, not its lm_head alias)
    assert set(names) <= set(model.state_dict()) and len(names) == len(set(names))
    assert {t.data_ptr() for t in model.state_dict().values()} == {t.data_ptr() for t in names.values()}
    assert all(not t.requires_grad for t in names.values())
    loaded = {}
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(
        model=types.SimpleNamespace(load_weights=lambda w: loaded.update(dict(w)))))
    fn(worker, weights)  # what each vLLM worker runs
    assert set(loaded) == set(names)

    v0_loaded = {}
    v0 = FakeLLM()
    v0.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(
        model_runner=types.SimpleNamespace(model=types.SimpleNamespace(load_weights=lambda w: v0_loaded.update(dict(w)))))))
    VLLMBackend("unused", tok, llm=v0).sync_weights(model)
    assert set(v0_loaded) == set(names)


def test_sync_under_sharding_reads_gathered_weights(fake_vllm, tiny, monkeypatch):
    """After a step the trainer syncs vLLM inside full_parameters (FSDP / ZeRO-3 hold shards outside it)."""
    from rlhfkit.train import online_rollout

    model, tok = tiny
    backend = VLLMBackend("unused", tok, llm=FakeLLM())
    seen = []
    backend.sync_weights = lambda m: seen.append((m, gathered))
    gathered = False

    import contextlib

    @contextlib.contextmanager
    def full_parameters(acc, policy):
        nonlocal gathered
        gathered = True
        yield policy
        gathered = False

    monkeypatch.setattr(online_rollout, "full_parameters", full_parameters)
    sampler = Sampler(model, tok, SamplingConfig(), backend=backend)
    online_rollout.sync_sampler(sampler, types.SimpleNamespace(unwrap_model=lambda m: m), model)
    assert seen == [(model, True)]


def test_missing_vllm_says_how_to_install(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'rlhfkit\[vllm\]'.*CUDA"):
        VLLMBackend("unused", tokenizer)


def test_real_vllm_generates_and_syncs_weights(tmp_path):
    """Real vLLM on a saved 'tiny:0.5' model (peaked, so greedy decoding is numerically robust):
    greedy completions match transformers' greedy decoding, log-probs come from the training model,
    and after ``sync_weights`` from a differently initialised model the completions follow it."""
    pytest.importorskip("vllm", reason="needs a CUDA machine with `pip install rlhfkit[vllm]`")
    from rlhfkit.models import load_model
    from rlhfkit.rollout.engine import HFBackend

    model, tok = load_model("tiny:0.5", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model = model.cuda().eval()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    backend = VLLMBackend(str(tmp_path / "tiny"), tok, gpu_memory_utilization=0.2, dtype="float32")
    sampler = Sampler(model, tok, greedy, backend=backend)
    hf = Sampler(model, tok, greedy, backend=HFBackend(model, tok))

    r = sampler.sample(PROMPTS, seed=0)
    assert torch.equal(r.completion_ids, hf.sample(PROMPTS).completion_ids)
    want = completion_logps(model, r, temperature=1.0)
    torch.testing.assert_close(r.logps, want, atol=0, rtol=0)

    sampled = Sampler(model, tok, SamplingConfig(temperature=1.0, max_new_tokens=8), backend=backend)
    group = sampled.sample([PROMPTS[0]] * 4, seed=1)
    assert len({tuple(row) for row in group.completion_ids.tolist()}) > 1  # a group is not 4 copies

    other, _ = load_model("tiny:0.5", seed=1)
    model.load_state_dict(other.state_dict())
    backend.sync_weights(model)
    after = sampler.sample(PROMPTS, seed=0)
    assert torch.equal(after.completion_ids, hf.sample(PROMPTS).completion_ids)
    assert not torch.equal(after.completion_ids, r.completion_ids)
