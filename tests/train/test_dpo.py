"""Tests for the offline preference trainer (rlhfkit.train.dpo).

The losses themselves are tested in test_losses_dpo.py, the log-probs in tests/models/test_logps.py; here:
the DPO forward against its naive equivalent, the reference cache, tie/strength handling, that sigmoid DPO learns, that every
loss runs end to end, resume, accumulation invariance, the CLI, and bad input.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from dpo_two_process import config
from torchrun import run_two_processes

from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
from rlhfkit.data.records import DataError
from rlhfkit.losses.dpo import REFERENCE_FREE
from rlhfkit.models.batching import pad_completions
from rlhfkit.models.logps import completion_logps
from rlhfkit.tracking import read_metrics
from rlhfkit.train import dpo
from rlhfkit.train.dpo import DPOConfig, example_losses, forward_examples, train
from rlhfkit.train.dpo_data import Example, load_examples

WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "garden", "window", "candle", "forest", "bridge",
         "coffee", "mirror", "planet", "silver", "thunder"]


def pref_row(i: int, w: str, v: str, **extra) -> dict:
    """A native PreferenceRecord row whose chosen reply says 'banana' where the rejected says 'cherry'."""
    return {"prompt": [{"role": "user", "content": f"Tell me about the {w}, item {i}."}],
            "chosen": {"role": "assistant", "content": f"The {w} is nice, banana {v}."},
            "rejected": {"role": "assistant", "content": f"The {w} is nice, cherry {v}."}, **extra}


TOY = [pref_row(i, WORDS[i % 16], WORDS[(i * 7 + 3) % 16]) for i in range(32)]
HELD_OUT = [pref_row(100 + i, w, v) for i, (w, v) in
            enumerate([("tiger", "lemon"), ("ocean", "violin"), ("desert", "pencil"), ("castle", "rocket")])]


@pytest.fixture
def prefs(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", TOY)


@pytest.fixture
def small(tmp_path):
    """Eight pairs, a quarter of them ties with strength 2: enough for one-step end-to-end runs."""
    return write_jsonl(tmp_path / "small.jsonl", [dict(r, tie=i % 4 == 0, strength=2) for i, r in enumerate(TOY[:8])])


def cfg_for(data, out, **kw) -> DPOConfig:
    base = dict(model="tiny", data=str(data), output_dir=str(out), batch_size=8, micro_batch_size=4, lr=3e-3,
                max_steps=1, eval_fraction=0.0, warmup_ratio=0.0, lr_schedule="constant", progress=False)
    return DPOConfig(**{**base, **kw})


def examples_of(tok, rows) -> list[Example]:
    return [Example(tokenize_prompt(tok, r["prompt"]), tokenize_completion(tok, r["prompt"], r["chosen"]["content"]),
                    tokenize_completion(tok, r["prompt"], r["rejected"]["content"]),
                    tie=r.get("tie", False), strength=float(r.get("strength") or 1)) for r in rows]


# --- log-probs ---------------------------------------------------------------------------------------


def naive_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Full logits over prompt + completion, log_softmax over the whole vocabulary, gathered."""
    logits = model(torch.tensor([prompt + completion])).logits[0]  # (T, V)
    logps = torch.log_softmax(logits.float(), -1)[len(prompt) - 1:-1]
    return logps.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_padding_free_equals_padded_values_and_gradients(tiny):
    """Same values, and the same gradient: the packed row's block-diagonal mask isolates sequences."""
    from rlhfkit.models import load_model

    model, tok = load_model("tiny", seed=1)
    ex = examples_of(tok, TOY[:3])
    grads = []
    for packing in ("padding_free", "padded"):
        model.zero_grad()
        logps, lengths = forward_examples(model, ex, packing, tok.pad_token_id)
        logps.sum().backward()
        grads.append((logps.detach(), lengths, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    assert torch.equal(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2], atol=1e-5, rtol=1e-4)


def test_one_forward_concatenated_equals_two_separate_forwards(tiny):
    model, tok = tiny
    ex = examples_of(tok, TOY[:4])
    prompts = [e.prompt_ids for e in ex]
    with torch.no_grad():
        logps, lengths = forward_examples(model, ex, "padding_free", tok.pad_token_id)  # (4, 2)
        for col, attr in enumerate(("first_ids", "second_ids")):
            batch = pad_completions(prompts, [getattr(e, attr) for e in ex], tok.pad_token_id)
            per_token = completion_logps(model, batch, layout="shared")
            torch.testing.assert_close(logps[:, col], per_token.sum(1), atol=1e-5, rtol=0)
            assert lengths[:, col].tolist() == batch.completion_mask.sum(1).tolist()
            naive = torch.stack([naive_logps(model, e.prompt_ids, getattr(e, attr)).sum() for e in ex])
            torch.testing.assert_close(logps[:, col], naive, atol=1e-4, rtol=0)


# --- losses wired to the trainer ----------------------------------------------------------------------


def test_ties_half_averages_both_orientations_and_strength_margin():
    """β = 1, reference logps 0. Pair 0: logps (-1, -2), h = 1, not a tie: -log σ(1) = 0.313262.
    Pair 1: logps (-2, -1), h = -1, a tie: ½(-log σ(-1) - log σ(1)) = ½(1.313262 + 0.313262) = 0.813262.
    With strength_margin 0.5 and pair 0 of strength 3: m = 0.5 x (3 - 1) = 1, -log σ(1 - 1) = log 2;
    the tie ignores its strength (margin 0)."""
    cfg = DPOConfig(data="x", beta=1.0, ties="half")
    ex = [Example([1], [2], [3]), Example([1], [2], [3], tie=True, strength=3.0)]
    logps = torch.tensor([[-1.0, -2.0], [-2.0, -1.0]])
    ref, lengths = torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.long)
    loss, _ = example_losses(cfg, logps, ref, lengths, ex)
    torch.testing.assert_close(loss, torch.tensor([0.313262, 0.813262]), atol=1e-6, rtol=0)
    cfg = DPOConfig(data="x", beta=1.0, ties="half", strength_margin=0.5)
    ex[0].strength = 3.0
    loss, _ = example_losses(cfg, logps, ref, lengths, ex)
    torch.testing.assert_close(loss, torch.tensor([math.log(2), 0.813262]), atol=1e-6, rtol=0)


def test_cached_and_uncached_reference_logps_give_identical_losses(prefs, tmp_path, monkeypatch):
    from rlhfkit.models import load_model

    cfg = cfg_for(prefs, tmp_path / "run")
    model, tok = load_model("tiny", seed=0)
    ex = examples_of(tok, TOY[:8])
    (tmp_path / "run").mkdir()
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    cached, how = dpo.reference_logps(cfg, ex, tmp_path / "run", tok, acc)
    assert how == "computed" and (tmp_path / "run" / "ref_logps.pt").exists()
    policy, _ = load_model("tiny", seed=5)  # a policy different from the reference
    with torch.no_grad():
        logps, lengths = forward_examples(policy, ex[:4], "padding_free", tok.pad_token_id)
        uncached, _ = forward_examples(model, ex[:4], "padding_free", tok.pad_token_id)  # reference on the fly
    loss_cached, _ = example_losses(cfg, logps, cached[:4], lengths, ex[:4])
    loss_uncached, _ = example_losses(cfg, logps, uncached, lengths, ex[:4])
    torch.testing.assert_close(loss_cached, loss_uncached, atol=1e-6, rtol=0)
    # a second pass over the same data and model reads the file and never loads the reference
    monkeypatch.setattr(dpo, "load_reference", lambda *a: pytest.fail("reference loaded despite a valid cache"))
    again, how = dpo.reference_logps(cfg, ex, tmp_path / "run", tok, acc)
    assert how == "cached" and torch.equal(again, cached)
    # other data: a different key, so the cache is not used
    monkeypatch.setattr(dpo, "load_reference", lambda *a: (_ for _ in ()).throw(RuntimeError("loaded")))
    with pytest.raises(RuntimeError, match="loaded"):
        dpo.reference_logps(cfg, ex[:7], tmp_path / "run", tok, acc)


# --- behaviour ---------------------------------------------------------------------------------------------


def test_sigmoid_dpo_learns_the_preferred_feature(prefs, tmp_path):
    """Chosen replies say 'banana' where rejected ones say 'cherry'. After 8 steps the policy must prefer
    'banana' on held-out prompts by a clear margin: log π(banana-style) - log π(cherry-style) rises by
    > 2 nats (measured ≈ +4.0; with the loss's sign flipped it falls by ≈ 4, so this fails)."""
    from rlhfkit.models import load_model

    model, tok = load_model("tiny", seed=0)
    held = examples_of(tok, HELD_OUT)

    def gap(m) -> float:
        with torch.no_grad():
            logps, _ = forward_examples(m, held, "padding_free", tok.pad_token_id)
        return (logps[:, 0] - logps[:, 1]).mean().item()

    before = gap(model)
    result = train(cfg_for(prefs, tmp_path / "run", micro_batch_size=8, max_steps=8))
    after = gap(load_model(result["checkpoint"])[0])
    assert after - before > 2.0, (before, after)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert rows[-1]["rewards/accuracy"] >= 0.9 and rows[-1]["rewards/margin"] > 0.3
    assert rows[-1]["loss/dpo"] < rows[0]["loss/dpo"] - 0.2


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "robust", "hinge", "simpo", "orpo", "kto"])
def test_each_loss_runs_one_step(loss, small, tmp_path, monkeypatch):
    """One step end to end; reference-free losses must never call the reference loader. sigmoid runs
    with ties=half and a strength margin, ipo with padded rows."""
    if loss in REFERENCE_FREE:
        monkeypatch.setattr(dpo, "load_reference", lambda *a: pytest.fail(f"{loss} loaded a reference model"))
    extra = {"sigmoid": {"ties": "half", "strength_margin": 0.5}, "ipo": {"packing": "padded"},
             "robust": {"label_smoothing": 0.1}, "simpo": {"beta": 2.0}}.get(loss, {})
    result = train(cfg_for(small, tmp_path / "run", loss=loss, batch_size=4, micro_batch_size=2, **extra))
    assert result["steps"] == 1 and math.isfinite(result["loss/dpo"])
    assert ("ref_logps" in result) == (loss not in REFERENCE_FREE)
    assert result["ties_skipped"] == (0 if loss == "sigmoid" else 2)
    row = read_metrics(tmp_path / "run")[-1]
    assert {"loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen"} <= set(row)
    if loss == "kto":
        assert result["train_examples"] == 2 * 6  # each non-tie pair split into desirable + undesirable
        assert "kl/kto_ref" in row


def test_eval_metrics_and_kl_to_reference(prefs, tmp_path):
    result = train(cfg_for(prefs, tmp_path / "run", max_steps=2, eval_fraction=0.25, eval_every=1, kl_prompts=3,
                           kl_max_new_tokens=8))
    rows = read_metrics(tmp_path / "run")
    assert result["eval_examples"] == 8 and len(rows) == 2
    for key in ("eval/loss", "eval/rewards/accuracy", "eval/rewards/margin", "eval/logps/chosen", "eval/kl_ref"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["eval/loss"] > rows[1]["eval/loss"]  # two steps of lr 3e-3 already generalise
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"prompt", "completion", "kl"} <= set(samples[0])


def test_ties_skip_by_default_and_half_keeps_them(small, tokenizer):
    examples, counts = load_examples(str(small), tokenizer, DPOConfig(data=str(small)))
    assert counts["ties_skipped"] == 2 and len(examples) == 6 and not any(e.tie for e in examples)
    examples, counts = load_examples(str(small), tokenizer, DPOConfig(data=str(small), ties="half"))
    assert counts["ties_skipped"] == 0 and [e.tie for e in examples] == [i % 4 == 0 for i in range(8)]
    assert {e.strength for e in examples} == {2.0}


def test_resume_reproduces_the_uninterrupted_run(prefs, tmp_path, monkeypatch):
    prefs = write_jsonl(prefs, TOY[:8])  # batch 4: two epochs in four steps
    full = cfg_for(prefs, tmp_path / "full", max_steps=4, batch_size=4, lr_schedule="linear", warmup_ratio=0.25)
    train(full)
    part = cfg_for(prefs, tmp_path / "part", max_steps=4, batch_size=4, lr_schedule="linear", warmup_ratio=0.25, stop_at_step=2)
    train(part)
    # the resumed run reuses the run dir's cached reference log-probs: no reference model is loaded
    monkeypatch.setattr(dpo, "load_reference", lambda *a: pytest.fail("reference reloaded on resume"))
    resumed = train(cfg_for(prefs, tmp_path / "part", max_steps=4, batch_size=4, lr_schedule="linear", warmup_ratio=0.25,
                            resume="auto"))
    assert resumed["ref_logps"] == "cached" and resumed["steps"] == 4
    expected = [r["loss/dpo"] for r in read_metrics(tmp_path / "full")]
    got = [r["loss/dpo"] for r in read_metrics(tmp_path / "part")]
    assert got == pytest.approx(expected, abs=1e-5)


def test_accumulation_equals_one_big_batch(prefs, tmp_path):
    """Batch 8 as 1 x 8 and as 4 x 2 in padded rows: same loss and same gradient norm."""
    prefs = write_jsonl(prefs, TOY[:8])
    runs = {}
    for name, micro, packing in (("one", 8, "padding_free"), ("accum", 2, "padded")):
        train(cfg_for(prefs, tmp_path / name, micro_batch_size=micro, packing=packing))
        runs[name] = read_metrics(tmp_path / name)[0]
    assert runs["accum"]["loss/dpo"] == pytest.approx(runs["one"]["loss/dpo"], abs=1e-6)
    assert runs["accum"]["optim/grad_norm"] == pytest.approx(runs["one"]["optim/grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_two_processes_match_one(prefs, tmp_path):
    """Global batch 8 split over 2 processes (torchrun, gloo) gives the 1-process losses, rewards, gradient
    norms and eval metrics: the loss is normalised by the global batch and metrics are gathered."""
    run_two_processes(Path(__file__).parent / "dpo_two_process.py", prefs, tmp_path / "two", timeout=600)
    assert json.loads((tmp_path / "two" / "processes.json").read_text())["num_processes"] == 2
    train(config(str(prefs), str(tmp_path / "one")))
    keys = ("loss/dpo", "rewards/margin", "rewards/accuracy", "optim/grad_norm", "eval/loss", "eval/rewards/margin")
    for one, two in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        for key in keys:
            if key == "rewards/accuracy" and one["step"] == 1:
                # at step 1 the policy is the reference: every margin is 0 up to float rounding (~1e-7,
                # different in one and two processes), so the share of margins > 0 is rounding noise
                assert one["rewards/margin"] == pytest.approx(0, abs=1e-5)
                continue
            assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_cli_subprocess(small, tmp_path, monkeypatch, capsys):
    """`rlhfkit dpo` through rlhfkit.cli.main in a subprocess (registering the command itself if the CLI
    does not list it yet), and a bad option through the same parser in-process."""
    import rlhfkit.cli as cli

    register = "c.TRAINERS.setdefault('dpo', ('rlhfkit.train.dpo', 'DPOConfig', 'dpo'))"
    code = f"import sys, rlhfkit.cli as c; {register}; sys.exit(c.main(sys.argv[1:]))"
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", code, "dpo", "--model", "tiny", "--data", str(small), "--loss", "ipo",
                           "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1", "--eval-fraction", "0",
                           "--output-dir", str(out), "--progress", "false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["steps"] == 1
    assert (out / "config.yaml").exists() and (out / "ref_logps.pt").exists()
    assert (out / "checkpoints" / "step-1" / "config.json").exists()
    monkeypatch.setitem(cli.TRAINERS, "dpo", cli.TRAINERS.get("dpo", ("rlhfkit.train.dpo", "DPOConfig", "dpo")))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["dpo", "--data", str(small), "--loss", "dpo2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown loss 'dpo2'" in err and "sigmoid" in err


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_config_options_are_named():
    with pytest.raises(ValueError, match="unknown loss 'dop'; choose one of sigmoid"):
        DPOConfig(data="x", loss="dop").validate()
    with pytest.raises(ValueError, match="data is required"):
        train(DPOConfig())  # at train time: a config without data is still a valid config
    with pytest.raises(ValueError, match="label_smoothing applies to loss=robust only"):
        DPOConfig(data="x", label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match="strength_margin applies to loss=sigmoid only"):
        DPOConfig(data="x", loss="ipo", strength_margin=1.0).validate()
    with pytest.raises(ValueError, match="ties=half is not defined for loss=hinge"):
        DPOConfig(data="x", loss="hinge", ties="half").validate()
    with pytest.raises(ValueError, match="ties must be 'skip' or 'half'"):
        DPOConfig(data="x", ties="drop").validate()


@pytest.mark.parametrize("field, value, message", [
    ("packing", "packed", "packing must be one of padding_free, padded, got 'packed'"),
    ("long_prompts", "truncate", "long_prompts must be one of error, skip, got 'truncate'"),
    ("data_format", "csv", "data_format must be one of auto, .*, got 'csv'"),
    ("lr_schedule", "step", "lr_schedule must be one of cosine, linear, constant, got 'step'"),
    ("beta", 0.0, "beta must be > 0, got 0.0"),
    ("eval_fraction", 1.5, r"eval_fraction must be in \[0, 1\), got 1.5"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("max_completion_length", 0, "max_completion_length must be >= 1, got 0"),
    ("kl_prompts", -1, "kl_prompts must be >= 0, got -1"),
    ("epochs", 0.0, "epochs must be > 0, got 0.0"),
])
def test_config_rejects_a_bad_value_naming_the_field(field, value, message):
    """From Python, at construction (``validate`` runs in ``__post_init__``)."""
    with pytest.raises(ValueError, match=message):
        DPOConfig(data="x.jsonl", **{field: value})
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        DPOConfig(data="x.jsonl", loss="robust", label_smoothing=0.5)


def test_pair_with_an_empty_side_names_file_line_and_field(tmp_path, tokenizer):
    rows = [TOY[0], dict(TOY[1], rejected={"role": "assistant", "content": "  "})]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'rejected.content': empty completion"):
        load_examples(str(data), tokenizer, DPOConfig(data=str(data)))


def test_kto_data_without_labels_names_file_line_and_field(tmp_path, tokenizer):
    rows = [{"prompt": "Hi?", "completion": "Hello.", "label": True}, {"prompt": "Bye?", "completion": "Bye."}]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = DPOConfig(data=str(data), loss="kto")
    with pytest.raises(DataError, match=r"kto\.jsonl:2: field 'label': missing: loss=kto needs a true/false label"):
        load_examples(str(data), tokenizer, cfg)
    rows[1]["label"] = "yes"
    write_jsonl(data, rows)
    with pytest.raises(DataError, match=r"kto\.jsonl:2: field 'label': must be true or false, got 'yes'"):
        load_examples(str(data), tokenizer, cfg)


def test_kto_unpaired_rows_and_mismatched_partners(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "metadata": {"label": i % 3 != 0}}
            for i in range(6)]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    examples, _ = load_examples(str(data), tokenizer, DPOConfig(data=str(data), loss="kto"))
    assert [e.desirable for e in examples] == [False, True, True, False, True, True]
    for e in examples:  # the z0 partner is another prompt's completion
        assert e.second_ids != e.first_ids
    assert sorted(map(tuple, (e.second_ids for e in examples))) == sorted(map(tuple, (e.first_ids for e in examples)))


def test_long_prompt_error_or_skip(tmp_path, tokenizer):
    rows = [TOY[0], dict(TOY[1], prompt=[{"role": "user", "content": "word " * 300}])]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"long\.jsonl:2: field 'prompt': the prompt is \d+ tokens, longer than"):
        load_examples(str(data), tokenizer, DPOConfig(data=str(data)))
    examples, counts = load_examples(str(data), tokenizer, DPOConfig(data=str(data), long_prompts="skip"))
    assert len(examples) == 1 and counts["long_prompts"] == 1
