"""Reward model: head init, scoring layout, shared-prompt training forward vs naive, normalisation,
save/load, the trainer (learning, margin and ties, accumulation invariance), evaluation, the CLI."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rlhfkit.data.prompts import load_prompts
from rlhfkit.data.records import PreferenceRecord
from rlhfkit.models.batching import pack_groups, pad_completions
from rlhfkit.models.heads import PackedScorer, RewardModel, init_head
from rlhfkit.train.reward import (
    EncodedPair,
    RewardConfig,
    encode,
    evaluate,
    expected_calibration_error,
    pair_loss,
    train,
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


# --- head and layout --------------------------------------------------------------------------------


def test_head_init_std_and_zero_bias():
    """std of N(0, 1/sqrt(d+1)) with d = 1023 is 1/32; 4096 weights give a std estimate within ~1.1%."""
    head = nn.Linear(1023, 4, bias=True)
    nn.init.constant_(head.bias, 3.0)
    init_head(head, seed=0)
    assert head.weight.std().item() == pytest.approx(1 / 32, rel=0.05)
    assert abs(head.weight.mean().item()) < 3 * (1 / 32) / 64
    assert torch.all(head.bias == 0)


def test_init_from_uses_the_formula(rm):
    d = rm.model.config.hidden_size
    w = rm.model.score.weight.detach().clone()
    expected = nn.Linear(d, 1, bias=False)
    init_head(expected, seed=1)
    assert torch.equal(w, expected.weight.detach())
    assert rm.norm is None


def test_score_reads_the_eos_and_ignores_padding(rm):
    """Each completion alone, or batched with longer/shorter neighbours (more left and right pad),
    scores the same; the token read is the completion's last, the EOS."""
    alone = torch.cat([rm.score([p], [c], normalized=False) for p, c in zip(PROMPTS, REJECTED)])
    batched = rm.score(PROMPTS, REJECTED, normalized=False, batch_size=3)
    assert torch.allclose(alone, batched, atol=1e-5)
    p_ids, c_ids = rm.tokenize(PROMPTS[0], CHOSEN[0])
    assert c_ids[-1] == rm.tok.eos_token_id
    b = pad_completions([p_ids, p_ids[:5]], [c_ids, c_ids[:2]], rm.tok.pad_token_id)
    ids, mask = b.input_ids, b.attention_mask
    assert ids.shape == mask.shape == (2, len(p_ids) + len(c_ids))
    assert not mask[1, :len(p_ids) - 5].any() and not mask[1, len(p_ids) + 2:].any()  # left and right pad


def test_score_ids_on_a_rollout(rm, tiny):
    """A Rollout's [left-padded prompt ; completion ; right pad] rows (sampled from the tiny policy)
    score as each row alone, unpadded."""
    from rlhfkit.rollout.engine import Sampler, SamplingConfig

    policy, tok = tiny
    r = Sampler(policy, tok, SamplingConfig(temperature=1.0, max_new_tokens=6)).sample(
        PROMPTS, seed=0, with_logps=False)
    got = rm.score_ids(r.input_ids, r.attention_mask, normalized=False)
    for b in range(len(PROMPTS)):
        ids = r.input_ids[b][r.attention_mask[b]][None]  # (1, real tokens)
        with torch.no_grad():
            want = rm.model(input_ids=ids).logits[0, 0]
        assert got[b].item() == pytest.approx(want.item(), abs=1e-5)


def test_reward_source_scores_the_sampled_ids(rm, tiny, tmp_path):
    """Online RL scores rollouts by their token ids when the RM shares the policy's vocabulary: the
    same scores as the text path (which re-encodes the text and closes it with an EOS), for truncated
    and ended completions, in one batch with both."""
    from rlhfkit.rollout.engine import Sampler, SamplingConfig
    from rlhfkit.rollout.rewards import RewardSource

    policy, tok = tiny
    path = rm.save(tmp_path / "rm")
    source = RewardSource(f"rm:{path}", task=None, device=torch.device("cpu"), tokenizer=tok)
    loaded = source.parts[0][2]
    assert source.shares_vocab(loaded)
    r = Sampler(policy, tok, SamplingConfig(temperature=1.0, max_new_tokens=5)).sample(PROMPTS, seed=0, with_logps=False)
    assert not r.ended.any()  # a random tiny model does not hit EOS in 5 tokens
    by_text = loaded.score(r.prompts, r.completions, normalized=False)
    assert torch.allclose(source(r), by_text, atol=1e-4)
    # the head is read at the appended EOS, not at the last sampled token
    assert not torch.allclose(source(r), loaded.score_ids(r.input_ids, r.attention_mask, normalized=False), atol=1e-3)
    # row 0 ended by the sampler (its EOS sampled, one step later than the others stopped): mixed batch
    c_ids = torch.cat([r.completion_ids, torch.full((len(PROMPTS), 1), tok.pad_token_id)], 1)
    c_mask = torch.cat([r.completion_mask, torch.zeros((len(PROMPTS), 1), dtype=torch.bool)], 1)
    c_ids[0, -1], c_mask[0, -1] = tok.eos_token_id, True
    mixed = dataclasses.replace(r, completion_ids=c_ids, completion_mask=c_mask,
                                ended=torch.tensor([True] + [False] * (len(PROMPTS) - 1)))
    assert torch.allclose(source(mixed), by_text, atol=1e-4)
    # without the policy's tokenizer the text path is used
    assert torch.allclose(RewardSource(f"rm:{path}", None, torch.device("cpu"))(r), by_text, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_separate_scoring(rm, attn):
    """The training layout [prompt ; reply 1 ; ... ; reply n] with its 4D mask gives the same rewards
    as scoring every [prompt ; reply] separately (the naive equivalent); rows hold 3, 2 and 1 replies."""
    rm.model.set_attn_implementation(attn)
    try:
        groups = [CHOSEN[:1] + REJECTED, [CHOSEN[1], REJECTED[0]], [CHOSEN[2]]]
        prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
        b = pack_groups([rm.tokenize(p, "x")[0] for p in prompts],
                        [[rm.tokenize(p, c)[1] for c in g] for p, g in zip(prompts, groups)], rm.tok.pad_token_id)
        assert b["reply_mask"].tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
        with torch.no_grad():
            got = PackedScorer(rm.model)(b["input_ids"], b["attention_mask"], b["position_ids"], b["read_at"])
        for r, (p, g) in enumerate(zip(prompts, groups)):
            want = rm.score([p] * len(g), g, normalized=False)
            assert torch.allclose(got[r, :len(g)], want, atol=1e-5), (r, got[r], want)
    finally:
        rm.model.set_attn_implementation("sdpa")


def test_grouped_loss_equals_one_row_per_pair(rm):
    """Three pairs over three replies of one prompt (K = 3 → C(3, 2) pairs) plus a pair of another
    prompt: sharing the rows (4 reply passes) gives the same loss as one row per pair (8 reply passes)."""
    from rlhfkit.train.reward import collate, encode, make_units

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


# --- normalisation, save, load ------------------------------------------------------------------------


def test_normalisation_gives_mean_0_std_1(rm):
    prompts = [p for p in PROMPTS for _ in range(4)]
    replies = [f"{c} {k}" for c in CHOSEN for k in range(4)]
    mean, std = rm.fit_normalization(prompts, replies)
    s = rm.score(prompts, replies)
    assert s.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert s.std().item() == pytest.approx(1.0, abs=1e-4)
    raw = rm.score(prompts, replies, normalized=False)
    assert torch.allclose(s, (raw - mean) / std, atol=1e-6)


def test_save_load_round_trip_and_plain_transformers(tmp_path, rm):
    from transformers import AutoModelForSequenceClassification

    rm.set_normalization(0.5, 2.0)
    rm.save(tmp_path / "rm")
    back = RewardModel.load(str(tmp_path / "rm"))
    assert back.norm == (0.5, 2.0)
    assert torch.allclose(back.score(PROMPTS, CHOSEN), rm.score(PROMPTS, CHOSEN), atol=1e-5)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    b = pad_completions(*zip(*[back.tokenize(p, c) for p, c in zip(PROMPTS, CHOSEN)]), back.tok.pad_token_id)
    ids, mask = b.input_ids, b.attention_mask
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask.long(), position_ids=(mask.long().cumsum(1) - 1).clamp(min=0)).logits
    assert torch.allclose(logits[:, 0], rm.score(PROMPTS, CHOSEN, normalized=False), atol=1e-5)


def test_load_a_causal_lm_is_an_error(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="is not a reward model: its config has architectures=.'LlamaForCausalLM'."):
        RewardModel.load(str(tmp_path / "lm"))
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0})
    (tmp_path / "lm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no weights for the reward head \(\['score.weight'\]\)"):
        RewardModel.load(str(tmp_path / "lm"))


def test_unnormalised_model_warns_once(rm, tmp_path):
    fresh = RewardModel.init_from("tiny", seed=2)
    with pytest.warns(UserWarning, match="no normalisation constants"):
        fresh.score(PROMPTS[:1], CHOSEN[:1])


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
    from rlhfkit.train.reward import collate, make_units

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


def test_ece_by_hand():
    """p = [0.9, 0.9, 0.6, 0.2]: confidences 0.9, 0.9, 0.6, 0.8; correct = p > ½ → 1, 1, 1, 0.
    Bins of width 0.05 on [0.5, 1]: {0.6}: acc 1, conf 0.6 → |0.4|·¼; {0.8}: acc 0, conf 0.8 → 0.8·¼;
    {0.9, 0.9}: acc 1, conf 0.9 → 0.1·½. ECE = 0.1 + 0.2 + 0.05 = 0.35."""
    ece, table = expected_calibration_error(np.array([0.9, 0.9, 0.6, 0.2]))
    assert ece == pytest.approx(0.35)
    assert sum(b["n"] for b in table) == 4


def train_cfg(tmp_path, data, **kw) -> RewardConfig:
    base = dict(model="tiny", data=str(data), output_dir=str(tmp_path / "run"), lr=3e-3, batch_size=16,
                micro_batch_size=8, warmup_ratio=0.1, progress=False, norm_samples=64, eval_batch_size=32)
    return RewardConfig(**{**base, **kw})


def test_freeze_backbone_trains_only_the_head(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", toy_prefs(8))
    out = train(train_cfg(tmp_path, data, freeze_backbone=True, max_steps=3, eval_fraction=0.0, lr=1e-2,
                          batch_size=8, norm_samples=8))
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
    from rlhfkit.train.reward import load_records, split_by_prompt

    data = write_jsonl(tmp_path / "prefs.jsonl", toy_prefs(80))
    out = train(train_cfg(tmp_path, data, epochs=2, eval_every=100, norm_samples=10_000))
    assert out["eval_pairs"] == 32 and out["train_pairs"] == 128 and out["steps"] == 16
    report = json.loads((tmp_path / "run" / "reward_eval.json").read_text())
    assert report["accuracy"] >= 0.9, report
    assert set(report["by_category"]) <= {"advice", "explanation", "creative", "opinion"}
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval/accuracy"] == report["accuracy"]
    rm = RewardModel.load(out["checkpoint"])
    train_recs, _ = split_by_prompt(load_records(str(data)), 0.2, 0)
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
    from rlhfkit.train.reward import load_records

    for bad, message in cases:
        broken = [dict(r) for r in rows]
        broken[1].update(bad)
        with pytest.raises(ValueError) as e:
            load_records(str(write_jsonl(tmp_path / "prefs.jsonl", broken)))
        assert message in str(e.value)
    with pytest.raises(ValueError, match="ties must be 'half' or 'drop'"):
        RewardConfig(ties="zero").validate()


# --- evaluation and the CLI --------------------------------------------------------------------------


def test_evaluate_groups_and_gold(rm):
    recs = [PreferenceRecord(prompt=p, chosen={"role": "assistant", "content": c},
                             rejected={"role": "assistant", "content": r},
                             metadata={"task": "t1" if i else "t2", "category": "x", "gold_chosen": 0.9,
                                       "gold_rejected": 0.1})
            for i, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED))]
    rep = evaluate(rm, recs)
    sc = rm.score(PROMPTS, CHOSEN, normalized=False) - rm.score(PROMPTS, REJECTED, normalized=False)
    assert rep["accuracy"] == pytest.approx((sc > 0).float().mean().item())
    assert rep["by_task"]["t1"]["n"] == 2 and rep["by_task"]["t2"]["n"] == 1
    assert rep["gold_accuracy"] == rep["accuracy"] and rep["label_gold_agreement"] == 1.0
    assert -1 <= rep["length_spearman"] <= 1 and 0 <= rep["ece"] <= 0.5


def test_reward_train_and_eval_commands(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_prefs(10))
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "rlhfkit.train.reward", "train", "--model", "tiny", "--data", data,
                          "--output-dir", run, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
                          "--lr", "1e-3", "--norm-samples", "16", "--progress", "false"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ckpt = run / "checkpoints" / "step-2"
    assert (run / "reward_eval.json").exists() and (ckpt / "config.json").exists()
    assert "rlhfkit_reward_norm" in json.loads((ckpt / "config.json").read_text())
    (run / "reward_eval.json").unlink()
    out = subprocess.run([sys.executable, "-m", "rlhfkit.train.reward", "eval", "--rm", ckpt, "--data", data],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((run / "reward_eval.json").read_text())
    assert report["pairs"] == 20 and 0 <= report["accuracy"] <= 1 and "ece" in report


def test_reward_command_errors(tmp_path, capsys):
    from rlhfkit.train.reward import main

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
    import os
    import signal

    rows = toy_prefs(8, per_prompt=3)  # keep 3 pairs of every other prompt, 1 of the rest: uneven rows
    data = write_jsonl(tmp_path / "p.jsonl", [r for i, r in enumerate(rows) if (i // 3) % 2 == 0 or i % 3 == 0])
    one = train(train_cfg(tmp_path / "one", data, max_steps=2, batch_size=8, micro_batch_size=2, lr=1e-2,
                          lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.0, norm_samples=4))
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(data), str(tmp_path / "two")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"two-process run timed out:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    record = json.loads((tmp_path / "two" / "processes.json").read_text())
    assert record["num_processes"] == 2 and record["backend"] == "gloo"
    assert record["losses"] == pytest.approx(losses(Path(one["run_dir"])), abs=1e-5)
