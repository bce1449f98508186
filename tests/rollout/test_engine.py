"""The sampling engine (rlhfkit.rollout.engine) on a tiny model: masks, padding, log-probs, select.

Layout under test (engine module docstring): prompts left-padded, completions right-padded with pad
after the first EOS, ``completion_mask`` True through that EOS, ``ended`` = an EOS was emitted, and
per-token log-probs from logits divided by the sampling temperature (tested in tests/models/test_logps.py).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlhfkit.models.batching import completion_mask_from_ids
from rlhfkit.rollout.engine import Rollout, Sampler, SamplingConfig

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "You are a careful assistant who answers in full sentences."},
     {"role": "user", "content": "Tell me, at some length, what you think about rainy autumn afternoons."}],
    [{"role": "user", "content": "Name a colour."}],
]


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
