"""``rlhfkit eval``, ``rlhfkit report`` and ``rlhfkit compare``.

``eval`` samples a policy and a reference on the same held-out prompts (same seed, same settings),
judges each pair, and writes ``eval.json`` (schema in winrate.evaluate_pairs) plus a console table.
A policy may be ``bon:N:SPEC`` — best-of-N sampling from SPEC's model, picked by the proxy reward —
the classic baseline an RL run must beat at equal KL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _policy_spec(spec: str) -> tuple[str, int]:
    """'MODEL' -> (MODEL, 1); 'bon:N:MODEL' -> (MODEL, N)."""
    if spec.startswith("bon:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) < 1 or not parts[2]:
            raise ValueError(f"--policy {spec}: best-of-N needs bon:N:MODEL with N >= 1")
        return parts[2], int(parts[1])
    return spec, 1


def sample_policy(model_name: str, n: int, prompts, args, scorer, seed: int):
    """Completions (one per prompt) and the Rollout they came from; best of ``n`` by ``scorer``."""
    from rlhfkit.models import load_model
    from rlhfkit.rollout.engine import Sampler, SamplingConfig

    model, tok = load_model(model_name)
    model.eval()
    sampler = Sampler(model, tok, SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens))
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
    from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
    from rlhfkit.models.batching import pad_completions
    from rlhfkit.models.logps import completion_logps

    out = []
    for i in range(0, len(prompts), 8):
        ps, cs = prompts[i:i + 8], completions[i:i + 8]
        batch = pad_completions([tokenize_prompt(tok, p) for p in ps],
                                [tokenize_completion(tok, p, c) for p, c in zip(ps, cs)], tok.pad_token_id)
        out += completion_logps(model, batch, temperature=temperature).sum(1).tolist()
    return out


def best_of_n_kl(n: int, same_model: bool) -> dict | None:
    """KL of best-of-n sampling from the reference itself: the analytic log n - (n - 1)/n nats, an
    upper bound (Beirami et al. 2024), reported without a CI. None when the base is another model."""
    from rlhfkit.evaluate.overopt import bon_kl

    if not same_model:
        return None
    b = float(bon_kl(n))
    return {"value": b, "ci_low": None, "ci_high": None, "kind": "best-of-n analytic upper bound"}


def make_scorer(judge: str, task):
    """(prompts, completions) -> Tensor scores, for 'gold' or 'rm:PATH'."""
    if judge == "gold":
        return lambda p, c: torch.tensor(task.gold(p, c), dtype=torch.float32)
    if judge.startswith("rm:"):
        from rlhfkit.models.heads import RewardModel

        rm = RewardModel.load(judge[3:])
        return lambda p, c: rm.score(p, c).float().cpu()
    raise ValueError(f"unknown scorer '{judge}'; use gold or rm:PATH")


def lm_judge_prefs(judge_model: str, prompts, a: list[str], b: list[str]) -> list[float]:
    """Per-prompt preference for a over b from the LM judge (both orders; 0.5 when they disagree)."""
    from rlhfkit.data.records import ComparisonPair
    from rlhfkit.feedback.judge import LMJudge, judge_pairs

    # identical or empty replies leave nothing to judge: they count as ties
    prefs = [0.5] * len(prompts)
    pairs = [ComparisonPair(id=str(i), prompt=p, a={"role": "assistant", "content": x},
                            b={"role": "assistant", "content": y})
             for i, (p, x, y) in enumerate(zip(prompts, a, b)) if x != y and x.strip() and y.strip()]
    for pair, rec in zip(pairs, judge_pairs(pairs, LMJudge.from_name(judge_model))):
        prefs[int(pair.id)] = 0.5 if rec.tie else 1.0 if rec.chosen["content"] == pair.a["content"] else 0.0
    return prefs


def eval_main(argv: list[str]) -> int:
    from rlhfkit.data.tasks import get_task

    ap = argparse.ArgumentParser(prog="rlhfkit eval", description="win rate of a policy over a reference, with CIs")
    ap.add_argument("--policy", required=True, help="model dir/name, or bon:N:MODEL for best-of-N by --proxy")
    ap.add_argument("--reference", default="smollm2-135m-instruct", help="model dir/name (default: the bundled model)")
    ap.add_argument("--task", default="sentiment", help="built-in task: held-out prompts and the gold reward")
    ap.add_argument("--judge", default="gold", help="who decides each pair: gold, rm:PATH or lm:MODEL")
    ap.add_argument("--proxy", default=None, help="proxy reward to report (and pick best-of-N): rm:PATH or gold")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output dir for eval.json (default: the policy dir if it is one, else .)")
    args = ap.parse_args(argv)
    try:
        pol_name, n = _policy_spec(args.policy)
        task = get_task(args.task)
    except ValueError as e:
        ap.error(str(e))
    if n > 1 and args.proxy is None:
        ap.error("best-of-N needs --proxy to pick the best sample")
    # checked before any model is loaded: a typo here would otherwise surface after minutes of sampling
    if args.judge != "gold" and not args.judge.startswith(("rm:", "lm:")):
        ap.error(f"--judge {args.judge}: use gold, rm:PATH or lm:MODEL")
    if args.proxy is not None and args.proxy != "gold" and not args.proxy.startswith("rm:"):
        ap.error(f"--proxy {args.proxy}: use gold or rm:PATH")
    from rlhfkit.data.records import DataError
    from rlhfkit.models.loading import ModelNotFoundError

    try:
        return _evaluate(args, ap, task, pol_name, n)
    except (DataError, ModelNotFoundError) as e:
        # a missing model or bad data is the user's input, and the message says which: no traceback
        print(f"rlhfkit eval: error: {e}", file=sys.stderr)
        return 1


def _evaluate(args, ap, task, pol_name: str, n: int) -> int:
    from rlhfkit.evaluate.winrate import evaluate_pairs, format_table

    prompts = task.prompts("heldout")[:args.num_prompts]
    proxy = make_scorer(args.proxy, task) if args.proxy else None
    pol_c, pol_model, tok = sample_policy(pol_name, n, prompts, args, proxy, args.seed)
    temperature = args.temperature or 1.0  # greedy (0): log-probs at T=1, as the Sampler's
    # best-of-N: the picked samples do not come from the model that scores them, so a Monte-Carlo KL
    # from their log-probs would be wrong (0 against its own base model); the analytic bound is used
    pol_logps = sequence_logps(pol_model, tok, prompts, pol_c, temperature) if n == 1 else None
    del pol_model
    ref_c, ref_model, ref_tok = sample_policy(args.reference, 1, prompts, args, None, args.seed)
    ref_logps_on_pol = sequence_logps(ref_model, ref_tok, prompts, pol_c, temperature) if n == 1 else None
    del ref_model

    gold_p, gold_r = task.gold(prompts, pol_c), task.gold(prompts, ref_c)
    prefs = None
    if args.judge.startswith("lm:"):
        prefs = lm_judge_prefs(args.judge[3:], prompts, pol_c, ref_c)
    elif args.judge.startswith("rm:"):
        judge = make_scorer(args.judge, task)
        sp, sr = judge(prompts, pol_c), judge(prompts, ref_c)
        prefs = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(sp.tolist(), sr.tolist())]
    elif args.judge != "gold":
        ap.error(f"--judge {args.judge}: use gold, rm:PATH or lm:MODEL")
    result = evaluate_pairs(
        pol_c, ref_c, gold_policy=gold_p, gold_reference=gold_r,
        proxy_policy=proxy(prompts, pol_c).tolist() if proxy else None,
        proxy_reference=proxy(prompts, ref_c).tolist() if proxy else None,
        prefs=prefs, logps_policy=pol_logps, logps_reference_on_policy=ref_logps_on_pol,
        meta={"policy": args.policy, "reference": args.reference, "task": args.task, "judge": args.judge,
              "proxy": args.proxy, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
              "seed": args.seed, "best_of_n": n},
        seed=args.seed,
    )
    if n > 1:
        result["kl"] = best_of_n_kl(n, same_model=pol_name == args.reference)
    out = Path(args.out) if args.out else (Path(pol_name) if Path(pol_name).is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"wrote {out / 'eval.json'}")
    return 0


def report_main(argv: list[str]) -> int:
    from rlhfkit.evaluate.report import write_report

    ap = argparse.ArgumentParser(prog="rlhfkit report", description="one self-contained HTML report for runs")
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--out", default=None, help="HTML file (default: RUN/report.html for one run, else report.html)")
    ap.add_argument("--title", default="rlhfkit report")
    args = ap.parse_args(argv)
    for r in args.runs:
        if not Path(r).is_dir():
            ap.error(f"{r}: not a run directory")
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else Path("report.html"))
    print(write_report([Path(r) for r in args.runs], out, title=args.title))
    return 0


def compare_main(argv: list[str]) -> int:
    from rlhfkit.evaluate.compare import compare_runs, format_compare

    ap = argparse.ArgumentParser(prog="rlhfkit compare", usage="rlhfkit compare [--metric M] RUNS_A... -- RUNS_B...",
                                 description="IQM with stratified bootstrap CIs and P(A > B) over groups of runs "
                                 "(strata: each run's task)")
    ap.add_argument("runs_a", nargs="+")
    ap.add_argument("--metric", default="eval/gold", help="metric compared: its last value in each run")
    if "--" not in argv:
        ap.parse_args(argv)  # --help exits 0 here
        ap.error("separate the two groups of runs with --")
    i = argv.index("--")
    args = ap.parse_args(argv[:i])
    runs_b = argv[i + 1:]
    if not runs_b:
        ap.error("no runs after --")
    print(format_compare(compare_runs([Path(r) for r in args.runs_a], [Path(r) for r in runs_b], metric=args.metric)))
    return 0
