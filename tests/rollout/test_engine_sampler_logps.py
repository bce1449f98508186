"""The sampler's own log-probs (``rollout.extras['sampler_logps']``) from backends that are not exactly the
policy (FastBackend, VLLMBackend), and the vLLM weight sync that fails loudly instead of hanging.

vLLM is replaced by a fake engine returning vLLM's output shapes: ``CompletionOutput.logprobs`` is one
dict per sampled token, ``{token_id: Logprob(logprob=...)}``.
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field

import pytest
import torch

from rlhfkit.rollout.engine import HFBackend, Sampler, SamplingConfig, aligned_sampler_logps
from rlhfkit.rollout.fast import FastBackend
from rlhfkit.rollout.vllm_backend import VLLMBackend

PROMPTS = [[{"role": "user", "content": "Hi."}], [{"role": "user", "content": "Name a colour, please."}]]


@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[dict] | None


@dataclass
class FakeLLM:
    """Scripted (token ids, log-probs) per request, with vLLM's per-token ``{id: Logprob}`` dicts."""

    scripted: list[tuple[list[int], list[float]]]
    calls: list = field(default_factory=list)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(params)
        return [types.SimpleNamespace(outputs=[Completion(ids, [{t: Logprob(lp), 7: Logprob(-9.0)} for t, lp in zip(ids, lps)])])
                for (ids, lps), _ in zip(self.scripted, prompts)]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: types.SimpleNamespace(kwargs=kw)
    monkeypatch.setitem(sys.modules, "vllm", module)


def test_hf_backend_keeps_no_sampler_logps(tiny):
    model, tok = tiny
    r = Sampler(model, tok, SamplingConfig(max_new_tokens=4)).sample(PROMPTS, seed=0)
    assert "sampler_logps" not in r.extras


def test_fast_backend_sampler_logps_align_with_the_mask(tiny):
    """At full precision the engine's own log-probs are the policy's (float rounding); zero after the end."""
    model, tok = tiny
    sampler = Sampler(model, tok, SamplingConfig(temperature=0.9, max_new_tokens=6),
                      backend=FastBackend(model, tok, quantize=False))
    r = sampler.sample(PROMPTS, seed=0)
    lp = r.extras["sampler_logps"]
    assert lp.shape == r.completion_mask.shape
    torch.testing.assert_close(lp, torch.where(r.completion_mask, r.logps, 0.0), rtol=1e-4, atol=1e-4)
    sub = r.select([1])
    assert torch.equal(sub.extras["sampler_logps"], lp[1:])


def test_vllm_log_probs_of_the_sampled_tokens_reach_the_rollout(fake_vllm, tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    llm = FakeLLM([([300, 301, eos], [-0.5, -1.5, -0.25]), ([302], [-2.0])])
    backend = VLLMBackend("unused", tok, llm=llm, with_logps=True)
    r = Sampler(model, tok, SamplingConfig(max_new_tokens=3), backend=backend).sample(PROMPTS, seed=0)
    assert all(p.kwargs["logprobs"] == 0 for p in llm.calls[0])  # the sampled token's log-prob only
    assert r.extras["sampler_logps"].tolist() == [[-0.5, -1.5, -0.25], [-2.0, 0.0, 0.0]]  # not the top-1 id 7's


def test_a_given_vllm_engine_is_not_asked_for_log_probs_by_default(fake_vllm, tiny):
    model, tok = tiny
    llm = FakeLLM([([300], [-1.0])] * 2)
    backend = VLLMBackend("unused", tok, llm=llm)
    r = Sampler(model, tok, SamplingConfig(max_new_tokens=2), backend=backend).sample(PROMPTS, seed=0)
    assert "logprobs" not in llm.calls[0][0].kwargs and "sampler_logps" not in r.extras


def test_misaligned_backend_logps_are_an_error():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="last_logps has shape"):
        aligned_sampler_logps(torch.zeros(3, 3), mask)
    assert aligned_sampler_logps(torch.full((2, 1), -1.0), mask).tolist() == [[-1.0, 0, 0], [-1.0, 0, 0]]


class StuckLLM:
    """``collective_rpc`` blocks until released: a vLLM worker that never answers."""

    def __init__(self):
        self.release = threading.Event()

    def collective_rpc(self, fn, args=()):
        self.release.wait(30)


def test_a_stuck_weight_sync_raises_naming_the_step(tiny):
    model, tok = tiny
    llm = StuckLLM()
    backend = VLLMBackend("unused", tok, llm=llm, sync_timeout_s=0.2)
    backend.step = 7
    with pytest.raises(TimeoutError, match=r"after training step 7 did not finish within 0.2 s \(weight_sync_timeout_s\)"):
        backend.sync_weights(model)
    llm.release.set()


def test_a_failing_weight_sync_raises_its_error(tiny):
    model, tok = tiny

    class Broken:
        def collective_rpc(self, fn, args=()):
            raise RuntimeError("CUDA out of memory")

    backend = VLLMBackend("unused", tok, llm=Broken())
    with pytest.raises(RuntimeError, match="weight sync before the first step failed.*CUDA out of memory"):
        backend.sync_weights(model)


def test_hf_backend_sync_is_a_no_op(tiny):
    model, tok = tiny
    HFBackend(model, tok).sync_weights(model)
