"""Run directories: the one writer (``RunDir``) and the one reader (``read_run`` and friends).

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one row per logged
step), ``samples.jsonl`` (sample completions), ``eval.json`` (``rlhfkit eval``) and optionally
``reward_eval.json``, ``checkpoints/`` and tracker folders. docs/evaluation.md describes each file.

Writing: only the main process writes; every other process gets a ``RunDir`` whose writes are
no-ops, so trainers call it unconditionally. Reading: ``report`` and ``compare`` read runs through the
functions at the end of this module, strictly (a malformed file is a ``ValueError`` naming file and
line) or leniently (the problem is recorded and the rest is read: a live run can leave a half-written
last line, and a report should still show everything else).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
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
            write_json(self.path / name, data)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for kind, t in self._trackers:
            if kind == "tensorboard":
                t.close()
            else:
                t.finish()


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file); returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, path)
    return path


# --- reading ---------------------------------------------------------------------------------------

RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "reward_eval.json")
OPTIONAL_FILES = ("reward_eval.json",)
"""Files whose absence is no problem (only reward-model runs write reward_eval.json)."""


def _bad(problems: list[str] | None, path: Path, what: str, lenient_suffix: str = "") -> None:
    """Strict (``problems`` is None): raise ``ValueError`` naming the file; lenient: record ``what``."""
    if problems is None:
        raise ValueError(f"{path} {what}")
    problems.append(f"{path.name} {what}{lenient_suffix}")


def read_log(path: str | Path, problems: list[str] | None = None) -> list[dict]:
    """The JSON object on each non-blank line of a run's log (metrics.jsonl, samples.jsonl). A line
    that is not one is an error, or, with a ``problems`` list, skipped and described there. (User data
    files are read by ``rlhfkit.data.io``, whose errors say file:line:field.)"""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(problems, path, f"line {i} is not valid JSON ({e.msg})", "; skipped")
            continue
        if not isinstance(row, dict):
            _bad(problems, path, f"line {i} is not a JSON object", "; skipped")
            continue
        rows.append(row)
    return rows


def read_json(path: str | Path, problems: list[str] | None = None) -> dict | None:
    """The JSON object in ``path`` (None, with a ``problems`` list, when it is not one)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        return _bad(problems, path, f"is not valid JSON ({e.msg})")
    if not isinstance(d, dict):
        return _bad(problems, path, "is not a JSON object")
    return d


def parse_config(path: Path, text: str, problems: list[str] | None = None) -> dict | None:
    """``config.yaml``'s mapping (None, with a ``problems`` list, when it is not one)."""
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return _bad(problems, path, f"does not parse as YAML: {e}")
    if cfg is None and problems is not None:  # an empty file: nothing to show, and nothing wrong to report
        return None
    if not isinstance(cfg, dict):
        return _bad(problems, path, "is not a YAML mapping")
    return cfg


def read_config(run_dir: str | Path) -> dict:
    """A run's resolved config; ``ValueError`` when config.yaml is missing or malformed."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"run {run_dir} has no config.yaml")
    return parse_config(path, path.read_text(encoding="utf-8"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order ([] when there is none yet)."""
    p = Path(run_dir) / "metrics.jsonl"
    return read_log(p) if p.exists() else []


def read_eval(run_dir: str | Path) -> dict | None:
    """A run's eval.json (the ``evaluate_pairs`` record), or None when it has none."""
    p = Path(run_dir) / "eval.json"
    return read_json(p) if p.is_file() else None


@dataclass
class RunData:
    """Everything read from one run directory; ``problems`` lists missing or malformed files."""

    name: str
    path: Path
    config: dict | None = None
    config_text: str | None = None
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    eval: dict | None = None
    reward_eval: dict | None = None
    problems: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)


def read_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read every file of a run directory leniently: never raises on a missing or malformed file."""
    run_dir = Path(run_dir)
    run = RunData(name=name or run_dir.name, path=run_dir)
    if not run_dir.is_dir():
        run.problems.append(f"run directory {run_dir} does not exist")
        run.missing.update(f for f in RUN_FILES if f not in OPTIONAL_FILES)
        return run
    for fname in RUN_FILES:
        p = run_dir / fname
        if not p.is_file():
            run.missing.add(fname)
            if fname not in OPTIONAL_FILES:
                run.problems.append(f"{fname} is missing")
            continue
        if fname == "config.yaml":
            run.config_text = p.read_text(encoding="utf-8", errors="replace")
            run.config = parse_config(p, run.config_text, run.problems)
        elif fname == "metrics.jsonl":
            run.metrics = read_log(p, run.problems)
        elif fname == "samples.jsonl":
            run.samples = read_log(p, run.problems)
        elif fname == "eval.json":
            run.eval = read_json(p, run.problems)
        else:
            run.reward_eval = read_json(p, run.problems)
    return run
