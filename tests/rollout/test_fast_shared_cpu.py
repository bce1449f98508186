"""CPU threading set up by ``rlhfkit`` (rlhfkit.cli.setup_cpu_env, docs/generation.md "Shared CPU"),
before torch loads, unless the user chose: the torch thread count from the idle cores
(rlhfkit.cli.cpu.free_cpu_threads) unless OMP_NUM_THREADS is set; a short barrier spin
(GOMP_SPINCOUNT) when every core is idle, OMP_WAIT_POLICY=PASSIVE when some are busy; THP_MEM_ALLOC_ENABLE=1."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rlhfkit import cli
from rlhfkit.cli import cpu

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in WAIT_VARS:  # set, then deleted: monkeypatch restores what was there, so nothing set here leaks
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_main_sets_the_wait_policy_before_torch_loads():
    """A fresh interpreter: after ``main(['--help'])`` the variables are set and torch was never imported,
    so libgomp reads them when it loads (no torch import: ~0.3 s). Help measures nothing: the short spin."""
    code = ("import os, sys\nfor v in " + repr(WAIT_VARS) + ": os.environ.pop(v, None)\n"
            "from rlhfkit.cli import main; main(['--help'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ['GOMP_SPINCOUNT'], os.environ['THP_MEM_ALLOC_ENABLE'], "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == f"None {cli.SPIN_COUNT} 1 False"


@pytest.mark.parametrize("free, policy, spin, threads", [(2, None, cli.SPIN_COUNT, 2), (1, "PASSIVE", None, 1)])
def test_idle_cores_get_a_short_spin_and_busy_ones_passive_waits(clean_env, free, policy, spin, threads):
    """Two allowed cores: both idle -> GOMP_SPINCOUNT and 2 threads; one busy -> PASSIVE and 1 thread."""
    clean_env.setattr(cpu, "allowed_cpus", lambda: 2)
    clean_env.setattr(cpu, "free_cpu_threads", lambda window_s=0.2: free)
    cli.setup_cpu_env("grpo", [])
    assert cli.os.environ.get("OMP_WAIT_POLICY") == policy and cli.os.environ.get("GOMP_SPINCOUNT") == spin
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("name, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "500")])
def test_a_users_wait_policy_and_huge_page_choice_win(clean_env, name, value):
    clean_env.setattr(cpu, "free_cpu_threads", lambda window_s=0.2: 1)  # busy cores would mean PASSIVE
    clean_env.setenv(name, value)
    clean_env.setenv("THP_MEM_ALLOC_ENABLE", "0")
    cli.setup_cpu_env("grpo", [])
    assert cli.os.environ[name] == value and cli.os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    other = {"OMP_WAIT_POLICY": "GOMP_SPINCOUNT", "GOMP_SPINCOUNT": "OMP_WAIT_POLICY"}[name]
    assert other not in cli.os.environ  # the user's choice is not mixed with ours


def test_threads_follow_the_free_cores_unless_omp_num_threads_is_set(clean_env):
    calls = []
    clean_env.setattr(cpu, "free_cpu_threads", lambda window_s=0.2: calls.append(1) or 1)
    clean_env.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(2)
    cli.setup_cpu_env("grpo", [])
    assert torch.get_num_threads() == 2  # the user's choice: untouched
    clean_env.delenv("OMP_NUM_THREADS")
    cli.setup_cpu_env("grpo", ["--help"])
    assert torch.get_num_threads() == 2  # help only: no 0.2 s measurement
    cli.setup_cpu_env("tasks", [])
    assert torch.get_num_threads() == 2 and not calls  # not a computing command
    cli.setup_cpu_env("grpo", [])
    assert torch.get_num_threads() == 1 and calls == [1]
