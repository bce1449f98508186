"""``rlhfkit export --merge CHECKPOINT OUT_DIR``: a LoRA checkpoint -> a plain Hugging Face model directory.

A LoRA run's checkpoints hold the adapter only (models/lora.py). Merging folds W + (alpha / r) B A into
the base weights and puts each trained head in place of the base's, then writes config + safetensors +
tokenizer: loadable by ``load_model`` / ``--model OUT_DIR``, plain ``transformers`` and vLLM. A checkpoint
without an adapter already is such a directory: merging it is an error that says so (not a silent copy,
which would hide a mistaken path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhfkit.models.heads import load_value_model
from rlhfkit.models.loading import load_model, load_tokenizer, quiet_transformers
from rlhfkit.models.lora import ADAPTER_CONFIG, is_adapter_dir, load_adapter, merge, read_base, restore_config


class ExportError(ValueError):
    """A checkpoint or output directory ``export`` cannot use; the message says what to do instead."""


def merge_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write the merged model of the LoRA checkpoint ``ckpt`` (a step-N folder, or its ``value/``) to ``out_dir``."""
    ckpt, out = Path(ckpt), Path(out_dir)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: no such checkpoint directory")
    if not is_adapter_dir(ckpt):
        raise ExportError(f"{ckpt} is not a LoRA checkpoint (no {ADAPTER_CONFIG}): there is no adapter to merge. A "
                          "full fine-tuning checkpoint already is a plain Hugging Face model directory: load it "
                          "directly (--model PATH) or copy it")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; give a new directory")
    base = read_base(ckpt)
    kind = base.get("kind", "causal-lm")
    if kind == "value":  # the critic's start (base body or a reward model) and its adapter
        model = load_value_model(str(ckpt), base["model"], base["seed"])
    else:
        model, _ = load_model(base["model"], seed=base["seed"], kind=kind)
        model = load_adapter(model, ckpt, trainable=False)
    merged = merge(model)
    restore_config(merged, ckpt)  # a reward model's read-out and normalisation
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers(False):
        merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base["model"]).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit export", description="Write a LoRA checkpoint as a plain Hugging Face "
                                "model directory (adapter merged into the weights; docs/lora.md).")
    p.add_argument("--merge", action="store_true", required=True,
                   help="merge the adapter into the base weights (the only export there is)")
    p.add_argument("checkpoint", help="a LoRA run's checkpoint: runs/X/checkpoints/step-N (or its value/ folder)")
    p.add_argument("out_dir", help="new directory for the merged model")
    args = p.parse_args(argv)
    try:
        out = merge_checkpoint(args.checkpoint, args.out_dir)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"rlhfkit export: error: {e}", file=sys.stderr)
        return 1
    print(f"merged model written to {out}")
    return 0
