"""SFT: the loss is the naive assistant-token NLL, the loop learns, batch layout and process count do
not change the numbers, a resumed run reproduces the uninterrupted one, and a run writes its files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torchrun import run_two_processes

from rlhfkit.data.chat import tokenize_chat
from rlhfkit.data.records import DataError
from rlhfkit.tracking import read_metrics
from rlhfkit.train.sft import SEGMENT_SDPA, SFTConfig, collate, summed_nll, train, use_segment_attention

TESTS = Path(__file__).parent
ROOT = TESTS.parent.parent
# constant LR, no warmup: the per-step losses then depend only on the data, the batch and the loop
FAST = dict(model="tiny", lr=1e-2, lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.0, progress=False)


def run_sft(data: Path, out: Path, **overrides) -> list[float]:
    """Train and return the per-step ``loss/sft`` from metrics.jsonl."""
    train(SFTConfig(**{**FAST, "data": str(data), "output_dir": str(out), **overrides}))
    return [row["loss/sft"] for row in read_metrics(out)]


def naive_nll(model, chat) -> tuple[float, int]:
    """Full-vocabulary logits at every position, log-softmax, and the sum of -log p(next token)
    wherever the next token is an assistant token: what ``summed_nll`` computes more cheaply."""
    ids = torch.tensor([chat.input_ids])
    with torch.no_grad():
        logps = F.log_softmax(model(ids).logits[0].double(), -1)  # (T, V)
    targets = [t for t in range(1, len(chat.input_ids)) if chat.loss_mask[t]]
    return -sum(logps[t - 1, chat.input_ids[t]].item() for t in targets), len(targets)


@pytest.mark.parametrize("packing", ["padding_free", "padded"])
def test_summed_nll_equals_the_naive_computation(tiny, sft_conversations, packing):
    model, tok = tiny
    chats = [tokenize_chat(tok, c["messages"]) for c in sft_conversations[:4]]
    expected = [naive_nll(model, c) for c in chats]
    with torch.no_grad():
        nll, count = summed_nll(model, collate(chats, packing, tok.pad_token_id), torch.device("cpu"))
    assert count == sum(n for _, n in expected) == sum(sum(c.loss_mask[1:]) for c in chats)
    assert nll.item() == pytest.approx(sum(s for s, _ in expected), rel=1e-5)


def test_segment_attention_equals_sdpa(sft_conversations, tmp_path):
    """Padding-free rows: attention conversation by conversation (``segment_sdpa``) gives the loss and
    gradients of sdpa over the whole row with the block-diagonal mask, and leaves no trace in a save."""
    from rlhfkit.models import load_model

    (ref, tok), (seg, _) = load_model("tiny", seed=3), load_model("tiny", seed=3)
    assert use_segment_attention(seg) and seg.config._attn_implementation == SEGMENT_SDPA
    assert ref.config._attn_implementation == "sdpa"
    batch = collate([tokenize_chat(tok, c["messages"]) for c in sft_conversations], "padding_free", tok.pad_token_id)
    assert batch["cu_seq_lens"].tolist()[-1] == batch["input_ids"].shape[1]
    losses = []
    for model in (ref, seg):
        nll, _ = summed_nll(model, batch, torch.device("cpu"))
        nll.backward()
        losses.append(nll.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, a), b in zip(ref.named_parameters(), seg.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
    seg.save_pretrained(tmp_path)
    assert "rlhfkit" not in (tmp_path / "config.json").read_text()


def test_memorises_a_handful_of_conversations(shared_sft_jsonl, tmp_path):
    """8 conversations, one batch of 8 per step. A random model starts near ln(49k) ~ 10.8 nats per
    token; 80 steps at lr 1e-2 bring the assistant-token loss under 0.6. A loop that drops the
    gradients stays near 10; a loss on the wrong tokens (prompts, padding) cannot be fitted this far
    with the assistant tokens still unlearnt."""
    losses = run_sft(shared_sft_jsonl, tmp_path / "run", batch_size=8, micro_batch_size=8, max_steps=80)
    assert len(losses) == 80
    assert losses[0] > 5
    assert losses[-1] < 0.6


@pytest.fixture(scope="module")
def reference_losses(shared_sft_jsonl, tmp_path_factory) -> list[float]:
    """3 steps with the whole global batch of 8 in one padding-free forward pass."""
    return run_sft(shared_sft_jsonl, tmp_path_factory.mktemp("ref") / "run", batch_size=8, micro_batch_size=8, max_steps=3)


@pytest.mark.parametrize("micro_batch_size, packing", [(1, "padding_free"), (8, "padded"), (2, "padded")])
def test_batch_layout_does_not_change_the_losses(shared_sft_jsonl, tmp_path, reference_losses, micro_batch_size, packing):
    """batch 8 x accumulation 1 == micro-batch 1 x accumulation 8 (and padded == padding-free): the
    loss is normalised by the global batch's token count, not averaged per micro-batch."""
    losses = run_sft(shared_sft_jsonl, tmp_path / "run", batch_size=8, micro_batch_size=micro_batch_size,
                     packing=packing, max_steps=3)
    assert losses == pytest.approx(reference_losses, abs=1e-5)
    assert losses[2] < losses[0] - 1  # it trained: equal losses of a frozen model would prove nothing


def test_two_processes_match_one(shared_sft_jsonl, tmp_path, reference_losses):
    """torchrun starts two processes; the script fails unless the trainer's accelerator saw both."""
    out = tmp_path / "two"
    run_two_processes(TESTS / "sft_two_process.py", shared_sft_jsonl, out, 3, timeout=240)
    record = json.loads((out / "processes.json").read_text())
    assert record["num_processes"] == 2 and record["backend"] == "gloo"
    assert record["losses"] == pytest.approx(reference_losses, abs=1e-4)
    # each process saved its own RNG streams (seeded seed + rank, so they differ) for a resume
    ckpt = out / "checkpoints" / "step-3"
    rngs = [torch.load(ckpt / f"rng-{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


# --- resume, checkpoints, run directory ------------------------------------------------------------

# warmup then cosine decay, so a resumed run that lost the scheduler or optimizer state shows
RESUME = dict(batch_size=4, micro_batch_size=2, max_steps=6, lr=3e-3, lr_schedule="cosine", warmup_ratio=0.34)


@pytest.fixture(scope="module")
def full_run(shared_sft_jsonl, tmp_path_factory) -> Path:
    """6 uninterrupted steps: 8 conversations in batches of 4 is 3 epochs, so the run (and the resume at
    step 3) crosses epoch boundaries, where the data order is reshuffled."""
    out = tmp_path_factory.mktemp("full") / "run"
    run_sft(shared_sft_jsonl, out, eval_data=str(shared_sft_jsonl), **RESUME)
    return out


def test_resumed_run_reproduces_the_uninterrupted_one(shared_sft_jsonl, tmp_path, full_run):
    out = tmp_path / "run"
    first = run_sft(shared_sft_jsonl, out, eval_data=str(shared_sft_jsonl), stop_at_step=3, **RESUME)
    assert len(first) == 3
    ckpt = out / "checkpoints" / "step-3"
    assert (ckpt / "trainer_state.pt").exists()
    run_sft(shared_sft_jsonl, out, eval_data=str(shared_sft_jsonl), resume=str(ckpt), **RESUME)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    expected = read_metrics(full_run)
    assert [r["loss/sft"] for r in rows] == pytest.approx([r["loss/sft"] for r in expected], abs=1e-5)
    assert [r["optim/lr"] for r in rows] == pytest.approx([r["optim/lr"] for r in expected], rel=1e-6)


def test_a_checkpoint_without_optimizer_state_resumes_with_fresh_moments(shared_sft_jsonl, tmp_path, full_run):
    out = tmp_path / "run"
    run_sft(shared_sft_jsonl, out, eval_data=str(shared_sft_jsonl), stop_at_step=3, save_optimizer=False, **RESUME)
    ckpt = out / "checkpoints" / "step-3"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert "optimizer" not in state and state["step"] == 3 and state["scheduler"] is not None
    with pytest.warns(UserWarning, match="no optimizer state"):
        run_sft(shared_sft_jsonl, out, eval_data=str(shared_sft_jsonl), resume=str(ckpt), **RESUME)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # the schedule continues; the losses after the resume differ from the run that kept AdamW's moments
    expected = read_metrics(full_run)
    assert [r["optim/lr"] for r in rows] == pytest.approx([r["optim/lr"] for r in expected], rel=1e-6)
    assert [r["loss/sft"] for r in rows[:4]] == pytest.approx([r["loss/sft"] for r in expected[:4]], abs=1e-5)
    assert abs(rows[4]["loss/sft"] - expected[4]["loss/sft"]) > 1e-3


def test_checkpoint_loads_with_plain_transformers(full_run, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = full_run / "checkpoints" / "step-6"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert getattr(model.config, "quantization_config", None) is None
    initial = tiny[0].get_input_embeddings().weight
    assert not torch.equal(model.get_input_embeddings().weight, initial)  # the trained weights were saved
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_run_directory_has_config_and_metrics(full_run):
    config = yaml.safe_load((full_run / "config.yaml").read_text())
    assert config["method"] == "sft" and config["lr"] == RESUME["lr"] and config["max_steps"] == 6
    assert config["rlhfkit_version"]
    assert "git_revision" in config
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        assert config["git_revision"] == head.strip()
    rows = read_metrics(full_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss/sft", "optim/lr", "optim/grad_norm", "train/epoch", "perf/tokens_per_s", "perf/step_s",
                "perf/peak_rss_mb"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["train/epoch"] == 3.0  # 8 conversations / batch 4 = 2 steps per epoch
    assert "eval/loss" in rows[-1] and rows[-1]["eval/loss"] > 0


def test_sizes_that_do_not_divide_raise(sft_jsonl, run_dir):
    with pytest.raises(ValueError, match="batch_size / \\(micro_batch_size x processes\\)"):
        train(SFTConfig(**{**FAST, "data": str(sft_jsonl), "output_dir": str(run_dir), "batch_size": 8,
                           "micro_batch_size": 3, "max_steps": 1}))


@pytest.mark.parametrize("field, value, message", [
    ("packing", "packed", "packing must be one of padding_free, padded, got 'packed'"),
    ("lr_schedule", "step", "lr_schedule must be one of cosine, linear, constant, got 'step'"),
    ("eval_fraction", 1.0, r"eval_fraction must be in \[0, 1\), got 1.0"),
    ("warmup_ratio", -0.1, r"warmup_ratio must be in \[0, 1\], got -0.1"),
    ("micro_batch_size", 0, "micro_batch_size must be >= 1, got 0"),
    ("lr", 0.0, "lr must be > 0, got 0.0"),
    ("grad_clip", -1.0, "grad_clip must be >= 0, got -1.0"),
    ("max_length", 0, "max_length must be >= 1, got 0"),
])
def test_config_rejects_a_bad_value_naming_the_field(field, value, message):
    """From Python, at construction (``validate`` runs in ``__post_init__``), not first in ``train``."""
    with pytest.raises(ValueError, match=message):
        SFTConfig(data="x.jsonl", **{field: value})


def test_missing_data_is_an_error_at_train_time(run_dir):
    """A config without data is a valid config (YAML bases, defaults); training without data is not."""
    with pytest.raises(DataError, match="--data is required"):
        train(SFTConfig(**{**FAST, "output_dir": str(run_dir)}))


def test_fewer_conversations_than_one_batch_raise(sft_jsonl, run_dir):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(SFTConfig(**{**FAST, "data": str(sft_jsonl), "output_dir": str(run_dir), "batch_size": 16,
                           "micro_batch_size": 16, "max_steps": 1}))


def test_a_resumed_process_gets_its_own_rng_streams(tmp_path):
    from rlhfkit.train import runtime

    torch.manual_seed(0)
    shared = runtime.rng_state()
    torch.manual_seed(1)
    own = runtime.rng_state()
    torch.save({"step": 3, "rng": shared}, tmp_path / runtime.STATE_FILE)
    torch.save(own, tmp_path / "rng-1.pt")
    assert runtime.load_trainer_state(tmp_path, rank=1)["step"] == 3
    assert torch.equal(torch.get_rng_state(), own["torch"])
    runtime.load_trainer_state(tmp_path, rank=0)  # no rng-0.pt: the state saved with the trainer state
    assert torch.equal(torch.get_rng_state(), shared["torch"])


def test_keep_checkpoints_deletes_the_older_ones(shared_sft_jsonl, tmp_path):
    run_sft(shared_sft_jsonl, tmp_path / "run", max_steps=3, batch_size=4, micro_batch_size=4, save_every=1,
            keep_checkpoints=2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-3"]
