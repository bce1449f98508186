"""PPO with a critic for RLHF, following "The N Implementation Details of RLHF with PPO" (Huang et
al. 2022/2024, arXiv 2403.17031). docs/ppo.md lists every detail, its source and the line here.

Per step: generate -> score (RM and/or gold, EOS trick) -> per-token KL-shaped rewards -> GAE with
the critic's values -> whitened advantages -> ``epochs_per_step`` passes of clipped policy + clipped
value updates over mini-batches -> log.

The critic is a separate model: a token-classification head (one output per position) on a copy of
the policy backbone or of the reward model (``value_init``); its head starts at zero when it comes
from the policy (N details #3), so the first values are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.losses.advantages import gae
from rlhfkit.losses.kl import AdaptiveKLController, FixedKLController, kl_per_token, kl_shaped_rewards
from rlhfkit.losses.ppo import ppo_policy_loss, value_loss
from rlhfkit.models.batching import position_ids
from rlhfkit.ops import masked_mean, masked_var, masked_whiten
from rlhfkit.rollout.engine import Rollout
from rlhfkit.train import online, runtime
from rlhfkit.train.grpo import optimize


@dataclass
class PPOConfig(online.OnlineConfig):
    gamma: float = 1.0
    """Discount (N details #8: 1 for RLHF; the episode is one completion)."""
    lam: float = 0.95
    """GAE lambda (N details #8)."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    clip_eps_value: float | None = 0.2
    """Value clip around the rollout-time values (N details #10; OpenRLHF uses 0.5; None = off)."""
    vf_coef: float = 0.1
    """Value loss weight (N details #10)."""
    epochs_per_step: int = 4
    """PPO epochs over each rollout batch (N details #10)."""
    mini_batch_size: int | None = 4
    """Sequences per PPO update; the rollout batch is split into these."""
    beta: float = 0.05
    """Per-token KL penalty coefficient in the reward (N details #8, #11: ~0.05 in the TL;DR work)."""
    kl_target: float | None = None
    """Adaptive KL controller target (sequence KL, nats); None = fixed beta (N details #11)."""
    kl_horizon: int = 10_000
    """Adaptive KL controller horizon (Ziegler et al. 2019)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards, without shifting the mean (N details #9, optional)."""
    value_init: str = "policy"
    """Critic initialisation: 'policy' (backbone copy, zero head) or 'reward' (the reward model given in
    `reward` as rm:PATH, head included)."""
    lr: float = 3e-6
    """Policy and critic learning rate (AdamW, eps from adam_eps, annealed to 0 by lr_schedule)."""

    def validate(self) -> None:
        super().validate()
        if self.value_init not in ("policy", "reward"):
            raise ValueError(f"value_init must be 'policy' or 'reward', got {self.value_init!r}")


def load_critic(cfg: PPOConfig, ckpt):
    """Token-level value model (B, T) -> (B, T, 1): from a checkpoint, the reward model, or the policy."""
    from transformers import AutoModelForTokenClassification

    from rlhfkit.models.loading import disable_dropout, quiet_transformers, resolve

    if ckpt is not None and (ckpt / "value").exists():
        source = str(ckpt / "value")
    elif cfg.value_init == "reward":
        rm = [p for p in cfg.reward.split(",") if p.strip().startswith("rm:")]
        if not rm:
            raise ValueError("value_init='reward' needs an rm:PATH entry in `reward`")
        source = rm[0].strip()[3:].partition("@")[0]
    else:
        source = None
    if source is None:
        if cfg.model.startswith("tiny"):
            from rlhfkit.models.loading import load_tokenizer, tiny_config

            tok = load_tokenizer(cfg.model)
            _, _, init = cfg.model.partition(":")
            config = tiny_config(tok, init_std=float(init) if init else 0.02)
            config.num_labels = 1
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                critic = AutoModelForTokenClassification.from_config(config)
        else:
            with quiet_transformers(True):  # the value head is new: its MISSING report is expected
                critic = AutoModelForTokenClassification.from_pretrained(resolve(cfg.model), num_labels=1)
        torch.nn.init.zeros_(critic.score.weight)
        if getattr(critic.score, "bias", None) is not None:
            torch.nn.init.zeros_(critic.score.bias)
    else:
        with quiet_transformers(True):  # from a reward model: score.bias (token head only) starts at 0
            critic = AutoModelForTokenClassification.from_pretrained(source, num_labels=1)
    disable_dropout(critic)
    return critic


def critic_values(critic, r: Rollout) -> torch.Tensor:
    """(B, C): V(s_t) for each completion step t, read at the position *before* token t is emitted
    (the same positions whose logits give the token's log-prob)."""
    att = r.attention_mask.long()
    out = critic(input_ids=r.input_ids, attention_mask=att, position_ids=position_ids(att), use_cache=False).logits
    p, c = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    return out[:, p - 1:p - 1 + c, 0].float()


def actor_critic_loss(policy, critic, mb: Rollout, adv: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    mask = mb.completion_mask
    logps, entropy = cfg.logps(policy, mb, with_entropy=True)
    pg, metrics = ppo_policy_loss(logps, mb.logps, adv, mask, cfg.clip_eps)
    values = critic_values(critic, mb)
    vf, vmetrics = value_loss(values, mb.values, mb.extras["returns"], mask, cfg.clip_eps_value)
    metrics.update(vmetrics)
    metrics["policy/entropy"] = masked_mean(entropy, mask).detach()
    metrics["loss/total"] = (pg + cfg.vf_coef * vf).detach()
    return pg + cfg.vf_coef * vf, metrics


def train(cfg: PPOConfig, reward_fn=None, task=None) -> dict:
    """Run PPO. Python API extras as in grpo.train: ``reward_fn(rollout)`` and ``task`` overrides."""
    # 1. runtime, task, models (policy, reference, critic), optimizer over policy + critic
    s = online.start(cfg, reward_fn, task)
    acc, ckpt, task, ref, tok, reward, total = s.acc, s.ckpt, s.task, s.ref, s.tok, s.reward, s.total
    critic = load_critic(cfg, ckpt)
    opt = runtime.adamw(list(s.policy.parameters()) + list(critic.parameters()), acc, cfg.lr, cfg.adam_eps)
    sched = runtime.make_scheduler(opt, cfg.lr_schedule, cfg.warmup_steps, total)
    policy, critic, opt = acc.prepare(s.policy, critic, opt)
    ref.to(acc.device)
    kl_ctl = (AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target is not None
              else FixedKLController(cfg.beta))
    sampler = online.make_sampler(cfg, acc.unwrap_model(policy), tok, str(ckpt or cfg.model))
    held_out = online.HeldOutEval(ref, reward, task, s.eval_prompts, cfg)
    step, state = runtime.restore(ckpt, opt, sched, acc.process_index)
    if state:
        kl_ctl.load_state_dict(state["kl_controller"])
    run = runtime.open_run(cfg, "ppo", acc, total)
    run.advance(step)
    result: dict = {"run_dir": str(run.path)}
    if step == 0 and cfg.eval_every:
        result["eval_start"] = held_out(sampler)
        run.log(0, result["eval_start"])

    budget = online.Budget(cfg.max_minutes)
    while step < total:
        with runtime.Timer() as t:
            # 2. generate, score (EOS trick inside), reference log-probs
            prompts = online.local_batch(s, step, cfg)
            r = online.generate_and_score(sampler, prompts, cfg.samples_per_prompt, ref, reward, task, cfg,
                                          seed=cfg.seed * 100_003 + step * 101 + acc.process_index)
            mask = r.completion_mask
            # 3. values, then per-token rewards: -beta * KL at every token, the score added at the last (EOS)
            with torch.no_grad():
                r.values = critic_values(critic, r) * mask
            kl = kl_per_token(r.logps, r.ref_logps, cfg.kl_estimator)
            rewards = kl_shaped_rewards(r.scores.float(), kl, mask, kl_ctl.beta)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            # 4. GAE on the critic's values; whitened advantages (N details #9)
            adv, returns = gae(rewards, r.values, mask, cfg.gamma, cfg.lam)
            r.extras["returns"] = returns
            adv = masked_whiten(adv, mask)
            # 5. PPO epochs over mini-batches, policy and critic together
            policy.train()
            critic.train()
            metrics = optimize([policy, critic], opt, r, adv, cfg, acc,
                               lambda mb, a: actor_critic_loss(policy, critic, mb, a, cfg))
            sched.step()
            sampler.backend.sync_weights(acc.unwrap_model(policy))
            seq_kl = ((r.logps - r.ref_logps) * mask).sum(1).mean()
            kl_ctl.update(acc.reduce(seq_kl, "mean").item(), cfg.prompts_per_step * cfg.samples_per_prompt)
        step += 1
        last = step == total or budget.spent(acc)
        # 6. log
        metrics.update(online.rollout_metrics(r))
        metrics["kl/beta"] = kl_ctl.beta
        metrics["value/explained_variance"] = explained_variance(r.values, returns, mask)
        metrics["value/mean"] = masked_mean(r.values, mask).item()
        metrics = {k: acc.reduce(torch.tensor(float(v), device=acc.device), "mean").item() for k, v in metrics.items()}
        metrics.update(runtime.perf_metrics(int(mask.sum()) * acc.num_processes, t.seconds, acc))
        metrics["optim/lr"] = sched.get_last_lr()[0]
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            metrics.update(held_out(sampler))
            result["eval_end"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if step % cfg.log_every == 0 or last:
            run.log(step, metrics)
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            run.log_samples(step, online.sample_rows(r))
        run.advance()
        # 7. checkpoint: policy at the top (plain HF), critic in value/
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            result["checkpoint"] = str(runtime.save_checkpoint(
                acc, run, step, {"policy": policy, "value": critic}, tok, opt, sched,
                {"kl_controller": kl_ctl.state_dict()}))
        if last:
            break
    run.close()
    result["steps"] = step
    result["last"] = metrics
    return result


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over valid tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r.item() == 0:
        return 0.0
    return (1 - masked_var(returns - values, mask, unbiased=False) / var_r).item()
