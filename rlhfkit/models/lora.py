"""LoRA through ``peft``: wrap a model, run it as its own reference, save / resume / merge its adapter.

With ``lora_r > 0`` (rlhfkit.config.CommonConfig) a trainer's model is the frozen base weights plus a
low-rank adapter per targeted Linear layer (Hu et al. 2021, https://arxiv.org/abs/2106.09685: W + (alpha
/ r) B A, B initialised to 0, so the wrapped model starts exactly equal to the base). Because the base
weights never change, *the reference policy is the policy with its adapter disabled*: no second copy of
the model in memory (:func:`reference_model`). A scalar head (reward model, PPO critic) is new and
trained in full next to the adapter (peft's ``modules_to_save``).

A checkpoint of a LoRA model is peft's adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, the head included) plus :data:`BASE_FILE`, which names the base model
(and the seed a 'tiny' base is built from); ``rlhfkit export --merge`` turns it into a plain model.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from rlhfkit.models.loading import load_model

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "rlhfkit_lora_base.json"
"""Written next to a saved adapter: ``{"model": base name, "seed": int, "kind": 'causal-lm'|'reward'|'value'}``
and, when there are any, ``"config"``: the model config's ``rlhfkit_*`` entries (a reward model's read-out
and normalisation), which :func:`restore_config` puts back on resume and export."""


class LoraError(ValueError):
    """A LoRA setting that does not fit the model or checkpoint; the message names the option to change."""


class LoraTargetError(LoraError):
    """``lora_targets`` names a module the model does not have; the message lists the Linear modules found."""


def settings_of(cfg) -> dict:
    """``{r, alpha, dropout, targets}`` from a config (any object with ``lora_*`` fields) or a dict of them."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    return {"r": int(get("lora_r", 0)), "alpha": float(get("lora_alpha", 16)),
            "dropout": float(get("lora_dropout", 0.0)), "targets": str(get("lora_targets", ALL_LINEAR))}


def linear_names(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` in ``model``, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's suffix rule for a list of names


def resolve_targets(model: nn.Module, targets: str, head_names=()) -> list[str]:
    """The module-name suffixes peft should wrap. 'all-linear': the last name component of every Linear
    except the output embedding (lm_head) and the ``head_names`` (trained in full instead). A comma list:
    kept as given, each checked to match at least one Linear module (else :class:`LoraTargetError`)."""
    linears = linear_names(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = {n for n, m in model.named_modules() if m is out_emb and m is not None}
    excluded |= {n for n in linears if any(_matches(n, h) for h in head_names)}
    if targets.strip() == ALL_LINEAR:
        chosen = sorted({n.rsplit(".", 1)[-1] for n in linears if n not in excluded})
        clash = [n for n in excluded if any(_matches(n, c) for c in chosen)]
        if not chosen or clash:
            raise LoraTargetError(f"lora_targets 'all-linear': {type(model).__name__} has no Linear layer besides "
                                  f"its heads ({', '.join(sorted(excluded)) or 'none'}) that could take an adapter"
                                  if not chosen else f"lora_targets 'all-linear': the head(s) {clash} share a name "
                                  f"with body layers; give lora_targets explicitly")
        return chosen
    asked = [t.strip() for t in targets.split(",") if t.strip()]
    missing = [t for t in asked if not any(_matches(n, t) for n in linears)]
    if missing:
        found = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise LoraTargetError(
            f"lora_targets {asked}: {missing} match(es) no Linear module of {type(model).__name__}. Linear modules "
            f"found (by last name component): {', '.join(found) or 'none'} (e.g. {linears[0] if linears else '-'}); "
            "use some of these or 'all-linear'")
    return asked


def apply_lora(model: nn.Module, cfg_or_settings, *, head_names=(), seed: int | None = None):
    """``model`` wrapped by a peft LoRA adapter (base weights frozen, the adapter and ``head_names`` trained).

    ``cfg_or_settings``: a config with ``lora_r``/``lora_alpha``/``lora_dropout``/``lora_targets`` (or the dict
    of :func:`settings_of`); r must be > 0. ``head_names``: a scalar head (``('score',)`` for reward and value
    models) kept fully trainable through ``modules_to_save``. The adapter's A matrices are drawn from
    ``seed`` (default the config's ``seed``) without touching the global RNG; B starts at 0, so the wrapped
    model's outputs equal the base's until the first update.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    s = settings_of(cfg_or_settings)
    if s["r"] <= 0:
        raise ValueError(f"apply_lora needs lora_r > 0, got {s['r']}")
    targets = resolve_targets(model, s["targets"], head_names)
    causal = not head_names and getattr(model, "get_output_embeddings", lambda: None)() is not None
    config = LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"], target_modules=targets,
                        modules_to_save=list(head_names) or None, task_type=TaskType.CAUSAL_LM if causal else None)
    if seed is None:
        seed = int(cfg_or_settings.get("seed", 0) if isinstance(cfg_or_settings, dict)
                   else getattr(cfg_or_settings, "seed", 0))
    with torch.random.fork_rng(devices=[]), _quiet_peft():
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    return wrapped


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 asks transformers 5 the deprecated ``is_gradient_checkpointing`` (a FutureWarning per wrap)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora_as(model, cfg, kind: str = "causal-lm"):
    """:func:`apply_lora` for a trainer's model of ``kind`` ('causal-lm' or 'reward': its ``score`` head
    trained in full), recording ``cfg.model`` and ``cfg.seed`` as its base for checkpoints."""
    wrapped = apply_lora(model, cfg, head_names=("score",) if kind == "reward" else ())
    record_base(wrapped, cfg.model, cfg.seed, kind)
    return wrapped


def _unwrap(model):
    return getattr(model, "module", model)  # DDP / accelerate wrappers keep the module in .module


def is_lora(model) -> bool:
    """True for a peft-wrapped model (or a DDP wrapper around one)."""
    m = _unwrap(model)
    return hasattr(m, "peft_config") and hasattr(m, "disable_adapter")


@contextlib.contextmanager
def adapter_disabled(model):
    """Run ``model`` as its base weights: peft's ``disable_adapter`` (LoRA deltas and the trained copies of
    ``modules_to_save`` heads off), restored on exit."""
    with _unwrap(model).disable_adapter():
        yield model


@contextlib.contextmanager
def reference_model(ref):
    """The model to run for reference log-probs, as a context: ``ref`` itself when it is a separate frozen
    copy (full fine-tuning: exactly as before LoRA existed), or, when ``ref`` is a LoRA policy, that policy
    with its adapter disabled — the same weights it started from, with no second copy in memory."""
    if is_lora(ref):
        with adapter_disabled(ref):
            yield ref
    else:
        yield ref


def merge(model) -> nn.Module:
    """A plain transformers model with the adapter folded into its weights (W + alpha/r B A) and each
    ``modules_to_save`` head replaced by its trained copy; the peft wrapper is gone."""
    return _unwrap(model).merge_and_unload()


# --- checkpoints -------------------------------------------------------------------------------------


def is_adapter_dir(path) -> bool:
    """True when ``path`` holds a saved peft adapter (a LoRA checkpoint) rather than full weights."""
    return path is not None and (Path(path) / ADAPTER_CONFIG).exists()


def record_base(model, name: str, seed: int, kind: str) -> None:
    """Remember on the wrapped model what it wraps (written to :data:`BASE_FILE` at each save)."""
    _unwrap(model).rlhfkit_base = {"model": name, "seed": int(seed), "kind": kind}


def save_adapter(model, path) -> None:
    """The adapter (+ trained heads) as safetensors, peft's config, and :data:`BASE_FILE`."""
    m = _unwrap(model)
    m.save_pretrained(path, safe_serialization=True)
    base = getattr(m, "rlhfkit_base", None)
    if base is not None:
        # rlhfkit's own config entries (a reward model's read-out and normalisation) are not in peft's files
        extra = {k: v for k, v in m.config.to_dict().items() if k.startswith("rlhfkit_")}
        (Path(path) / BASE_FILE).write_text(json.dumps({**base, **({"config": extra} if extra else {})}) + "\n")


def restore_config(model, path) -> None:
    """Put the rlhfkit config entries saved with an adapter (:func:`save_adapter`) back on ``model``."""
    for key, value in read_base(path).get("config", {}).items():
        setattr(model.config, key, value)


def read_base(path) -> dict:
    """The :data:`BASE_FILE` of a saved adapter; an adapter saved without one names its base in peft's
    config (``base_model_name_or_path``), with seed 0 and kind 'causal-lm'."""
    p = Path(path)
    if (p / BASE_FILE).exists():
        return json.loads((p / BASE_FILE).read_text())
    cfg = json.loads((p / ADAPTER_CONFIG).read_text())
    if not cfg.get("base_model_name_or_path"):
        raise ValueError(f"{p}: the adapter names no base model ({BASE_FILE} is missing and {ADAPTER_CONFIG} has no "
                         "base_model_name_or_path)")
    return {"model": cfg["base_model_name_or_path"], "seed": 0, "kind": "causal-lm"}


def load_adapter(model, path, *, trainable: bool = True):
    """``model`` (the base) wrapped with the adapter saved in ``path``; peft reads safetensors only here
    (``adapter_model.safetensors``; a pickled ``adapter_model.bin`` is refused before peft sees it)."""
    from peft import PeftModel

    p = Path(path)
    if not (p / ADAPTER_WEIGHTS).exists():
        raise ValueError(f"{p}: no {ADAPTER_WEIGHTS}; rlhfkit loads adapters from safetensors only "
                         "(a pickled adapter_model.bin is not read)")
    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(p), is_trainable=trainable)


def load_adapter_weights(model, path) -> None:
    """Copy a saved adapter's tensors (safetensors) into an already wrapped model of the same shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(_unwrap(model), load_file(str(Path(path) / ADAPTER_WEIGHTS)))


def load_policy(cfg, ckpt=None, *, kind: str = "causal-lm"):
    """``(model, tokenizer)`` a trainer starts from: ``cfg.model`` (or the checkpoint ``ckpt`` when resuming),
    LoRA-wrapped when ``cfg.lora_r > 0``. Full fine-tuning is exactly ``load_model(ckpt or cfg.model)``.
    A LoRA checkpoint resumes on its base (``cfg.model``, which must be the one it was trained on); a
    mismatch between the checkpoint and ``lora_r`` is an error naming the option, before any training."""
    r = settings_of(cfg)["r"]
    heads = ("score",) if kind == "reward" else ()
    if ckpt is not None and is_adapter_dir(ckpt):
        saved = json.loads((Path(ckpt) / ADAPTER_CONFIG).read_text()).get("r")
        if r == 0:
            raise LoraError(f"resume: {ckpt} is a LoRA checkpoint (r={saved}); resume it with --lora-r {saved}")
        if saved != r:
            raise LoraError(f"resume: {ckpt} holds a rank-{saved} adapter but lora_r is {r}; use --lora-r {saved}")
        base = read_base(ckpt)
        if base["model"] != cfg.model:
            raise LoraError(f"resume: {ckpt} is an adapter on model {base['model']!r}, but model is {cfg.model!r}; "
                             f"pass --model {base['model']}")
        model, tok = load_model(cfg.model, seed=base["seed"], kind=kind)
        model = load_adapter(model, ckpt)
    elif ckpt is not None:
        if r > 0:
            raise LoraError(f"resume: {ckpt} holds full weights, not a LoRA adapter, but lora_r is {r}; resume "
                             "it with --lora-r 0 (or start a new LoRA run without --resume)")
        return load_model(str(ckpt), seed=cfg.seed, kind=kind)
    else:
        model, tok = load_model(cfg.model, seed=cfg.seed, kind=kind)
        if r == 0:
            return model, tok
        model = apply_lora(model, cfg, head_names=heads)
    record_base(model, cfg.model, cfg.seed if ckpt is None else base["seed"], kind)
    return model, tok
