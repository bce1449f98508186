"""Every trainer with LoRA on (--lora-r > 0): it learns, its reference is the adapter-disabled policy (no
second model is loaded), its checkpoints are adapters that resume, and bad options fail before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from toy_rl import ToyTask, frac_in_set, make_token_set

from rlhfkit.models import load_model
from rlhfkit.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from rlhfkit.train import dpo, online

LORA = dict(lora_r=8, lora_alpha=16.0)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def assert_adapter_checkpoint(path: Path) -> None:
    """An adapter (safetensors) and no full weights, nothing pickled."""
    assert (path / ADAPTER_CONFIG).exists() and (path / ADAPTER_WEIGHTS).exists()
    assert not (path / "model.safetensors").exists() and not list(path.glob("*.bin"))


def assert_same_losses(resumed: dict, straight: dict) -> None:
    """Step 2 of a run resumed from step 1 logs the losses and reward of the uninterrupted run's step 2."""
    keys = [k for k in straight if k.startswith(("loss/", "reward/mean"))]
    assert keys and {k: resumed[k] for k in keys} == pytest.approx({k: straight[k] for k in keys}, rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def token_set():
    return make_token_set()


@pytest.fixture
def no_second_model(monkeypatch):
    """With LoRA, online.start must not load a reference copy."""
    monkeypatch.setattr(online, "load_model", lambda *a, **k: pytest.fail("loaded a second (reference) model"))


def online_common(**kw):
    base = dict(model="tiny:0.5", task="toy", prompts_per_step=4, samples_per_prompt=4, max_new_tokens=8,
                temperature=1.0, missing_eos_penalty=None, eval_every=0, progress=False)
    return {**base, **LORA, **kw}


# --- GRPO: learning with LoRA -------------------------------------------------------------------------


def signed_reward(token_set, sign):
    return lambda r: sign * frac_in_set(token_set, r)


def test_grpo_with_lora_learns_the_toy_reward_and_its_negation(tmp_path, token_set, no_second_model):
    """The toy of tests/toy_rl.py with only the adapter trained (r 8, alpha 32, lr 1e-1: the adapter starts
    at B = 0 and needs a larger step than full fine-tuning's 5e-2; measured from a start of 0.41: the mean of
    the last 3 steps 1.0 up and 0.11 down). A flipped loss sign fails one of the two runs. beta > 0, so the
    KL to the reference (the adapter-disabled policy) is computed every step: 0 at step 1 (B = 0), then
    growing as the policy moves."""
    from rlhfkit.train.grpo import GRPOConfig, train

    curves = {}
    for sign in (+1, -1):
        out = tmp_path / f"run{sign:+d}"
        cfg = GRPOConfig(**online_common(total_steps=12, lr=1e-1, lora_alpha=32.0, beta=1e-3, output_dir=str(out)))
        train(cfg, reward_fn=signed_reward(token_set, sign), task=ToyTask())
        curves[sign] = [sign * row["reward/mean"] for row in read_metrics(out)]
    up, down = curves[+1], [-v for v in curves[-1]]
    start = (up[0] + down[0]) / 2
    assert sum(up[-3:]) / 3 > start + 0.3, up
    assert sum(down[-3:]) / 3 < start - 0.1, down
    rows = read_metrics(tmp_path / "run+1")
    assert rows[0]["kl/seq"] == pytest.approx(0.0, abs=1e-5)  # step 1: policy == reference
    assert rows[-1]["kl/seq"] > 1e-3  # later the adapter-on policy differs from the adapter-off reference
    assert_adapter_checkpoint(tmp_path / "run+1" / "checkpoints" / "step-12")


# --- DPO: the reference pass is the adapter-disabled policy --------------------------------------------


PREFS = [{"prompt": [{"role": "user", "content": f"Tell me about thing {i}."}],
          "chosen": {"role": "assistant", "content": f"Thing {i} is a banana."},
          "rejected": {"role": "assistant", "content": f"Thing {i} is a cherry."}} for i in range(8)]


def dpo_cfg(data, out, **kw):
    base = dict(model="tiny", data=str(data), output_dir=str(out), batch_size=8, micro_batch_size=4, lr=3e-2,
                max_steps=1, eval_fraction=0.0, warmup_ratio=0.0, lr_schedule="constant", progress=False)
    return dpo.DPOConfig(**{**base, **kw})


def test_dpo_with_lora_runs_one_step_and_its_reference_is_the_adapter_disabled_model(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    full = dpo.train(dpo_cfg(data, tmp_path / "full"))  # loads the reference model (load_reference)
    want = torch.load(tmp_path / "full" / "ref_logps.pt", weights_only=True)["logps"]
    monkeypatch.setattr(dpo, "load_reference", lambda *a: pytest.fail("LoRA DPO loaded a reference model"))
    result = dpo.train(dpo_cfg(data, tmp_path / "lora", **LORA))
    got = torch.load(tmp_path / "lora" / "ref_logps.pt", weights_only=True)["logps"]
    assert result["ref_logps"] == "computed" and torch.allclose(got, want, atol=1e-6)
    row = read_metrics(tmp_path / "lora")[0]
    assert row["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: adapter on == adapter off
    assert math.isfinite(result["loss/dpo"]) and full["steps"] == result["steps"] == 1
    assert_adapter_checkpoint(Path(result["checkpoint"]))


def test_dpo_with_lora_kl_to_reference_uses_the_adapter_disabled_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(dpo, "load_reference", lambda *a: pytest.fail("LoRA DPO loaded a reference model"))
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS + [dict(r, prompt=[{"role": "user", "content": f"Q{i}?"}])
                                                          for i, r in enumerate(PREFS)])
    dpo.train(dpo_cfg(data, tmp_path / "run", max_steps=2, eval_fraction=0.25, eval_every=1, kl_prompts=2,
                      kl_max_new_tokens=6, **LORA))
    rows = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["eval/kl_ref"]) for r in rows)


# --- SFT: adapter checkpoints resume exactly ----------------------------------------------------------


def test_sft_with_lora_resumes_as_the_uninterrupted_run(tmp_path, sft_jsonl):
    from rlhfkit.train.sft import SFTConfig, train

    def run(out, **kw):
        train(SFTConfig(model="tiny", data=str(sft_jsonl), output_dir=str(out), lr=1e-2, lr_schedule="constant",
                        warmup_ratio=0.0, eval_fraction=0.0, progress=False, batch_size=4, micro_batch_size=2,
                        max_steps=2, save_every=1, **LORA, **kw))
        return [r["loss/sft"] for r in read_metrics(out)]

    straight = run(tmp_path / "a")
    assert straight[1] < straight[0]  # the adapter learns
    assert_adapter_checkpoint(tmp_path / "a" / "checkpoints" / "step-1")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step-1"))
    assert resumed[-1] == pytest.approx(straight[-1], abs=1e-6)


# --- PPO and CMPO: critic and prior with LoRA ------------------------------------------------------------


def test_ppo_with_lora_trains_a_lora_critic_and_resumes(tmp_path, no_second_model):
    from rlhfkit.train.ppo import PPOConfig, train

    cfg = lambda out, **kw: PPOConfig(**online_common(samples_per_prompt=1, total_steps=2, lr=1e-2, beta=0.05,
                                                      save_every=1, output_dir=str(out), **kw))
    train(cfg(tmp_path / "a"), reward_fn=lambda r: r.completion_mask.float().mean(1), task=ToyTask())
    ckpt = tmp_path / "a" / "checkpoints" / "step-1"
    assert_adapter_checkpoint(ckpt)
    assert_adapter_checkpoint(ckpt / "value")
    rows = read_metrics(tmp_path / "a")
    assert all(math.isfinite(r["loss/value"]) for r in rows)
    train(cfg(tmp_path / "b", resume=str(ckpt)), reward_fn=lambda r: r.completion_mask.float().mean(1), task=ToyTask())
    assert_same_losses(read_metrics(tmp_path / "b")[-1], rows[-1])


def test_cmpo_with_lora_runs_and_resumes_its_prior(tmp_path, token_set, no_second_model):
    from rlhfkit.train.cmpo import CMPOConfig, train

    cfg = lambda out, **kw: CMPOConfig(**online_common(total_steps=2, lr=1e-2, beta=0.05, save_every=1,
                                                       output_dir=str(out), **kw))
    reward = lambda r: frac_in_set(token_set, r)  # noqa: E731
    train(cfg(tmp_path / "a"), reward_fn=reward, task=ToyTask())
    ckpt = tmp_path / "a" / "checkpoints" / "step-1"
    assert_adapter_checkpoint(ckpt / "prior")
    train(cfg(tmp_path / "b", resume=str(ckpt)), reward_fn=reward, task=ToyTask())
    assert_same_losses(read_metrics(tmp_path / "b")[-1], read_metrics(tmp_path / "a")[-1])


# --- bad input ------------------------------------------------------------------------------------------


def test_cli_lora_targets_matching_nothing_fail_before_training_naming_the_modules(tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "run"
    rc = main(["grpo", "--model", "tiny", "--lora-r", "4", "--lora-targets", "c_attn", "--output-dir", str(out),
               "--total-steps", "1", "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 1 and "c_attn" in err and "q_proj" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()


def test_lora_with_a_non_hf_rollout_backend_is_an_error_before_any_model_loads(monkeypatch):
    from rlhfkit.train.grpo import GRPOConfig

    monkeypatch.setattr(online, "load_policy", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="rollout_backend 'hf'"):
        online.start(GRPOConfig(**online_common(rollout_backend="fast")), task=ToyTask())


def test_the_merged_export_of_a_trained_run_loads_with_load_model(tmp_path, sft_jsonl):
    from rlhfkit.cli.export import merge_checkpoint
    from rlhfkit.models.logps import completion_logps
    from rlhfkit.models.lora import load_policy
    from rlhfkit.train.sft import SFTConfig, train

    cfg = SFTConfig(model="tiny", data=str(sft_jsonl), output_dir=str(tmp_path / "run"), lr=1e-2, progress=False,
                    eval_fraction=0.0, batch_size=4, micro_batch_size=4, max_steps=1, **LORA)
    ckpt = Path(train(cfg)["checkpoint"])
    adapted, tok = load_policy(cfg, ckpt)
    merged, _ = load_model(str(merge_checkpoint(ckpt, tmp_path / "merged")))
    from rlhfkit.models.batching import pad_completions

    batch = pad_completions([tok.encode("Hi")], [tok.encode(" there") + [tok.eos_token_id]], tok.pad_token_id)
    assert torch.allclose(completion_logps(merged, batch), completion_logps(adapted, batch), atol=1e-5)



def test_reward_model_with_lora_trains_resumes_and_merges_to_the_same_scores(tmp_path):
    """A LoRA reward model (head in full): 4 steps straight == 2, stop, resume to 4; its checkpoints are
    adapters; the merged export is a plain reward model (read-out and normalisation kept) whose scores
    equal the adapter model's."""
    from test_reward import toy_prefs

    from rlhfkit.cli.export import merge_checkpoint
    from rlhfkit.models.heads import RewardModel
    from rlhfkit.train import reward

    data = write_jsonl(tmp_path / "p.jsonl", toy_prefs(4))

    def run(out, **kw):
        cfg = reward.RewardConfig(model="tiny", data=str(data), output_dir=str(out), batch_size=4, micro_batch_size=2,
                                  max_steps=4, lr=1e-2, eval_fraction=0.0, norm_samples=4, progress=False, **LORA, **kw)
        return cfg, reward.train(cfg)

    cfg, straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_at_step=2)
    _, resumed = run(tmp_path / "b", resume="auto")
    assert [r["loss/reward"] for r in read_metrics(tmp_path / "b")] == pytest.approx(
        [r["loss/reward"] for r in read_metrics(tmp_path / "a")], abs=1e-5)
    ckpt = Path(straight["checkpoint"])
    assert_adapter_checkpoint(ckpt)
    adapted, tok = reward.load_reward_model(cfg, ckpt)
    merged = RewardModel.load(str(merge_checkpoint(ckpt, tmp_path / "merged")))
    assert merged.norm is not None
    prompts = [[{"role": "user", "content": "Say something."}]] * 2
    replies = ["good good words", "bad words here"]
    want = RewardModel(adapted, tok).score(prompts, replies)
    assert torch.allclose(merged.score(prompts, replies), want, atol=1e-4)


def test_grpo_with_lora_on_two_processes_matches_one(tmp_path):
    """DDP with a frozen base: the same global batch (4 prompts x 4) on 2 processes gives the losses of one
    process (the samples made equal by grpo_two_process.row_seeded_generation; tolerance as in
    tests/train/test_online_distributed.py)."""
    import lora_two_process
    from grpo_two_process import row_seeded_generation
    from torchrun import run_two_processes

    from rlhfkit.train.grpo import train

    run_two_processes(Path(__file__).parent / "lora_two_process.py", tmp_path / "two", timeout=300)
    assert json.loads((tmp_path / "two" / "processes.json").read_text())["num_processes"] == 2
    with row_seeded_generation():
        train(lora_two_process.config(str(tmp_path / "one")))
    keys = ("loss/policy", "loss/kl", "optim/grad_norm", "kl/seq", "reward/mean")
    one, two = ([r for r in read_metrics(tmp_path / run) if keys[0] in r] for run in ("one", "two"))
    assert len(one) == len(two) == 3
    assert [r["kl/seq"] for r in one][-1] > 0  # the adapter moved the policy away from its reference
    for a, b in zip(one, two):
        assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-4, abs=1e-5)
    assert_adapter_checkpoint(tmp_path / "two" / "checkpoints" / "step-3")
