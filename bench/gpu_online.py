"""GRPO on one GPU: rlhfkit against TRL's ``GRPOTrainer``, completions/s and peak GPU memory, bf16.

    python bench/gpu_online.py [--steps 5] [--warmup 1] [--prompts-per-step 8] [--k 8] [--max-new-tokens 128]

The CUDA counterpart of ``bench/online.py`` (read its docstring for what is timed and how): the same
bundled model, task (sentiment, gold reward), prompt order, learning rate, KL coefficient and
estimator, one optimisation pass per step in one micro-batch; here in bf16 autocast on the GPU
(rlhfkit ``mixed_precision='bf16'``, TRL ``bf16=True``), with a batch sized for a GPU (default 8
prompts x 8 completions, 128 new tokens). Both generate with Hugging Face ``generate`` (rlhfkit's
``hf`` backend, TRL without vLLM). Each framework runs in its own process; the memory figure is
``torch.cuda.max_memory_allocated`` of that process.

Last line: ``RESULT speedup=<rlhfkit completions/s / TRL's> mem_ratio=<rlhfkit peak GPU memory / TRL's> ...``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_result, run_worker, write_worker_result  # noqa: E402
from online import BETA, LR, SEED, TASK, TEMPERATURE, _instrument_rlhfkit, _rows, stream_prompts  # noqa: E402


def gpu_peak_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def worker_rlhfkit(args) -> None:
    from rlhfkit.models.loading import BUNDLED
    from rlhfkit.train import grpo

    run_dir = Path(args.out).parent / "rlhfkit-grpo"
    _instrument_rlhfkit(run_dir)
    n = args.prompts_per_step * args.k
    cfg = grpo.GRPOConfig(model=BUNDLED, task=TASK, reward="gold", output_dir=str(run_dir), seed=SEED,
                          max_steps=args.steps, prompts_per_step=args.prompts_per_step, samples_per_prompt=args.k,
                          max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0, lr=LR, beta=BETA,
                          epochs_per_step=1, mini_batch_size=None, micro_batch_size=n, eval_every=0,
                          sample_every=0, mixed_precision="bf16", progress=False)
    grpo.train(cfg)
    rows = _rows(run_dir)
    write_worker_result(args.out, framework="rlhfkit", step_s=[r["perf/step_s"] for r in rows],
                        completions=[n] * len(rows), reward=[r["reward/mean"] for r in rows],
                        length=[r["rollout/length"] for r in rows], gpu_peak_mb=gpu_peak_mb())


def worker_trl(args) -> None:
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from rlhfkit.data.tasks import get_task
    from rlhfkit.models.loading import bundled_model_dir

    task = get_task(TASK)
    step_rewards: list[float] = []
    n = args.prompts_per_step * args.k

    def gold_reward(prompts, completions, **kwargs) -> list[float]:
        scores = task.gold(prompts, [c[-1]["content"] for c in completions])
        step_rewards.append(sum(scores) / len(scores))
        return scores

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.step_s = 0.0, []

        def on_step_begin(self, targs, state, control, **kw):
            torch.cuda.synchronize()
            self.begin = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            torch.cuda.synchronize()
            self.step_s.append(time.perf_counter() - self.begin)

    model_dir = str(bundled_model_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = "<|endoftext|>"
    ds = datasets.Dataset.from_list([{"prompt": p} for p in stream_prompts(args.steps, args.prompts_per_step)])
    targs = trl.GRPOConfig(
        output_dir=str(Path(args.out).parent / "trl-grpo"), per_device_train_batch_size=n,
        num_generations=args.k, gradient_accumulation_steps=1, num_iterations=1, max_steps=args.steps,
        max_completion_length=args.max_new_tokens, temperature=TEMPERATURE, learning_rate=LR, beta=BETA,
        bf16=True, gradient_checkpointing=False, shuffle_dataset=False, seed=SEED, dataloader_num_workers=0,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=gold_reward, args=targs, train_dataset=ds,
                              processing_class=tok, callbacks=[timer])
    trainer.train()
    write_worker_result(args.out, framework="trl", version=trl.__version__, step_s=timer.step_s,
                        completions=[n] * len(timer.step_s), reward=step_rewards, gpu_peak_mb=gpu_peak_mb())


WORKERS = {"rlhfkit": worker_rlhfkit, "trl": worker_trl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--k", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=240, help="seconds per framework before it is killed")
    p.add_argument("--only", choices=sorted(WORKERS), help="run one framework (no ratio)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        WORKERS[args.worker](args)
        return
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (bench/online.py is the CPU benchmark)")
    from rlhfkit.models.loading import bundled_model_dir

    bundled_model_dir()
    print(f"GRPO on {torch.cuda.get_device_name()}: {args.prompts_per_step} prompts x {args.k}, "
          f"{args.max_new_tokens} new tokens, bf16, {args.steps} steps ({args.warmup} warm-up)", flush=True)
    rates, mem = {}, {}
    fw_args = ["--steps", args.steps, "--prompts-per-step", args.prompts_per_step, "--k", args.k,
               "--max-new-tokens", args.max_new_tokens]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-online-") as tmp:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        for name in [args.only] if args.only else ["rlhfkit", "trl"]:
            r, m = run_worker(__file__, name, Path(tmp) / f"{name}.json", *fw_args, env=env, timeout=args.timeout)
            step_s, done = r["step_s"][args.warmup:], r["completions"][args.warmup:]
            rates[name], mem[name] = sum(done) / sum(step_s), r["gpu_peak_mb"]
            print(f"{name:>8}: {rates[name]:7.2f} completions/s  step s {[round(s, 2) for s in r['step_s']]}  "
                  f"GPU peak {r['gpu_peak_mb']:.0f} MiB  reward {[round(x, 3) for x in r['reward']]}  "
                  f"process wall {m.wall_s:.0f} s", flush=True)
    if args.only:
        print_result(**{f"{args.only}_completions_s": rates[args.only], f"{args.only}_gpu_mb": mem[args.only]})
        return
    print_result(speedup=rates["rlhfkit"] / rates["trl"], mem_ratio=mem["rlhfkit"] / mem["trl"],
                 rlhfkit_completions_s=rates["rlhfkit"], trl_completions_s=rates["trl"],
                 rlhfkit_gpu_mb=mem["rlhfkit"], trl_gpu_mb=mem["trl"], steps=args.steps, warmup=args.warmup)


if __name__ == "__main__":
    main()
