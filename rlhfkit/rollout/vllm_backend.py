"""vLLM generation backend (optional extra: ``pip install rlhfkit[vllm]``), same interface as HFBackend.

vLLM only produces token ids here; log-probs for training are recomputed by the training model
(rlhfkit.models.logps.completion_logps), so a vLLM/transformers numerical mismatch can never leak into the PPO
ratio at step start (a frequent complaint in other libraries' issue trackers: sampling-time and
training-time log-probs disagree).

Weights: after each optimizer step the trainer calls ``sync_weights(model)``, which streams the
policy's state dict into the colocated vLLM engine with ``load_weights``.
"""

from __future__ import annotations

import torch

from rlhfkit.models.batching import right_pad
from rlhfkit.rollout.engine import SamplingConfig


class VLLMBackend:
    def __init__(self, model_dir: str, tokenizer, *, gpu_memory_utilization: float = 0.3, dtype: str = "auto",
                 llm=None):
        self.tok = tokenizer
        if llm is None:
            try:  # vllm is an optional heavy extra (CUDA only): imported when this backend is chosen
                from vllm import LLM
            except ImportError as e:
                raise RuntimeError("the vLLM backend needs `pip install 'rlhfkit[vllm]'` on a CUDA machine") from e
            llm = LLM(model=model_dir, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                      enable_prefix_caching=True)
        self.llm = llm

    def sampling_params(self, sampling: SamplingConfig, seed: int | None):
        from vllm import SamplingParams  # optional extra, as in __init__

        return SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
            max_tokens=sampling.max_new_tokens, seed=seed, stop_token_ids=[self.tok.eos_token_id],
            skip_special_tokens=False,
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
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seqs = [list(o.outputs[0].token_ids) for o in outs]
        return right_pad(seqs, self.tok.pad_token_id)[0].to(prompt_ids.device)

    def sync_weights(self, model) -> None:
        """Copy the training policy's weights into the vLLM engine (same process, same GPU)."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if hasattr(self.llm, "collective_rpc"):  # vLLM >= 0.7 (V1 engine)
            self.llm.collective_rpc(_load_weights_rpc, args=(list(state.items()),))
        else:  # older V0 engine: the model lives on the driver worker
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(state.items())


def _load_weights_rpc(worker, weights):
    worker.model_runner.model.load_weights(weights)
