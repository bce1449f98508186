"""SFT throughput and memory: rlhfkit against TRL's ``SFTTrainer`` on the bundled SmolLM2-135M.

    python bench/sft.py [--steps 6] [--batch-size 8] [--examples 64]

Both frameworks train the same model (the bundled GGUF converted to fp32 safetensors, the directory
``rlhfkit.models.loading.bundled_model_dir()``) on the same conversations, with the same batch size,
steps, learning rate, schedule (constant), gradient clipping (1.0), AdamW, fp32, and a loss on the
assistant reply only. Each runs in its own subprocess, one after the other, so the peak RSS is
per framework. Throughput = real tokens (no padding) / wall time from the end of step 1 to the end
of the last step (step 1 pays one-off costs: allocator warm-up, lazy optimizer state).

TRL is configured for speed and parity, not with its defaults: ``padding_free=True`` (TRL's
padding-free collator, the counterpart of rlhfkit's default ``packing='padding_free'``: one row of
concatenated conversations with position ids restarting per conversation),
``gradient_checkpointing=False`` (TRL's default is True; rlhfkit does not checkpoint), ``bf16=False``
(TRL's default is True; this benchmark is fp32), the prompt/completion dataset format so that
TRL's ``completion_only_loss`` puts the loss on the reply as rlhfkit does, ``max_length=None``
(TRL refuses a max_length with padding_free and no packing; every conversation here is shorter than
``--max-length``, which rlhfkit gets, so nothing is truncated on either side), no checkpoint saving.
Its optimizer is its default, ``adamw_torch_fused``. TRL's ``packing=True`` is not used: it
concatenates conversations into rows of ``max_length`` tokens, which changes the number of
conversations per step.

On a shared machine other processes' load moves the wall-clock figures by tens of percent from one
run to the next; ``speedup_cpu`` (tokens per CPU-second of the training process, all threads) is
the same ratio by a clock that load disturbs much less. Peak RSS is the whole process's (kernel
accounting of the finished child); the figure at the last step leaves out rlhfkit's final
checkpoint save (TRL is told not to save).

The last line is ``RESULT speedup=... mem_ratio=... rlhfkit_tok_s=... trl_tok_s=... speedup_cpu=... frac_of_peak=...``
(``frac_of_peak``: model FLOPs per second / the measured fp32 matmul rate, bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
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

LR = 1e-5
_SUBJECTS = ["the old lighthouse", "a small garden", "the city library", "a mountain village", "the river delta",
             "a night train", "the school orchestra", "a bakery", "the harbour market", "a desert observatory",
             "the winter forest", "a bicycle workshop", "the museum of clocks", "a fishing boat", "the tea farm"]
_ASPECTS = ["its history", "how it works", "what people do there", "why visitors like it", "how it changed",
            "what it looks like at dawn", "the people who run it", "its busiest season"]
_SENTENCES = [
    "It was built more than a century ago by people who wanted {s} to last.",
    "Most mornings begin quietly, and the first visitors arrive before the sun is fully up.",
    "Over the years the place has changed hands several times, yet its character stayed the same.",
    "Locals will tell you that the best time to see {s} is late in the afternoon.",
    "The work there follows the seasons, so spring and autumn feel completely different.",
    "A small team keeps everything running, and each of them knows every corner by heart.",
    "Many travellers come for a single day and end up staying for a week.",
    "The sounds you hear there are part of its charm: bells, voices, wind and water.",
    "If you go, bring comfortable shoes, some water and a little patience.",
    "Children usually love it, because there is always something moving or changing.",
    "Historians describe {s} as a good example of how communities adapt to new needs.",
    "In bad weather it becomes a shelter, and strangers often share stories while they wait.",
    "The most surprising detail is how much of the original design is still in use today.",
    "Some people say it is overrated, but most leave with a better impression than they expected.",
    "Photographs rarely capture it well; the scale only makes sense when you stand there.",
]
_SYSTEMS = [None, None, "You are a friendly travel guide. Answer in plain prose.",
            "You are a concise assistant who explains places clearly."]


def make_conversations(n: int, tok, seed: int = 0, min_tokens: int = 100, max_tokens: int = 200) -> list[dict]:
    """``n`` single-turn chats whose rendered length is drawn uniformly from [min_tokens, max_tokens]
    (the reply grows sentence by sentence until the conversation reaches its drawn length)."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        subject = rng.choice(_SUBJECTS)
        system = rng.choice(_SYSTEMS)
        prompt = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"Tell me about {subject}, especially {rng.choice(_ASPECTS)}."}]
        target = rng.randint(min_tokens, max_tokens)
        pool = rng.sample(_SENTENCES, len(_SENTENCES))
        reply: list[str] = []
        messages = prompt
        for sentence in pool:
            reply.append(sentence.format(s=subject))
            candidate = prompt + [{"role": "assistant", "content": " ".join(reply)}]
            length = len(tok.apply_chat_template(candidate, tokenize=True, return_dict=True)["input_ids"])
            if length > max_tokens:
                break
            messages = candidate
            if length >= target:
                break
        assert messages[-1]["role"] == "assistant", "a prompt alone is longer than max_tokens"
        convs.append({"messages": messages})
    return convs


# --- workers: each runs in its own process ---------------------------------------------------------


def rlhfkit_worker(args) -> None:
    import time

    from rlhfkit import tracking
    from rlhfkit.models.loading import BUNDLED
    from rlhfkit.tracking import read_metrics
    from rlhfkit.train.sft import SFTConfig, train

    # the trainer logs right after each optimizer step: record the process's CPU time there too
    cpu_times, rss, original_log = [], [], tracking.RunDir.log

    def log_with_cpu_time(self, step, metrics):
        cpu_times.append(time.process_time())
        rss.append(self_peak_rss_mb())
        return original_log(self, step, metrics)

    tracking.RunDir.log = log_with_cpu_time
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(model=BUNDLED, data=args.data, output_dir=out, max_steps=args.steps, batch_size=args.batch_size,
                        micro_batch_size=args.batch_size, max_length=args.max_length, lr=LR, lr_schedule="constant",
                        warmup_ratio=0.0, grad_clip=1.0, eval_fraction=0.0, mixed_precision="no", progress=False,
                        packing="padding_free", seed=0)
        train(cfg)
        rows = read_metrics(out)
    ends = [r["time"] for r in rows]  # written right after each optimizer step
    tokens = [round(r["perf/tokens_per_s"] * r["perf/step_s"]) for r in rows]  # real tokens, no padding
    write_worker_result(args.out, framework="rlhfkit", step_end_times=ends, step_end_cpu=cpu_times, step_end_peak_rss_mb=rss,
                        step_tokens=tokens,
                        losses=[r["loss/sft"] for r in rows], peak_rss_mb_self=self_peak_rss_mb())


def trl_worker(args) -> None:
    import time

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from rlhfkit.models.loading import bundled_model_dir

    path = bundled_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = "<|endoftext|>"  # as rlhfkit does: the GGUF's pad is EOS
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])

    class StepEnd(TrainerCallback):
        times: list[float] = []

        cpu: list[float] = []
        rss: list[float] = []

        def on_step_end(self, targs, state, control, **kw):
            self.times.append(time.time())
            self.cpu.append(time.process_time())
            self.rss.append(self_peak_rss_mb())

    timer = StepEnd()
    with tempfile.TemporaryDirectory() as out:
        targs = trl.SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", padding_free=True,
            max_length=None, bf16=False, fp16=False, gradient_checkpointing=False, seed=0, dataloader_num_workers=0,
            disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        )
        trainer = trl.SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[timer])
        trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    seen = [0] + [int(h["num_tokens"]) for h in logs]  # cumulative real tokens (padding-free: no pad tokens)
    write_worker_result(args.out, framework="trl", version=trl.__version__, step_end_times=timer.times,
                        step_end_cpu=timer.cpu, step_end_peak_rss_mb=timer.rss,
                        step_tokens=[b - a for a, b in zip(seen, seen[1:])], losses=[h["loss"] for h in logs],
                        peak_rss_mb_self=self_peak_rss_mb(), optim=targs.optim)


# --- the comparison --------------------------------------------------------------------------------


def throughput(result: dict, clock: str = "step_end_times") -> float:
    """Real tokens of steps 2..N over the time from the end of step 1 to the end of step N, by the
    wall clock (``step_end_times``) or the process's CPU time (``step_end_cpu``, all threads)."""
    ends, tokens = result[clock], result["step_tokens"]
    assert len(ends) == len(tokens) >= 2, f"{result['framework']}: {len(ends)} step times, {len(tokens)} token counts"
    return sum(tokens[1:]) / (ends[-1] - ends[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per framework (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per step (one micro-batch)")
    p.add_argument("--examples", type=int, default=64, help="conversations in the generated data set")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per conversation (none is longer)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both workers (default: torch's choice, one "
                   "per core); 1 keeps CPU-time figures clean on a loaded machine, where waiting threads spin")
    p.add_argument("--worker", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "rlhfkit":
        return rlhfkit_worker(args)
    if args.worker == "trl":
        return trl_worker(args)

    from rlhfkit.models.loading import bundled_model_dir, load_tokenizer

    bundled_model_dir()  # convert the GGUF once, outside both measurements
    tok = load_tokenizer("smollm2-135m-instruct")
    convs = make_conversations(args.examples, tok)
    lengths = [len(tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    assert max(lengths) <= args.max_length, "raise --max-length: TRL (padding_free) would not truncate"
    print(f"data: {len(convs)} conversations, {min(lengths)}..{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
          f"batch {args.batch_size}, {args.steps} steps, fp32, threads per process: "
          f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "conversations.jsonl"
        data.write_text("".join(json.dumps(c) + "\n" for c in convs))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        for framework in ("rlhfkit", "trl"):
            out = Path(tmp) / f"{framework}.json"
            r, m = run_worker(__file__, framework, out, "--data", data, "--steps", args.steps,
                              "--batch-size", args.batch_size, "--max-length", args.max_length,
                              env=env if framework == "trl" else rlhfkit_env(env))
            r["tok_s"], r["tok_cpu_s"] = throughput(r), throughput(r, "step_end_cpu")
            r["peak_rss_mb"], r["wall_s"] = m.peak_rss_mb, m.wall_s
            results[framework] = r
            print(f"{framework:>8}: {r['tok_s']:8.1f} tok/s  {r['tok_cpu_s']:8.1f} tok/CPU-s  peak RSS "
                  f"{m.peak_rss_mb:7.0f} MiB (at the last step {r['step_end_peak_rss_mb'][-1]:7.0f})  "
                  f"process wall {m.wall_s:6.1f} s  "
                  f"losses {[round(x, 3) for x in r['losses']]}", flush=True)
    ours, trl_ = results["rlhfkit"], results["trl"]
    print(f"TRL {trl_.get('version')} optimizer: {trl_.get('optim')}; load average at the end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    # frac_of_peak: training FLOPs (6 x params x real tokens) per second / the measured fp32 matmul rate
    peak, n_params = matmul_peak_flops(args.threads), count_params(bundled_model_dir())
    frac = {k: frac_of_peak(model_flops(n_params, r["tok_s"], "train"), peak) for k, r in results.items()}
    # speedup_cpu: the same ratio by CPU time, which other processes' load disturbs much less
    print_result(speedup=ours["tok_s"] / trl_["tok_s"], mem_ratio=ours["peak_rss_mb"] / trl_["peak_rss_mb"],
                 rlhfkit_tok_s=ours["tok_s"], trl_tok_s=trl_["tok_s"],
                 speedup_cpu=ours["tok_cpu_s"] / trl_["tok_cpu_s"], rlhfkit_rss_mb=ours["peak_rss_mb"],
                 trl_rss_mb=trl_["peak_rss_mb"], steps=args.steps, batch_size=args.batch_size,
                 threads=args.threads or "default", frac_of_peak=frac["rlhfkit"], trl_frac_of_peak=frac["trl"],
                 peak_gflop_s=peak / 1e9)


if __name__ == "__main__":
    main()
