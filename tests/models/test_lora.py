"""LoRA (rlhfkit.models.lora): wrapping, the target check, the reference as the adapter-disabled policy,
and a checkpoint that saves, resumes and merges to the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.config import CommonConfig
from rlhfkit.models import load_model
from rlhfkit.models.heads import completion_values, load_value_model
from rlhfkit.models.logps import completion_logps
from rlhfkit.models.lora import (
    ADAPTER_WEIGHTS,
    BASE_FILE,
    LoraError,
    LoraTargetError,
    adapter_disabled,
    apply_lora,
    is_lora,
    load_policy,
    reference_model,
    save_adapter,
)


def lora_cfg(**kw):
    base = dict(model="tiny", seed=0, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets="all-linear")
    return SimpleNamespace(**{**base, **kw})


def batch_for(tok):
    """Two prompts and completions in the scored layout (models.batching.pad_completions)."""
    from rlhfkit.models.batching import pad_completions

    prompts = [tok.encode("Hello there, how are"), tok.encode("One two")]
    completions = [tok.encode(" you today?") + [tok.eos_token_id], tok.encode(" three four five") + [tok.eos_token_id]]
    return pad_completions(prompts, completions, tok.pad_token_id)


def perturb_adapter(model, seed=1):
    """B = 0 at init makes the adapter a no-op; random B makes it matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# --- wrapping and targets ------------------------------------------------------------------------------


def test_all_linear_wraps_every_body_linear_but_not_the_output_head():
    model, _ = load_model("tiny", seed=0)
    wrapped = apply_lora(model, lora_cfg())
    assert is_lora(wrapped) and not is_lora(load_model("tiny")[0])
    targets = set(wrapped.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base, embeddings and lm_head are frozen
    assert len(trainable) == 2 * 7 * 2  # A and B for 7 projections in 2 layers


def test_a_target_that_matches_nothing_is_an_error_listing_the_linear_modules():
    model, _ = load_model("tiny", seed=0)
    with pytest.raises(LoraTargetError) as e:
        apply_lora(model, lora_cfg(lora_targets="q_proj,c_attn"))
    msg = str(e.value)
    assert "['c_attn']" in msg and "q_proj" in msg and "down_proj" in msg and "all-linear" in msg
    apply_lora(load_model("tiny")[0], lora_cfg(lora_targets="q_proj,v_proj"))  # the ones that exist are fine


@pytest.mark.parametrize("field,value,message", [("lora_r", -1, "lora_r must be >= 0"),
                                                 ("lora_alpha", 0, "lora_alpha must be > 0"),
                                                 ("lora_dropout", 1.0, "lora_dropout must be in"),
                                                 ("lora_targets", "q_proj,,v_proj", "lora_targets must be")])
def test_lora_options_are_validated_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        CommonConfig(**{field: value})


def test_a_reward_head_stays_fully_trainable():
    model, _ = load_model("tiny", seed=0, kind="reward")
    wrapped = apply_lora(model, lora_cfg(), head_names=("score",))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("score" in n and "lora_" not in n for n in trainable)
    assert "score" not in wrapped.peft_config["default"].target_modules


# --- the reference is the policy with its adapter disabled ---------------------------------------------


def test_reference_gives_the_base_logps_before_and_after_a_step(tiny):
    base, tok = tiny
    batch = batch_for(tok)
    want = completion_logps(base, batch, layout="padded")
    policy, _ = load_model("tiny", seed=0)  # the same weights as the session's tiny model
    policy = apply_lora(policy, lora_cfg())
    assert torch.equal(completion_logps(policy, batch, layout="padded"), want)  # B = 0: starts as the base
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # the first step moves only B (A's gradient is 0 while B = 0); the second moves both
        (-completion_logps(policy, batch, layout="padded").sum()).backward()
        opt.step()
        opt.zero_grad()
    moved = completion_logps(policy, batch, layout="padded")
    assert (moved - want).abs().max() > 1e-3  # the adapted policy did change
    with reference_model(policy) as ref:
        assert torch.equal(completion_logps(ref, batch, layout="padded"), want)
        assert torch.equal(completion_logps(ref, batch, layout="shared"), completion_logps(base, batch, layout="shared"))
    assert torch.equal(completion_logps(policy, batch, layout="padded"), moved)  # adapter back on after
    with reference_model(base) as same:  # full fine-tuning: the separate copy, untouched
        assert same is base


# --- checkpoints: save, resume, merge -------------------------------------------------------------------


def test_a_lora_checkpoint_saves_resumes_and_merges_to_the_same_logits(tmp_path, tiny):
    _, tok = tiny
    batch = batch_for(tok)
    cfg = lora_cfg(seed=3)
    policy, _ = load_policy(cfg)
    perturb_adapter(policy)
    want = completion_logps(policy, batch, layout="padded")
    ckpt = tmp_path / "step-1"
    save_adapter(policy, ckpt)
    assert (ckpt / ADAPTER_WEIGHTS).exists() and not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))
    assert json.loads((ckpt / BASE_FILE).read_text()) == {"model": "tiny", "seed": 3, "kind": "causal-lm"}
    resumed, _ = load_policy(cfg, ckpt)
    assert is_lora(resumed) and any(p.requires_grad for p in resumed.parameters())
    assert torch.equal(completion_logps(resumed, batch, layout="padded"), want)
    with adapter_disabled(resumed):  # the base under it is the seed-3 tiny model, as at the start
        assert torch.equal(completion_logps(resumed, batch, layout="padded"),
                           completion_logps(load_model("tiny", seed=3)[0], batch, layout="padded"))
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "export", "--merge", str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    merged, _ = load_model(str(out))
    assert not is_lora(merged) and (out / "model.safetensors").exists()
    assert torch.allclose(completion_logps(merged, batch, layout="padded"), want, atol=1e-5)


def test_resume_mismatches_are_errors_naming_the_option(tmp_path):
    policy, _ = load_policy(lora_cfg())
    save_adapter(policy, tmp_path / "lora")
    with pytest.raises(LoraError, match="--lora-r 4"):
        load_policy(lora_cfg(lora_r=0), tmp_path / "lora")
    with pytest.raises(LoraError, match="--lora-r 4"):
        load_policy(lora_cfg(lora_r=8), tmp_path / "lora")
    with pytest.raises(LoraError, match="--model tiny"):
        load_policy(lora_cfg(model="tiny:0.5"), tmp_path / "lora")
    full, tok = load_model("tiny")
    full.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    with pytest.raises(LoraError, match="--lora-r 0"):
        load_policy(lora_cfg(), tmp_path / "full")


def test_loading_an_unmerged_adapter_as_a_model_says_to_export_it(tmp_path):
    from rlhfkit.models import ModelNotFoundError

    save_adapter(load_policy(lora_cfg())[0], tmp_path / "lora")
    with pytest.raises(ModelNotFoundError, match="rlhfkit export --merge"):
        load_model(str(tmp_path / "lora"))


def test_export_of_a_full_checkpoint_is_an_error_saying_there_is_no_adapter(tmp_path):
    from rlhfkit.cli.export import ExportError, merge_checkpoint

    full, tok = load_model("tiny")
    full.save_pretrained(tmp_path / "full")
    with pytest.raises(ExportError, match="not a LoRA checkpoint"):
        merge_checkpoint(tmp_path / "full", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_lora_critic_trains_its_head_and_merges_to_the_same_values(tmp_path, tiny):
    from rlhfkit.cli.export import merge_checkpoint

    _, tok = tiny
    batch = batch_for(tok)
    critic = load_value_model(None, "tiny", seed=0, lora=lora_cfg())
    assert is_lora(critic)
    assert torch.count_nonzero(completion_values(critic, batch)) == 0  # zero head: first values are 0
    gen = torch.Generator().manual_seed(0)  # the same "trained" weights whatever ran before
    with torch.no_grad():  # a trained head and adapter
        for name, p in critic.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    want = completion_values(critic, batch)
    save_adapter(critic, tmp_path / "value")
    resumed = load_value_model(str(tmp_path / "value"), "tiny", seed=0)
    assert torch.equal(completion_values(resumed, batch), want)
    merged_dir = merge_checkpoint(tmp_path / "value", tmp_path / "merged")
    from transformers import AutoModelForTokenClassification

    merged = AutoModelForTokenClassification.from_pretrained(merged_dir)
    # merging W + BA rounds differently from applying BA beside W: values of size ~5 agree to ~1e-5
    assert torch.allclose(completion_values(merged, batch), want, rtol=1e-4, atol=1e-4)
