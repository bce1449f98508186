"""Shared fixtures: a tiny model and its tokenizer, run directories, a small SFT data file.

The tiny model is a randomly initialised 2-layer Llama with the bundled SmolLM2 tokenizer (see
``rlhfkit.models.loading.tiny_config``). The session-scoped ``tiny`` pair is shared by every test in
the run: treat it as read-only (no optimizer steps, no ``resize_token_embeddings``); a test that
trains calls ``load_model("tiny")`` itself (~0.5 s once the tokenizer is cached).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

# Tests never reach the hub; a missing local file must fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Eight short conversations: with and without a system message, one multi-turn. Short enough that a
# tiny model memorises them in tens of steps; varied enough that a loss on the wrong tokens shows.
SFT_CONVERSATIONS: list[dict] = [
    {"messages": [{"role": "system", "content": "You answer in one short sentence."},
                  {"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": "The sky is blue."}]},
    {"messages": [{"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Two plus two is four."},
                  {"role": "user", "content": "And doubled?"},
                  {"role": "assistant", "content": "Eight."}]},
    {"messages": [{"role": "user", "content": "Name a fruit."},
                  {"role": "assistant", "content": "An apple."}]},
    {"messages": [{"role": "user", "content": "Say hello in French."},
                  {"role": "assistant", "content": "Bonjour."}]},
    {"messages": [{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": "Capital of Italy?"},
                  {"role": "assistant", "content": "Rome."}]},
    {"messages": [{"role": "user", "content": "How many legs does a spider have?"},
                  {"role": "assistant", "content": "A spider has eight legs."}]},
    {"messages": [{"role": "user", "content": "Opposite of hot?"},
                  {"role": "assistant", "content": "Cold."}]},
    {"messages": [{"role": "user", "content": "Which planet do we live on?"},
                  {"role": "assistant", "content": "We live on Earth."}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny():
    """``(model, tokenizer)`` from ``load_model("tiny", seed=0)``, shared by the session: read-only."""
    from rlhfkit.models import load_model

    model, tok = load_model("tiny", seed=0)
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def tokenizer(tiny):
    """The bundled SmolLM2 tokenizer as rlhfkit prepares it (pad != EOS, left padding)."""
    return tiny[1]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A not-yet-existing run directory under the test's tmp_path (trainers create it)."""
    return tmp_path / "run"


@pytest.fixture
def sft_conversations() -> list[dict]:
    """A fresh copy of the eight SFT conversations (``{"messages": [...]}`` rows); safe to edit."""
    return copy.deepcopy(SFT_CONVERSATIONS)


@pytest.fixture
def sft_jsonl(tmp_path, sft_conversations) -> Path:
    """``sft.jsonl`` holding the eight conversations, one per line (line N = conversation N-1)."""
    return write_jsonl(tmp_path / "sft.jsonl", sft_conversations)


@pytest.fixture(scope="session")
def shared_sft_jsonl(tmp_path_factory) -> Path:
    """The same file, written once per session for module-scoped fixtures: do not modify it."""
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", SFT_CONVERSATIONS)
