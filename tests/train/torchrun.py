"""Run a script under ``torchrun`` with two processes, for the trainers' two-process tests.

``python -m torch.distributed.run`` (not ``accelerate launch --cpu``, which starts one process on a
machine without a GPU: DESIGN.md). The script runs in its own session, so on a timeout the whole
group (torchrun and both workers) is killed and no orphans are left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_two_processes(script: Path, *args, timeout: float = 300) -> None:
    """Run ``script ARGS...`` on two processes (one thread each); fail the test on a timeout or a
    non-zero exit, with the end of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"two-process run timed out:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
