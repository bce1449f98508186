"""DPO (sigmoid) throughput and peak memory: rlhfkit against TRL's ``DPOTrainer``, side by side.

    python bench/dpo.py [--steps 4] [--batch-size 8] [--micro-batch-size 4] [--pairs 64] [--threads 1]

Both frameworks train the bundled SmolLM2-135M-Instruct (TRL gets the directory
``rlhfkit.models.loading.bundled_model_dir()``) in fp32 on the same preference pairs with the same
global batch, micro-batch, optimizer settings (AdamW, lr 1e-6, linear schedule, grad clip 1) and
length limits, each in its own subprocess (``bench/common.py``), so peak RSS is per framework.

The data: ``--pairs`` synthetic pairs (conversational TRL format, which rlhfkit reads too) with
realistically uneven lengths; each framework trains ONE epoch over the first steps x batch_size of
them (default 4 steps = 32 pairs, ~3 CPU-minutes for both frameworks together; ``--steps 8`` runs
all 64 in about twice that).

What is timed (``time_s``): from before the first model load to the end of the last optimizer step,
imports excluded. rlhfkit: the whole ``train(cfg)``, including tokenization and its reference
pre-pass over the data, with the final checkpoint write stubbed out. TRL: ``DPOTrainer(...)``
(model + reference load, dataset tokenization) and ``trainer.train()``; TRL's default
``precompute_ref_log_probs=False`` runs the reference model on every batch instead of a pre-pass,
and ``gradient_checkpointing=False`` (TRL's default is True) so that both keep their activations.
rlhfkit's worker gets what the ``rlhfkit`` command sets before torch loads (``common.rlhfkit_env``: huge
pages, a short OpenMP barrier spin), TRL's its defaults; a variable you export applies to both.
Threads: one torch thread per framework by default (``--threads``). This machine's 2 cores are
shared with other jobs; with 2 OpenMP threads a descheduled thread stalls the other at every barrier
and wall times swing by 2x between identical runs, while single-threaded runs repeat closely.

pairs/s = trained pairs / time_s. ``mean_loss`` is the mean training loss over the steps in both
(TRL's ``training_loss``); the two shuffle the pairs differently, so they agree only roughly. ``cpu_s`` (user + system CPU time over the same span) is reported
too: on a shared machine it is the steadier figure, and ``cpu_speedup`` is its ratio.

The last line is machine-readable:

    RESULT speedup=<rlhfkit pairs/s / trl pairs/s> mem_ratio=<rlhfkit peak RSS / trl peak RSS> ... frac_of_peak=<model
    FLOP/s / measured fp32 matmul FLOP/s>
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

TOPICS = ["tides", "volcanoes", "bread yeast", "solar panels", "honeybees", "glaciers", "vaccines", "compilers",
          "rainbows", "coral reefs", "batteries", "jazz harmony", "chess openings", "photosynthesis", "bridges",
          "hash tables"]
ASKS = ["Explain {t} to a curious twelve-year-old.", "What is the most common misconception about {t}?",
        "Give me three facts about {t}, briefly.", "How would you teach a friend about {t} in one evening?"]
CONTEXT = ["I am preparing a short science club session and want to get the basics right.",
           "My notes from school are vague and I would like a clear explanation without jargon.",
           "We argued about this at dinner yesterday and nobody could settle it.", ""]
GOOD = ["{T} are easier to understand once you follow the energy.", "A good first step is to look at a simple example.",
        "Scientists measured this carefully over many decades.", "The key idea is cause and effect, step by step.",
        "Small changes add up over time, which is why patience matters here.",
        "You can check this yourself with a cheap experiment at home.", "Most surprises disappear with a diagram.",
        "In short: observe, compare, and then explain what changed."]
BAD = ["Not sure.", "It is complicated.", "Look it up somewhere.", "{T} are just a thing that happens, honestly.",
       "People argue about it a lot.", "I guess it depends."]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` conversational pairs: helpful multi-sentence chosen vs terse rejected. Token lengths with the
    bundled template (its default system prompt included): prompts 39-59, chosen 8-84, rejected 4-29."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        fill = lambda s: s.format(t=t, T=t.capitalize())  # noqa: E731
        chosen = " ".join(fill(s) for s in rng.sample(GOOD, rng.randint(1, 7)))
        rejected = " ".join(fill(s) for s in rng.sample(BAD, rng.randint(1, 4)))
        ask = " ".join(s for s in (rng.choice(CONTEXT), fill(rng.choice(ASKS))) if s)
        rows.append({"prompt": [{"role": "user", "content": ask}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def cpu_seconds() -> float:
    """User + system CPU time of this process: unlike wall time, barely affected by other load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_rlhfkit(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import accelerate  # noqa: F401  imported before the clock starts, as TRL's imports are
    import transformers.models.llama.modeling_llama  # noqa: F401

    import rlhfkit.data.io  # noqa: F401
    import rlhfkit.models  # noqa: F401
    from rlhfkit.models.loading import BUNDLED
    from rlhfkit.train import dpo, runtime

    runtime.save_checkpoint = lambda *a, **k: Path(args.out).parent  # checkpoint writing is not what we time
    cfg = dpo.DPOConfig(model=BUNDLED, data=args.data, output_dir=str(Path(args.out).parent / "rlhfkit-run"),
                        loss="sigmoid", beta=0.1, lr=1e-6, lr_schedule="linear", warmup_ratio=0.0, grad_clip=1.0,
                        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                        inference_micro_batch_size=args.batch_size, max_steps=args.steps,
                        max_prompt_length=args.max_prompt_length, max_completion_length=args.max_completion_length,
                        packing=args.packing, eval_fraction=0.0, mixed_precision="no", progress=False)
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = dpo.train(cfg)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    from rlhfkit.tracking import read_metrics

    losses = [row["loss/dpo"] for row in read_metrics(cfg.output_dir)]
    write_worker_result(args.out, time_s=seconds, cpu_s=cpu, ref_pass_s=result["ref_pass_s"], steps=result["steps"],
                        mean_loss=sum(losses) / len(losses), peak_rss_mb=self_peak_rss_mb())


def worker_trl(args) -> None:
    import datasets
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (as in the rlhfkit worker)
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.models.loading import bundled_model_dir

    torch.set_num_threads(args.threads)
    model_dir = str(bundled_model_dir())
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    accum = args.batch_size // args.micro_batch_size
    targs = DPOConfig(output_dir=str(Path(args.out).parent / "trl-run"), per_device_train_batch_size=args.micro_batch_size,
                      gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=1e-6, beta=0.1,
                      loss_type=["sigmoid"], lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                      max_length=args.max_prompt_length + args.max_completion_length, bf16=False, fp16=False,
                      use_cpu=True, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                      report_to="none", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                      model_init_kwargs={"dtype": torch.float32})
    t0, c0 = time.perf_counter(), cpu_seconds()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = "<|endoftext|>"  # as rlhfkit's loader: a pad distinct from EOS
    trainer = DPOTrainer(model=model_dir, args=targs, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    out = trainer.train()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    write_worker_result(args.out, time_s=seconds, cpu_s=cpu, steps=out.global_step, mean_loss=out.training_loss,
                        peak_rss_mb=self_peak_rss_mb())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps = one epoch over steps x batch-size pairs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--pairs", type=int, default=64, help="pairs generated (the data set the steps draw from)")
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--packing", default="padding_free", help="rlhfkit's packing: padding_free or padded")
    p.add_argument("--threads", type=int, default=1, help="torch threads per framework (1: see the module docstring)")
    p.add_argument("--only", choices=["rlhfkit", "trl"], help="run one framework (no RESULT line)")
    p.add_argument("--worker", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        {"rlhfkit": worker_rlhfkit, "trl": worker_trl}[args.worker](args)
        return
    n = args.steps * args.batch_size
    if n > args.pairs:
        p.error(f"--steps x --batch-size = {n} pairs, more than --pairs {args.pairs}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs)[:n]))
        for name in ("rlhfkit", "trl"):
            if args.only and name != args.only:
                continue
            out = Path(tmp) / name / "result.json"
            out.parent.mkdir()
            flags = []
            for flag in ("steps", "batch_size", "micro_batch_size", "max_prompt_length", "max_completion_length", "packing",
                         "threads"):
                flags += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            env = env if name == "trl" else rlhfkit_env(env)  # what the rlhfkit command sets; TRL its defaults
            res, measured = run_worker(__file__, name, out, "--data", data, *flags, env=env, timeout=1800)
            res.update(peak_rss_mb=measured.peak_rss_mb, wall_s=measured.wall_s, pairs_s=n / res["time_s"])
            results[name] = res
            print(f"{name:8} {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})}",
                  flush=True)
    if len(results) == 2:
        ours, trl = results["rlhfkit"], results["trl"]
        # frac_of_peak: per pair, policy forward + backward (6 N T) and the reference forward (2 N T) over
        # both sides' chat-templated tokens, per second / the measured fp32 matmul rate
        from rlhfkit.models.loading import bundled_model_dir, load_tokenizer

        tok = load_tokenizer("smollm2-135m-instruct")
        rows = make_pairs(args.pairs)[:n]
        tokens = sum(chat_tokens(tok, r["prompt"] + r["chosen"]) + chat_tokens(tok, r["prompt"] + r["rejected"])
                     for r in rows) / n
        peak, n_params = matmul_peak_flops(args.threads), count_params(bundled_model_dir())
        pair_flops = model_flops(n_params, tokens, "train") + model_flops(n_params, tokens, "forward")
        print_result(speedup=ours["pairs_s"] / trl["pairs_s"],
                     mem_ratio=ours["peak_rss_mb"] / trl["peak_rss_mb"], rlhfkit_pairs_s=ours["pairs_s"],
                     trl_pairs_s=trl["pairs_s"], rlhfkit_peak_mb=ours["peak_rss_mb"],
                     trl_peak_mb=trl["peak_rss_mb"], cpu_speedup=trl["cpu_s"] / ours["cpu_s"], pairs=n,
                     frac_of_peak=frac_of_peak(ours["pairs_s"] * pair_flops, peak),
                     trl_frac_of_peak=frac_of_peak(trl["pairs_s"] * pair_flops, peak), peak_gflop_s=peak / 1e9)


if __name__ == "__main__":
    main()
