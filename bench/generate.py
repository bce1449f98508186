"""Generation throughput against the machine's limits: transformers' ``generate`` vs rlhfkit's CPU engine.

    python bench/generate.py [--quick] [--shared-cpu] [--batches 1,8,32,64] [--new-tokens 48]

For each batch size, on the bundled model (fp32 policy), prompts from the ``sentiment`` task:

* ``greedy``: B distinct prompts, temperature 0;
* ``sampled``: B/K distinct prompts, each K = 4 times in a row (a GRPO group), temperature 1.

Every row generates exactly ``--new-tokens`` tokens (EOS is disabled for both engines, so early exit
never flatters one side) and tokens/s = B x new_tokens / wall time of the call. The engine's time
includes ``sync_weights`` and the int8 re-quantization it triggers: in RL both happen once per policy
update, i.e. once per generate call, so the cost is in every figure. Runs alternate HF / engine and the
median of ``--reps`` is kept, so both see the same background load (printed with every figure).

The floors (measured here, at startup): a decode step cannot take less than reading the fp32 weights
once at the machine's read bandwidth, nor less than its matmul FLOPs (2 x parameters x B) at the
machine's fp32 GEMM rate. ``frac_of_floor = floor_step_s / achieved_step_s``; the int8 engine reads a
quarter of the bytes and uses integer dot products, so it can exceed 1 against the fp32 floor.

The engine's own ceiling (``ceiling_<batch>``): one more engine call with each int8 kernel call timed
(``QuantLinear.gemm``); HF's time over (kernel seconds + re-quantization) is the speedup the engine could
reach with these kernels if every other op were free. A target above it needs faster kernels, not a
leaner loop.

``--shared-cpu``: the same measurement (batch 8) in fresh worker processes while another process runs a
PyTorch training loop, under each thread setting rlhfkit could choose (docs/generation.md, "Shared CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import print_result  # noqa: E402

K = 4  # samples per prompt in the "sampled" case


def load():
    import torch  # noqa: F401  (after the environment of a worker is set)
    from transformers.utils import logging as hf_logging

    from rlhfkit.models import load_model

    hf_logging.set_verbosity_error()  # eos_token_id=-1 (no EOS) makes generate warn on every call
    model, tok = load_model("smollm2-135m-instruct")
    return model.eval(), tok


class _NoEos:
    """The tokenizer as the engines see it, with an EOS id no token has: every row runs to the cap."""

    def __init__(self, tok):
        self.pad_token_id, self.eos_token_id = tok.pad_token_id, -1


def floors() -> dict:
    """Read bandwidth (bytes/s) and fp32 GEMM rate (FLOP/s) of this machine, best of a few tries."""
    import torch

    buf = torch.ones(64 * 2**20)  # 256 MiB, far larger than any cache
    best = min(_timed(lambda: buf.sum()) for _ in range(5))
    a = torch.randn(2048, 2048)
    gemm = min(_timed(lambda: a @ a) for _ in range(3))
    return {"bandwidth_gb_s": buf.numel() * 4 / best / 1e9, "matmul_gflop_s": 2 * 2048**3 / gemm / 1e9}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def batch(tok, b: int, grouped: bool):
    from rlhfkit.data.chat import tokenize_prompt
    from rlhfkit.data.tasks import get_task
    from rlhfkit.models.batching import left_pad

    prompts = get_task("sentiment").prompts("train")
    n = max(1, b // K) if grouped else b
    seqs = [tokenize_prompt(tok, prompts[i % len(prompts)], 512) for i in range(n)]
    seqs = [s for s in seqs for _ in range(b // n)][:b]
    return left_pad(seqs, tok.pad_token_id)


def measure(model, tok, batches, new_tokens: int, reps: int, modes=("greedy", "sampled")) -> list[dict]:
    from rlhfkit.rollout.engine import HFBackend, SamplingConfig
    from rlhfkit.rollout.fast import FastBackend

    no_eos = _NoEos(tok)
    hf, fast = HFBackend(model, no_eos), FastBackend(model, no_eos)
    rows = []
    for b in batches:
        for mode in modes:
            ids, mask = batch(tok, b, grouped=mode == "sampled")
            sampling = SamplingConfig(temperature=0.0 if mode == "greedy" else 1.0, max_new_tokens=new_tokens)

            def run_fast():
                fast.sync_weights(model)  # a policy update's refresh; re-quantization runs inside generate
                return fast.generate(ids, mask, sampling, 0)

            fast.generate(ids[:, -8:], mask[:, -8:], SamplingConfig(max_new_tokens=2), 0)  # warm-up (untimed)
            hf.generate(ids[:, -8:], mask[:, -8:], SamplingConfig(max_new_tokens=2), 0)
            t_hf, t_fast, loads = [], [], []
            for _ in range(reps):
                t_hf.append(_timed(lambda: hf.generate(ids, mask, sampling, 0)))
                t_fast.append(_timed(run_fast))
                loads.append(os.getloadavg()[0])
            row = {"batch": b, "mode": mode, "hf_s": statistics.median(t_hf), "fast_s": statistics.median(t_fast),
                   "load": max(loads)}
            row["gemm_s"], row["quantize_s"] = kernel_seconds(run_fast, fast)
            # the engine's time if everything but its int8 kernels and its re-quantization took no time
            row["ceiling"] = row["hf_s"] / (row["gemm_s"] + row["quantize_s"])
            row["hf_tok_s"] = b * new_tokens / row["hf_s"]
            row["fast_tok_s"] = b * new_tokens / row["fast_s"]
            rows.append(row)
            print(f"  B={b:3d} {mode:8s} hf {row['hf_tok_s']:7.1f} tok/s  engine {row['fast_tok_s']:7.1f} tok/s "
                  f"(x{row['hf_s'] / row['fast_s']:.2f}; re-quantize {row['quantize_s']:.2f}s, int8 kernels "
                  f"{row['gemm_s']:.2f}s: at most x{row['ceiling']:.2f} with them)  load {row['load']:.1f}", flush=True)
    return rows


def kernel_seconds(run_fast, fast) -> tuple[float, float]:
    """(seconds inside the int8 kernels, seconds re-quantizing) of one more engine call, timed kernel by kernel
    (``QuantLinear.gemm``; each timing includes a Python call, so the figure is slightly high). Their sum is
    what the call would take if every other op (per-token scaling, norms, rotary, attention, sampling, the
    fp32 first-token rows) were free: HF's time over it bounds the speedup these kernels allow."""
    from rlhfkit.rollout.int8 import QuantLinear

    spent = [0.0]
    real = QuantLinear.gemm

    def timed(self, x):
        t0 = time.perf_counter()
        y = real(self, x)
        spent[0] += time.perf_counter() - t0
        return y

    QuantLinear.gemm = timed
    try:
        run_fast()
    finally:
        QuantLinear.gemm = real
    return spent[0], fast.last_stats["quantize_s"]


def competitor(stop_file: str) -> None:
    """Another PyTorch process on the same cores: an MLP training loop until ``stop_file`` appears."""
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
    opt = torch.optim.AdamW(net.parameters())
    x = torch.randn(256, 1024)
    while not os.path.exists(stop_file):
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


SHARED_CASES = [  # (name, environment for the generating process, competitor running)
    ("alone", {}, False),
    ("alone+passive", {"OMP_WAIT_POLICY": "PASSIVE"}, False),
    ("alone+spin10k", {"GOMP_SPINCOUNT": "10000"}, False),
    ("shared", {}, True),
    ("shared+passive", {"OMP_WAIT_POLICY": "PASSIVE"}, True),
    ("shared+spin10k", {"GOMP_SPINCOUNT": "10000"}, True),
    ("shared+1thread", {"OMP_NUM_THREADS": "1"}, True),
]


def shared_cpu(new_tokens: int, reps: int) -> list[dict]:
    """Batch 8, greedy, in a fresh worker per case (OpenMP reads its environment once, at start)."""
    results = []
    stop = Path(f"/tmp/rlhfkit_bench_stop_{os.getpid()}")
    for name, env, with_competitor in SHARED_CASES:
        stop.unlink(missing_ok=True)
        comp = None
        if with_competitor:
            comp = subprocess.Popen([sys.executable, __file__, "--competitor", str(stop)])
        try:
            out = subprocess.run([sys.executable, __file__, "--worker", "--batches", "8", "--new-tokens",
                                  str(new_tokens), "--reps", str(reps)], env={**os.environ, **env},
                                 capture_output=True, text=True, check=True).stdout
        finally:
            stop.touch()
            if comp is not None:
                comp.wait()
        row = json.loads(out.strip().splitlines()[-1])[0]
        row["case"] = name
        results.append(row)
        print(f"  {name:16s} hf {row['hf_tok_s']:7.1f} tok/s  engine {row['fast_tok_s']:7.1f} tok/s  "
              f"load {row['load']:.1f}", flush=True)
    stop.unlink(missing_ok=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1,8,32, greedy only, 1 rep, 24 tokens")
    ap.add_argument("--shared-cpu", action="store_true", help="also the shared-CPU cases (batch 8)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--competitor", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.competitor:
        return competitor(args.competitor)
    batches = [int(x) for x in args.batches.split(",")]
    modes = ("greedy", "sampled")
    if args.quick:
        batches, modes, args.reps, args.new_tokens = [b for b in batches if b <= 32], ("greedy",), 1, 24
    model, tok = load()
    if args.worker:
        print(json.dumps(measure(model, tok, batches, args.new_tokens, args.reps, ("greedy",))))
        return
    import torch

    print(f"# bench/generate.py  threads={torch.get_num_threads()}  uptime load {os.getloadavg()}", flush=True)
    fl = floors()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"floors: read {fl['bandwidth_gb_s']:.1f} GB/s, fp32 GEMM {fl['matmul_gflop_s']:.1f} GFLOP/s; "
          f"{n_params / 1e6:.1f}M parameters", flush=True)
    rows = measure(model, tok, batches, args.new_tokens, args.reps, modes)
    fields = {}
    for r in rows:
        floor_s = max(n_params * 4 / (fl["bandwidth_gb_s"] * 1e9),
                      2 * n_params * r["batch"] / (fl["matmul_gflop_s"] * 1e9))
        r["frac_of_floor"] = floor_s / (r["fast_s"] / args.new_tokens)
        r["hf_frac_of_floor"] = floor_s / (r["hf_s"] / args.new_tokens)
    greedy = {r["batch"]: r for r in rows if r["mode"] == "greedy"}
    target = [b for b in (8, 32) if b in greedy] or list(greedy)
    fields["speedup_vs_hf"] = min(greedy[b]["hf_s"] / greedy[b]["fast_s"] for b in target)
    fields["frac_of_floor"] = min(greedy[b]["frac_of_floor"] for b in target)
    for r in rows:
        tag = f"b{r['batch']}" + ("" if r["mode"] == "greedy" else "s")
        fields[f"speedup_{tag}"] = r["hf_s"] / r["fast_s"]
        fields[f"tok_s_{tag}"] = r["fast_tok_s"]
        fields[f"hf_tok_s_{tag}"] = r["hf_tok_s"]
        fields[f"frac_{tag}"] = r["frac_of_floor"]
        fields[f"ceiling_{tag}"] = r["ceiling"]
    if args.shared_cpu:
        print("shared CPU (batch 8, greedy; another process trains an MLP on the same cores):", flush=True)
        shared = {r["case"]: r for r in shared_cpu(args.new_tokens, 1 if args.quick else 2)}
        for name, r in shared.items():
            key = name.replace("+", "_")
            fields[f"{key}_tok_s"] = r["fast_tok_s"]
            fields[f"{key}_hf_tok_s"] = r["hf_tok_s"]
    fields["bandwidth_gb_s"], fields["matmul_gflop_s"] = fl["bandwidth_gb_s"], fl["matmul_gflop_s"]
    fields["load"] = max(r["load"] for r in rows)
    print_result(**fields)


if __name__ == "__main__":
    main()
