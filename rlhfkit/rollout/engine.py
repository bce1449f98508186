"""The sampling engine: prompts in, a :class:`Rollout` out (token ids, masks, per-token log-probs).

A Rollout is laid out as :mod:`rlhfkit.models.batching` draws it (B sequences, P prompt tokens, C
completion tokens)::

    prompt_ids     (B, P)  left-padded with the pad token        prompt_mask     (B, P) bool
    completion_ids (B, C)  right-padded after the first EOS      completion_mask (B, C) bool

``completion_mask`` is True up to and including the first EOS (the EOS is a real action the policy
takes and must be credited); a completion with no EOS within ``max_new_tokens`` is *truncated*.
Log-probs come from :func:`rlhfkit.models.logps.completion_logps` with logits divided by the sampling
temperature, identically at sampling and training time (N implementation details #5).
A backend (transformers' ``generate`` here, the int8 CPU engine in fast.py, vLLM in vllm_backend.py)
produces token ids; one that is not exactly the policy (fast, vLLM) also reports its own log-probs of
the sampled tokens in ``backend.last_logps``, which :meth:`Sampler.sample` keeps as
``rollout.extras['sampler_logps']`` for the importance-sampling correction (rlhfkit.losses.importance).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from rlhfkit.data.chat import tokenize_prompt
from rlhfkit.models.batching import CompletionBatch, completion_mask_from_ids, left_pad
from rlhfkit.models.logps import SHARED_ROW_TOKENS, completion_logps


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Softmax temperature; logits are divided by it for sampling and for training log-probs."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off). Off-policy bias warning: with top_p < 1 the sampler is
    not the policy the log-probs describe."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_new_tokens: int = 64
    """Completion length cap; completions cut here are 'truncated' (no EOS)."""


@dataclass
class Rollout(CompletionBatch):
    """One batch of sampled completions and everything computed about them: the four tensors of a
    :class:`CompletionBatch` (shapes in the module doc) and the fields below."""

    prompts: list[list[dict]] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    ended: torch.Tensor | None = None
    """(B,) bool: the completion emitted EOS before max_new_tokens."""
    logps: torch.Tensor | None = None
    """(B, C) policy per-token log-probs at sampling time (temperature-scaled)."""
    ref_logps: torch.Tensor | None = None
    """(B, C) reference-model per-token log-probs."""
    values: torch.Tensor | None = None
    """(B, C) critic values, when a critic exists."""
    scores: torch.Tensor | None = None
    """(B,) sequence scores (reward model / programmatic), before KL shaping."""
    rewards: torch.Tensor | None = None
    """(B, C) per-token rewards after KL shaping."""
    extras: dict = field(default_factory=dict)
    """Per-row extras, sliced with the rows by :meth:`select`; ``sampler_logps`` (B, C) the sampler's own
    log-probs of the sampled tokens (0 where ``completion_mask`` is False), present when the backend is
    not exactly the policy."""

    def select(self, idx) -> Rollout:
        """The sub-batch at ``idx`` (a mini-batch): row indices (list or tensor) or a (B,) bool mask.
        Every tensor and list field is sliced alike; a tensor is indexed on its own device (the
        trainers index with a GPU tensor while ``extras`` such as raw scores stay on the CPU)."""
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(1)  # as row numbers, so lists get the same rows as tensors
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)

        def pick(v):
            if isinstance(v, torch.Tensor):
                return v[idx.to(v.device)] if isinstance(idx, torch.Tensor) else v[rows]
            if isinstance(v, list):
                return [v[i] for i in rows]
            return v
        return Rollout(**{k: pick(getattr(self, k)) for k in self.__dataclass_fields__ if k != "extras"},
                       extras={k: pick(v) for k, v in self.extras.items()})


class HFBackend:
    """Generation with ``transformers``' ``generate`` (KV cache, left padding, per-row EOS stop)."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                 generator_seed: int | None = None) -> torch.Tensor:
        model = self.model
        was_training = model.training
        model.eval()
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tok.pad_token_id,
                      eos_token_id=self.tok.eos_token_id, use_cache=True)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)  # 0 disables top-k: generate would otherwise apply its default of 50
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        ctx = torch.random.fork_rng(devices=[]) if generator_seed is not None else contextlib.nullcontext()
        with ctx:
            if generator_seed is not None:
                torch.manual_seed(generator_seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(), **kwargs)
        model.train(was_training)
        return out[:, prompt_ids.shape[1]:]

    def sync_weights(self, model) -> None:
        """The HF backend generates with the training model itself: nothing to copy."""


class Sampler:
    """Prompts in, :class:`Rollout` out. The backend (HF or vLLM) only produces token ids."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, backend=None, max_prompt_length: int = 512,
                 layout: str = "padded"):
        self.model, self.tok, self.sampling = model, tokenizer, sampling
        self.backend = backend or HFBackend(model, tokenizer)
        self.max_prompt_length = max_prompt_length
        self.layout = layout  # of the sampling-time log-prob pass (rlhfkit.models.logps)

    def encode_prompts(self, prompts: list[list[dict]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [tokenize_prompt(self.tok, p, self.max_prompt_length) for p in prompts]
        ids, mask = left_pad(seqs, self.tok.pad_token_id)
        device = device or next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def sample(self, prompts: list[list[dict]], *, seed: int | None = None, with_logps: bool = True) -> Rollout:
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        completion_ids = self.backend.generate(prompt_ids, prompt_mask, self.sampling, seed)
        if completion_ids.shape[1] == 0:
            completion_ids = torch.full((len(prompts), 1), self.tok.eos_token_id, device=prompt_ids.device)
        mask, ended = completion_mask_from_ids(completion_ids, self.tok.eos_token_id)
        completion_ids = completion_ids.masked_fill(~mask, self.tok.pad_token_id)
        texts = self.tok.batch_decode([row[m] for row, m in zip(completion_ids, mask)], skip_special_tokens=True)
        r = Rollout(prompts=prompts, completions=texts, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                    completion_ids=completion_ids, completion_mask=mask, ended=ended)
        sampler_logps = getattr(self.backend, "last_logps", None)  # None: HFBackend, the policy itself
        if sampler_logps is not None:
            r.extras["sampler_logps"] = aligned_sampler_logps(sampler_logps, mask)
        if with_logps:
            r.logps = completion_logps(self.model, r, layout=self.layout, temperature=self.sampling.temperature or 1.0,
                                       max_row_tokens=SHARED_ROW_TOKENS)
        return r


def aligned_sampler_logps(sampler_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """A backend's (B, C') log-probs as (B, C) float32 on the mask's device, 0 where the mask is False.

    C' may be narrower than C (no column produced: the Sampler's one EOS column) but never wider, and the
    rows must match: anything else means the log-probs belong to another batch (a backend bug)."""
    b, c = completion_mask.shape
    if sampler_logps.dim() != 2 or sampler_logps.shape[0] != b or sampler_logps.shape[1] > c:
        raise ValueError(f"the backend's last_logps has shape {tuple(sampler_logps.shape)}; the completions are {(b, c)}")
    out = torch.zeros(b, c, device=completion_mask.device)
    out[:, :sampler_logps.shape[1]] = sampler_logps.float().to(completion_mask.device)
    return out.masked_fill(~completion_mask, 0.0)
