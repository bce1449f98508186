"""Helpers every benchmark shares: run a framework in its own process and read its peak memory, and
print the machine-readable ``RESULT`` line.

Each framework runs in a fresh subprocess so that its peak resident memory is its own (imports,
model, optimizer state, activations) and not the maximum of everything a shared process ever held.
The peak comes from the kernel's accounting of the finished child (``wait4``'s ``ru_maxrss``), so
it covers the whole life of the process, not just the moments a sampler happened to look.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    """What one framework's subprocess did: exit status, its output, wall time and peak RSS."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> Measured:
    """Run ``cmd`` to completion; return its output and its peak resident set size in MiB.

    Output goes to temporary files (not pipes) so that a chatty child cannot block on a full pipe
    while we wait for it. On Linux ``ru_maxrss`` is in KiB; on macOS it is in bytes.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        scale = 1 / 2**20 if platform.system() == "Darwin" else 1 / 1024
        return Measured(proc.returncode, out.read(), err.read(), wall, usage.ru_maxrss * scale)


def self_peak_rss_mb() -> float:
    """Peak RSS of the calling process so far, in MiB (Linux: ru_maxrss is KiB)."""
    import resource

    scale = 1 / 2**20 if platform.system() == "Darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def write_worker_result(path: str | Path, **fields) -> None:
    """A worker's measurements, as JSON, for the parent to read."""
    Path(path).write_text(json.dumps(fields, indent=2))


def read_worker_result(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_result(**fields) -> str:
    """Print the benchmark's last line, ``RESULT key=value ...``, and return it."""
    line = "RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in fields.items())
    print(line, flush=True)
    return line


def fail(measured: Measured, what: str) -> None:
    """Stop the benchmark with the failing child's stderr tail."""
    sys.stderr.write(f"{what} failed with exit status {measured.returncode}:\n{measured.stderr[-5000:]}\n")
    raise SystemExit(1)


def run_worker(script: str, name: str, out: Path, *args, env: dict | None = None,
               timeout: float | None = None) -> tuple[dict, Measured]:
    """Run ``script --worker NAME --out OUT ARGS...`` in a fresh process; return what the worker wrote to
    ``out`` and the process's measurements. A failing worker stops the benchmark with its stderr."""
    m = run_measured([sys.executable, str(script), "--worker", name, "--out", str(out), *map(str, args)],
                     env=env, timeout=timeout)
    if m.returncode != 0:
        fail(m, name)
    return read_worker_result(out), m


def rlhfkit_env(env: dict) -> dict:
    """``env`` plus what the ``rlhfkit`` command sets before torch loads on an idle machine
    (rlhfkit.cli.cpu.command_env: huge pages for PyTorch's large CPU allocations and a short OpenMP barrier
    spin). The benches give it to rlhfkit's workers (the Python API they call does not set it) and TRL's
    workers run with their own defaults; a value already in ``env`` (the user's export) wins, and a
    user's ``OMP_WAIT_POLICY`` replaces the spin."""
    from rlhfkit.cli.cpu import command_env

    return {**env, **command_env(env)}


# --- distance to the hardware limit (issue 19 item 3): model FLOPs per second / measured matmul peak ----


def matmul_peak_flops(threads: int | None = None, n: int = 1024, reps: int = 5) -> float:
    """This machine's measured fp32 matrix-product rate in FLOP/s: the best of ``reps`` timed (n, n) @ (n, n)
    products (2 n^3 FLOPs each) after one warm-up, on ``threads`` torch threads (None: the current count,
    i.e. what OMP_NUM_THREADS gives the workers). ~0.1-0.3 s. Best-of, so a loaded machine reads low
    but not wildly: the figure the benches' ``frac_of_peak`` divides by."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n)
        a @ a  # warm-up: thread pool start, page faults
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best


def count_params(model_dir: str | Path) -> int:
    """Parameters of the model at ``model_dir`` (tied embedding / lm head counted once), built on the meta
    device: no weights read, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def model_flops(params: int, tokens: float, kind: str) -> float:
    """The standard estimate of a dense transformer's FLOPs for ``tokens`` tokens (Kaplan et al. 2020,
    arXiv:2001.08361, sec. 2.1; attention-score FLOPs left out, small at these lengths): 'train'
    (forward + backward) ``6 N T``, 'forward' and 'generate' (one forward pass per token) ``2 N T``."""
    per_token = {"train": 6, "forward": 2, "generate": 2}[kind]
    return per_token * params * tokens


def frac_of_peak(flops_per_s: float, peak_flops: float) -> float:
    """Model FLOPs per second achieved / the measured matmul peak (the MFU idea on a CPU): what is left to
    win once a speedup over TRL is read against the hardware."""
    return flops_per_s / peak_flops


def chat_tokens(tok, messages: list[dict], generation_prompt: bool = False) -> int:
    """Tokens of ``messages`` rendered with the tokenizer's chat template (what the trainers see)."""
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                       add_generation_prompt=generation_prompt)["input_ids"])
