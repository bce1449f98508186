"""Model loading: the bundled SmolLM2 against a direct ``transformers`` GGUF load, the tiny test
model, and the errors for names that cannot be loaded."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from rlhfkit.models import BUNDLED, ModelNotFoundError, load_model
from rlhfkit.models.loading import bundled_gguf_path, bundled_model_dir

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
    {"role": "assistant", "content": "Red, orange and yellow."},
]


@pytest.fixture(scope="module")
def bundled():
    """The bundled model through rlhfkit (converts on first use, ~35 s; later loads read the cache)."""
    return load_model(BUNDLED)


def test_bundled_logits_match_direct_gguf_load(bundled):
    """Parity with the reference implementation: dequantizing the GGUF with plain ``transformers``
    must give the same logits as rlhfkit's converted safetensors cache."""
    from transformers import AutoModelForCausalLM

    model, tok = bundled
    gguf = bundled_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] > 20
    with torch.no_grad():
        ours = model.eval()(ids).logits
        theirs = reference(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], reference.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_bundled_config_is_plain_fp32_and_saves_and_reloads(bundled, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = bundled
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert next(model.parameters()).dtype == torch.float32
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=0)
    # and through rlhfkit's own loader, as a trainer resuming from a checkpoint would
    again, again_tok = load_model(str(tmp_path))
    assert again_tok.pad_token_id == tok.pad_token_id


def best_time(fn, tries: int = 2) -> float:
    """The fastest of ``tries`` calls: a load time, not the time other processes took from us."""
    times = []
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def test_bundled_second_load_is_fast(bundled):
    assert (bundled_model_dir() / "model.safetensors").exists()  # the fixture filled the cache
    assert best_time(lambda: load_model(BUNDLED)) < 2.0


def test_bundled_tokenizer_pads_left_with_a_token_that_is_not_eos(bundled):
    _, tok = bundled
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"  # what closes every assistant turn in SmolLM2's template
    assert tok.padding_side == "left"
    batch = tok(["hi", "a much longer text than the first"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.pad_token_id and batch.attention_mask[0, 0] == 0


@pytest.mark.parametrize("name", [BUNDLED, "tiny"])
def test_every_dropout_is_zero(name, bundled, tiny):
    model = bundled[0] if name == BUNDLED else tiny[0]
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            assert m.p == 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        assert getattr(model.config, key, 0.0) == 0.0, key
    # and behaviourally: train mode gives the same logits as eval mode
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        train_logits = model.train()(ids).logits
        eval_logits = model.eval()(ids).logits
    torch.testing.assert_close(train_logits, eval_logits, atol=0, rtol=0)


def test_tiny_builds_fast_and_is_deterministic_per_seed(tiny):
    assert best_time(lambda: load_model("tiny", seed=0)) < 2.0  # tokenizer cached by the session fixture
    a, tok = load_model("tiny", seed=0)
    b, _ = load_model("tiny", seed=0)
    c, _ = load_model("tiny", seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)
    assert a.config.num_hidden_layers == 2
    assert a.get_input_embeddings().num_embeddings >= len(tok)
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"


def test_tiny_load_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny", seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("path", ["/nonexistent/rlhfkit-model", "./no-such-model-dir", "no-such-model"])
def test_missing_local_path_names_the_path(path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as e:
        load_model(path)
    assert path in str(e.value)


def test_hub_id_while_offline_says_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="offline") as e:
        load_model("rlhfkit-test-org/no-such-model")
    assert "rlhfkit-test-org/no-such-model" in str(e.value)
    assert time.perf_counter() - t0 < 20  # fails at once instead of retrying the network


def test_directory_without_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json") as e:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)
