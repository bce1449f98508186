"""Ablation: CMPO against PPO, GRPO and RLOO at an equal sample budget, several seeds, two tasks.

    python bench/ablation_cmpo.py [--model smollm2-135m-instruct] [--tasks sentiment,concise]
        [--seeds 0,1,2] [--steps 40] [--prompts-per-step 8] [--samples-per-prompt 4]

Every method sees the same number of sampled completions: ``steps x prompts_per_step x
samples_per_prompt``. CMPO, GRPO and RLOO draw K = ``samples_per_prompt`` completions for each of
``prompts_per_step`` prompts; PPO (critic baseline, one sample per prompt) draws one completion for
each of ``prompts_per_step x K`` prompts. Everything else is each method's own default (learning
rate unless ``--lr``, epochs, mini-batches, KL coefficient and estimator), so PPO does more gradient
updates per sample (4 epochs x mini-batches) than the critic-free methods (one update per step);
``--equal-updates`` gives PPO one update per step too (and makes its runs ~5x cheaper).

Score per run: the final eval hook's mean *gold* reward on the task's held-out prompts (sampled
from the trained policy at the training temperature, fixed seed), its KL(policy || reference) and
its win rate against the starting model (per held-out prompt, the trained reply's gold reward
against the starting model's reply sampled with the same seed; ties count half). Aggregates follow
Agarwal et al. 2021 (``rlhfkit.evaluate.stats``): IQM over all runs x tasks with a 95% stratified
bootstrap CI, and P(CMPO > X) on the gold reward with its CI, per baseline.

Each finished run writes ``OUT/TASK-METHOD-sSEED/row.json`` and deletes its checkpoints (unless
``--keep-checkpoints``); a later call with the same settings reuses the rows it finds. So an
interrupted ablation resumes where it stopped, and on a multi-core machine one process per task
(``--tasks sentiment --threads 1`` and ``--tasks concise --threads 1``, same ``--out``) followed by a
call with every task (which only aggregates) splits the work.

Tasks: any built-in task (``rlhfkit tasks``) or ``toy``: the reward is the fraction of completion
tokens in a fixed half S of the vocabulary (tests/train/test_online.py's toy, learnable by a random
'tiny' model in a few steps; gold = the same fraction of the re-tokenised text). A random tiny
model almost never emits EOS, so pass ``--missing-eos-penalty none`` with it.

The last line is ``RESULT cmpo_iqm=... ppo_iqm=... grpo_iqm=... rloo_iqm=... p_cmpo_gt_ppo=... ...``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_result  # noqa: E402

METHODS = {  # method -> (its trainer module, its config class); RLOO is a preset of the GRPO loop
    "cmpo": ("rlhfkit.train.cmpo", "CMPOConfig"),
    "ppo": ("rlhfkit.train.ppo", "PPOConfig"),
    "grpo": ("rlhfkit.train.grpo", "GRPOConfig"),
    "rloo": ("rlhfkit.train.grpo", "RLOOConfig"),
}


class ToyTask:
    """Reward = fraction of completion tokens in S = {x : e_x . u > 0} (e: the model's input embeddings)."""

    name = "toy"

    def __init__(self, model_name: str):
        import torch

        from rlhfkit.models import load_model

        model, self.tok = load_model(model_name)
        u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        self.S = ((model.get_input_embeddings().weight.detach() @ u) > 0).tolist()

    def prompts(self, split: str = "train"):
        from rlhfkit.data.prompts import load_prompts

        return [[{"role": "user", "content": p["prompt"]}] for p in load_prompts(split)]

    def gold(self, prompts, completions):
        out = []
        for text in completions:
            ids = self.tok(text, add_special_tokens=False).input_ids
            out.append(sum(self.S[i] for i in ids if i < len(self.S)) / max(len(ids), 1))
        return out


def make_config(method: str, args, task_name: str, seed: int, out: Path):
    """The method's config at its defaults, with the shared fields and the equal sample budget."""
    shared = dict(model=args.model, task=task_name, seed=seed,
                  total_steps=args.steps, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  missing_eos_penalty=args.missing_eos_penalty, eval_every=args.steps, eval_prompts=args.eval_prompts,
                  sample_every=0, progress=False, output_dir=str(out))
    if args.lr is not None:
        shared["lr"] = args.lr
    k, p = args.samples_per_prompt, args.prompts_per_step
    cls = getattr(trainer_module(method), METHODS[method][1])
    if method != "ppo":
        return cls(**shared, samples_per_prompt=k, prompts_per_step=p)
    # PPO: one completion for each of p x k prompts (its critic is the baseline), the same sample budget
    cfg = cls(**shared, samples_per_prompt=1, prompts_per_step=p * k)
    if args.equal_updates:
        cfg.epochs_per_step, cfg.mini_batch_size = 1, None
    elif cfg.mini_batch_size and (p * k) % cfg.mini_batch_size:
        cfg.mini_batch_size = None  # the default 4 must divide the rollout batch; else one mini-batch
    return cfg


def trainer_module(method: str):
    """The method's trainer module (imported on demand: each run is one method)."""
    import importlib

    return importlib.import_module(METHODS[method][0])


def cached_row(out: Path, settings: dict) -> dict | None:
    """The row a finished run with these settings left in ``out``, else None."""
    path = out / "row.json"
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    return row if row.get("settings") == settings else None


def run_one(method: str, args, task_name: str, task, seed: int, out: Path, settings: dict) -> dict:
    """Train one (task, method, seed) run from scratch; its final eval as a row, saved in ``out/row.json``."""
    if out.exists():
        shutil.rmtree(out)  # a stale or unfinished run: start it again
    cfg = make_config(method, args, task_name, seed, out)
    t0 = time.perf_counter()
    res = trainer_module(method).train(cfg, task=task)
    end, start = res["eval_end"], res["eval_start"]
    row = {"task": task_name, "method": method, "seed": seed, "gold": end["eval/gold"],
           "gold_start": start["eval/gold"], "kl": end["eval/kl"], "win_rate": end["eval/win_rate_start"],
           "length": end["eval/length"], "length_start": start["eval/length"],
           "seconds": time.perf_counter() - t0, "settings": settings}
    if not args.keep_checkpoints:
        shutil.rmtree(Path(res["run_dir"]) / "checkpoints", ignore_errors=True)
    (out / "row.json").write_text(json.dumps(row, indent=2))
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="policy to start from (e.g. tiny:0.5)")
    p.add_argument("--tasks", default="sentiment,concise", help="comma list of built-in tasks and/or 'toy'")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="comma list (>= 3 for the bootstrap to mean anything)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples-per-prompt", type=int, default=4, help="K for CMPO/GRPO/RLOO; PPO gets K x the prompts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--missing-eos-penalty", default="-1", help="a float, or 'none' (use 'none' with tiny models)")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: each method's)")
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--equal-updates", action="store_true",
                   help="PPO makes one update per step (1 epoch, one mini-batch) like the others, instead of its "
                        "default 4 epochs x mini-batches of 4: equal samples *and* equal optimizer updates")
    p.add_argument("--threads", type=int, default=None, help="torch threads for this process (default: torch's)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (~1.6 GB a run)")
    p.add_argument("--out", default="runs/ablation_cmpo")
    args = p.parse_args(argv)
    args.missing_eos_penalty = None if args.missing_eos_penalty.lower() == "none" else float(args.missing_eos_penalty)
    return args


def main(argv=None) -> int:
    from rlhfkit.evaluate.stats import iqm, probability_of_improvement_ci, stratified_bootstrap_ci

    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    budget = args.steps * args.prompts_per_step * args.samples_per_prompt
    print(f"[ablation] model={args.model} tasks={tasks} methods={methods} seeds={seeds} steps={args.steps} "
          f"samples/run={budget}", flush=True)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("tasks", "methods", "seeds", "threads", "out",
                                                                  "keep_checkpoints")}
    runs = []
    t_all = time.perf_counter()
    for task_name in tasks:
        task = None
        for seed in seeds:  # seeds outside methods: a run cut short leaves every method with the same seeds
            for method in methods:
                out = out_root / f"{task_name}-{method}-s{seed}"
                row = cached_row(out, settings)
                if row is None:
                    task = task or (ToyTask(args.model) if task_name == "toy" else None)
                    row = run_one(method, args, task_name, task, seed, out, settings)
                runs.append(row)
                print(f"[ablation] {task_name:<10} {method:<5} seed {seed}: gold {row['gold']:.4f} "
                      f"(start {row['gold_start']:.4f}) kl {row['kl']:.4f} win {row['win_rate']:.3f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    (out_root / "runs.json").write_text(json.dumps(runs, indent=2))

    def scores(method: str, key: str) -> dict:
        return {t: np.array([r[key] for r in runs if r["method"] == method and r["task"] == t]) for t in tasks}

    summary: dict = {"config": vars(args), "samples_per_run": budget, "methods": {},
                     "gold_start": {t: float(scores(methods[0], "gold_start")[t].mean()) for t in tasks}}
    print(f"\n{'method':<6} {'gold IQM [95% CI]':<26} {'win rate IQM [95% CI]':<26} {'KL IQM [95% CI]':<26}  "
          + "  ".join(f"{t:>10}" for t in tasks))
    for m in methods:
        est = {key: stratified_bootstrap_ci(scores(m, key), iqm, seed=0) for key in ("gold", "win_rate", "kl")}
        per_task = {t: float(v.mean()) for t, v in scores(m, "gold").items()}
        summary["methods"][m] = {f"{key}_iqm": e.to_dict() for key, e in est.items()}
        summary["methods"][m]["gold_mean_per_task"] = per_task
        print(f"{m:<6} {str(est['gold']):<26} {str(est['win_rate']):<26} {str(est['kl']):<26}  "
              + "  ".join(f"{per_task[t]:>10.4f}" for t in tasks))
    print(f"{'start':<6} {'':<26} {'':<26} {'':<26}  " + "  ".join(f"{summary['gold_start'][t]:>10.4f}" for t in tasks))
    result = {f"{m}_iqm": summary["methods"][m]["gold_iqm"]["value"] for m in methods}
    result.update({f"{m}_win": summary["methods"][m]["win_rate_iqm"]["value"] for m in methods})
    if "cmpo" in methods:
        for other in (m for m in methods if m != "cmpo"):
            poi = probability_of_improvement_ci(scores("cmpo", "gold"), scores(other, "gold"), seed=0)
            summary[f"p_cmpo_gt_{other}"] = poi.to_dict()
            print(f"P(cmpo > {other}) = {poi}")
            result[f"p_cmpo_gt_{other}"] = poi.value
            result[f"p_cmpo_gt_{other}_lo"] = poi.ci_low
    result.update({f"{m}_kl": summary["methods"][m]["kl_iqm"]["value"] for m in methods})
    result.update(model=args.model, tasks="+".join(tasks), seeds=len(seeds), steps=args.steps, samples_per_run=budget,
                  minutes=(time.perf_counter() - t_all) / 60)
    (out_root / "summary.json").write_text(json.dumps(summary, indent=2))
    print_result(**result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
