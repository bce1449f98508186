"""Phase 2 of every online method: this step's prompts -> K sampled completions each -> scores.

The prompt stream, the sampler (HF or vLLM backend), the per-step sampling seed, the EOS trick and
the batch's reward/KL/length metrics. Used by grpo.py, ppo.py and cmpo.py through
:func:`generate_and_score`; the loop around it is in online.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from rlhfkit.config import check_choice
from rlhfkit.losses.kl import kl_per_token
from rlhfkit.models.loading import resolve
from rlhfkit.ops import masked_mean
from rlhfkit.rollout import rewards
from rlhfkit.rollout.engine import Rollout, Sampler
from rlhfkit.rollout.vllm_backend import VLLMBackend  # cheap: vllm is imported only when one is built

if TYPE_CHECKING:  # annotations only: online.py imports this module
    from rlhfkit.train.online import OnlineConfig, Start

ROLLOUT_BACKENDS = ("hf", "vllm")
"""Generation backends (``OnlineConfig.rollout_backend``): transformers' generate, or vLLM."""


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


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The sampler's generator seed at ``step`` on process ``rank``: ``seed * 100_003 + step * 101 + rank``.

    Why a formula and not the global RNG: each (step, rank) gets its own stream, and it is a pure
    function of the step, so a resumed run draws exactly the completions the uninterrupted run drew
    at that step, whatever else consumed random numbers before (model loading, the eval hook). Within
    one run the streams are distinct while rank < 101 (the step stride); 100_003 (a prime) keeps runs
    with neighbouring ``seed`` apart for the first ~990 steps (while step * 101 + rank < 100_003).
    The vLLM backend seeds row i of a batch with this + i (vllm_backend.py: a group's K copies of a
    prompt must not share a seed), so rows of different ranks can share a seed, never with the same prompt.
    """
    return seed * 100_003 + step * 101 + rank


def make_sampler(cfg: OnlineConfig, policy, tok, model_dir: str) -> Sampler:
    """The sampler over the (unwrapped) policy with the configured backend ('hf' or 'vllm')."""
    check_choice(cfg, "rollout_backend", ROLLOUT_BACKENDS)
    backend = None  # 'hf': the Sampler's default HFBackend, generating with ``policy`` itself
    if cfg.rollout_backend == "vllm":
        backend = VLLMBackend(resolve(model_dir), tok, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    return Sampler(policy, tok, cfg.sampling(), backend=backend, max_prompt_length=cfg.max_prompt_length,
                   layout=cfg.layout())


def local_prompts(s: Start, step: int, cfg: OnlineConfig) -> list:
    """This process's slice of the step's ``prompts_per_step`` prompts (every process draws the same
    global batch from the stream, then takes its own contiguous share)."""
    prompts = s.stream.batch(step, cfg.prompts_per_step)
    i = s.acc.process_index
    return prompts[i * s.local_prompts:(i + 1) * s.local_prompts]


@torch.no_grad()
def generate_and_score(s: Start, sampler: Sampler, step: int, cfg: OnlineConfig, with_logps: bool = True) -> Rollout:
    """Sample K = ``samples_per_prompt`` completions for each of this process's prompts, then the
    policy's and the reference's per-token log-probs and the scores (EOS trick applied).

    Groups are consecutive: rows [g*K, (g+1)*K) share a prompt (what group advantages expect; a group
    never spans two processes, so per-group baselines need no gather). ``with_logps=False`` leaves
    ``r.logps`` None for a trainer that takes them from its own first (and only) training forward pass.
    ``r.extras``: ``raw_scores`` (before the EOS trick) and ``gold`` (the task's reward, for logging).
    """
    k = cfg.samples_per_prompt
    repeated = [p for p in local_prompts(s, step, cfg) for _ in range(k)]
    r = sampler.sample(repeated, seed=sampling_seed(cfg.seed, step, s.acc.process_index), with_logps=with_logps)
    if s.ref is not None:
        r.ref_logps = cfg.logps(s.ref, r)
    raw = s.reward(r)
    r.extras["raw_scores"] = raw.clone()
    r.extras["gold"] = raw.clone() if s.reward.uses_gold_only else rewards.task_gold(s.task, r)
    if cfg.missing_eos_penalty is not None:  # N details #7: a completion without EOS scores the penalty
        raw = torch.where(r.ended.cpu(), raw, torch.full_like(raw, cfg.missing_eos_penalty))
    r.scores = raw.to(r.completion_ids.device)
    return r


def rollout_metrics(r: Rollout) -> dict:
    """reward/, kl/ and rollout/ metrics of one batch (padding excluded everywhere)."""
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


def sample_rows(r: Rollout, n: int = 4) -> list[dict]:
    """The first ``n`` completions of the batch as rows of ``samples.jsonl``."""
    return [{"prompt": p[-1]["content"], "completion": c, "reward": float(s), "gold": float(g)}
            for p, c, s, g in list(zip(r.prompts, r.completions, r.extras["raw_scores"], r.extras["gold"]))[:n]]
