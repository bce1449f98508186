"""Shared-CPU threading set up by ``rlhfkit`` (rlhfkit.cli.setup_cpu_env, docs/generation.md "Shared
CPU"): OMP_WAIT_POLICY=PASSIVE and THP_MEM_ALLOC_ENABLE=1 before torch loads, unless the user chose; the torch thread count from the
idle cores (rlhfkit.rollout.threads.free_cpu_threads) unless OMP_NUM_THREADS is set."""

from __future__ import annotations

import subprocess
import sys

import torch

from rlhfkit import cli
from rlhfkit.rollout import threads


def test_main_sets_passive_wait_before_torch_loads():
    """A fresh interpreter: after ``main(['--help'])`` the variable is set and torch was never imported,
    so libgomp reads PASSIVE when it loads (no torch import: ~0.3 s)."""
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); os.environ.pop('THP_MEM_ALLOC_ENABLE', None); "
            "from rlhfkit.cli import main; main(['--help']); "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['THP_MEM_ALLOC_ENABLE'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "PASSIVE 1 False"  # huge pages too: PyTorch reads it at its first allocation


def test_a_users_wait_policy_and_huge_page_choice_win(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    cli.setup_cpu_env("tasks", [])
    assert cli.os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and cli.os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_threads_follow_the_free_cores_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "free_cpu_threads", lambda window_s=0.2: 1)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(2)
        cli.setup_cpu_env("grpo", [])
        assert torch.get_num_threads() == 2  # the user's choice: untouched
        monkeypatch.delenv("OMP_NUM_THREADS")
        cli.setup_cpu_env("grpo", ["--help"])
        assert torch.get_num_threads() == 2  # help only: no 0.2 s measurement
        cli.setup_cpu_env("tasks", [])
        assert torch.get_num_threads() == 2  # not a computing command
        cli.setup_cpu_env("grpo", [])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
