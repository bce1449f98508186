"""The sampling engine: batched generation plus the per-token log-probs the RL losses need.

Layout of every batch (shapes: B sequences, P prompt tokens, C completion tokens)::

    prompt_ids     (B, P)  left-padded with the pad token        prompt_mask     (B, P) bool
    completion_ids (B, C)  right-padded after the first EOS      completion_mask (B, C) bool

``completion_mask`` is True up to and including the first EOS (the EOS is a real action the policy
takes and must be credited); a completion with no EOS within ``max_new_tokens`` is *truncated*.
Position ids are ``cumsum(attention_mask) - 1`` so left padding never shifts positions
(N implementation details #2). Log-probs are taken from logits divided by the sampling temperature,
identically at sampling and training time (N implementation details #5), and only at completion
positions (``logits_to_keep``): no full-vocabulary work on prompt tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from rlhfkit.data.chat import tokenize_prompt
from rlhfkit.ops import entropy_from_logits, selective_log_softmax


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
class Rollout:
    """One batch of sampled completions and everything computed about them (shapes in module doc)."""

    prompts: list[list[dict]]
    completions: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    ended: torch.Tensor
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

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], 1)

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


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = True
    return ids, mask


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): True through the first EOS of each row; ended = an EOS occurred."""
    is_eos = completion_ids == eos_id
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.int().argmax(1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long))
    mask = torch.arange(completion_ids.shape[1], device=completion_ids.device)[None] <= first[:, None]
    return mask, ended


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def forward_completion(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Model output over [prompt; completion] keeping only the C+1 positions whose logits predict
    completion tokens (``logits_to_keep``). Returns the raw output; ``out.logits`` is (B, C+1, V)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, completion_mask], 1).long()
    return model(input_ids=ids, attention_mask=att, position_ids=position_ids(att), use_cache=False,
                 logits_to_keep=completion_ids.shape[1] + 1)


SHARED_ROW_TOKENS = 2048
"""Most tokens in one packed row of the shared-prompt layout. Attention over a packed row costs N^2
(the mask is dense), linear layers N: at 2048 tokens on a 135M model the masked-out attention is
~25% of the linear work; a larger batch is split into several rows."""


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                     with_entropy: bool = False, share_prompts: bool = False):
    """Per-token log-probs (B, C) of the completion tokens under ``model`` at ``temperature``
    (and per-token entropies when asked). Masked positions hold garbage; callers mask them.

    ``share_prompts``: the padding-free layout of :func:`rlhfkit.train.logps.completion_logps`, in which
    a prompt that several completions continue (GRPO's K samples) is computed once and no padding is
    computed; the same values as the padded batch, to float rounding (tested)."""
    if share_prompts:
        return _shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                    with_entropy)
    logits = forward_completion(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logits
    logits = logits[:, :-1].float() / temperature  # position t predicts completion token t
    logps = selective_log_softmax(logits, completion_ids)
    if with_entropy:
        return logps, entropy_from_logits(logits)
    return logps


def _shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float,
                         with_entropy: bool):
    from rlhfkit.train.logps import completion_logps as ragged_logps

    prompts = [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask.bool())]
    completions = [row[:n].tolist() for row, n in zip(completion_ids, completion_mask.sum(1).tolist())]
    out = ragged_logps(model, prompts, completions, temperature=temperature, with_entropy=with_entropy,
                       max_row_tokens=SHARED_ROW_TOKENS)
    pad = (0, completion_ids.shape[1] - out[0].shape[1])  # the batch's width C; mask is a prefix of each row
    logps = torch.nn.functional.pad(out[0], pad)
    return (logps, torch.nn.functional.pad(out[2], pad)) if with_entropy else logps


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
                 share_prompts: bool = False):
        self.model, self.tok, self.sampling = model, tokenizer, sampling
        self.backend = backend or HFBackend(model, tokenizer)
        self.max_prompt_length = max_prompt_length
        self.share_prompts = share_prompts  # the layout of the sampling-time log-probs (see completion_logps)

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
        if with_logps:
            r.logps = completion_logps(self.model, prompt_ids, prompt_mask, completion_ids, mask,
                                       self.sampling.temperature or 1.0, share_prompts=self.share_prompts)
        return r
