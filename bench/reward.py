"""Reward-model training throughput and memory: rlhfkit against TRL's ``RewardTrainer`` on the bundled SmolLM2-135M.

    python bench/reward.py [--steps 4] [--batch-size 8] [--k 4] [--prompts 12]

The data is what ``rlhfkit sample`` + ``rlhfkit label`` produce: K replies per prompt (built-in
train prompts, replies of 25-48 tokens like the bundled model's 48-token samples) and every pair
among them, C(K, 2) pairs per prompt, each labelled at random. Both frameworks train the same model
(the directory ``rlhfkit.models.loading.bundled_model_dir()``) on the same pairs with the same batch
size in pairs, steps, learning rate, constant schedule, gradient clipping (1.0), AdamW, fp32, one
forward pass per step (no accumulation). Each runs in its own subprocess, one after the other, so
the peak RSS is per framework. Throughput = pairs of steps 2..N / wall time from the end of step 1
to the end of step N (step 1 pays one-off costs).

What differs is the layout. TRL scores each pair as two right-padded sequences [prompt ; chosen]
and [prompt ; rejected]. rlhfkit (``group_by_prompt``, its default) keeps a prompt's pairs together
and scores one row [prompt ; reply 1 ; ... ; reply n] per prompt in the batch, each distinct reply
once (InstructGPT §3.5). With ``--k 2`` there is one pair per prompt, and the only saving left is
the prompt computed once per pair: run it to see the layout's floor.

TRL is configured for parity, not with its defaults: ``gradient_checkpointing=False`` (default
True; rlhfkit does not checkpoint), ``bf16=False`` (default True; this benchmark is fp32), constant
LR without warmup, no checkpoint saving. Its pad token is set to ``<|endoftext|>`` as rlhfkit does
(the GGUF's pad is EOS). The last line is
``RESULT speedup=... mem_ratio=... rlhfkit_pairs_s=... trl_pairs_s=... frac_of_peak=...`` (model FLOPs per second / the
measured fp32 matmul rate, bench/common.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
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

LR = 1e-5
_SENTENCES = [
    "That is a good question, and there are a few things worth keeping in mind.",
    "Start small and be consistent, because habits grow from repetition.",
    "Many people find it easier to plan the evening before.",
    "It helps to write down what matters most to you.",
    "Try to keep things simple at first.",
    "If something does not work, change one thing at a time and see what happens.",
    "Ask a friend for an honest opinion; an outside view often helps.",
    "Remember to take short breaks and drink some water.",
    "The details depend on your situation, so adjust as you go.",
    "Above all, be kind to yourself while you learn.",
]


def make_pairs(n_prompts: int, k: int, tok, seed: int = 0, min_tokens: int = 25, max_tokens: int = 48) -> list[dict]:
    """``n_prompts`` built-in prompts x K replies (each grown sentence by sentence to a drawn length in
    [min_tokens, max_tokens]), every pair of a prompt's replies, the chosen side drawn at random."""
    from rlhfkit.data.prompts import load_prompts

    rng = random.Random(seed)
    rows = []
    prompts = load_prompts("train")
    for p in rng.sample(prompts, n_prompts):
        replies = []
        for _ in range(k):
            target, words = rng.randint(min_tokens, max_tokens), []
            for s in rng.sample(_SENTENCES, len(_SENTENCES)):
                if len(tok(" ".join(words + [s]), add_special_tokens=False)["input_ids"]) > max_tokens:
                    break
                words.append(s)
                if len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) >= target:
                    break
            replies.append(" ".join(words))
        for a, b in itertools.combinations(dict.fromkeys(replies), 2):
            chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
            rows.append({"prompt": [{"role": "user", "content": p["prompt"]}],
                         "chosen": {"role": "assistant", "content": chosen},
                         "rejected": {"role": "assistant", "content": rejected}})
    return rows


# --- workers: each runs in its own process ---------------------------------------------------------


def rlhfkit_worker(args) -> None:
    from rlhfkit.models.loading import BUNDLED
    from rlhfkit.tracking import read_metrics
    from rlhfkit.train.reward import RewardConfig, train

    with tempfile.TemporaryDirectory() as out:
        cfg = RewardConfig(model=BUNDLED, data=args.data, output_dir=out, max_steps=args.steps,
                           batch_size=args.batch_size, micro_batch_size=args.batch_size, lr=LR, lr_schedule="constant",
                           warmup_ratio=0.0, grad_clip=1.0, eval_fraction=0.0, mixed_precision="no", progress=False,
                           norm_samples=8, seed=0)
        train(cfg)
        rows = read_metrics(out)
    write_worker_result(args.out, framework="rlhfkit", step_end_times=[r["time"] for r in rows],
                        losses=[r["loss/reward"] for r in rows], peak_rss_mb_self=self_peak_rss_mb())


def trl_worker(args) -> None:
    import time

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from rlhfkit.models.loading import bundled_model_dir

    path = bundled_model_dir()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = "<|endoftext|>"  # as rlhfkit does: the GGUF's pad is EOS
    model.config.pad_token_id = tok.pad_token_id
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": [r["chosen"]], "rejected": [r["rejected"]]} for r in rows])

    class StepEnd(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, targs, state, control, **kw):
            self.times.append(time.time())

    timer = StepEnd()
    with tempfile.TemporaryDirectory() as out:
        targs = trl.RewardConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False,
            gradient_checkpointing=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = trl.RewardTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[timer])
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    write_worker_result(args.out, framework="trl", version=trl.__version__, step_end_times=timer.times,
                        losses=[h["loss"] for h in logs], peak_rss_mb_self=self_peak_rss_mb(), optim=targs.optim)


# --- the comparison --------------------------------------------------------------------------------


def throughput(result: dict, batch_size: int) -> float:
    """Pairs of steps 2..N over the wall time from the end of step 1 to the end of step N."""
    ends = result["step_end_times"]
    assert len(ends) >= 2, f"{result['framework']}: {len(ends)} step times"
    return batch_size * (len(ends) - 1) / (ends[-1] - ends[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per framework (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (one forward pass)")
    p.add_argument("--k", type=int, default=4, help="replies per prompt; C(K, 2) pairs each")
    p.add_argument("--prompts", type=int, default=12, help="prompts in the generated data set")
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
    rows = make_pairs(args.prompts, args.k, tok)
    assert len(rows) >= args.batch_size * args.steps, "more --prompts: fewer pairs than steps x batch"
    print(f"data: {len(rows)} pairs from {args.prompts} prompts x K={args.k}; batch {args.batch_size} pairs, "
          f"{args.steps} steps, fp32, torch threads per process: {os.environ.get('OMP_NUM_THREADS', 'default')}",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prefs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        for framework in ("rlhfkit", "trl"):
            out = Path(tmp) / f"{framework}.json"
            r, m = run_worker(__file__, framework, out, "--data", data, "--steps", args.steps, "--batch-size",
                              args.batch_size, env=env if framework == "trl" else rlhfkit_env(env))
            r["pairs_s"], r["peak_rss_mb"], r["wall_s"] = throughput(r, args.batch_size), m.peak_rss_mb, m.wall_s
            results[framework] = r
            print(f"{framework:>8}: {r['pairs_s']:7.2f} pairs/s  peak RSS {m.peak_rss_mb:7.0f} MiB  process wall "
                  f"{m.wall_s:6.1f} s  losses {[round(x, 3) for x in r['losses']]}", flush=True)
    ours, trl_ = results["rlhfkit"], results["trl"]
    print(f"TRL {trl_.get('version')} optimizer: {trl_.get('optim')}")
    # frac_of_peak: forward + backward (6 N T) over both replies' chat-templated tokens per pair, per second
    tokens = sum(chat_tokens(tok, r["prompt"] + [r["chosen"]]) + chat_tokens(tok, r["prompt"] + [r["rejected"]])
                 for r in rows) / len(rows)
    peak, n_params = matmul_peak_flops(), count_params(bundled_model_dir())
    pair_flops = model_flops(n_params, tokens, "train")
    print_result(speedup=ours["pairs_s"] / trl_["pairs_s"],
                 mem_ratio=ours["peak_rss_mb"] / trl_["peak_rss_mb"], rlhfkit_pairs_s=ours["pairs_s"],
                 trl_pairs_s=trl_["pairs_s"], rlhfkit_rss_mb=ours["peak_rss_mb"],
                 trl_rss_mb=trl_["peak_rss_mb"], steps=args.steps, batch_size=args.batch_size, k=args.k,
                 frac_of_peak=frac_of_peak(ours["pairs_s"] * pair_flops, peak),
                 trl_frac_of_peak=frac_of_peak(trl_["pairs_s"] * pair_flops, peak), peak_gflop_s=peak / 1e9)


if __name__ == "__main__":
    main()
