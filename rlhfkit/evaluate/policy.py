"""A policy against a reference on the same held-out prompts: the work behind ``rlhfkit eval``.

Both are sampled on the same prompts (same seed, same settings), each pair is judged, and the result
is the ``eval.json`` record (schema in ``winrate.evaluate_pairs``). A policy may be ``bon:N:SPEC`` —
best-of-N sampling from SPEC's model, picked by the proxy reward — the classic baseline an RL run must
beat at equal KL. Judges: ``gold`` (the task's hidden reward), ``rm:PATH`` (a reward model) or
``lm:MODEL``; an LM judge lives in ``feedback/`` (a sibling package), so the caller passes it in as
``lm_judge`` (``rlhfkit/cli/evaluate.py`` builds one from ``feedback.judge``).

The prompts are a task's held-out split, or the user's prompt rows (``prompt_rows``, read by
``rlhfkit.data.prompt_data`` as the trainers read them); ``reward`` is a trainer's reward spec (fn:,
verify:, judge:, rm:, gold) scored on both sides with the rows' columns (:func:`reward_block`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
from rlhfkit.data.prompt_data import PromptRow
from rlhfkit.data.tasks import Task
from rlhfkit.evaluate.overopt import bon_kl
from rlhfkit.evaluate.winrate import evaluate_pairs
from rlhfkit.models.batching import pad_completions
from rlhfkit.models.heads import RewardModel
from rlhfkit.models.loading import load_model
from rlhfkit.models.logps import completion_logps
from rlhfkit.rollout.engine import Rollout, Sampler, SamplingConfig
from rlhfkit.rollout.reward_components import ReferenceReplies
from rlhfkit.rollout.rewards import RewardSource, parse_reward_spec
from rlhfkit.rollout.sample import prompt_file_rows

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


def parse_eval_specs(policy: str, judge: str | None = "gold", proxy: str | None = None,
                     reward: str | None = None) -> tuple[str, int]:
    """Check the policy, judge, proxy and reward specs before any model is loaded (a typo would otherwise
    surface after minutes of sampling); returns (policy model, N of best-of-N, 1 for plain sampling).
    ``judge`` None: no judge (the win rate comes from gold, else the proxy or reward)."""
    model, n = parse_policy(policy)
    if proxy is not None and reward is not None:
        raise ValueError("give --proxy or --reward, not both (the reward is reported, and picks best-of-N, "
                         "in the proxy's place)")
    if reward is not None:
        parse_reward_spec(reward)
    if n > 1 and proxy is None and reward is None:
        raise ValueError("best-of-N needs --proxy (or --reward) to pick the best sample")
    if judge is not None and judge != "gold" and not judge.startswith(("rm:", "lm:")):
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


def eval_prompt_rows(source, split: str = "all", eval_fraction: float = 0.1, split_seed: int = 0,
                     num_prompts: int | None = None) -> list[PromptRow]:
    """The user's prompts to evaluate on, read as the trainers read ``--prompts``: every row (``split``
    'all'), or the held-out side of the trainers' split ('heldout': the prompts a run with this
    ``eval_fraction`` never trained on) or its train side; the first ``num_prompts`` of them."""
    return prompt_file_rows(source, split, eval_fraction, split_seed)[:num_prompts]


def task_prompt_rows(task: Task, split: str = "heldout") -> list[PromptRow]:
    """A task's prompts as PromptRows (its other fields, e.g. arith's ``answer``, as columns), as the
    trainers give them to the reward."""
    if not hasattr(task, "prompt_rows"):
        return [PromptRow(messages=p, prompt=p, where=f"task {task.name} {split} prompt {i}")
                for i, p in enumerate(task.prompts(split))]
    rows = [dict(r) for r in task.prompt_rows(split)]
    return [PromptRow(messages=r["messages"], prompt=r.pop("messages"), columns=r,
                      where=f"task {task.name} {split} prompt {i}") for i, r in enumerate(rows)]


def lazy_reference_replies(reference: str, max_new_tokens: int):
    """``prompts -> replies``: the reference model's greedy replies (cached per prompt) for the pairwise
    judge (``judge:MODEL:pairwise``); the model loads on the first call."""
    held: list = []

    def replies(prompts):
        if not held:
            model, tok = load_model(reference)
            held.append(ReferenceReplies(model.eval(), tok, max_new_tokens))
        return held[0](prompts)
    return replies


def reward_scores(source: RewardSource, rows: list[PromptRow], completions: list[str]):
    """(total (B,), {component: (B,)}) of the reward on one reply per row, NaN = unscored."""
    r = Rollout(prompt_ids=None, prompt_mask=None, completion_ids=None, completion_mask=None,
                prompts=[row.messages for row in rows], completions=list(completions), extras={"rows": rows})
    return source.score(r)


def reward_block(spec: str, policy: tuple, reference: tuple) -> dict:
    """``eval.json``'s ``reward`` entry: per side, the reward's mean over the replies it scored, the
    fraction unscored, and each component's mean and none fraction (as the trainers log them)."""
    def side(total, parts):
        ok = ~total.isnan()
        comps = {name: {"mean": float(v[~v.isnan()].mean()) if bool((~v.isnan()).any()) else None,
                        "none_frac": float(v.isnan().float().mean())} for name, v in parts.items()}
        return {"mean": float(total[ok].mean()) if bool(ok.any()) else None,
                "unscored_frac": float((~ok).float().mean()), "components": comps}
    return {"spec": spec, "policy": side(*policy), "reference": side(*reference)}


def eval_policy(policy: str, task: Task | None, *, reference: str = "smollm2-135m-instruct",
                judge: str | None = "gold", proxy: str | None = None, num_prompts: int = 64,
                max_new_tokens: int = 48, temperature: float = 0.7, seed: int = 0,
                lm_judge: PrefsFn | None = None, prompt_rows: list[PromptRow] | None = None,
                reward: str | None = None, meta: dict | None = None) -> dict:
    """Win rate (and gold, proxy, KL, length) of ``policy`` over ``reference`` on ``num_prompts`` of
    ``task``'s held-out prompts, or on ``prompt_rows``; the ``evaluate_pairs`` record that ``eval.json`` holds.

    ``policy``: a model, or ``bon:N:MODEL`` (best of N samples by ``proxy`` or ``reward``). ``judge``:
    gold (needs a task), rm:PATH or lm:MODEL (then ``lm_judge`` gives the preferences), or None.
    ``proxy``: gold or rm:PATH. ``reward``: a trainer's reward spec, scored on both sides with the
    rows' columns; it fills the proxy block when every reply is scored, and ``reward`` (:func:`reward_block`)
    always. ``task`` may be None with ``prompt_rows`` (no gold). ``meta``: extra entries for ``meta``.
    """
    pol_name, n = parse_eval_specs(policy, judge, proxy, reward)
    if judge is not None and judge.startswith("lm:") and lm_judge is None:
        raise ValueError(f"--judge {judge}: pass lm_judge, the preferences function of the LM judge")
    if task is None and (judge == "gold" or proxy == "gold"):
        raise ValueError("gold needs a task (--task); with your own prompts judge with rm:PATH or lm:MODEL, or "
                         "report a --reward")
    rows = prompt_rows[:num_prompts] if prompt_rows is not None else task_prompt_rows(task)[:num_prompts]
    prompts = [r.messages for r in rows]
    source = None
    if reward is not None:  # built (functions imported, columns checked, judges loaded) before any sampling
        source = RewardSource(reward, task, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        source.check(rows)
        source.attach_reference(lazy_reference_replies(reference, max_new_tokens))
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    if source is not None:
        def proxy_fn(p, c):  # best-of-N picks by the total; an unscored sample is never picked over a scored one
            return torch.nan_to_num(reward_scores(source, rows, c)[0], nan=-math.inf)
    else:
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

    gold_p, gold_r = (task.gold(prompts, pol_c), task.gold(prompts, ref_c)) if task is not None else (None, None)
    proxy_p = proxy_r = block = None
    if source is not None:
        pol_scores, ref_scores = reward_scores(source, rows, pol_c), reward_scores(source, rows, ref_c)
        block = reward_block(reward, pol_scores, ref_scores)
        if not bool(pol_scores[0].isnan().any() or ref_scores[0].isnan().any()):  # paired CIs need every reply scored
            proxy_p, proxy_r = pol_scores[0].tolist(), ref_scores[0].tolist()
    elif proxy_fn is not None:
        proxy_p, proxy_r = proxy_fn(prompts, pol_c).tolist(), proxy_fn(prompts, ref_c).tolist()
    prefs = None
    if judge is not None and judge.startswith("lm:"):
        prefs = lm_judge(prompts, pol_c, ref_c)
    elif judge is not None and judge.startswith("rm:"):
        judge_fn = make_scorer(judge, task)
        sp, sr = judge_fn(prompts, pol_c), judge_fn(prompts, ref_c)
        prefs = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(sp.tolist(), sr.tolist())]
    result = evaluate_pairs(
        pol_c, ref_c, gold_policy=gold_p, gold_reference=gold_r, proxy_policy=proxy_p, proxy_reference=proxy_r,
        prefs=prefs, logps_policy=pol_logps, logps_reference_on_policy=ref_logps_on_pol,
        meta={"policy": policy, "reference": reference, "task": task.name if task is not None else None,
              "judge": judge, "proxy": proxy, "temperature": temperature, "max_new_tokens": max_new_tokens,
              "seed": seed, "best_of_n": n, **({"reward": reward} if reward is not None else {}), **(meta or {})},
        seed=seed,
    )
    if block is not None:
        result["reward"] = block
    # every pair, in prompt order: what the figures above were computed from (model text: untrusted, show escaped)
    result["samples"] = [{"prompt": r.messages[-1].get("content", ""), "policy": a, "reference": b,
                          **({"gold_policy": gold_p[i], "gold_reference": gold_r[i]} if gold_p is not None else {})}
                         for i, (r, a, b) in enumerate(zip(rows, pol_c, ref_c))]
    if n > 1:
        result["kl"] = best_of_n_kl(n, same_model=pol_name == reference)
    return result


def default_eval_dir(policy: str) -> Path:
    """Where ``rlhfkit eval`` writes eval.json by default: the policy's directory if it is one, else '.'."""
    model = Path(parse_policy(policy)[0])
    return model if model.is_dir() else Path(".")
