"""Run directories and metrics: config.yaml, metrics.jsonl, samples.jsonl, console progress, trackers.

Only the main process writes; every other process gets a ``RunDir`` whose writes are no-ops, so
trainers call it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import rlhfkit


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(rlhfkit.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class RunDir:
    """``runs/<name>/``: resolved config, metrics.jsonl, samples.jsonl, checkpoints/."""

    def __init__(self, path: str | Path, config: dict, *, method: str, is_main: bool = True,
                 report_to: str = "none", total_steps: int | None = None, progress: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.method = method
        self._trackers: list[Any] = []
        self._bar = None
        if not is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        resolved = {"method": method, **config, "rlhfkit_version": rlhfkit.__version__, "git_revision": git_revision(),
                    "python": sys.version.split()[0]}
        (self.path / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self._setup_trackers(report_to, resolved)
        if progress and total_steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=method, dynamic_ncols=True, file=sys.stderr)

    def _setup_trackers(self, report_to: str, config: dict) -> None:
        for name in [n.strip() for n in (report_to or "none").split(",") if n.strip() and n.strip() != "none"]:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise RuntimeError("report_to=tensorboard needs `pip install tensorboard`") from e
                self._trackers.append(("tensorboard", SummaryWriter(str(self.path / "tensorboard"))))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError as e:
                    raise RuntimeError("report_to=wandb needs `pip install wandb`") from e
                self._trackers.append(("wandb", wandb.init(project="rlhfkit", name=self.path.name, config=config)))
            else:
                raise ValueError(f"report_to: unknown tracker '{name}'; use none, tensorboard or wandb")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for kind, t in self._trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
            if kind == "tensorboard":
                for k, v in numeric.items():
                    t.add_scalar(k, v, step)
            else:
                t.log(numeric, step=step)
        if self._bar is not None:
            shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in row.items()
                     if k in ("loss/total", "loss/sft", "loss/dpo", "loss/reward", "reward/mean", "eval/gold") and isinstance(v, float)}
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Append sample completions (untrusted model text: the report escapes it)."""
        if not self.is_main or not rows:
            return
        with open(self.path / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in r.items()}}) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        if self.is_main:
            tmp = self.path / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
            os.replace(tmp, self.path / name)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for kind, t in self._trackers:
            if kind == "tensorboard":
                t.close()
            else:
                t.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
