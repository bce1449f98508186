"""Peak memory of GRPO and DPO with LoRA against full fine-tuning, on the bundled model (docs/lora.md).

    python bench/lora_memory.py [--steps 3] [--lora-r 16] [--model smollm2-135m-instruct]

Four runs, each in its own subprocess (bench/common.py: the peak RSS is the kernel's ``ru_maxrss`` of
the finished child, model loading included): GRPO full, GRPO LoRA, DPO full, DPO LoRA, same settings
otherwise, fp32 on the CPU (``mixed_precision='no'``).

GRPO: the sentiment task's gold reward, 2 prompts x 4 completions, 32 new tokens, one micro-batch of 8,
beta 0.04 (k1), so full fine-tuning holds a frozen reference copy next to the policy, its gradients and
AdamW's two moments; with LoRA the reference is the policy with its adapter off and only the adapter has
gradients and moments. DPO: sigmoid loss, beta 0.1, 16 generated preference pairs, batches of 8 in
micro-batches of 4. Full DPO never holds its reference next to the policy (its log-probs are computed
once, before the policy loads), so there LoRA saves the gradients and optimizer state only.
Each run ends with its checkpoint write (the adapter only, with LoRA).

The last line is ``RESULT mem_ratio_grpo=<LoRA peak / full peak> mem_ratio_dpo=<...> ...``. ``--model tiny
--steps 1`` is a seconds-long smoke test of the script itself (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_result, read_worker_result, run_worker, self_peak_rss_mb, write_worker_result  # noqa: E402

LORA_ALPHA_PER_R = 2
"""lora_alpha = 2 r (a common choice; it does not change memory)."""


def lora_fields(args) -> dict:
    return dict(lora_r=args.lora_r, lora_alpha=float(LORA_ALPHA_PER_R * args.lora_r)) if args.lora else {}


def worker_grpo(args) -> None:
    from rlhfkit.train import grpo

    run_dir = Path(args.out).parent / f"grpo-{'lora' if args.lora else 'full'}"
    cfg = grpo.GRPOConfig(model=args.model, task="sentiment", reward="gold", output_dir=str(run_dir), seed=0,
                          max_steps=args.steps, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=32,
                          temperature=1.0, lr=2e-6 if not args.lora else 2e-4, beta=0.04, micro_batch_size=8,
                          eval_every=0, sample_every=0, mixed_precision="no", progress=False, **lora_fields(args))
    result = grpo.train(cfg)
    write_worker_result(args.out, steps=result["steps"], peak_rss_mb_self=self_peak_rss_mb())


def preference_rows(n: int) -> list[dict]:
    """``n`` short generated preference pairs (the content does not matter for memory)."""
    topics = ["the sea", "a cat", "bread", "rain", "a train", "music", "a garden", "winter"]
    return [{"prompt": [{"role": "user", "content": f"Write one sentence about {topics[i % len(topics)]} ({i})."}],
             "chosen": {"role": "assistant", "content": f"Here is a calm sentence about {topics[i % len(topics)]}."},
             "rejected": {"role": "assistant", "content": "No."}} for i in range(n)]


def worker_dpo(args) -> None:
    from rlhfkit.train import dpo

    run_dir = Path(args.out).parent / f"dpo-{'lora' if args.lora else 'full'}"
    data = Path(args.out).parent / "prefs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(16)))
    cfg = dpo.DPOConfig(model=args.model, data=str(data), output_dir=str(run_dir), seed=0, max_steps=args.steps,
                        batch_size=8, micro_batch_size=4, lr=5e-7 if not args.lora else 5e-5, beta=0.1,
                        eval_fraction=0.0, mixed_precision="no", progress=False, **lora_fields(args))
    result = dpo.train(cfg)
    write_worker_result(args.out, steps=result["steps"], peak_rss_mb_self=self_peak_rss_mb())


WORKERS = {"grpo": worker_grpo, "dpo": worker_dpo}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA runs (alpha = 2 r)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="'tiny' only to smoke-test this script")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        WORKERS[args.worker](args)
        return
    if args.model == "smollm2-135m-instruct":
        from rlhfkit.models.loading import bundled_model_dir

        bundled_model_dir()  # convert the GGUF once, outside every measurement
    print(f"{args.model}, fp32, {args.steps} steps per run, LoRA r={args.lora_r}; torch threads per process: "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        for method in ("grpo", "dpo"):
            for mode in ("full", "lora"):
                out = Path(tmp) / f"{method}-{mode}.json"
                extra = ["--lora"] if mode == "lora" else []
                _, m = run_worker(__file__, method, out, "--steps", args.steps, "--model", args.model,
                                  "--lora-r", args.lora_r, *extra, env=env, timeout=args.timeout)
                peaks[f"{method}_{mode}"] = m.peak_rss_mb
                print(f"{method:>5} {mode:>5}: peak RSS {m.peak_rss_mb:7.0f} MiB  wall {m.wall_s:6.1f} s  steps "
                      f"{read_worker_result(out)['steps']}  load {os.getloadavg()[0]:.1f}", flush=True)
    print_result(mem_ratio_grpo=peaks["grpo_lora"] / peaks["grpo_full"],
                 mem_ratio_dpo=peaks["dpo_lora"] / peaks["dpo_full"],
                 **{f"peak_mb_{k}": v for k, v in peaks.items()}, lora_r=args.lora_r, steps=args.steps)


if __name__ == "__main__":
    main()
