"""The online methods' shared config (:class:`OnlineConfig`, which PPO, GRPO/RLOO and CMPO extend) and
the small checks their ``validate()`` methods use. ``rlhfkit.train.online`` re-exports these names."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhfkit.config import CommonConfig, check_choice
from rlhfkit.losses.kl import KL_ESTIMATORS
from rlhfkit.models.logps import SHARED_ROW_TOKENS, completion_logps
from rlhfkit.rollout import rewards
from rlhfkit.rollout.engine import SamplingConfig
from rlhfkit.train.online_rollout import IMPORTANCE_SAMPLING, ROLLOUT_BACKENDS, check_backend_available

LR_SCHEDULES = ("linear", "cosine", "constant")
"""Decay after warmup (``runtime.make_scheduler``'s names)."""
DEFAULT_TASK = "sentiment"
"""The task of a run given neither ``task`` nor ``prompts``."""
DEFAULT_EVAL_FRACTION = 0.1
"""``eval_fraction`` when ``prompts`` is given without ``eval_prompts_data``."""
SPLIT_SEED = 0
"""Hash seed of the held-out split of ``prompts`` (rlhfkit.data.prompt_data.split_held_out): fixed, not
the run's seed, so runs with different seeds evaluate on the same prompts."""


@dataclass
class OnlineConfig(CommonConfig):
    """Fields shared by the online RL methods."""

    task: str | None = None
    """Built-in task (`rlhfkit tasks` lists them): its prompts and its hidden gold reward. None:
    'sentiment' when ``prompts`` is None; with ``prompts``, a task only adds its gold reward ('gold'
    in ``reward``, ``eval/gold``), and None means no gold at all."""
    prompts: str | None = None
    """Your own prompt dataset (a .jsonl/.json/.parquet file, a save_to_disk folder or a hub id): a
    ``prompt`` string or message list, or ``messages``, per row; every other column goes to the reward
    with its prompt (docs/rewards.md). None = the task's prompts."""
    eval_prompts_data: str | None = None
    """Held-out prompts for the eval hook from a second dataset (same forms as ``prompts``); needs
    ``prompts``. None = a held-out fraction of ``prompts`` (``eval_fraction``), or the task's held-out split."""
    eval_fraction: float | None = None
    """Fraction of the distinct prompts of ``prompts`` held out for the eval hook (split by prompt with
    a fixed hash seed, so the same file always splits the same way), in [0, 1). None = 0.1 when
    ``prompts`` is given without ``eval_prompts_data``. 0 = no held-out set (no eval)."""
    reward: str = "gold"
    """What the policy is optimised for, a weighted comma list of: 'gold' (the task's programmatic
    reward), 'rm:PATH' (a trained reward model), 'fn:MODULE:NAME' or 'fn:FILE.py:NAME' (a TRL-style
    reward function), 'verify:math', 'verify:exact' (against the 'answer' column), 'verify:regex=PATTERN',
    'judge:MODEL' (an LM judge); e.g. 'rm:runs/rm@1.0,gold@0.5' (docs/rewards.md)."""
    total_steps: int = 40
    """Optimizer phases (generate -> optimize) to run; max_steps overrides it."""
    prompts_per_step: int = 8
    """Prompts sampled per step (all processes together)."""
    samples_per_prompt: int = 1
    """K completions per prompt (GRPO/RLOO groups need K >= 2)."""
    temperature: float = 0.7
    """Sampling temperature (> 0); training log-probs use the same one (N details #5)."""
    top_p: float = 1.0
    """Nucleus sampling, in (0, 1] (1.0 = off, keeps the sampler exactly the policy)."""
    max_new_tokens: int = 48
    """Completion length cap; longer completions are truncated."""
    max_prompt_length: int = 256
    """Prompts longer than this (tokens) are an error."""
    missing_eos_penalty: float | None = -1.0
    """EOS trick (N details #7): a completion without EOS scores this instead of its reward (None = off)."""
    lr: float = 1e-6
    """Policy learning rate (AdamW)."""
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5 as in the TL;DR PPO reproduction, N details #10)."""
    lr_schedule: str = "linear"
    """LR decay after warmup: linear (annealed to 0, N details #10), cosine or constant."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    epochs_per_step: int = 1
    """Optimisation passes over each batch of rollouts (PPO's 'ppo_epochs')."""
    mini_batch_size: int | None = None
    """Sequences per optimizer update (per process); None = the whole rollout batch (one update per epoch)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (per process)."""
    share_prompts: bool = True
    """Log-prob passes (sampling-time, reference, training) compute each prompt once for all of its
    completions, without padding (one packed row, a 4D mask; ``rlhfkit.models.logps``, layout 'shared').
    False: padded batches, each completion with its own copy of the prompt. Same values to float rounding."""
    beta: float = 0.05
    """KL coefficient against the reference (starting) policy (0 disables the KL penalty)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: k1, k2 or k3 (http://joschu.net/blog/kl-approx.html)."""
    eval_every: int = 10
    """Evaluate on held-out prompts every this many steps (and at step 0 and the end); 0 = never."""
    eval_prompts: int = 32
    """Held-out prompts used by the eval hook (the first this many of the held-out set, fixed seed)."""
    sample_every: int = 10
    """Write a table of sample completions to samples.jsonl every this many steps (0 = never)."""
    max_minutes: float | None = None
    """Wall-clock budget: stop (evaluating and checkpointing) after the step that passes it; the LR
    schedule still follows total_steps. None = no budget."""
    rollout_backend: str = "auto"
    """Generation backend (docs/generation.md): 'auto' (the default: 'fast' for a whole Llama policy on a
    CPU, else 'hf'; LoRA and FSDP / ZeRO-3 get 'hf'), 'hf' (transformers generate on the policy itself, any
    device, exact), 'fast' (rlhfkit's int8 CPU engine, Llama models on a CPU; re-quantized from the policy
    after every update), or 'vllm' (CUDA, `pip install rlhfkit[vllm]`; weights are pushed to vLLM after
    every update). 'fast' and 'vllm' are not exactly the policy: see ``importance_sampling``; or 'remote' (a
    rollout server started with `rlhfkit serve-rollouts` at ``rollout_server``; the policy's weights are
    pushed to it at start and after every update; it reports its log-probs, so 'auto' importance sampling
    logs and corrects the gap)."""
    rollout_server: str | None = None
    """URL of the rollout server (e.g. 'http://gen-host:8000') for rollout_backend 'remote'; None otherwise
    (docs/generation.md, "Server mode")."""
    rollout_timeout_s: float = 600.0
    """'remote': seconds one generate request may take before the run stops with an error naming the step
    (a dead or stuck server otherwise hangs the run). > 0."""
    vllm_gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory vLLM may take when colocated with training, in (0, 1]."""
    weight_sync_timeout_s: float = 300.0
    """vLLM and 'remote': seconds a weight sync into the engine (a push to the server) may take before the run
    stops with an error naming the step (a stuck worker otherwise hangs the run). > 0."""
    importance_sampling: str = "auto"
    """Truncated importance sampling (TIS, rlhfkit.losses.importance) of a sampler that is not exactly the
    policy: each token's policy-gradient term times ``min(π_old/μ, is_cap)``, μ the sampler's own
    log-prob. 'auto': on when the backend reports its log-probs ('fast', 'vllm', 'remote'; 'hf' samples from the
    policy itself, so nothing changes), 'on' (an error with 'hf'), 'off' (the gap is still logged)."""
    is_cap: float = 2.0
    """TIS truncation C (Yao et al. 2025 use 2; typical 1.5-5); 0 disables the correction. >= 0."""

    def validate(self) -> None:
        super().validate()
        check_choice(self, "kl_estimator", KL_ESTIMATORS)
        check_choice(self, "lr_schedule", LR_SCHEDULES)
        check_choice(self, "rollout_backend", ROLLOUT_BACKENDS)
        check_choice(self, "importance_sampling", IMPORTANCE_SAMPLING)
        require(self, "importance_sampling", not (self.importance_sampling == "on" and self.rollout_backend == "hf"),
                "'auto' or 'off' with rollout_backend 'hf' (it samples from the policy itself: no sampler log-probs)")
        check_backend_available(self.rollout_backend)
        if self.rollout_backend == "remote":
            require(self, "rollout_server", bool(self.rollout_server) and str(self.rollout_server).startswith(
                ("http://", "https://")), "the URL of a running `rlhfkit serve-rollouts` (e.g. 'http://127.0.0.1:8000') "
                "with rollout_backend 'remote'")
        else:
            require(self, "rollout_server", self.rollout_server is None,
                    f"None unless rollout_backend is 'remote' (it is {self.rollout_backend!r})")
        rewards.parse_reward_spec(self.reward)
        require(self, "eval_fraction", self.eval_fraction is None or self.eval_prompts_data is None,
                "None when eval_prompts_data is given (one held-out set)")
        require(self, "eval_fraction", self.eval_fraction is None or 0 <= self.eval_fraction < 1, "in [0, 1) or None")
        for name in ("prompts", "eval_prompts_data", "task"):
            require(self, name, getattr(self, name) is None or str(getattr(self, name)).strip() != "", "non-empty or None")
        for name in ("total_steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_prompt_length",
                     "epochs_per_step", "micro_batch_size", "eval_prompts"):
            require(self, name, getattr(self, name) >= 1, ">= 1")
        for name in ("warmup_steps", "grad_clip", "beta", "eval_every", "sample_every"):
            require(self, name, getattr(self, name) >= 0, ">= 0")
        for name in ("temperature", "lr", "adam_eps"):
            require(self, name, getattr(self, name) > 0, "> 0")
        require(self, "top_p", 0 < self.top_p <= 1, "in (0, 1]")
        require(self, "vllm_gpu_memory_utilization", 0 < self.vllm_gpu_memory_utilization <= 1, "in (0, 1]")
        require(self, "weight_sync_timeout_s", self.weight_sync_timeout_s > 0, "> 0")
        require(self, "rollout_timeout_s", self.rollout_timeout_s > 0, "> 0")
        require(self, "is_cap", self.is_cap >= 0, ">= 0 (0 = no correction)")
        require(self, "mini_batch_size", self.mini_batch_size is None or self.mini_batch_size >= 1, ">= 1 or None")
        require(self, "max_minutes", self.max_minutes is None or self.max_minutes >= 0, ">= 0 or None")
        require(self, "missing_eos_penalty", self.missing_eos_penalty is None or math.isfinite(self.missing_eos_penalty),
                "finite or None")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)

    def steps(self) -> int:
        return self.max_steps or self.total_steps

    def layout(self) -> str:
        """The log-prob layout (rlhfkit.models.logps) of every pass: 'shared' or 'padded'."""
        return "shared" if self.share_prompts else "padded"

    def logps(self, model, batch, with_entropy: bool = False):
        """Per-token log-probs (B, C) of ``batch``'s completions under ``model`` at the sampling
        temperature, in the configured layout: the one call behind every online log-prob pass."""
        return completion_logps(model, batch, layout=self.layout(), temperature=self.temperature,
                                with_entropy=with_entropy, max_row_tokens=SHARED_ROW_TOKENS)


def require(cfg, name: str, ok: bool, rule: str) -> None:
    """Raise ValueError naming the field ``name`` unless ``ok`` (``rule`` says what is allowed)."""
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {getattr(cfg, name)!r}")


def variant(table: dict, name: str, field_name: str):
    """``table[name]``: a method variant chosen by name; an unknown name is an error, never a fallback."""
    if name not in table:
        raise ValueError(f"{field_name} must be one of {', '.join(table)}, got {name!r}")
    return table[name]
