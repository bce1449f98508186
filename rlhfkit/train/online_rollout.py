"""Phase 2 of every online method: this step's prompts -> K sampled completions each -> scores.

The prompt stream, the sampler (HF, fast, vLLM or remote backend), the per-step sampling seed, the EOS trick and
the batch's reward/KL/length metrics. Used by grpo.py, ppo.py and cmpo.py through
:func:`generate_and_score`; the loop around it is in online.py.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import numpy as np
import torch

from rlhfkit.config import check_choice
from rlhfkit.losses.importance import IS_CAP, masked_truncated_is_weights
from rlhfkit.losses.kl import kl_per_token
from rlhfkit.models.loading import resolve
from rlhfkit.models.lora import reference_model
from rlhfkit.ops import masked_mean
from rlhfkit.rollout.engine import Rollout, Sampler
from rlhfkit.rollout.fast import SUPPORTED_MODEL_TYPES, FastBackend
from rlhfkit.rollout.remote import RemoteBackend
from rlhfkit.rollout.reward_components import task_gold
from rlhfkit.rollout.vllm_backend import VLLMBackend  # cheap: vllm is imported only when one is built
from rlhfkit.train.runtime import trim_heap
from rlhfkit.train.sharding import full_parameters, sharding_kind

if TYPE_CHECKING:  # annotations only: online.py imports this module
    from rlhfkit.train.online import Start
    from rlhfkit.train.online_config import OnlineConfig

PART = "reward_part/"
"""``r.extras`` key prefix of each reward component's (B,) scores (NaN = None)."""
ROLLOUT_BACKENDS = ("hf", "fast", "auto", "vllm", "remote")
"""Generation backends (``OnlineConfig.rollout_backend``): transformers' generate, rlhfkit's int8 CPU
engine (rlhfkit.rollout.fast), 'auto' (fast on a CPU for a Llama model, else hf), vLLM, or a rollout
server (rlhfkit.rollout.remote, at ``OnlineConfig.rollout_server``)."""
IMPORTANCE_SAMPLING = ("auto", "on", "off")
"""``OnlineConfig.importance_sampling``: the truncated IS correction of an inexact sampler."""


class PromptStream:
    """Endless shuffled passes over the train prompt rows (``PromptRow``: the prompt and its columns);
    deterministic in (seed, position) so a resumed run sees the same prompts as an uninterrupted one."""

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


def check_backend_available(name: str) -> None:
    """Raise before any model loads when backend ``name`` cannot run here: 'vllm' needs CUDA and the
    ``vllm`` package (checked with ``importlib.util.find_spec``, which does not import it)."""
    if name != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("rollout_backend 'vllm' needs vLLM: `pip install 'rlhfkit[vllm]'` (on a CUDA machine); "
                         "or use rollout_backend 'hf'")
    if not torch.cuda.is_available():
        raise ValueError("rollout_backend 'vllm' needs a CUDA GPU and none is visible here; use 'hf' (or 'fast' on a CPU)")


def resolve_backend(cfg: OnlineConfig, policy) -> str:
    """``cfg.rollout_backend`` with 'auto' (the default) resolved: 'fast' when the policy is a whole, plain
    Llama model on a CPU (the engine's measured win is there: docs/generation.md), else 'hf' (with LoRA too:
    the engine copies plain weights, not an adapter; and under FSDP / ZeRO-3, whose processes hold shards)."""
    if cfg.rollout_backend != "auto":
        if cfg.rollout_backend == "fast" and sharding_kind(None, policy) != "none":
            raise ValueError(f"rollout_backend 'fast' copies whole weights, but this policy is sharded "
                             f"({sharding_kind(None, policy)}); use 'hf' or 'auto'")
        return cfg.rollout_backend
    on_cpu = next(policy.parameters()).device.type == "cpu"
    fits = on_cpu and not cfg.lora_r and policy.config.model_type in SUPPORTED_MODEL_TYPES
    return "fast" if fits and sharding_kind(None, policy) == "none" else "hf"


def make_sampler(cfg: OnlineConfig, policy, tok, model_dir: str) -> Sampler:
    """The sampler over the (unwrapped) policy with the configured backend ('hf', 'fast', 'auto', 'vllm' or
    'remote'). Under FSDP or ZeRO-3 that module holds shards: its callers sample inside ``sharding.full_parameters``.
    The trainer calls ``sampler.backend.sync_weights(policy)`` after each optimizer step: a no-op for 'hf',
    a re-quantization for 'fast', a copy into the engine for 'vllm', a push to the server for 'remote'."""
    check_choice(cfg, "rollout_backend", ROLLOUT_BACKENDS)
    name = resolve_backend(cfg, policy)
    if name == "hf" and cfg.importance_sampling == "on":
        raise ValueError(f"importance_sampling 'on' needs a sampler with its own log-probs, but rollout_backend "
                         f"{cfg.rollout_backend!r} resolved to 'hf' here (the policy itself); use 'auto' or 'off'")
    backend = None  # 'hf': the Sampler's default HFBackend, generating with ``policy`` itself
    if name == "fast":
        backend = FastBackend(policy, tok)
    elif name == "vllm":
        backend = VLLMBackend(resolve(model_dir), tok, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                              sync_timeout_s=cfg.weight_sync_timeout_s)
    elif name == "remote":
        backend = remote_backend(cfg, policy, tok)
    return Sampler(policy, tok, cfg.sampling(), backend=backend, max_prompt_length=cfg.max_prompt_length,
                   layout=cfg.layout())


def remote_backend(cfg: OnlineConfig, policy, tok) -> RemoteBackend:
    """A client of the rollout server at ``cfg.rollout_server``, which gets ``policy``'s weights here, once, so
    server and policy agree from step 0 (the server may have loaded other weights, or an older run's).

    Several processes: every process builds a client and generates its own prompts; a weight push gathers the
    full parameters on every process (FSDP2 / ZeRO-3: a collective) and only the main process sends them, the
    others wait (accelerate's PartialState: the state the trainer's Accelerator shares). FSDP1 is refused: its
    gather needs the root wrapper, which the trainers do not hand to the sampler."""
    from accelerate import PartialState

    if sharding_kind(None, policy) == "fsdp1":
        raise ValueError("rollout_backend 'remote' does not support FSDP1: use FSDP2 (fsdp_version: 2, as in "
                         "examples/accelerate/fsdp.yaml), DeepSpeed ZeRO-3, DDP or one process")
    backend = RemoteBackend(cfg.rollout_server, tok, timeout_s=cfg.rollout_timeout_s,
                            sync_timeout_s=cfg.weight_sync_timeout_s, acc=PartialState(),
                            gather=lambda model: full_parameters(None, model))
    backend.sync_weights(policy)
    return backend


def local_prompts(s: Start, step: int, cfg: OnlineConfig) -> list:
    """This process's slice of the step's ``prompts_per_step`` prompt rows (every process draws the
    same global batch from the stream, then takes its own contiguous share). A row carries its columns,
    so the reward's columns stay aligned with this process's prompts by construction."""
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
    ``r.extras``: ``rows`` (each completion's PromptRow, the reward's columns), ``raw_scores`` (before
    the EOS trick; NaN where unscored), ``reward_part/<name>`` (each reward component's (B,) scores, NaN = None),
    ``scored`` ((B,) bool: some component scored it) and ``gold`` (the task's reward, when there is a task).

    Unscored samples (every component returned None) are excluded, not counted as 0: ``scored`` is
    the ``valid`` mask GRPO, Dr. GRPO and RLOO pass to their estimators (train/grpo.py: baseline, std
    and n/(n-1) over the scored samples of the group only, advantage 0 for the unscored one, 0 for a
    group with fewer than 2 scored), and ``online.optimize`` leaves them out of the loss. ``r.scores``
    still holds a finite placeholder there (:func:`fill_unscored`) for the readers that take no mask.
    With K = 1 (PPO) the group is the sample itself: it is simply left out of the loss.
    """
    k = cfg.samples_per_prompt
    rows = [row for row in local_prompts(s, step, cfg) for _ in range(k)]
    if isinstance(sampler.backend, (VLLMBackend, RemoteBackend)):
        sampler.backend.step = step  # named by a request or weight sync that fails at or after this step
    with full_parameters(s.acc, sampler.model):  # FSDP / ZeRO-3: generate from the gathered weights, not a shard
        r = sampler.sample([row.messages for row in rows], seed=sampling_seed(cfg.seed, step, s.acc.process_index),
                           with_logps=with_logps)
    r.extras["rows"] = rows
    if s.ref is not None:
        with full_parameters(s.acc, s.ref), reference_model(s.ref) as ref:  # LoRA: the policy, adapter off
            r.ref_logps = cfg.logps(ref, r)
    raw, parts = s.reward.score(r)
    r.extras["raw_scores"] = raw.clone()
    for name, part in parts.items():  # one flat (B,) entry each: Rollout.select slices them with the rows
        r.extras[PART + name] = part
    scored = ~raw.isnan()
    r.extras["scored"] = scored
    if s.task is not None:
        r.extras["gold"] = raw.clone() if s.reward.uses_gold_only else task_gold(s.task, r)
    if cfg.missing_eos_penalty is not None:  # N details #7: a completion without EOS scores the penalty
        raw = torch.where(r.ended.cpu() | ~scored, raw, torch.full_like(raw, cfg.missing_eos_penalty))
    r.scores = fill_unscored(raw, scored, k).to(r.completion_ids.device)
    release = getattr(sampler.backend, "release", None)  # fast: its int8 copies are stale after the update
    if release is not None:
        release()
    trim_heap()  # the update's gradients and activations then reuse the pages generation freed
    return r


def is_weights(cfg: OnlineConfig, mb: Rollout, old_per_token_logps: torch.Tensor) -> torch.Tensor | None:
    """The micro-batch's truncated importance weights ``min(exp(log π_old - log μ), is_cap)`` (B, C) for the
    policy-gradient loss, from the trainer's old log-probs (``mb.logps``, or the training pass's own when
    the rollout was sampled without them) and the sampler's ``mb.extras['sampler_logps']``; None when the
    correction is off or the sampler is the policy (no sampler log-probs: the loss is then unchanged)."""
    sampler = mb.extras.get("sampler_logps")
    if sampler is None or cfg.importance_sampling == "off" or cfg.is_cap == 0:
        return None
    return masked_truncated_is_weights(old_per_token_logps, sampler, mb.completion_mask, cfg.is_cap)[0]


def sampler_gap_metrics(cfg: OnlineConfig, r: Rollout) -> dict:
    """``rollout/logp_diff_mean`` (mean |log π_old - log μ| over real tokens), and when the correction is on
    ``rollout/is_weight_mean`` and ``rollout/is_clipped_frac``, over the whole rollout batch; {} for a
    sampler without its own log-probs (hf)."""
    sampler = r.extras.get("sampler_logps")
    if sampler is None or r.logps is None:
        return {}
    _, m = masked_truncated_is_weights(r.logps, sampler, r.completion_mask, cfg.is_cap or IS_CAP)
    corrected = cfg.importance_sampling != "off" and cfg.is_cap > 0
    return {k: float(v) for k, v in m.items() if corrected or k == "rollout/logp_diff_mean"}


def fill_unscored(scores: torch.Tensor, scored: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) ``scores`` with each unscored entry replaced by the mean of the scored entries of its group
    (consecutive groups of ``k``), 0 where a group has none. E.g. k=3, [1, nan, 4] -> [1, 2.5, 4].

    A placeholder, not the exclusion itself (that is the ``scored`` mask): the masked estimators never
    read it, and for the readers without a mask it is the neutral value — CMPO's leave-one-out gives
    the sample 0, DAPO's filter (``informative_groups``) sees a group as flat exactly when its scored
    samples are equal or fewer than 2, and PPO's K = 1 batch gets 0."""
    grouped = torch.where(scored, scores, torch.zeros_like(scores)).view(-1, k)
    counts = scored.view(-1, k).sum(1, keepdim=True)
    means = grouped.sum(1, keepdim=True) / counts.clamp(min=1)
    return torch.where(scored.view(-1, k), grouped, means.expand_as(grouped)).reshape(-1)


def rollout_metrics(r: Rollout) -> dict:
    """reward/, kl/ and rollout/ metrics of one batch (padding excluded everywhere)."""
    mask = r.completion_mask
    lengths = mask.sum(1).float()
    raw = r.extras["raw_scores"]
    scored = raw[~raw.isnan()]
    m = {
        "reward/mean": scored.mean().item() if len(scored) else 0.0,
        "reward/std": scored.std().item() if len(scored) > 1 else 0.0,
        "reward/score_mean": r.scores.float().mean().item(),
        "reward/unscored_frac": 1.0 - len(scored) / max(len(raw), 1),
        "rollout/length": lengths.mean().item(),
        "rollout/truncated_frac": (~r.ended).float().mean().item(),
    }
    if "gold" in r.extras:
        m["reward/gold"] = r.extras["gold"].mean().item()
    m.update(component_metrics({k[len(PART):]: v for k, v in r.extras.items() if k.startswith(PART)}, "reward"))
    if r.ref_logps is not None:
        seq_kl = ((r.logps - r.ref_logps) * mask).sum(1)
        m["kl/seq"] = seq_kl.mean().item()
        m["kl/k3_token"] = masked_mean(kl_per_token(r.logps, r.ref_logps, "k3"), mask).item()
    return m


def component_metrics(parts: dict, prefix: str) -> dict:
    """``<prefix>/<name>/mean`` (over the samples the component scored; 0 when none) and
    ``<prefix>/<name>/none_frac`` (the fraction it returned None for) of each reward component."""
    m = {}
    for name, s in parts.items():
        ok = ~s.isnan()
        m[f"{prefix}/{name}/mean"] = s[ok].mean().item() if bool(ok.any()) else 0.0
        m[f"{prefix}/{name}/none_frac"] = 1.0 - ok.float().mean().item()
    return m


def sample_rows(r: Rollout, n: int = 4) -> list[dict]:
    """The first ``n`` completions of the batch as rows of ``samples.jsonl`` (reward None = unscored)."""
    out = []
    for i, (p, c, s) in enumerate(list(zip(r.prompts, r.completions, r.extras["raw_scores"].tolist()))[:n]):
        row = {"prompt": p[-1]["content"], "completion": c, "reward": None if s != s else s}
        if "gold" in r.extras:
            row["gold"] = float(r.extras["gold"][i])
        out.append(row)
    return out


def sync_sampler(sampler: Sampler, acc, policy) -> None:
    """After an optimizer step, give the sampler's backend the new weights. vLLM copies tensors, so under
    FSDP / ZeRO-3 it reads them inside ``full_parameters`` (whole tensors, not this process's shards); 'hf'
    samples from the policy itself, 'fast' is CPU-only (never sharded) and 'remote' gathers on its own."""
    if isinstance(sampler.backend, VLLMBackend):
        with full_parameters(acc, policy) as full:
            sampler.backend.sync_weights(full)
    else:
        sampler.backend.sync_weights(acc.unwrap_model(policy))
