"""The sampling engine (rlhfkit.rollout.engine) on a tiny model: masks, padding, log-probs, select.

Layout under test (engine module docstring): prompts left-padded, completions right-padded with pad
after the first EOS, ``completion_mask`` True through that EOS, ``ended`` = an EOS was emitted, and
per-token log-probs from logits divided by the sampling temperature.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlhfkit.models import load_model
from rlhfkit.rollout.engine import (
    Rollout,
    Sampler,
    SamplingConfig,
    completion_logps,
    completion_mask_from_ids,
)

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "You are a careful assistant who answers in full sentences."},
     {"role": "user", "content": "Tell me, at some length, what you think about rainy autumn afternoons."}],
    [{"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def peaked():
    """A 'tiny:0.5' model (init std 0.5): peaked next-token distributions, so a log-prob computed at
    the wrong temperature or position is off by far more than the 1e-5 tolerance (with the default
    init the distribution is near-uniform over 49k tokens and such errors hide)."""
    model, tok = load_model("tiny:0.5", seed=0)
    return model.eval(), tok


class FixedBackend:
    """A backend that 'generates' given rows, as HF generate returns them (anything after an EOS)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = torch.tensor(rows, dtype=torch.long) if rows and rows[0] else torch.zeros((len(rows), 0), dtype=torch.long)
        self.calls = []

    def generate(self, prompt_ids, prompt_mask, sampling, generator_seed=None):
        self.calls.append((prompt_ids, prompt_mask, generator_seed))
        return self.rows.clone()

    def sync_weights(self, model):
        pass


def naive_completion_logps(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> torch.Tensor:
    """One unpadded sequence, full forward, log_softmax of every position, gather the completion tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (P + C, V)
    logps = torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, ids[0, 1:, None])[:, 0]  # (P + C - 1,)
    return logps[len(prompt_ids) - 1:]  # position t predicts token t + 1: the last C belong to the completion


# --- masks, ended, padding -------------------------------------------------------------------------


def test_completion_mask_runs_through_the_first_eos():
    eos = 7
    ids = torch.tensor([[1, 2, eos, 3, eos],   # EOS mid-row, a second EOS later: the first one counts
                        [eos, 4, 4, 4, 4],     # EOS as the very first token
                        [1, 2, 3, 4, 5],       # no EOS: truncated
                        [1, 2, 3, 4, eos]])    # EOS as the last possible token
    mask, ended = completion_mask_from_ids(ids, eos)
    assert mask.tolist() == [[True, True, True, False, False],
                             [True, False, False, False, False],
                             [True, True, True, True, True],
                             [True, True, True, True, True]]
    assert ended.tolist() == [True, True, False, True]
    assert mask.dtype == torch.bool and ended.dtype == torch.bool


def test_sampler_masks_pads_after_eos_and_sets_ended(tiny):
    model, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert pad != eos
    a, b = 300, 301  # arbitrary non-special tokens
    rows = [[a, eos, b, b, eos],  # garbage after the EOS must become pad and be masked out
            [a, b, a, b, a],      # truncated
            [eos, a, a, a, a]]
    sampler = Sampler(model, tok, SamplingConfig(temperature=1.0, max_new_tokens=5), backend=FixedBackend(rows))
    r = sampler.sample(PROMPTS, seed=0)
    assert r.completion_mask.tolist() == [[True, True, False, False, False],
                                          [True] * 5,
                                          [True, False, False, False, False]]
    assert r.ended.tolist() == [True, False, True]
    assert r.completion_ids.tolist() == [[a, eos, pad, pad, pad], [a, b, a, b, a], [eos, pad, pad, pad, pad]]
    assert r.completions[2] == ""  # only the EOS: nothing to decode
    assert r.completions[0] == tok.decode([a])
    # prompts are left-padded: the mask is a suffix of each row and the ids under it are the prompt
    for row, m, p in zip(r.prompt_ids, r.prompt_mask, PROMPTS):
        n = int(m.sum())
        assert m[-n:].all() and not m[:-n].any()
        assert (row[:-n] == pad).all()
        assert row[-n:].tolist() == tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"]


def test_sampler_gives_an_empty_generation_one_eos(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok, SamplingConfig(max_new_tokens=4), backend=FixedBackend([[], []]))
    r = sampler.sample(PROMPTS[:2])
    assert r.completion_ids.tolist() == [[tok.eos_token_id]] * 2
    assert r.completion_mask.all() and r.ended.all()


@pytest.fixture(scope="module")
def eos_prone(tiny):
    """The tiny model with its LM head replaced by a constant distribution (zero weight, a bias):
    EOS with probability 0.2, four ordinary tokens with 0.2 each, everything else ~0. Sampling then
    ends at random positions, so HF generate's own post-EOS padding and early stop are exercised."""
    model, tok = tiny
    m = copy.deepcopy(model)
    hidden, vocab = m.config.hidden_size, m.get_output_embeddings().weight.shape[0]
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[[tok.eos_token_id, 300, 301, 302, 303]] = 0.0
    m.lm_head = head
    return m.eval(), tok


def test_hf_sampling_eos_mask_and_pad_invariants(eos_prone):
    model, tok = eos_prone
    eos, pad = tok.eos_token_id, tok.pad_token_id
    sampler = Sampler(model, tok, SamplingConfig(temperature=1.0, max_new_tokens=6))
    r = sampler.sample([PROMPTS[i % 3] for i in range(16)], seed=3)
    ids, mask = r.completion_ids, r.completion_mask
    assert r.ended.any() and not r.ended.all(), "seed 3 should give both ended and truncated rows"
    for row, m, ended in zip(ids.tolist(), mask.tolist(), r.ended.tolist()):
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n)  # a prefix
        assert ended == (eos in row[:n])
        if ended:
            assert row[n - 1] == eos and eos not in row[:n - 1]  # the mask ends exactly at the first EOS
            assert all(t == pad for t in row[n:])
        else:
            assert n == len(row) == 6  # truncated rows are full width
        assert set(row[:n]) <= {eos, 300, 301, 302, 303}
    # the sampler's log-probs: log 0.2 for every real token of this constant distribution
    torch.testing.assert_close(r.logps[mask], torch.full((int(mask.sum()),), float(torch.tensor(0.2).log())),
                               atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(eos_prone):
    model, tok = eos_prone
    sampler = Sampler(model, tok, SamplingConfig(temperature=1.0, max_new_tokens=6))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    r1 = sampler.sample(PROMPTS, seed=5)
    after = torch.rand(3)
    r2 = sampler.sample(PROMPTS, seed=5)
    r3 = sampler.sample(PROMPTS, seed=6)
    assert torch.equal(before, after)
    assert torch.equal(r1.completion_ids, r2.completion_ids)
    assert not torch.equal(r1.completion_ids, r3.completion_ids)


# --- log-probs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equal_a_naive_full_forward(peaked, temperature):
    """Batched (left-padded prompts, right-padded completions, logits_to_keep) == one unpadded
    sequence at a time through a plain forward + log_softmax(logits / T) + gather, to 1e-5."""
    model, tok = peaked
    sampler = Sampler(model, tok, SamplingConfig(temperature=temperature, max_new_tokens=6))
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(300, 5000, (n,), generator=g).tolist() + [tok.eos_token_id] for n in (4, 1, 2)]
    prompt_ids, prompt_mask = sampler.encode_prompts(PROMPTS)
    width = max(map(len, completions))
    c_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completions])  # right-padded
    c_mask = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in completions])
    got = completion_logps(model, prompt_ids, prompt_mask, c_ids, c_mask, temperature)
    assert got.shape == c_ids.shape
    for i, c in enumerate(completions):
        p = prompt_ids[i][prompt_mask[i]].tolist()
        want = naive_completion_logps(model, p, c, temperature)
        torch.testing.assert_close(got[i, :len(c)], want, atol=1e-5, rtol=0)
    # the check has teeth: at T=1 the same tokens' log-probs differ from T=0.7 by far more than 1e-5
    if temperature != 1.0:
        other = naive_completion_logps(model, prompt_ids[0][prompt_mask[0]].tolist(), completions[0], 1.0)
        assert (other - got[0, :len(completions[0])]).abs().max() > 1e-2


def test_sampler_logps_use_the_sampling_temperature(peaked):
    model, tok = peaked
    sampler = Sampler(model, tok, SamplingConfig(temperature=0.7, max_new_tokens=5))
    r = sampler.sample(PROMPTS, seed=0)
    for i in range(len(PROMPTS)):
        p = r.prompt_ids[i][r.prompt_mask[i]].tolist()
        c = r.completion_ids[i][r.completion_mask[i]].tolist()
        torch.testing.assert_close(r.logps[i, :len(c)], naive_completion_logps(model, p, c, 0.7), atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_prompts_completion_logps(peaked):
    model, tok = peaked
    sampler = Sampler(model, tok, SamplingConfig(temperature=1.0))
    short, long_ = PROMPTS[0], PROMPTS[1]
    completion = torch.tensor([[400, 500, 600, tok.eos_token_id]])
    c_mask = torch.ones_like(completion, dtype=torch.bool)
    alone_ids, alone_mask = sampler.encode_prompts([short])
    batch_ids, batch_mask = sampler.encode_prompts([short, long_])
    assert batch_ids.shape[1] > alone_ids.shape[1] and not batch_mask[0].all()  # the short prompt is padded
    alone = completion_logps(model, alone_ids, alone_mask, completion, c_mask)
    batched = completion_logps(model, batch_ids, batch_mask, completion.repeat(2, 1), c_mask.repeat(2, 1))
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)
    assert (batched[1] - batched[0]).abs().max() > 1e-2  # the other prompt conditions differently


@pytest.mark.parametrize("row_tokens", [None, 40])
def test_shared_prompt_layout_equals_the_padded_batch(peaked, monkeypatch, row_tokens):
    """GRPO-shaped batch (each prompt K=3 times, shuffled, ragged completions): the shared-prompt,
    padding-free layout gives the padded batch's log-probs, entropies and gradients; with a 40-token row
    budget the batch is split into several packed rows and still matches."""
    import rlhfkit.rollout.engine as engine

    if row_tokens:
        monkeypatch.setattr(engine, "SHARED_ROW_TOKENS", row_tokens)
    model, tok = peaked
    model = copy.deepcopy(model).train()
    sampler = Sampler(model, tok, SamplingConfig(temperature=0.7, max_new_tokens=6))
    prompts = [PROMPTS[i] for i in (0, 2, 0, 1, 2, 0, 1, 2, 1)]
    g = torch.Generator().manual_seed(1)
    completions = [torch.randint(300, 5000, (n,), generator=g).tolist() + [tok.eos_token_id]
                   for n in (3, 0, 5, 2, 1, 4, 5, 2, 3)]
    prompt_ids, prompt_mask = sampler.encode_prompts(prompts)
    width = max(map(len, completions)) + 2  # wider than any completion, as a rollout batch can be
    c_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completions])
    c_mask = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in completions])
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logps, entropy = completion_logps(model, prompt_ids, prompt_mask, c_ids, c_mask, 0.7, with_entropy=True,
                                          share_prompts=share)
        assert logps.shape == entropy.shape == c_ids.shape
        (logps * c_mask).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[share] = (logps * c_mask, entropy * c_mask, grads)
    (lp0, h0, g0), (lp1, h1, g1) = results[False], results[True]
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=0)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):  # float sums in another order: compare each parameter's gradient as a whole
        assert (b - a).norm() <= 1e-4 * a.norm() + 1e-6
    # teeth: a completion scored after another prompt differs by far more than the tolerance
    swapped = completion_logps(model, prompt_ids.roll(1, 0), prompt_mask.roll(1, 0), c_ids, c_mask, 0.7,
                               share_prompts=True)
    assert ((swapped - lp1) * c_mask).abs().max() > 1e-2


# --- Rollout.select --------------------------------------------------------------------------------


def test_rollout_select_slices_every_field_alike():
    B, P, C = 5, 3, 4
    g = torch.Generator().manual_seed(0)
    r = Rollout(
        prompts=[[{"role": "user", "content": f"p{i}"}] for i in range(B)],
        completions=[f"c{i}" for i in range(B)],
        prompt_ids=torch.arange(B * P).view(B, P), prompt_mask=torch.rand(B, P, generator=g) > 0.3,
        completion_ids=torch.arange(B * C).view(B, C) + 100, completion_mask=torch.rand(B, C, generator=g) > 0.3,
        ended=torch.tensor([True, False, True, False, True]),
        logps=torch.randn(B, C, generator=g), ref_logps=torch.randn(B, C, generator=g),
        values=torch.randn(B, C, generator=g), scores=torch.randn(B, generator=g), rewards=torch.randn(B, C, generator=g),
        extras={"returns": torch.randn(B, C, generator=g), "gold": torch.randn(B, generator=g), "tags": list("abcde"),
                "note": "kept as is"},
    )
    unset = [f.name for f in dataclasses.fields(Rollout) if getattr(r, f.name) is None]
    assert not unset, f"give every field a value so select is tested on it: {unset}"
    for idx in (torch.tensor([3, 0, 4]), [3, 0, 4]):
        sub = r.select(idx)
        rows = [3, 0, 4]
        for f in dataclasses.fields(Rollout):
            if f.name == "extras":
                continue
            full, part = getattr(r, f.name), getattr(sub, f.name)
            if isinstance(full, torch.Tensor):
                assert torch.equal(part, full[rows]), f.name
            else:
                assert part == [full[i] for i in rows], f.name
        assert torch.equal(sub.extras["returns"], r.extras["returns"][rows])
        assert torch.equal(sub.extras["gold"], r.extras["gold"][rows])
        assert sub.extras["tags"] == ["d", "a", "e"] and sub.extras["note"] == "kept as is"
        assert torch.equal(sub.input_ids, r.input_ids[rows]) and torch.equal(sub.attention_mask, r.attention_mask[rows])
    bool_sub = r.select(r.ended)
    assert bool_sub.completions == ["c0", "c2", "c4"] and torch.equal(bool_sub.scores, r.scores[r.ended])
