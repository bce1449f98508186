"""Online RL (GRPO) throughput and peak memory: rlhfkit against TRL's ``GRPOTrainer``; rlhfkit PPO's step time.

    python bench/online.py [--steps 4] [--warmup 1] [--rounds 2] [--no-ppo]

Both GRPO runs train the bundled SmolLM2-135M-Instruct (TRL gets the directory
``rlhfkit.models.loading.bundled_model_dir()``) in fp32 on the sentiment task's train prompts, in the
same order (rlhfkit's ``PromptStream`` for seed 0; TRL gets them as a data set with
``shuffle_dataset=False``), with the task's gold reward as the only reward. Per step: 2 prompts x 4
completions = 8 completions, up to 32 new tokens, temperature 1.0 (top-p 1, top-k off), one
optimisation pass over the batch in one micro-batch of 8 (one optimizer update), lr 2e-6, KL
coefficient beta 0.04 against a frozen reference copy (k3 estimator in both). rlhfkit samples with its
default backend, ``auto``: on this CPU the int8 engine, its gap to the policy corrected by truncated
importance sampling (docs/generation.md); ``--rollout-backend hf`` gives it transformers' ``generate`` on
the policy, as TRL has.

TRL settings (everything else is its default): ``per_device_train_batch_size=8``,
``num_generations=4``, ``gradient_accumulation_steps=1``, ``num_iterations=1``,
``max_completion_length=32``, ``temperature=1.0``, ``learning_rate=2e-6``, ``beta=0.04`` (TRL's
default is 0.0, i.e. no reference model; rlhfkit's GRPO default and the GRPO paper use 0.04, so both
hold and run a reference model here), ``bf16=False`` (TRL's default is True; this is fp32),
``gradient_checkpointing=False`` (TRL's default is True; rlhfkit keeps activations), ``use_vllm``
left False, ``shuffle_dataset=False`` (same prompt order), no logging / evaluation / saving
(``logging_strategy='no'``, ``save_strategy='no'``, ``report_to='none'``, ``disable_tqdm=True``).
TRL's defaults that differ from rlhfkit's and stay: ``loss_type='dapo'`` (rlhfkit: ``seq_mean``; the
same work either way) and the ``adamw_torch_fused`` optimizer. rlhfkit runs with ``eval_every=0``,
``sample_every=0``, ``mixed_precision='no'`` and its final checkpoint write stubbed out.

What is timed: the optimizer steps only, each from the start of generation to the end of the
optimizer update (rlhfkit: the trainer's own ``perf/step_s``, phases generate -> score ->
advantages -> optimize; TRL: ``on_step_begin`` -> ``on_step_end``, which encloses its generation,
scoring, reference pass, loss and update). Model loading, imports and logging are outside. The first
``--warmup`` steps pay one-off costs (allocator, lazy optimizer state) and are left out of the
rates. completions/s = completions in the timed steps / their summed step time. The process's CPU
time (user + system) over the same spans is reported too (``completions per CPU-s``,
``cpu_speedup``): on a machine shared with other work it is the steadier figure.

PPO: rlhfkit's ``PPOConfig`` at the same batch of 8 completions (8 prompts x 1), the same sampling,
one epoch over one mini-batch of 8 (PPO's default is 4 epochs over mini-batches of 4), critic
initialised from the policy; reported as mean seconds per step over the timed steps.

Each run is its own subprocess (``bench/common.py``), so the peak RSS (``wait4``'s ``ru_maxrss``,
model loading included) is per framework (the largest over rounds). ``--rounds`` repeats the
rlhfkit / TRL pair, alternating, and pools each framework's timed steps over the rounds: this machine's
speed drifts by up to 1.5x within minutes, and one run each would compare two different machines. On
a machine shared with other work the timings are noisy; compare rates from one invocation only.

The last line is machine-readable:

    RESULT speedup=<rlhfkit completions/s / TRL's> mem_ratio=<rlhfkit peak RSS / TRL's> ... frac_of_peak=<rlhfkit's
    model FLOP/s / measured fp32 matmul FLOP/s>
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    chat_tokens,
    count_params,
    frac_of_peak,
    matmul_peak_flops,
    model_flops,
    print_result,
    rlhfkit_env,
    run_worker,
    self_peak_rss_mb,
    write_worker_result,
)

TASK = "sentiment"
PROMPTS_PER_STEP = 2
K = 4  # completions per prompt (the GRPO group size)
MAX_NEW_TOKENS = 32
TEMPERATURE = 1.0
LR = 2e-6
BETA = 0.04
SEED = 0


def stream_prompts(steps: int, per_step: int) -> list[list[dict]]:
    """The train prompts rlhfkit's trainer draws for steps 0..steps-1, in order."""
    from rlhfkit.data.tasks import get_task
    from rlhfkit.train.online_rollout import PromptStream

    stream = PromptStream(get_task(TASK).prompts("train"), SEED)
    return [p for s in range(steps) for p in stream.batch(s, per_step)]


def cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine, steadier than wall time."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _instrument_rlhfkit(run_dir: Path) -> list[float]:
    """Stub out the final checkpoint write (not part of a step; rlhfkit writes one after the last
    step) and record each step's CPU seconds: the trainers time a step with one ``runtime.Timer``."""
    from rlhfkit.train import runtime

    runtime.save_checkpoint = lambda *a, **k: run_dir
    cpu: list[float] = []

    class CPUTimer(runtime.Timer):
        def __enter__(self):
            self.c0 = cpu_seconds()
            return super().__enter__()

        def __exit__(self, *exc):
            cpu.append(cpu_seconds() - self.c0)
            return super().__exit__(*exc)

    runtime.Timer = CPUTimer
    return cpu


def run_dir_of(args) -> Path:
    """The worker's own output folder, beside its result file: each run of each round starts empty."""
    return Path(args.out).with_name(Path(args.out).stem + "-run")


def _rows(run_dir: Path) -> list[dict]:
    from rlhfkit.tracking import read_metrics

    return [r for r in read_metrics(run_dir) if "perf/step_s" in r]


def worker_rlhfkit(args) -> None:
    from rlhfkit.models.loading import BUNDLED
    from rlhfkit.train import grpo

    run_dir = run_dir_of(args)
    cpu = _instrument_rlhfkit(run_dir)
    cfg = grpo.GRPOConfig(model=BUNDLED, task=TASK, reward="gold", output_dir=str(run_dir), seed=SEED,
                          max_steps=args.steps, prompts_per_step=PROMPTS_PER_STEP, samples_per_prompt=K,
                          max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, lr=LR, beta=BETA,
                          epochs_per_step=1, mini_batch_size=None, micro_batch_size=PROMPTS_PER_STEP * K,
                          eval_every=0, sample_every=0, mixed_precision="no", progress=False,
                          rollout_backend=args.rollout_backend)
    grpo.train(cfg)
    rows = _rows(run_dir)
    write_worker_result(args.out, framework="rlhfkit", step_s=[r["perf/step_s"] for r in rows], cpu_s=cpu,
                        completions=[PROMPTS_PER_STEP * K] * len(rows), reward=[r["reward/mean"] for r in rows],
                        length=[r["rollout/length"] for r in rows], peak_rss_mb_self=self_peak_rss_mb())


def worker_trl(args) -> None:
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from rlhfkit.data.tasks import get_task
    from rlhfkit.models.loading import bundled_model_dir

    task = get_task(TASK)
    step_rewards: list[float] = []

    def gold_reward(prompts, completions, **kwargs) -> list[float]:
        # conversational data set: each completion is [{"role": "assistant", "content": ...}]
        scores = task.gold(prompts, [c[-1]["content"] for c in completions])
        step_rewards.append(sum(scores) / len(scores))
        return scores

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.cpu0, self.step_s, self.cpu_s = 0.0, 0.0, [], []

        def on_step_begin(self, targs, state, control, **kw):
            self.begin, self.cpu0 = time.perf_counter(), cpu_seconds()

        def on_step_end(self, targs, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.begin)
            self.cpu_s.append(cpu_seconds() - self.cpu0)

    model_dir = str(bundled_model_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = "<|endoftext|>"  # as rlhfkit's loader: a pad distinct from EOS (the GGUF's pad is EOS)
    ds = datasets.Dataset.from_list([{"prompt": p} for p in stream_prompts(args.steps, PROMPTS_PER_STEP)])
    targs = trl.GRPOConfig(
        output_dir=str(run_dir_of(args)), per_device_train_batch_size=PROMPTS_PER_STEP * K,
        num_generations=K, gradient_accumulation_steps=1, num_iterations=1, max_steps=args.steps,
        max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, learning_rate=LR, beta=BETA,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        shuffle_dataset=False, seed=SEED, dataloader_num_workers=0, logging_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
    )
    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=gold_reward, args=targs, train_dataset=ds,
                              processing_class=tok, callbacks=[timer])
    trainer.train()
    write_worker_result(args.out, framework="trl", version=trl.__version__, step_s=timer.step_s, cpu_s=timer.cpu_s,
                        completions=[PROMPTS_PER_STEP * K] * len(timer.step_s), reward=step_rewards,
                        optim=getattr(targs.optim, "value", str(targs.optim)), loss_type=targs.loss_type,
                        peak_rss_mb_self=self_peak_rss_mb())


def worker_ppo(args) -> None:
    from rlhfkit.models.loading import BUNDLED
    from rlhfkit.train import ppo

    run_dir = run_dir_of(args)
    cpu = _instrument_rlhfkit(run_dir)
    n = PROMPTS_PER_STEP * K
    cfg = ppo.PPOConfig(model=BUNDLED, task=TASK, reward="gold", output_dir=str(run_dir), seed=SEED,
                        max_steps=args.steps, prompts_per_step=n, samples_per_prompt=1, max_new_tokens=MAX_NEW_TOKENS,
                        temperature=TEMPERATURE, top_p=1.0, epochs_per_step=1, mini_batch_size=n, micro_batch_size=n,
                        eval_every=0, sample_every=0, mixed_precision="no", progress=False,
                        rollout_backend=args.rollout_backend)
    ppo.train(cfg)
    rows = _rows(run_dir)
    write_worker_result(args.out, framework="rlhfkit-ppo", step_s=[r["perf/step_s"] for r in rows], cpu_s=cpu,
                        completions=[n] * len(rows), reward=[r["reward/mean"] for r in rows],
                        peak_rss_mb_self=self_peak_rss_mb())


WORKERS = {"rlhfkit": worker_rlhfkit, "trl": worker_trl, "ppo": worker_ppo}


def timed(results: list[dict], warmup: int) -> dict:
    """Rates over each run's steps after its first ``warmup``, pooled over the runs: completions per wall
    second and per CPU second, mean wall and CPU seconds per step."""
    step_s, cpu_s, done = ([x for r in results for x in r[key][warmup:]] for key in ("step_s", "cpu_s", "completions"))
    assert step_s and len(cpu_s) == len(step_s), (
        f"{results[0]['framework']}: {len(step_s)} step times, {len(cpu_s)} CPU times, {warmup} warm-up")
    return {"completions_s": sum(done) / sum(step_s), "completions_cpu_s": sum(done) / sum(cpu_s),
            "mean_step_s": sum(step_s) / len(step_s), "mean_step_cpu_s": sum(cpu_s) / len(cpu_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per framework")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the rates (one-off costs)")
    p.add_argument("--no-ppo", action="store_true", help="skip the rlhfkit PPO step-time run")
    p.add_argument("--rounds", type=int, default=2, help="rlhfkit / TRL runs each, alternating; steps pooled")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per framework before it is killed")
    p.add_argument("--rollout-backend", choices=("auto", "hf", "fast"), default="auto",
                   help="rlhfkit's generation backend (GRPO and PPO): 'auto', the trainers' default, is the int8 CPU "
                        "engine with the IS correction here (docs/generation.md); 'hf' = transformers generate")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        WORKERS[args.worker](args)
        return
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}: no step would be timed")

    from rlhfkit.models.loading import bundled_model_dir

    bundled_model_dir()  # convert the GGUF once, outside every measurement
    print(f"GRPO: {PROMPTS_PER_STEP} prompts x {K} completions, {MAX_NEW_TOKENS} new tokens, T={TEMPERATURE}, fp32, "
          f"{args.steps} steps ({args.warmup} warm-up); torch threads per process: "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        order = ["rlhfkit", "trl"] * args.rounds + ([] if args.no_ppo else ["ppo"])
        for i, name in enumerate(order):
            out = Path(tmp) / f"{name}-{i}.json"
            # rlhfkit runs with what its command sets (common.rlhfkit_env), TRL with its own defaults
            worker_env = env if name == "trl" else rlhfkit_env(env)
            r, m = run_worker(__file__, name, out, "--steps", args.steps, "--rollout-backend", args.rollout_backend,
                              env=worker_env, timeout=args.timeout)
            r.update(timed([r], args.warmup), peak_rss_mb=m.peak_rss_mb)
            runs.setdefault(name, []).append(r)
            print(f"{name:>8}: {r['completions_s']:6.3f} completions/s ({r['completions_cpu_s']:6.3f} per CPU-s)  "
                  f"mean step {r['mean_step_s']:6.2f} s ({r['mean_step_cpu_s']:6.2f} CPU-s)  peak RSS "
                  f"{m.peak_rss_mb:6.0f} MiB  process wall {m.wall_s:6.1f} s  load {os.getloadavg()[0]:.1f}\n"
                  f"{'':>10}step s {[round(s, 1) for s in r['step_s']]}  CPU s {[round(s, 1) for s in r['cpu_s']]}  "
                  f"reward {[round(x, 3) for x in r['reward']]}", flush=True)
    results = {name: {**rs[0], **timed(rs, args.warmup), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "length": [x for r in rs for x in r.get("length", [])]} for name, rs in runs.items()}
    ours, theirs = results["rlhfkit"], results["trl"]
    print(f"TRL {theirs['version']}: optimizer {theirs['optim']}, loss_type {theirs['loss_type']}; "
          f"load average now {os.getloadavg()[0]:.1f}")
    # frac_of_peak (rlhfkit's run): per completion, sampling (2 N T), the reference pass (2 N T) and the
    # policy's forward + backward (6 N T) over T = its prompt's chat-templated tokens + the mean completion
    # length, per second / the measured fp32 matmul rate
    from rlhfkit.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    prompts = stream_prompts(args.steps, PROMPTS_PER_STEP)
    tokens = (sum(chat_tokens(tok, p, generation_prompt=True) for p in prompts) / len(prompts)
              + sum(ours["length"]) / len(ours["length"]))
    peak, n_params = matmul_peak_flops(), count_params(bundled_model_dir())
    completion_flops = sum(model_flops(n_params, tokens, kind) for kind in ("generate", "forward", "train"))
    print_result(speedup=ours["completions_s"] / theirs["completions_s"],
                 mem_ratio=ours["peak_rss_mb"] / theirs["peak_rss_mb"],
                 rlhfkit_completions_s=ours["completions_s"], trl_completions_s=theirs["completions_s"],
                 ppo_step_s=results["ppo"]["mean_step_s"] if "ppo" in results else float("nan"),
                 cpu_speedup=ours["completions_cpu_s"] / theirs["completions_cpu_s"],
                 rlhfkit_rss_mb=ours["peak_rss_mb"], trl_rss_mb=theirs["peak_rss_mb"], steps=args.steps, rounds=args.rounds,
                 warmup=args.warmup, frac_of_peak=frac_of_peak(ours["completions_s"] * completion_flops, peak),
                 peak_gflop_s=peak / 1e9, rollout_backend=args.rollout_backend)


if __name__ == "__main__":
    main()
