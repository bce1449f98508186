"""Reward-model training (rlhfkit.train.reward, .reward_data): the shared-prompt rows vs one row per
pair, margin and ties in the loss, the trainer (learning, accumulation invariance, resume, two
processes), bad input, config checks, and `rlhfkit reward train|eval`. The model itself is tested in
tests/models/test_heads.py, the evaluation report in tests/evaluate/test_reward_model.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun import run_two_processes

from rlhfkit.cli.reward import main
from rlhfkit.data.prompts import load_prompts
from rlhfkit.data.records import DataError, PreferenceRecord
from rlhfkit.evaluate.reward_model import reward_model_report
from rlhfkit.models.heads import PackedScorer, RewardModel
from rlhfkit.train.reward import RewardConfig, pair_loss, train
from rlhfkit.train.reward_data import (
    EncodedPair,
    collate,
    encode,
    make_units,
    read_preferences,
    split_by_prompt,
)

GOOD = ["wonderful", "great", "lovely", "excellent", "happy", "delightful"]
BAD = ["awful", "terrible", "horrible", "dreadful", "sad", "miserable"]
FILL = ["the", "day", "was", "quite", "really", "and", "it", "felt", "so", "today", "very"]


def toy_prefs(n_prompts: int, per_prompt: int = 2, seed: int = 0) -> list[dict]:
    """A separable set: the chosen reply holds one 'good' word, the rejected one a 'bad' word, both
    among 3-8 filler words; lengths are independent of the label."""
    rng = random.Random(seed)

    def reply(lexicon):
        w = [rng.choice(FILL) for _ in range(rng.randint(3, 8))]
        w.insert(rng.randrange(len(w) + 1), rng.choice(lexicon))
        return {"role": "assistant", "content": " ".join(w).capitalize() + "."}

    rows = []
    for p in load_prompts("all")[:n_prompts]:
        for _ in range(per_prompt):
            rows.append({"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": reply(GOOD),
                         "rejected": reply(BAD), "metadata": {"category": p["category"], "task": "toy"}})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rm():
    return RewardModel.init_from("tiny", seed=1)


PROMPTS = [[{"role": "user", "content": "Hello there, how are you?"}], [{"role": "user", "content": "Name a fruit."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}]]
CHOSEN = ["I am fine, thanks for asking.", "Apple.", "Rome."]
REJECTED = ["Bad.", "A banana is a long yellow fruit that monkeys like.", "It is Rome, the eternal city."]


# --- rows and the loss --------------------------------------------------------------------------


def test_grouped_loss_equals_one_row_per_pair(rm):
    """Three pairs over three replies of one prompt (K = 3 → C(3, 2) pairs) plus a pair of another
    prompt: sharing the rows (4 reply passes) gives the same loss as one row per pair (8 reply passes)."""
    a, b, c = "A short reply.", "Another reply, a bit longer than the first.", "Third."
    def rec(p, x, y, tie=False):  # noqa: E306
        return (None, PreferenceRecord(prompt=p, chosen={"role": "assistant", "content": x},
                                       rejected={"role": "assistant", "content": y}, tie=tie, strength=2))
    data, _ = encode([rec(PROMPTS[0], a, b), rec(PROMPTS[0], a, c, tie=True), rec(PROMPTS[0], c, b),
                      rec(PROMPTS[1], CHOSEN[1], REJECTED[1])], rm.tok, 512, margin_scale=0.3, ties="half")
    shared, single = make_units(data, share=True), make_units(data, share=False)
    assert [len(u.replies) for u in shared] == [3, 2] and len(single) == 4
    scorer = PackedScorer(rm.model)
    with torch.no_grad():
        l1, m1 = pair_loss(scorer, collate(shared, rm.tok.pad_token_id, "cpu"))
        l2, m2 = pair_loss(scorer, collate(single, rm.tok.pad_token_id, "cpu"))
    assert l1.item() == pytest.approx(l2.item(), abs=1e-5)
    assert m1["reward/margin"].item() == pytest.approx(m2["reward/margin"].item(), abs=1e-5)


# --- trainer pieces -------------------------------------------------------------------------------------


def test_margin_and_ties_reach_the_loss(tokenizer):
    """Two pairs, rewards fixed by a stub scorer: pair 0 strength 1 with margin_scale 0.5 → m = 0.5,
    rewards (1, 0): -log σ(1 - 0 - 0.5) = 0.474077. Pair 1 a tie with strength 3 (margin ignored),
    rewards (0.3, -0.2), d = 0.5: -½[log σ(0.5) + log σ(-0.5)] = ½(0.474077 + 0.974077) = 0.724077.
    Mean over the two pairs: 0.599077."""
    recs = [PreferenceRecord(prompt=PROMPTS[0], chosen={"role": "assistant", "content": "a"},
                             rejected={"role": "assistant", "content": "b"}, strength=1),
            PreferenceRecord(prompt=PROMPTS[1], chosen={"role": "assistant", "content": "c"},
                             rejected={"role": "assistant", "content": "d"}, tie=True, strength=3)]
    data, cut = encode([(None, r) for r in recs], tokenizer, 512, margin_scale=0.5, ties="half")
    assert cut == 0 and [d.margin for d in data] == [0.5, 0.0] and [d.tie for d in data] == [False, True]
    batch = collate(make_units(data), tokenizer.pad_token_id, "cpu")
    stub = lambda *a: torch.tensor([[1.0, 0.0], [0.3, -0.2]])  # noqa: E731
    loss, _ = pair_loss(stub, batch)
    assert loss.item() == pytest.approx(0.599077, abs=1e-5)
    dropped, _ = encode([(None, r) for r in recs], tokenizer, 512, margin_scale=0.5, ties="drop")
    assert len(dropped) == 1 and not dropped[0].tie
    plain, _ = encode([(None, r) for r in recs], tokenizer, 512, margin_scale=0.0, ties="half")
    assert plain[0].margin == 0.0


def test_long_replies_are_cut_and_counted(tokenizer):
    rec = PreferenceRecord(prompt=PROMPTS[0], chosen={"role": "assistant", "content": "word " * 200},
                           rejected={"role": "assistant", "content": "short"})
    (pair,), cut = encode([(None, rec)], tokenizer, 64, 0.0, "half")
    assert cut == 1 and len(pair.prompt_ids) + len(pair.chosen_ids) == 64
    assert isinstance(pair, EncodedPair)


def train_cfg(tmp_path, data, **kw) -> RewardConfig:
    base = dict(model="tiny", data=str(data), output_dir=str(tmp_path / "run"), lr=3e-3, batch_size=16,
                micro_batch_size=8, warmup_ratio=0.1, progress=False, norm_samples=64, eval_batch_size=32)
    return RewardConfig(**{**base, **kw})


def test_freeze_backbone_trains_only_the_head(tmp_path):
    """Without the probe (probe=False) a frozen-backbone RM takes 3 AdamW steps on its head alone."""
    data = write_jsonl(tmp_path / "p.jsonl", toy_prefs(8))
    out = train(train_cfg(tmp_path, data, freeze_backbone=True, probe=False, max_steps=3, eval_fraction=0.0, lr=1e-2,
                          batch_size=8, norm_samples=8))
    assert out["steps"] == 3
    start, trained = RewardModel.init_from("tiny", seed=0).model, RewardModel.load(out["checkpoint"]).model
    for (name, a), b in zip(start.named_parameters(), trained.parameters()):
        moved = not torch.equal(a, b)
        assert moved == name.startswith("score"), name


def test_accumulation_matches_one_big_batch(tmp_path):
    """One step of 8 pairs: micro 8 x 1 and micro 2 x 4 give the same loss and the same weights."""
    data = write_jsonl(tmp_path / "p.jsonl", toy_prefs(4))
    results, heads = [], []
    for micro in (8, 2):
        out = train(train_cfg(tmp_path / f"m{micro}", data, batch_size=8, micro_batch_size=micro, max_steps=1,
                              eval_fraction=0.0, lr=1e-2, warmup_ratio=0.0, norm_samples=4))
        results.append(out)
        heads.append(RewardModel.load(out["checkpoint"]).model.score.weight.detach())
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-5)
    assert torch.allclose(heads[0], heads[1], atol=1e-5)


def test_learns_a_separable_toy_set(tmp_path):
    """Held-out prompts (20%): accuracy >= 0.9 after two epochs of 8 steps; the training completions
    (the normalisation set) score mean 0, std 1 under the saved model; the run dir has reward_eval.json."""
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_prefs(80))
    out = train(train_cfg(tmp_path, data, epochs=2, eval_every=100, norm_samples=10_000), report=reward_model_report)
    assert out["eval_pairs"] == 32 and out["train_pairs"] == 128 and out["steps"] == 16
    report = json.loads((tmp_path / "run" / "reward_eval.json").read_text())
    assert report["accuracy"] >= 0.9, report
    assert set(report["by_category"]) <= {"advice", "explanation", "creative", "opinion"}
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval/accuracy"] == report["accuracy"]
    rm = RewardModel.load(out["checkpoint"])
    train_recs, _ = split_by_prompt(read_preferences(str(data)), 0.2, 0)
    completions = {(json.dumps(r.prompt), s["content"]): r.prompt for _, r in train_recs for s in (r.chosen, r.rejected)}
    scores = rm.score(list(completions.values()), [c for _, c in completions], batch_size=64)
    assert out["norm"]["n"] == len(completions) == 256
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-3)


def test_bad_preference_files(tmp_path):
    rows = toy_prefs(2)
    cases = [({"tie": "maybe"}, "prefs.jsonl:2: field 'tie': must be true or false, got 'maybe'"),
             ({"strength": -1}, "prefs.jsonl:2: field 'strength': must be a non-negative integer, got -1"),
             ({"source": "crowd"}, "prefs.jsonl:2: field 'source': must be one of human, judge, simulated, rm, unknown"),
             ({"rejected": rows[1]["chosen"]}, "prefs.jsonl:2: field 'rejected': chosen and rejected are the same text"),
             ({"chosen": {"role": "assistant", "content": ""}}, "prefs.jsonl:2: field 'chosen.content': empty completion")]
    for bad, message in cases:
        broken = [dict(r) for r in rows]
        broken[1].update(bad)
        with pytest.raises(ValueError) as e:
            read_preferences(str(write_jsonl(tmp_path / "prefs.jsonl", broken)))
        assert message in str(e.value)
    with pytest.raises(ValueError, match="ties must be 'half' or 'drop'"):
        RewardConfig(ties="zero").validate()


# --- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("ties", "zero", "ties must be 'half' or 'drop', got 'zero'"),
    ("lr_schedule", "step", "lr_schedule must be one of cosine, linear, constant, got 'step'"),
    ("margin_scale", -0.5, "margin_scale must be >= 0, got -0.5"),
    ("eval_fraction", 1.0, r"eval_fraction must be in \[0, 1\), got 1.0"),
    ("micro_batch_size", 0, "micro_batch_size must be >= 1, got 0"),
    ("norm_samples", 0, "norm_samples must be >= 1, got 0"),
    ("warmup_ratio", 2.0, r"warmup_ratio must be in \[0, 1\], got 2.0"),
])
def test_config_rejects_a_bad_value_naming_the_field(field, value, message):
    """From Python, at construction (``validate`` runs in ``__post_init__``)."""
    with pytest.raises(ValueError, match=message):
        RewardConfig(data="x.jsonl", **{field: value})


def test_missing_data_is_an_error_at_train_time():
    with pytest.raises(DataError, match="reward training needs data"):
        train(RewardConfig(model="tiny"))


def test_reward_train_and_eval_commands(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_prefs(10))
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "reward", "train", "--model", "tiny", "--data", data,
                          "--output-dir", run, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
                          "--lr", "1e-3", "--norm-samples", "16", "--progress", "false"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ckpt = run / "checkpoints" / "step-2"
    assert (run / "reward_eval.json").exists() and (ckpt / "config.json").exists()
    assert "rlhfkit_reward_norm" in json.loads((ckpt / "config.json").read_text())
    (run / "reward_eval.json").unlink()
    out = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "reward", "eval", "--rm", ckpt, "--data", data],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((run / "reward_eval.json").read_text())
    assert report["pairs"] == 20 and 0 <= report["accuracy"] <= 1 and "ece" in report


def test_reward_command_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "tiny"])
    assert e.value.code == 2 and "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--rm", str(tmp_path), "--data", "x.jsonl"])
    assert "has no config.json" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["fit"])
    assert e.value.code == 2 and "invalid choice: 'fit'" in capsys.readouterr().err


# --- resume and processes -------------------------------------------------------------------------------

RESUME = dict(batch_size=4, micro_batch_size=2, max_steps=4, lr=3e-3, lr_schedule="cosine", warmup_ratio=0.25,
              eval_fraction=0.0, norm_samples=4)


def losses(run) -> list[float]:
    return [json.loads(line)["loss/reward"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    """4 steps straight vs 2 steps, stop, resume to 4: the same losses (8 pairs in batches of 4 is
    2 steps per epoch, so the resume crosses an epoch boundary where the order is reshuffled)."""
    data = write_jsonl(tmp_path / "p.jsonl", toy_prefs(4))
    train(train_cfg(tmp_path / "a", data, **RESUME))
    train(train_cfg(tmp_path / "b", data, stop_at_step=2, **RESUME))
    out = train(train_cfg(tmp_path / "b", data, resume="auto", **RESUME))
    assert out["steps"] == 4 and "norm" in out
    assert losses(tmp_path / "b" / "run") == pytest.approx(losses(tmp_path / "a" / "run"), abs=1e-5)


TWO_PROCESS = '''
import json, sys
from pathlib import Path
from accelerate import PartialState
from rlhfkit.tracking import read_metrics
from rlhfkit.train.reward import RewardConfig, train
cfg = RewardConfig(model="tiny", data=sys.argv[1], output_dir=sys.argv[2], max_steps=2, batch_size=8,
                   micro_batch_size=2, lr=1e-2, lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.0,
                   progress=False, norm_samples=4)
train(cfg)
state = PartialState()  # the state the trainer's Accelerator set up
assert state.num_processes == 2, state.num_processes
if state.is_main_process:
    rows = read_metrics(sys.argv[2])
    Path(sys.argv[2], "processes.json").write_text(json.dumps(
        {"num_processes": state.num_processes, "backend": state.backend, "losses": [r["loss/reward"] for r in rows]}))
'''


def test_two_processes_match_one(tmp_path):
    """torchrun with 2 processes (each gets 4 of the 8 pairs, in micro-batches of whole prompts: here of
    1, 2 and 3 pairs, a 3-pair prompt exceeding micro_batch_size) gives the losses of one process; the
    script fails unless the trainer's accelerator saw both processes."""
    rows = toy_prefs(8, per_prompt=3)  # keep 3 pairs of every other prompt, 1 of the rest: uneven rows
    data = write_jsonl(tmp_path / "p.jsonl", [r for i, r in enumerate(rows) if (i // 3) % 2 == 0 or i % 3 == 0])
    one = train(train_cfg(tmp_path / "one", data, max_steps=2, batch_size=8, micro_batch_size=2, lr=1e-2,
                          lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.0, norm_samples=4))
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS)
    run_two_processes(script, data, tmp_path / "two", timeout=300)
    record = json.loads((tmp_path / "two" / "processes.json").read_text())
    assert record["num_processes"] == 2 and record["backend"] == "gloo"
    assert record["losses"] == pytest.approx(losses(Path(one["run_dir"])), abs=1e-5)
