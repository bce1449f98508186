"""Server mode, the generation side: a FastAPI app that samples completions for a remote trainer.

``rlhfkit serve-rollouts`` (rlhfkit/cli/serve.py) builds it over one model, its tokenizer and a backend
(HF, fast or vLLM: engine.py, fast.py, vllm_backend.py); the trainer talks to it through
:class:`rlhfkit.rollout.remote.RemoteBackend` (docs/generation.md, "Server mode")::

    GET  /health      -> {model, backend, weights_version, eos_token_id, pad_token_id, vocab_size}
    POST /generate    {prompt_token_ids: [[int]] unpadded rows, sampling: {temperature, top_p, top_k,
                       max_new_tokens}, seed: int | null}
                      -> {completion_ids: [[int]] each row through its first EOS, logps: [[float]] | null,
                          weights_version}
    POST /weights?version=N   body: safetensors bytes of the policy's weights (remote.weight_tensors)
                      -> {weights_version: N}

Rows are left-padded here (rlhfkit.models.batching.left_pad) exactly as the trainer's Sampler pads them,
so an HF server given the trainer's weights and seed samples the trainer's tokens. Log-probs of the
sampled tokens: a backend's own ``last_logps`` (fast, vLLM), or for HF the served model's
``completion_logps`` at the sampling temperature, so the trainer can always log the sampler gap.
One lock serializes generation and weight loads: there is one model, and a request never sees half of
a weight update. Weight pushes are checked in full (keys, shapes) before anything is copied.
"""

from __future__ import annotations

import threading
from typing import Annotated

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from rlhfkit.models.batching import CompletionBatch, completion_mask_from_ids, left_pad
from rlhfkit.models.logps import completion_logps
from rlhfkit.rollout.engine import HFBackend, SamplingConfig, aligned_sampler_logps
from rlhfkit.rollout.remote import weight_tensors


class Sampling(BaseModel):
    """The request's :class:`rlhfkit.rollout.engine.SamplingConfig`; unknown keys are an error (a typo
    such as ``max_tokens`` would otherwise sample with a default)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(ge=0, allow_inf_nan=False)
    """0 = greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: StrictInt = Field(default=0, ge=0)
    """0 = off."""
    max_new_tokens: StrictInt = Field(gt=0)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_token_ids: list[Annotated[list[StrictInt], Field(min_length=1)]] = Field(min_length=1)
    """One unpadded row of token ids per completion to sample (a prompt repeated K times for a group)."""
    sampling: Sampling
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    """Seed of the whole batch's sampling (the HF backend seeds the global generator with it, as the
    trainer's HFBackend does; vLLM seeds row i with seed + i). None = unseeded."""


def field_error(loc: list, msg: str) -> HTTPException:
    """A 422 shaped like pydantic's own, so every validation error names its field the same way."""
    return HTTPException(422, detail=[{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def weight_mismatch(received: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """Why ``received`` cannot be loaded into the tensors ``expected`` (the first bad key: an unknown one,
    then in the served model's order a missing one or one of another shape or kind), or None."""
    unknown = [k for k in received if k not in expected]
    if unknown:
        return f"unknown key {unknown[0]!r}: the served model has no such tensor (another architecture?)"
    missing = [k for k in expected if k not in received]
    for key, want in expected.items():
        if key not in received:
            return f"missing key {key!r} ({len(missing)} of the served model's {len(expected)} tensors missing)"
        got = received[key]
        if tuple(got.shape) != tuple(want.shape):
            return f"key {key!r} has shape {tuple(got.shape)} but the served model's is {tuple(want.shape)}"
        if got.dtype.is_floating_point != want.dtype.is_floating_point:
            return f"key {key!r} has dtype {got.dtype} but the served model's is {want.dtype}"
    return None


def create_app(model: torch.nn.Module, tokenizer, backend=None, *, model_name: str = "model",
               backend_name: str = "hf") -> FastAPI:
    """The rollout server's app over ``model`` (the served weights, which /weights overwrites),
    ``tokenizer`` (its pad and EOS ids) and ``backend`` (default: an HFBackend over ``model``; a fast or
    vLLM backend gets ``sync_weights(model)`` after each load)."""
    backend = backend or HFBackend(model, tokenizer)
    model.eval()
    lock = threading.Lock()
    state = {"version": 0}
    vocab = model.get_input_embeddings().num_embeddings
    max_len = getattr(model.config, "max_position_embeddings", None)
    app = FastAPI(title="rlhfkit rollout server", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict:
        return {"model": model_name, "backend": backend_name, "weights_version": state["version"],
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "vocab_size": vocab}

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict:  # a plain def: FastAPI runs it in its thread pool
        for i, row in enumerate(req.prompt_token_ids):
            bad = next((j for j, t in enumerate(row) if not 0 <= t < vocab), None)
            if bad is not None:
                raise field_error(["prompt_token_ids", i, bad], f"token id {row[bad]} is outside the served "
                                  f"model's vocabulary [0, {vocab})")
        longest = max(len(row) for row in req.prompt_token_ids)
        if max_len is not None and longest + req.sampling.max_new_tokens > max_len:
            raise field_error(["sampling", "max_new_tokens"], f"the longest prompt ({longest} tokens) + "
                              f"max_new_tokens ({req.sampling.max_new_tokens}) exceeds the served model's "
                              f"max_position_embeddings ({max_len})")
        sampling = SamplingConfig(**req.sampling.model_dump())
        device = next(model.parameters()).device
        ids, mask = left_pad(req.prompt_token_ids, tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        with lock, torch.no_grad():
            completion = backend.generate(ids, mask, sampling, req.seed)
            if completion.shape[1] == 0:  # nothing generated: an empty completion per row
                return {"completion_ids": [[] for _ in req.prompt_token_ids], "logps": None,
                        "weights_version": state["version"]}
            cmask, _ = completion_mask_from_ids(completion, tokenizer.eos_token_id)
            if hasattr(backend, "last_logps"):  # fast, vLLM: the sampler's own (None when it has none)
                lps = backend.last_logps
                lps = None if lps is None else aligned_sampler_logps(lps, cmask)
            else:  # HF samples from the served model itself: its log-probs at the sampling temperature
                batch = CompletionBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=completion,
                                        completion_mask=cmask)
                lps = completion_logps(model, batch, temperature=sampling.temperature or 1.0)
            version = state["version"]
        rows = [c[m].tolist() for c, m in zip(completion.cpu(), cmask.cpu())]
        logps = None if lps is None else [lp[m].tolist() for lp, m in zip(lps.float().cpu(), cmask.cpu())]
        return {"completion_ids": rows, "logps": logps, "weights_version": version}

    def load(body: bytes, version: int) -> dict:
        from safetensors.torch import load as load_safetensors

        try:
            received = load_safetensors(body)
        except Exception as e:  # safetensors raises its own error types; the message is what matters
            raise HTTPException(400, f"body: not a safetensors file of the policy's weights ({e})") from e
        with lock, torch.no_grad():
            if version <= state["version"]:
                raise HTTPException(400, f"version: {version} is not greater than the served weights' version "
                                         f"{state['version']} (each push carries the next version number)")
            expected = weight_tensors(model)
            problem = weight_mismatch(received, expected)
            if problem:  # checked in full before anything is copied: the old weights stay in place
                raise HTTPException(400, f"weights: {problem}")
            for key, t in expected.items():
                t.copy_(received[key])  # to the served model's device and dtype
            backend.sync_weights(model)
            state["version"] = version
        return {"weights_version": version}

    @app.post("/weights")
    async def weights(request: Request, version: int = Query(ge=0)) -> dict:
        body = await request.body()
        return await run_in_threadpool(load, body, version)  # off the event loop: /health stays responsive

    return app
