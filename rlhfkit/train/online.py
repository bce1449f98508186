"""What every online RL method (PPO, GRPO, RLOO, REINFORCE++, CMPO) shares: the config block, the
prompt stream, reward sources, the generate-and-score phase, the periodic eval hook.

The methods' modules keep their own loops and math; this file is plumbing only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from rlhfkit.config import CommonConfig
from rlhfkit.data.tasks import get_task
from rlhfkit.losses.kl import kl_per_token
from rlhfkit.models.logps import SHARED_ROW_TOKENS, completion_logps
from rlhfkit.ops import masked_mean
from rlhfkit.rollout import rewards
from rlhfkit.rollout.engine import Rollout, Sampler, SamplingConfig


@dataclass
class OnlineConfig(CommonConfig):
    """Fields shared by the online RL methods."""

    task: str = "sentiment"
    """Built-in task giving the prompts and the hidden gold reward (`rlhfkit tasks` lists them)."""
    reward: str = "gold"
    """What the policy is optimised for: 'gold' (the task's programmatic reward), 'rm:PATH' (a
    trained reward model), or a weighted comma list, e.g. 'rm:runs/rm@1.0,gold@0.5'."""
    total_steps: int = 40
    """Optimizer phases (generate -> optimize) to run; max_steps overrides it."""
    prompts_per_step: int = 8
    """Prompts sampled per step (all processes together)."""
    samples_per_prompt: int = 1
    """K completions per prompt (GRPO/RLOO groups need K >= 2)."""
    temperature: float = 0.7
    """Sampling temperature; training log-probs use the same one (N details #5)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off, keeps the sampler exactly the policy)."""
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
    """Sequences per optimizer update; None = the whole rollout batch (one update per epoch)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (per process)."""
    share_prompts: bool = True
    """Log-prob passes (sampling-time, reference, training) compute each prompt once for all of its
    completions, without padding (one packed row, a 4D mask; ``rlhfkit.train.logps``). False: padded
    batches, each completion with its own copy of the prompt. Same values to float rounding."""
    beta: float = 0.05
    """KL coefficient against the reference (starting) policy (0 disables the reference model)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: k1, k2 or k3 (http://joschu.net/blog/kl-approx.html)."""
    eval_every: int = 10
    """Evaluate on held-out prompts every this many steps (and at step 0 and the end)."""
    eval_prompts: int = 32
    """Held-out prompts used by the eval hook (fixed set, fixed seed)."""
    sample_every: int = 10
    """Write a table of sample completions to samples.jsonl every this many steps."""
    max_minutes: float | None = None
    """Wall-clock budget: stop (evaluating and checkpointing) after the step that passes it; the LR
    schedule still follows total_steps. None = no budget."""
    rollout_backend: str = "hf"
    """Generation backend: 'hf' (transformers generate, any device) or 'vllm' (CUDA, `pip install
    rlhfkit[vllm]`; weights are pushed to vLLM after every update)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory vLLM may take when colocated with training."""

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


class Budget:
    """``max_minutes`` as a check the loop makes after each step."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def spent(self, acc) -> bool:
        """True on every process once any process is past the deadline (all must stop at one step)."""
        over = self.deadline is not None and time.monotonic() > self.deadline
        if acc.num_processes > 1:
            over = acc.reduce(torch.tensor(float(over), device=acc.device), "max").item() > 0
        return over


# --- prompts -----------------------------------------------------------------------------------------


class PromptStream:
    """Endless shuffled passes over the task's train prompts; deterministic in (seed, position) so
    a resumed run sees the same prompts as an uninterrupted one."""

    def __init__(self, prompts: list, seed: int):
        if not prompts:
            raise ValueError("no training prompts")
        self.prompts, self.seed = prompts, seed

    def batch(self, step: int, n: int) -> list:
        out = []
        for i in range(step * n, (step + 1) * n):
            epoch, j = divmod(i, len(self.prompts))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
            out.append(self.prompts[order[j]])
        return out


# --- the generate-and-score phase -------------------------------------------------------------------


@torch.no_grad()
def generate_and_score(sampler: Sampler, prompts: list, k: int, ref_model, reward: rewards.RewardSource, task,
                       cfg: OnlineConfig, seed: int, with_logps: bool = True) -> Rollout:
    """Sample K completions per prompt, compute policy and reference log-probs and the scores.

    Groups are consecutive: rows [g*K, (g+1)*K) share a prompt (what group advantages expect).
    ``with_logps=False`` leaves ``r.logps`` None for a trainer that takes them from its own first
    (and only) training forward pass.
    """
    repeated = [p for p in prompts for _ in range(k)]
    r = sampler.sample(repeated, seed=seed, with_logps=with_logps)
    if ref_model is not None:
        r.ref_logps = cfg.logps(ref_model, r)
    raw = reward(r)
    r.extras["raw_scores"] = raw.clone()
    r.extras["gold"] = raw.clone() if reward.uses_gold_only else rewards.task_gold(task, r)
    if cfg.missing_eos_penalty is not None:
        raw = torch.where(r.ended.cpu(), raw, torch.full_like(raw, cfg.missing_eos_penalty))
    r.scores = raw.to(r.completion_ids.device)
    return r


def rollout_metrics(r: Rollout) -> dict:
    """reward/, kl/ and length metrics of one batch (padding excluded everywhere)."""
    mask = r.completion_mask
    lengths = mask.sum(1).float()
    m = {
        "reward/mean": r.extras["raw_scores"].mean().item(),
        "reward/std": r.extras["raw_scores"].std().item() if len(r.completions) > 1 else 0.0,
        "reward/score_mean": r.scores.float().mean().item(),
        "reward/gold": r.extras["gold"].mean().item(),
        "rollout/length": lengths.mean().item(),
        "rollout/truncated_frac": (~r.ended).float().mean().item(),
    }
    if r.ref_logps is not None:
        seq_kl = ((r.logps - r.ref_logps) * mask).sum(1)
        m["kl/seq"] = seq_kl.mean().item()
        m["kl/k3_token"] = masked_mean(kl_per_token(r.logps, r.ref_logps, "k3"), mask).item()
    return m


# --- the eval hook --------------------------------------------------------------------------------


class HeldOutEval:
    """The eval hook: gold reward, proxy reward and KL(policy || reference) on a fixed held-out prompt set.

    Sampled at the training temperature with a fixed seed, so successive evals differ only by the
    policy. KL is the sequence-level estimate mean_y[log pi(y) - log pi_ref(y)], y ~ pi. The first
    call's per-prompt gold rewards (the starting policy's, in a run that does not resume) are the
    baseline of every later call's ``eval/win_rate_start``: the fraction of prompts whose reply scores
    a higher gold reward than the first eval's reply to the same prompt, ties counted half.
    """

    def __init__(self, ref_model, reward: rewards.RewardSource, task, prompts: list, cfg: OnlineConfig):
        self.ref_model, self.reward, self.task, self.prompts, self.cfg = ref_model, reward, task, prompts, cfg
        self.start_gold: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, sampler: Sampler) -> dict:
        r = sampler.sample(self.prompts, seed=12345)
        gold = rewards.task_gold(self.task, r).float()
        proxy = gold if self.reward.uses_gold_only else self.reward(r)
        out = {"eval/gold": gold.mean().item(), "eval/proxy": proxy.mean().item(),
               "eval/length": r.completion_mask.sum(1).float().mean().item()}
        if self.start_gold is None:
            self.start_gold = gold
        else:
            out["eval/win_rate_start"] = ((gold > self.start_gold).float() + 0.5 * (gold == self.start_gold).float()).mean().item()
        if self.ref_model is not None:
            ref = self.cfg.logps(self.ref_model, r)
            kl = ((r.logps - ref) * r.completion_mask).sum(1).mean().item()
            out["eval/kl"] = kl
            out["eval/sqrt_kl"] = math.sqrt(max(kl, 0.0))
        return out


def sample_rows(r: Rollout, n: int = 4) -> list[dict]:
    return [{"prompt": p[-1]["content"], "completion": c, "reward": float(s), "gold": float(g)}
            for p, c, s, g in list(zip(r.prompts, r.completions, r.extras["raw_scores"], r.extras["gold"]))[:n]]


def make_sampler(cfg: OnlineConfig, policy, tok, model_dir: str) -> Sampler:
    """The sampler over the (unwrapped) policy with the configured backend."""
    backend = None
    if cfg.rollout_backend == "vllm":
        from rlhfkit.models.loading import resolve
        from rlhfkit.rollout.vllm_backend import VLLMBackend

        backend = VLLMBackend(resolve(model_dir), tok, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    elif cfg.rollout_backend != "hf":
        raise ValueError(f"rollout_backend must be 'hf' or 'vllm', got {cfg.rollout_backend!r}")
    return Sampler(policy, tok, cfg.sampling(), backend=backend, max_prompt_length=cfg.max_prompt_length,
                   layout=cfg.layout())


@dataclass
class Start:
    """What every online method builds before its loop (phase 1), made by :func:`start`."""

    acc: object
    ckpt: object
    task: object
    policy: object
    ref: object
    tok: object
    reward: object
    total: int
    local_prompts: int
    stream: PromptStream
    eval_prompts: list


def start(cfg: OnlineConfig, reward_fn=None, task=None) -> Start:
    """Accelerator and per-process seed (N details #12), the checkpoint to resume from, the task,
    policy + frozen reference, the reward source (``reward_fn(rollout)`` overrides it), step count,
    this process's share of prompts, the prompt stream and the fixed held-out eval prompts."""
    from rlhfkit.ops import exact_div
    from rlhfkit.train import runtime

    acc = runtime.make_accelerator(cfg.mixed_precision)
    runtime.seed_everything(cfg.seed + acc.process_index)
    ckpt = runtime.find_checkpoint(cfg.resume, cfg.output_dir)
    task = task or get_task(cfg.task)
    policy, ref, tok = load_policy_and_reference(cfg, ckpt)
    reward = rewards.RewardSource(cfg.reward, task, acc.device, tok) if reward_fn is None else rewards.CustomReward(reward_fn)
    return Start(acc=acc, ckpt=ckpt, task=task, policy=policy, ref=ref, tok=tok, reward=reward, total=cfg.steps(),
                 local_prompts=exact_div(cfg.prompts_per_step, acc.num_processes, "prompts_per_step / processes"),
                 stream=PromptStream(task.prompts("train"), cfg.seed),
                 eval_prompts=task.prompts("heldout")[:cfg.eval_prompts])


def local_batch(s: Start, step: int, cfg: OnlineConfig) -> list:
    """This process's slice of the step's prompts."""
    prompts = s.stream.batch(step, cfg.prompts_per_step)
    i = s.acc.process_index
    return prompts[i * s.local_prompts:(i + 1) * s.local_prompts]


def load_policy_and_reference(cfg: OnlineConfig, ckpt):
    """The trainable policy (from the checkpoint when resuming) and a frozen reference copy of the
    *starting* model: the KL penalty needs it when beta > 0, and the eval hook always reports KL."""
    from rlhfkit.models import load_model

    policy, tok = load_model(str(ckpt) if ckpt else cfg.model, seed=cfg.seed)
    ref, _ = load_model(cfg.model, seed=cfg.seed)
    ref.eval().requires_grad_(False)
    return policy, ref, tok
