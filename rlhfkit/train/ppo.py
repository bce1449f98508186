"""PPO with a critic for RLHF, following "The N Implementation Details of RLHF with PPO" (Huang et
al. 2022/2024, arXiv 2403.17031). docs/ppo.md lists every detail, its source and the line here.

Per step: generate -> score (RM and/or gold, EOS trick) -> per-token KL-shaped rewards -> GAE with
the critic's values -> whitened advantages -> ``epochs_per_step`` passes of clipped policy + clipped
value updates over mini-batches -> adapt beta -> log.

The critic is a separate model (``rlhfkit.models.heads.load_value_model``): a token-classification
head (one output per position) on a copy of the policy backbone or of the reward model
(``value_init``); its head starts at zero when it comes from the policy (N details #3), so the first
values are 0. The machinery (start, generate-and-score, optimize, log/eval/checkpoint) is online.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.losses.advantages import gae, whiten
from rlhfkit.losses.kl import AdaptiveKLController, FixedKLController, kl_per_token, kl_shaped_rewards
from rlhfkit.losses.ppo import ppo_policy_loss, value_loss
from rlhfkit.models.heads import completion_values, load_value_model
from rlhfkit.ops import masked_mean, masked_var
from rlhfkit.rollout import rewards
from rlhfkit.rollout.engine import Rollout
from rlhfkit.train import online, online_rollout, runtime


def reward_model_path(cfg: PPOConfig) -> str:
    """The first ``rm:PATH`` of ``cfg.reward``: where value_init='reward' starts the critic."""
    paths = [path for kind, _, path in rewards.parse_reward_spec(cfg.reward) if kind == "rm"]
    if not paths:
        raise ValueError(f"value_init='reward' needs an rm:PATH entry in `reward`, got reward={cfg.reward!r}")
    return paths[0]


VALUE_INITS = {"policy": lambda cfg: None, "reward": reward_model_path}
"""``PPOConfig.value_init`` -> the critic's source directory (None: a zero head on the policy's body)."""


@dataclass
class PPOConfig(online.OnlineConfig):
    gamma: float = 1.0
    """Discount, in [0, 1] (N details #8: 1 for RLHF; the episode is one completion)."""
    lam: float = 0.95
    """GAE lambda, in [0, 1] (N details #8)."""
    clip_eps: float = 0.2
    """Policy ratio clip, > 0."""
    clip_eps_value: float | None = 0.2
    """Value clip around the rollout-time values (N details #10; OpenRLHF uses 0.5; None = off)."""
    vf_coef: float = 0.1
    """Value loss weight, >= 0 (N details #10)."""
    epochs_per_step: int = 4
    """PPO epochs over each rollout batch (N details #10)."""
    mini_batch_size: int | None = 4
    """Sequences per PPO update; the rollout batch is split into these."""
    beta: float = 0.05
    """Per-token KL penalty coefficient in the reward (N details #8, #11: ~0.05 in the TL;DR work)."""
    kl_target: float | None = None
    """Adaptive KL controller target (sequence KL, nats, > 0); None = fixed beta (N details #11)."""
    kl_horizon: int = 10_000
    """Adaptive KL controller horizon (Ziegler et al. 2019), in samples, >= 1."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards, without shifting the mean (N details #9, optional)."""
    value_init: str = "policy"
    """Critic initialisation: 'policy' (backbone copy, zero head) or 'reward' (the reward model given in
    `reward` as rm:PATH, head included)."""
    lr: float = 3e-6
    """Policy and critic learning rate (AdamW, eps from adam_eps, annealed to 0 by lr_schedule)."""

    def validate(self) -> None:
        super().validate()
        online.variant(VALUE_INITS, self.value_init, "value_init")(self)  # 'reward' also checks for rm:PATH
        for name in ("gamma", "lam"):
            online.require(self, name, 0 <= getattr(self, name) <= 1, "in [0, 1]")
        online.require(self, "clip_eps", self.clip_eps > 0, "> 0")
        online.require(self, "clip_eps_value", self.clip_eps_value is None or self.clip_eps_value > 0, "> 0 or None")
        online.require(self, "vf_coef", self.vf_coef >= 0, ">= 0")
        online.require(self, "kl_target", self.kl_target is None or self.kl_target > 0, "> 0 or None")
        online.require(self, "kl_horizon", self.kl_horizon >= 1, ">= 1")


def critic_source(cfg: PPOConfig, ckpt) -> str | None:
    """The checkpoint's ``value/`` when resuming a PPO run, else the ``value_init`` source."""
    if ckpt is not None and (ckpt / "value").exists():
        return str(ckpt / "value")
    return online.variant(VALUE_INITS, cfg.value_init, "value_init")(cfg)


def actor_critic_loss(policy, critic, mb: Rollout, adv: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """Clipped policy surrogate + vf_coef x clipped value loss on one micro-batch (N details #10)."""
    mask = mb.completion_mask
    logps, entropy = cfg.logps(policy, mb, with_entropy=True)
    pg, metrics = ppo_policy_loss(logps, mb.logps, adv, mask, cfg.clip_eps, is_weights=online_rollout.is_weights(cfg, mb, mb.logps))
    values = completion_values(critic, mb)
    vf, vmetrics = value_loss(values, mb.values, mb.extras["returns"], mask, cfg.clip_eps_value)
    metrics.update(vmetrics)
    metrics["policy/entropy"] = masked_mean(entropy, mask).detach()
    metrics["loss/total"] = (pg + cfg.vf_coef * vf).detach()
    return pg + cfg.vf_coef * vf, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over valid tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r.item() == 0:
        return 0.0
    return (1 - masked_var(returns - values, mask, unbiased=False) / var_r).item()


def train(cfg: PPOConfig, reward_fn=None, task=None, prompts=None) -> dict:
    """Run PPO. Python API extras as in grpo.train: ``reward_fn(rollout)`` and ``task`` overrides."""
    # 1. runtime, task, policy + frozen reference, reward, critic; one optimizer over policy + critic
    s = online.start(cfg, reward_fn, task, prompts)
    acc = s.acc
    critic = load_value_model(critic_source(cfg, s.ckpt), cfg.model, cfg.seed, lora=cfg)  # LoRA + head when lora_r > 0
    opt = runtime.adamw(list(s.policy.parameters()) + list(critic.parameters()), acc, cfg.lr, cfg.adam_eps)
    sched = runtime.make_scheduler(opt, cfg.lr_schedule, cfg.warmup_steps, s.total)
    policy, critic, opt = acc.prepare(s.policy, critic, opt)
    kl_ctl = (AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target is not None
              else FixedKLController(cfg.beta))
    sampler = online_rollout.make_sampler(cfg, acc.unwrap_model(policy), s.tok, str(s.ckpt or cfg.model))
    loop, state = online.begin(cfg, s, "ppo", opt, sched, eval_hook=lambda: s.held_out(sampler),
                               sampler=sampler)
    if state:
        kl_ctl.load_state_dict(state["kl_controller"])

    while loop.step < loop.total:
        with runtime.Timer() as t:
            # 2. generate, score (EOS trick inside), policy and reference log-probs
            r = online_rollout.generate_and_score(s, sampler, loop.step, cfg)
            mask = r.completion_mask
            # ALGO LOGIC
            # 3. values, then per-token rewards: -beta * KL at every token, the score added at the last (EOS)
            with torch.no_grad():
                r.values = completion_values(critic, r) * mask
            kl = kl_per_token(r.logps, r.ref_logps, cfg.kl_estimator)
            token_rewards = kl_shaped_rewards(r.scores.float(), kl, mask, kl_ctl.beta)
            # whitening statistics over the global batch (every process's tokens), as one process would see them
            reduce_sum = lambda t: acc.reduce(t, "sum")  # noqa: E731
            if cfg.whiten_rewards:
                token_rewards = whiten(token_rewards, mask, reduce_sum, shift_mean=False)
            # 4. GAE on the critic's values (delta_t = r_t + gamma V_{t+1} - V_t); whitened advantages (N details #9)
            adv, returns = gae(token_rewards, r.values, mask, cfg.gamma, cfg.lam)
            r.extras["returns"] = returns
            adv = whiten(adv, mask, reduce_sum)
            # 5. PPO epochs over mini-batches, policy and critic together
            policy.train()
            critic.train()
            metrics = online.optimize([policy, critic], opt, r, adv,
                                      lambda mb, a: actor_critic_loss(policy, critic, mb, a, cfg), cfg, acc, loop.step)
            sched.step()
            online_rollout.sync_sampler(sampler, acc, policy)
            # 6. adapt beta to the observed sequence KL (a no-op for the fixed controller)
            seq_kl = ((r.logps - r.ref_logps) * mask).sum(1).mean()
            kl_ctl.update(acc.reduce(seq_kl, "mean").item(), cfg.prompts_per_step * cfg.samples_per_prompt)
        # 7. log, eval, samples, checkpoint: the policy at the top (plain HF), the critic in value/
        metrics.update({"kl/beta": kl_ctl.beta, "value/explained_variance": explained_variance(r.values, returns, mask),
                        "value/mean": masked_mean(r.values, mask).item()})
        if online.end_of_step(loop, r, metrics, t.seconds, models={"policy": policy, "value": critic},
                              state={"kl_controller": kl_ctl.state_dict()}):
            break
    return online.finish(loop)
