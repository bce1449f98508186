"""How many CPU threads torch should use right now (the commands call it once at start, before torch
loads: rlhfkit.cli.setup_cpu_env). No torch import here."""

from __future__ import annotations

import os
import time

SPIN_COUNT = "10000"
"""``GOMP_SPINCOUNT`` the commands set on an idle machine: how long libgomp's idle threads spin at a
barrier before they sleep (its default is 300000)."""


def command_env(env, busy: bool = False) -> dict:
    """The variables the ``rlhfkit`` command adds to ``env`` before torch loads (rlhfkit.cli.setup_cpu_env
    says why): ``THP_MEM_ALLOC_ENABLE=1``, and the barrier wait, ``OMP_WAIT_POLICY=PASSIVE`` when some
    cores were ``busy`` at start, else ``GOMP_SPINCOUNT``. A variable already in ``env`` is the user's
    choice and is not returned; a user's ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` replaces both waits."""
    out = {} if "THP_MEM_ALLOC_ENABLE" in env else {"THP_MEM_ALLOC_ENABLE": "1"}
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        out.update({"OMP_WAIT_POLICY": "PASSIVE"} if busy else {"GOMP_SPINCOUNT": SPIN_COUNT})
    return out


def allowed_cpus() -> int:
    """The cores this process may run on (its affinity mask; the CPU count where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_cpu_threads(window_s: float = 0.2) -> int:
    """How many of this process's allowed cores are idle right now (at least 1): the idle share of
    ``/proc/stat`` over ``window_s`` times the cores in the affinity mask. Linux only; elsewhere the
    allowed core count.

    Why (docs/generation.md, "Shared CPU"): an OpenMP team of N threads meets at a barrier after every
    parallel op; when another process holds a core, one team member waits for a scheduler time slice at
    each of the ~1000 ops of a decode step. Use ``torch.set_num_threads(free_cpu_threads())`` at start.
    """
    allowed = allowed_cpus()
    try:
        def idle_total():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return v[3] + v[4], sum(v)  # idle + iowait, all
        i0, t0 = idle_total()
        time.sleep(window_s)
        i1, t1 = idle_total()
    except OSError:
        return allowed
    idle_share = (i1 - i0) / max(1, t1 - t0)  # of all cores of the machine
    return max(1, min(allowed, round(idle_share * (os.cpu_count() or allowed))))
