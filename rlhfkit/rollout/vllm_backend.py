"""vLLM generation backend (optional extra: ``pip install rlhfkit[vllm]``), same interface as HFBackend.

vLLM produces the token ids and, since vLLM samples with its own kernels (bf16, other reductions), its
own log-probs of the sampled tokens (``SamplingParams(logprobs=0)``: the sampled token only), kept in
:attr:`VLLMBackend.last_logps`. The Sampler hands them to the trainer as ``extras['sampler_logps']``; the
training log-probs are still recomputed by the training model (rlhfkit.models.logps.completion_logps),
and the gap between the two is corrected by truncated importance sampling (rlhfkit.losses.importance).
The engine is built with ``logprobs_mode='processed_logprobs'`` so its log-probs are those of the
distribution it sampled from (after temperature, top-k, top-p), not of the raw logits at T = 1.

Weights: after each optimizer step the trainer calls ``sync_weights(model)``, which streams the
policy's state dict into the colocated vLLM engine with ``load_weights``; a sync that does not finish
within ``sync_timeout_s`` raises instead of hanging the run (docs/generation.md, "vLLM").
"""

from __future__ import annotations

import threading
import warnings

import torch

from rlhfkit.models.batching import right_pad
from rlhfkit.rollout.engine import SamplingConfig
from rlhfkit.rollout.remote import weight_tensors

SYNC_TIMEOUT_S = 300.0
"""Default weight-sync timeout (``OnlineConfig.weight_sync_timeout_s``): a 7B bf16 state dict streams in
well under a minute on one GPU; five minutes without completion means a stuck worker, not a slow copy."""


class VLLMBackend:
    """Colocated vLLM engine (same process, same GPU as training).

    Args: ``model_dir`` the policy's Hugging Face folder; ``tokenizer``; ``gpu_memory_utilization`` vLLM's
    share of the GPU; ``dtype``; ``sync_timeout_s`` seconds a :meth:`sync_weights` may take before it
    raises; ``llm`` an engine built elsewhere (tests pass a fake one); ``with_logps`` ask vLLM for the
    sampled tokens' log-probs (default: True for the engine built here, False for a given ``llm``, whose
    ``logprobs_mode`` is unknown: pass True only for one built with ``logprobs_mode='processed_logprobs'``).
    Attributes: ``last_logps`` (B, C) float32 the sampler's log-probs of the tokens it sampled, 0 after a
    row's end (None when this vLLM cannot report processed log-probs); ``step`` the training step the
    loop last sampled for (set by rlhfkit.train.online_rollout), named in sync errors.
    """

    def __init__(self, model_dir: str, tokenizer, *, gpu_memory_utilization: float = 0.3, dtype: str = "auto",
                 sync_timeout_s: float = SYNC_TIMEOUT_S, llm=None, with_logps: bool | None = None):
        self.tok = tokenizer
        self.sync_timeout_s = sync_timeout_s
        self.step: int | None = None
        self.last_logps: torch.Tensor | None = None
        self.with_logps = llm is None if with_logps is None else with_logps
        if llm is None:
            try:  # vllm is an optional heavy extra (CUDA only): imported when this backend is chosen
                from vllm import LLM
            except ImportError as e:
                raise RuntimeError("the vLLM backend needs `pip install 'rlhfkit[vllm]'` on a CUDA machine") from e
            kwargs = dict(model=model_dir, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                          enable_prefix_caching=True)
            try:
                llm = LLM(**kwargs, logprobs_mode="processed_logprobs")
            except TypeError as e:  # a vLLM without logprobs_mode: its V1 log-probs are of the raw logits at T = 1
                if "logprobs_mode" not in str(e):
                    raise
                warnings.warn("this vLLM has no logprobs_mode (vLLM >= 0.10.2): sampler log-probs are not kept, so "
                              "no importance-sampling correction is applied", stacklevel=2)
                llm, self.with_logps = LLM(**kwargs), False
        self.llm = llm

    def sampling_params(self, sampling: SamplingConfig, seed: int | None):
        from vllm import SamplingParams  # optional extra, as in __init__

        return SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
            max_tokens=sampling.max_new_tokens, seed=seed, stop_token_ids=[self.tok.eos_token_id],
            skip_special_tokens=False, **({"logprobs": 0} if self.with_logps else {}),  # 0: the sampled token only
        )

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                 generator_seed: int | None = None) -> torch.Tensor:
        prompts = [{"prompt_token_ids": row[m].tolist()} for row, m in zip(prompt_ids, prompt_mask)]
        # A seed in SamplingParams seeds that request's own generator, so one seed shared by all
        # requests gives the K copies of a prompt (a GRPO/RLOO group) K identical completions: every
        # request gets its own seed, seed + row.
        if generator_seed is None:
            params = self.sampling_params(sampling, None)
        else:
            params = [self.sampling_params(sampling, generator_seed + i) for i in range(len(prompts))]
        self.last_logps = None
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seqs = [list(o.outputs[0].token_ids) for o in outs]
        ids = right_pad(seqs, self.tok.pad_token_id)[0]
        if self.with_logps:  # (B, C) like ids, 0 after each row's last token
            self.last_logps = torch.zeros(ids.shape)
            for row, o in enumerate(outs):
                lps = sampled_logps(o.outputs[0])
                self.last_logps[row, :len(lps)] = torch.tensor(lps)
        return ids.to(prompt_ids.device)

    def sync_weights(self, model) -> None:
        """Copy the training policy's weights into the vLLM engine (same process, same GPU), or raise
        ``TimeoutError`` naming the step after ``sync_timeout_s`` (a stuck worker otherwise hangs the run
        forever: the most reported failure of colocated engines)."""
        # each tensor once, by state-dict name (state_dict() would reshard an FSDP2 module mid-gather)
        state = {k: v.detach() for k, v in weight_tensors(model).items()}
        errors: list[BaseException] = []

        def load():
            try:
                if hasattr(self.llm, "collective_rpc"):  # vLLM >= 0.7 (V1 engine)
                    self.llm.collective_rpc(_load_weights_rpc, args=(list(state.items()),))
                else:  # older V0 engine: the model lives on the driver worker
                    self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(state.items())
            except BaseException as e:  # re-raised on the caller's thread below
                errors.append(e)

        # a daemon thread: a timed-out load cannot be cancelled, but it must not keep the process alive
        worker = threading.Thread(target=load, name="vllm-weight-sync", daemon=True)
        worker.start()
        worker.join(self.sync_timeout_s)
        where = "before the first step" if self.step is None else f"after training step {self.step}"
        if worker.is_alive():
            raise TimeoutError(f"vLLM weight sync {where} did not finish within {self.sync_timeout_s:g} s "
                               "(weight_sync_timeout_s): a vLLM worker is stuck or out of GPU memory; the engine "
                               "would keep sampling from stale weights, so the run stops here")
        if errors:
            raise RuntimeError(f"vLLM weight sync {where} failed: {errors[0]!r}") from errors[0]


def sampled_logps(completion) -> list[float]:
    """The log-prob of each sampled token from one vLLM ``CompletionOutput``: ``logprobs`` is one dict per
    token, ``{token_id: Logprob(logprob=...)}``, always holding the sampled id (plus the top-k asked for)."""
    if completion.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs although SamplingParams(logprobs=0) asked for them")
    return [float(step[t].logprob) for t, step in zip(completion.token_ids, completion.logprobs)]


def _load_weights_rpc(worker, weights):
    worker.model_runner.model.load_weights(weights)
