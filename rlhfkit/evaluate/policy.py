"""A policy against a reference on the same held-out prompts: the work behind ``rlhfkit eval``.

Both are sampled on the same prompts (same seed, same settings), each pair is judged, and the result
is the ``eval.json`` record (schema in ``winrate.evaluate_pairs``). A policy may be ``bon:N:SPEC`` —
best-of-N sampling from SPEC's model, picked by the proxy reward — the classic baseline an RL run must
beat at equal KL. Judges: ``gold`` (the task's hidden reward), ``rm:PATH`` (a reward model) or
``lm:MODEL``; an LM judge lives in ``feedback/`` (a sibling package), so the caller passes it in as
``lm_judge`` (``rlhfkit/cli/evaluate.py`` builds one from ``feedback.judge``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
from rlhfkit.data.tasks import Task
from rlhfkit.evaluate.overopt import bon_kl
from rlhfkit.evaluate.winrate import evaluate_pairs
from rlhfkit.models.batching import pad_completions
from rlhfkit.models.heads import RewardModel
from rlhfkit.models.loading import load_model
from rlhfkit.models.logps import completion_logps
from rlhfkit.rollout.engine import Sampler, SamplingConfig

# (prompts, completions) -> (B,) scores
Scorer = Callable[[list[list[dict]], list[str]], torch.Tensor]
# (prompts, policy completions, reference completions) -> per prompt 1 (policy wins), 0 or 0.5 (tie)
PrefsFn = Callable[[list[list[dict]], list[str], list[str]], list[float]]

LOGP_BATCH = 8
"""Sequences per forward pass when scoring log-probs (memory, not results, depends on it)."""


def parse_policy(spec: str) -> tuple[str, int]:
    """'MODEL' -> (MODEL, 1); 'bon:N:MODEL' -> (MODEL, N)."""
    if spec.startswith("bon:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) < 1 or not parts[2]:
            raise ValueError(f"--policy {spec}: best-of-N needs bon:N:MODEL with N >= 1")
        return parts[2], int(parts[1])
    return spec, 1


def parse_eval_specs(policy: str, judge: str = "gold", proxy: str | None = None) -> tuple[str, int]:
    """Check the policy, judge and proxy specs before any model is loaded (a typo would otherwise
    surface after minutes of sampling); returns (policy model, N of best-of-N, 1 for plain sampling)."""
    model, n = parse_policy(policy)
    if n > 1 and proxy is None:
        raise ValueError("best-of-N needs --proxy to pick the best sample")
    if judge != "gold" and not judge.startswith(("rm:", "lm:")):
        raise ValueError(f"--judge {judge}: use gold, rm:PATH or lm:MODEL")
    if proxy is not None and proxy != "gold" and not proxy.startswith("rm:"):
        raise ValueError(f"--proxy {proxy}: use gold or rm:PATH")
    return model, n


def sample_policy(model_name: str, n: int, prompts, sampling: SamplingConfig, scorer: Scorer | None, seed: int):
    """Completions (one per prompt), the model and its tokenizer; best of ``n`` samples by ``scorer``."""
    model, tok = load_model(model_name)
    model.eval()
    sampler = Sampler(model, tok, sampling)
    rollouts = [sampler.sample(prompts, seed=seed + i) for i in range(n)]
    if n == 1:
        return rollouts[0].completions, model, tok
    scores = torch.stack([scorer(prompts, r.completions) for r in rollouts])  # (n, B)
    best = scores.argmax(0)
    return [rollouts[best[i]].completions[i] for i in range(len(prompts))], model, tok


@torch.no_grad()
def sequence_logps(model, tok, prompts, completions, temperature: float = 1.0) -> list[float]:
    """log pi_T(y|x) summed over completion tokens, with logits divided by ``temperature``.

    For KL(policy || reference) the samples' log-probs must come from the distribution they were
    drawn from: pass the sampling temperature (the trainers' eval/kl does the same)."""
    out = []
    for i in range(0, len(prompts), LOGP_BATCH):
        ps, cs = prompts[i:i + LOGP_BATCH], completions[i:i + LOGP_BATCH]
        batch = pad_completions([tokenize_prompt(tok, p) for p in ps],
                                [tokenize_completion(tok, p, c) for p, c in zip(ps, cs)], tok.pad_token_id)
        out += completion_logps(model, batch, temperature=temperature).sum(1).tolist()
    return out


def best_of_n_kl(n: int, same_model: bool) -> dict | None:
    """KL of best-of-n sampling from the reference itself: the analytic log n - (n - 1)/n nats, an
    upper bound (Beirami et al. 2024), reported without a CI. None when the base is another model."""
    if not same_model:
        return None
    b = float(bon_kl(n))
    return {"value": b, "ci_low": None, "ci_high": None, "kind": "best-of-n analytic upper bound"}


def make_scorer(spec: str, task: Task) -> Scorer:
    """(prompts, completions) -> Tensor scores, for 'gold' or 'rm:PATH'."""
    if spec == "gold":
        return lambda p, c: torch.tensor(task.gold(p, c), dtype=torch.float32)
    if spec.startswith("rm:"):
        rm = RewardModel.load(spec[3:])
        return lambda p, c: rm.score(p, c).float().cpu()
    raise ValueError(f"unknown scorer '{spec}'; use gold or rm:PATH")


def eval_policy(policy: str, task: Task, *, reference: str = "smollm2-135m-instruct", judge: str = "gold",
                proxy: str | None = None, num_prompts: int = 64, max_new_tokens: int = 48, temperature: float = 0.7,
                seed: int = 0, lm_judge: PrefsFn | None = None) -> dict:
    """Win rate (and gold, proxy, KL, length) of ``policy`` over ``reference`` on ``num_prompts`` of
    ``task``'s held-out prompts; the ``evaluate_pairs`` record that ``eval.json`` holds.

    ``policy``: a model, or ``bon:N:MODEL`` (best of N samples by ``proxy``). ``judge``: gold,
    rm:PATH or lm:MODEL (then ``lm_judge`` gives the preferences). ``proxy``: gold or rm:PATH.
    """
    pol_name, n = parse_eval_specs(policy, judge, proxy)
    if judge.startswith("lm:") and lm_judge is None:
        raise ValueError(f"--judge {judge}: pass lm_judge, the preferences function of the LM judge")
    prompts = task.prompts("heldout")[:num_prompts]
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    proxy_fn = make_scorer(proxy, task) if proxy else None
    pol_c, pol_model, tok = sample_policy(pol_name, n, prompts, sampling, proxy_fn, seed)
    logp_temperature = temperature or 1.0  # greedy (0): log-probs at T=1, as the Sampler's
    # best-of-N: the picked samples do not come from the model that scores them, so a Monte-Carlo KL
    # from their log-probs would be wrong (0 against its own base model); the analytic bound is used
    pol_logps = sequence_logps(pol_model, tok, prompts, pol_c, logp_temperature) if n == 1 else None
    del pol_model
    ref_c, ref_model, ref_tok = sample_policy(reference, 1, prompts, sampling, None, seed)
    ref_logps_on_pol = sequence_logps(ref_model, ref_tok, prompts, pol_c, logp_temperature) if n == 1 else None
    del ref_model

    gold_p, gold_r = task.gold(prompts, pol_c), task.gold(prompts, ref_c)
    prefs = None
    if judge.startswith("lm:"):
        prefs = lm_judge(prompts, pol_c, ref_c)
    elif judge.startswith("rm:"):
        judge_fn = make_scorer(judge, task)
        sp, sr = judge_fn(prompts, pol_c), judge_fn(prompts, ref_c)
        prefs = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(sp.tolist(), sr.tolist())]
    result = evaluate_pairs(
        pol_c, ref_c, gold_policy=gold_p, gold_reference=gold_r,
        proxy_policy=proxy_fn(prompts, pol_c).tolist() if proxy_fn else None,
        proxy_reference=proxy_fn(prompts, ref_c).tolist() if proxy_fn else None,
        prefs=prefs, logps_policy=pol_logps, logps_reference_on_policy=ref_logps_on_pol,
        meta={"policy": policy, "reference": reference, "task": task.name, "judge": judge,
              "proxy": proxy, "temperature": temperature, "max_new_tokens": max_new_tokens,
              "seed": seed, "best_of_n": n},
        seed=seed,
    )
    if n > 1:
        result["kl"] = best_of_n_kl(n, same_model=pol_name == reference)
    return result


def default_eval_dir(policy: str) -> Path:
    """Where ``rlhfkit eval`` writes eval.json by default: the policy's directory if it is one, else '.'."""
    model = Path(parse_policy(policy)[0])
    return model if model.is_dir() else Path(".")
