"""The reward model (rlhfkit.models.heads): head init, scoring layout (EOS read, padding ignored),
scoring a rollout's ids, the shared-prompt packed rows vs separate scoring (for every read-out),
normalisation, save/load (with the read-out; an old checkpoint reads last/last)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from rlhfkit.models.batching import pack_groups, pad_completions
from rlhfkit.models.heads import PackedScorer, RewardModel, init_head
from rlhfkit.models.readout import READOUT_KEY, ReadOut, resolve_readout

PROMPTS = [[{"role": "user", "content": "Hello there, how are you?"}], [{"role": "user", "content": "Name a fruit."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}]]
CHOSEN = ["I am fine, thanks for asking.", "Apple.", "Rome."]
REJECTED = ["Bad.", "A banana is a long yellow fruit that monkeys like.", "It is Rome, the eternal city."]


@pytest.fixture(scope="module")
def rm():
    return RewardModel.init_from("tiny", seed=1)


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
    loaded = source.parts[0][2].rm  # the ModelReward component holds the RewardModel
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


READOUTS = [("last", "last"), ("mean", "last"), ("mean", "1-2"), ("last", "0-1")]


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_separate_scoring(rm, attn, readout):
    """The training layout [prompt ; reply 1 ; ... ; reply n] with its 4D mask gives the same rewards
    as scoring every [prompt ; reply] separately (the naive equivalent) for each read-out; rows hold 3, 2
    and 1 replies. ``reply_start`` is each reply's first column (as reward_data.collate computes it)."""
    from rlhfkit.train.reward_data import Unit, collate

    rm.model.set_attn_implementation(attn)
    rm.set_readout(*readout)
    try:
        groups = [CHOSEN[:1] + REJECTED, [CHOSEN[1], REJECTED[0]], [CHOSEN[2]]]
        prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
        b = pack_groups([rm.tokenize(p, "x")[0] for p in prompts],
                        [[rm.tokenize(p, c)[1] for c in g] for p, g in zip(prompts, groups)], rm.tok.pad_token_id)
        assert b["reply_mask"].tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
        units = [Unit(rm.tokenize(p, "x")[0], [rm.tokenize(p, c)[1] for c in g], [], [], [])
                 for p, g in zip(prompts, groups)]
        start = collate(units, rm.tok.pad_token_id, "cpu")["reply_start"]
        assert start[0, 0].item() == len(units[0].prompt_ids) and start[0, 1].item() == b["read_at"][0, 0].item() + 1
        with torch.no_grad():
            got = PackedScorer(rm.model)(b["input_ids"], b["attention_mask"], b["position_ids"], b["read_at"], start)
        for r, (p, g) in enumerate(zip(prompts, groups)):
            want = rm.score([p] * len(g), g, normalized=False)
            assert torch.allclose(got[r, :len(g)], want, atol=1e-5), (r, got[r], want)
    finally:
        rm.model.set_attn_implementation("sdpa")
        rm.set_readout("last", "last")


def test_readouts_differ_and_mean_pooling_needs_reply_start(rm):
    """The read-outs are different features (a test of their equality across layouts could otherwise
    pass with one of them ignored); PackedScorer refuses "mean" without the replies' starts."""
    scores = {}
    try:
        for readout in READOUTS:
            rm.set_readout(*readout)
            scores[readout] = rm.score(PROMPTS, CHOSEN, normalized=False)
        for a in READOUTS:
            for b in READOUTS:
                assert a == b or not torch.allclose(scores[a], scores[b], atol=1e-4), (a, b)
        rm.set_readout("mean", "last")
        b = pack_groups([rm.tokenize(PROMPTS[0], "x")[0]], [[rm.tokenize(PROMPTS[0], CHOSEN[0])[1]]], rm.tok.pad_token_id)
        with pytest.raises(ValueError, match="needs reply_start"):
            PackedScorer(rm.model)(b["input_ids"], b["attention_mask"], b["position_ids"], b["read_at"])
    finally:
        rm.set_readout("last", "last")


def test_mean_readout_scores_a_rollout_by_ids_as_by_text(tiny, tmp_path):
    """A mean-pooled RM scores a rollout's ids (prompt columns inferred from the chat template's
    generation prompt, as RewardSource calls score_ids without them) as it scores the text."""
    from rlhfkit.rollout.engine import Sampler, SamplingConfig
    from rlhfkit.rollout.rewards import RewardSource

    policy, tok = tiny
    path = RewardModel.init_from("tiny", seed=3, pooling="mean", layers="1-2").save(tmp_path / "rm")
    source = RewardSource(f"rm:{path}", task=None, device=torch.device("cpu"), tokenizer=tok)
    loaded = source.parts[0][2].rm
    assert loaded.readout == ReadOut("mean", "1-2")
    r = Sampler(policy, tok, SamplingConfig(temperature=1.0, max_new_tokens=5)).sample(PROMPTS, seed=0, with_logps=False)
    by_text = loaded.score(r.prompts, r.completions, normalized=False)
    assert torch.allclose(source(r), by_text, atol=1e-4)
    width = r.prompt_ids.shape[1]
    assert torch.allclose(loaded.score_ids(r.input_ids, r.attention_mask, normalized=False),
                          loaded.score_ids(r.input_ids, r.attention_mask, normalized=False, prompt_width=width))
    # a wrong width (one prompt column read as reply) changes the score: the width is used
    assert not torch.allclose(loaded.score_ids(r.input_ids, r.attention_mask, normalized=False, prompt_width=width - 1),
                              loaded.score_ids(r.input_ids, r.attention_mask, normalized=False, prompt_width=width))


def test_resolve_readout_checks_its_options():
    assert resolve_readout("mean", "middle", 30) == ReadOut("mean", "8-24")
    assert resolve_readout("last", "12", 30) == ReadOut("last", "12-12")
    assert resolve_readout("mean", "middle", 2) == ReadOut("mean", "1-1")
    with pytest.raises(ValueError, match="pooling must be one of"):
        resolve_readout("max", "last", 30)
    with pytest.raises(ValueError, match="needs 0 <= A <= B <= 30"):
        resolve_readout("mean", "8-31", 30)
    with pytest.raises(ValueError, match="layers must be 'last', 'middle'"):
        resolve_readout("mean", "eight", 30)


def test_readout_is_saved_and_an_old_checkpoint_reads_last_token(tmp_path):
    rm = RewardModel.init_from("tiny", seed=4, pooling="mean", layers="middle")
    rm.save(tmp_path / "rm")
    back = RewardModel.load(str(tmp_path / "rm"))
    assert back.readout == ReadOut("mean", "1-1")
    assert torch.allclose(back.score(PROMPTS, CHOSEN, normalized=False), rm.score(PROMPTS, CHOSEN, normalized=False))
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    del cfg[READOUT_KEY]  # as written before the read-out setting existed
    (tmp_path / "rm" / "config.json").write_text(json.dumps(cfg))
    old = RewardModel.load(str(tmp_path / "rm"))
    assert old.readout == ReadOut("last", "last")
    ids = [sum(old.tokenize(PROMPTS[0], CHOSEN[0]), [])]
    with torch.no_grad():  # today's read-out: transformers' own head at the last token
        want = old.model(input_ids=torch.tensor(ids)).logits[0, 0]
    assert old.score(PROMPTS[:1], CHOSEN[:1], normalized=False)[0].item() == pytest.approx(want.item(), abs=1e-5)


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


def test_lora_reward_model_reads_the_same_features():
    """A LoRA-wrapped RM (peft; the head trained in full through modules_to_save) reads its read-out
    through the wrapper: before any update it scores as the bare model (B = 0) in both layouts, and the
    head it trains is peft's live copy, so a step on it moves the score."""
    from rlhfkit.models.lora import apply_lora

    bare = RewardModel.init_from("tiny", seed=5, pooling="mean", layers="1-2")
    want = bare.score(PROMPTS, CHOSEN, normalized=False)
    wrapped = RewardModel(apply_lora(bare.model, {"lora_r": 4}, head_names=("score",), seed=0), bare.tok)
    assert torch.allclose(wrapped.score(PROMPTS, CHOSEN, normalized=False), want, atol=1e-5)
    units_b = pack_groups([wrapped.tokenize(p, "x")[0] for p in PROMPTS],
                          [[wrapped.tokenize(p, c)[1]] for p, c in zip(PROMPTS, CHOSEN)], wrapped.tok.pad_token_id)
    start = units_b["read_at"] - torch.tensor([[len(wrapped.tokenize(p, c)[1])] for p, c in zip(PROMPTS, CHOSEN)]) + 1
    scorer = PackedScorer(wrapped.model)
    packed = scorer(units_b["input_ids"], units_b["attention_mask"], units_b["position_ids"], units_b["read_at"], start)
    assert torch.allclose(packed[:, 0], want, atol=1e-5)
    assert scorer.head.weight.requires_grad
    packed[:, 0].sum().backward()
    with torch.no_grad():
        scorer.head.weight -= 0.5 * scorer.head.weight.grad
    assert not torch.allclose(wrapped.score(PROMPTS, CHOSEN, normalized=False), want, atol=1e-3)
