"""Config dataclasses: YAML loading, command-line overrides, and the shared blocks every method uses.

Each training method defines one dataclass whose fields carry a docstring (the string literal under
the field). Defaults live in the dataclass only. ``load_config`` merges, in order: defaults, a YAML
file whose keys mirror the dataclass, then command-line overrides; unknown keys are errors.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config file or override; the message names the file and key."""


@dataclass
class CommonConfig:
    """Fields every training command shares."""

    model: str = "smollm2-135m-instruct"
    """Model to start from: 'smollm2-135m-instruct' (bundled), 'tiny' (random 2-layer test model),
    a local Hugging Face directory, or a hub id."""
    output_dir: str | None = None
    """Run directory; default runs/<method>-<time>."""
    seed: int = 0
    """Random seed. Each process adds its rank, so processes sample differently (N details #12)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run the configured epochs/episodes)."""
    log_every: int = 1
    """Write metrics.jsonl every this many optimizer steps."""
    save_every: int | None = None
    """Save a checkpoint every this many steps (None: only at the end)."""
    keep_checkpoints: int | None = None
    """Keep only the newest this many checkpoints (older step-N folders are deleted after each save; a
    checkpoint with its optimizer state is ~4x the model's size). None keeps all."""
    save_optimizer: bool = True
    """Save the optimizer state in checkpoints (AdamW's two moments: twice the model's size). False
    makes a checkpoint ~3x smaller; resuming from one restarts the moments from zero (with a warning)."""
    resume: str | None = None
    """Checkpoint directory to resume from (runs/X/checkpoints/step-N), or 'auto' for the latest in output_dir."""
    mixed_precision: str = "auto"
    """'auto' (bf16 on CUDA with bf16 support, else fp16 on CUDA, none on CPU), 'no', 'bf16' or 'fp16'."""
    report_to: str = "none"
    """Extra trackers: 'none', 'tensorboard', 'wandb', or a comma-separated list."""
    progress: bool = True
    """Show a progress bar with ETA on the console."""
    lora_r: int = 0
    """LoRA rank (peft): train low-rank adapters on the frozen model instead of every weight; the reference
    model is then the same weights with the adapter disabled (no second copy). 0 = full fine-tuning.
    Typical 8-64 (docs/lora.md)."""
    lora_alpha: float = 16
    """LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r (> 0; peft's default 8,
    16 as in the QLoRA recipes)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1). 0 keeps sampling-time and training log-probs identical
    (N implementation details #6)."""
    lora_targets: str = "all-linear"
    """Modules that get an adapter: 'all-linear' (every nn.Linear except the output head and any scalar
    head) or a comma list of module-name suffixes, e.g. 'q_proj,v_proj'; a name that matches no Linear
    module is an error listing the ones found."""

    def __post_init__(self) -> None:
        # Checked at construction, so a bad value from Python fails as early as one from the CLI.
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for a value outside its set or range. Each method's
        config extends this (calling ``super().validate()`` first)."""
        check_choice(self, "mixed_precision", MIXED_PRECISIONS)
        for tracker in self.report_to.split(","):
            if tracker.strip() not in TRACKERS:
                raise ValueError(f"report_to: unknown tracker {tracker.strip()!r}; choose from {', '.join(TRACKERS)}")
        for name in ("log_every", "save_every", "keep_checkpoints", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {value}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not all(t.strip() for t in self.lora_targets.split(",")):
            raise ValueError(f"lora_targets must be 'all-linear' or a comma list of module names, got {self.lora_targets!r}")


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb")


def check_choice(cfg, name: str, choices) -> None:
    """Raise ValueError naming ``name`` when ``cfg.name`` is not one of ``choices``."""
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it, across the dataclass's bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        docs.update(_class_field_docs(klass))
    return docs


@lru_cache(maxsize=None)
def _class_field_docs(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or command-line string to the field's type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [coerce(v, inner, key) for v in value] if inner is not Any else list(value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def load_config(cls: type, path: str | None = None, overrides: dict[str, Any] | None = None):
    """Defaults <- YAML file <- overrides. Unknown keys raise ConfigError naming file and key."""
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        for key, value in data.items():
            if key not in types_:
                raise ConfigError(f"{path}: unknown config key '{key}' for {cls.__name__}; known keys: {', '.join(types_)}")
            try:
                values[key] = coerce(value, types_[key], key)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        if key not in types_:
            raise ConfigError(f"unknown config key '{key}' for {cls.__name__}")
        values[key] = coerce(value, types_[key], f"--{key.replace('_', '-')}")
    return cls(**values)  # validated in __post_init__


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name VALUE`` option per dataclass field, with the field's docstring as help."""
    docs = field_docs(cls)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys mirror the config fields")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = (docs.get(f.name, "") + f" (default: {default!r})").replace("%", "%%")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                            metavar="VALUE", help=help_)


def config_from_args(cls: type, args: argparse.Namespace):
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return load_config(cls, getattr(args, "config", None), overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

