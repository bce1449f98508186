"""Does the full demo's loop work? `rlhfkit demo` at several seeds, and the gold gain of each (issue 18).

    python bench/demo_seeds.py [--seeds 0,1,2] [--out-dir runs/demo-seeds] [-- DEMO OPTIONS...]

Runs ``rlhfkit demo --seed S --output-dir OUT/seed-S`` for each seed, one after the other, each in its own
process, and reads each run's ``state.json`` and ``<method>/eval.json``: the held-out gold gain of every
trained method over the starting model with its paired-bootstrap 95% CI, the win rate, KL, the reward
model's held-out accuracy vs gold and its ceiling, and the phase times. A seed whose run directory is
already complete is read, not rerun (``--rerun`` forces it); an interrupted one is resumed.

The last line is ``RESULT gain_ci_low_min=<lowest CI bound over seeds and methods> seeds_with_gain=<seeds
whose every method's CI is above 0>/<seeds> gain_mean=... wall_s_max=<slowest run>``. Options after ``--``
go to ``rlhfkit demo`` unchanged (e.g. ``-- --task sentiment --methods grpo,ppo``); ``--quick`` runs the
small demo (its figures mean little).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_result  # noqa: E402


def run_seed(seed: int, out: Path, demo_args: list[str], rerun: bool) -> float | None:
    """Run (or resume) one seed's demo; the wall time in seconds, or None when it was already complete."""
    state = out / "state.json"
    if state.exists() and not rerun and "report" in json.loads(state.read_text()).get("done", []):
        return None
    cmd = [sys.executable, "-m", "rlhfkit.cli", "demo"]
    cmd += ["--resume", str(out)] if state.exists() and not rerun else ["--seed", str(seed), "--output-dir", str(out),
                                                                          *demo_args]
    if rerun and out.exists():
        raise SystemExit(f"--rerun: remove {out} first (a run directory is never overwritten by this script)")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    (out / "bench.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"seed {seed}: rlhfkit demo failed with exit status {proc.returncode} (log: {out / 'bench.log'})")
    return wall


def read_seed(out: Path) -> dict:
    """The seed's figures from its run directory."""
    state = json.loads((out / "state.json").read_text())
    methods = [m.strip() for m in state["args"]["methods"].split(",") if m.strip()]
    rm = state["results"].get("reward") or {}
    row = {"methods": {}, "phase_s": state.get("phase_seconds", {}),
           "rm_gold": (rm.get("gold_accuracy_ci") or {}).get("value"), "rm_ceiling": rm.get("ceiling")}
    for m in methods:
        e = json.loads((out / m / "eval.json").read_text())
        row["methods"][m] = {"gain": e["gold"]["difference"], "win_rate": (e.get("win_rate") or {}).get("value"),
                             "kl": (e.get("kl") or {}).get("value"),
                             "proxy_gain": ((e.get("proxy") or {}).get("difference") or {}).get("value")}
    return row


def main() -> None:
    argv = sys.argv[1:]
    demo_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out-dir", default="runs/demo-seeds")
    ap.add_argument("--rerun", action="store_true", help="rerun complete seeds (their directories must be removed)")
    args = ap.parse_args(own)
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out_dir)
    walls, rows = {}, {}
    for seed in seeds:
        out = root / f"seed-{seed}"
        print(f"seed {seed}: {out}", flush=True)
        walls[seed] = run_seed(seed, out, demo_args, args.rerun)
        rows[seed] = read_seed(out)

    lows, values, with_gain = [], [], 0
    for seed, row in rows.items():
        phases = " ".join(f"{k}={v:.0f}s" for k, v in row["phase_s"].items())
        rm = "n/a" if row["rm_gold"] is None else f"{row['rm_gold']:.3f} (ceiling {row['rm_ceiling']:.3f})"
        print(f"seed {seed}: wall {'(earlier run)' if walls[seed] is None else f'{walls[seed]:.0f} s'}; "
              f"RM vs gold {rm}; {phases}")
        ok = True
        for m, r in row["methods"].items():
            g = r["gain"]
            print(f"  {m:<6} gold gain {g['value']:+.4f} [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]  win rate "
                  f"{r['win_rate']:.3f}  KL {r['kl'] if r['kl'] is None else format(r['kl'], '.2f')}  proxy gain "
                  f"{r['proxy_gain'] if r['proxy_gain'] is None else format(r['proxy_gain'], '+.3f')}")
            lows.append(g["ci_low"])
            values.append(g["value"])
            ok = ok and g["ci_low"] > 0
        with_gain += ok
    measured = [w for w in walls.values() if w is not None]
    print_result(gain_ci_low_min=min(lows), seeds_with_gain=f"{with_gain}/{len(rows)}",
                 gain_mean=statistics.mean(values), wall_s_max=max(measured) if measured else "n/a")


if __name__ == "__main__":
    main()
