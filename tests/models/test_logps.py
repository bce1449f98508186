"""The one log-prob path (rlhfkit.models.logps.completion_logps) against its naive equivalent.

Both layouts ("padded", "shared") must give, for every completion token, what a plain forward of
that one unpadded ``prompt + completion`` gives: ``log_softmax(logits / T)`` gathered at the token.
The shared layout must also give the padded layout's gradients (the 4D mask isolates sequences).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlhfkit.data.chat import tokenize_prompt
from rlhfkit.models import load_model
from rlhfkit.models.batching import CompletionBatch, pad_completions
from rlhfkit.models.logps import completion_logps
from rlhfkit.rollout.engine import Sampler, SamplingConfig

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


def naive_logps(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """One unpadded sequence, full forward, log_softmax of every position, gather the completion tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (P + C, V)
    logps = torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, ids[0, 1:, None])[:, 0]  # (P + C - 1,)
    return logps[len(prompt_ids) - 1:]  # position t predicts token t + 1: the last C belong to the completion


def random_ids(g: torch.Generator, lengths) -> list[list[int]]:
    return [torch.randint(300, 5000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_both_layouts_equal_a_naive_full_forward(peaked, layout, temperature):
    """Left-padded prompts, right-padded ragged completions, logits only at completion positions ==
    one unpadded sequence at a time through a plain forward, to 1e-5; masked entries are exactly 0."""
    model, tok = peaked
    g = torch.Generator().manual_seed(0)
    prompts, completions = random_ids(g, (5, 9, 1, 3)), random_ids(g, (4, 1, 7, 2))
    batch = pad_completions(prompts, completions, tok.pad_token_id)
    with torch.no_grad():
        got = completion_logps(model, batch, layout=layout, temperature=temperature)
    assert got.shape == (4, 7)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        # rtol: the peaked model gives log-probs down to ~-20, where fp32 rounding alone is ~2e-6
        torch.testing.assert_close(got[b, :len(c)], naive_logps(model, p, c, temperature), atol=1e-5, rtol=1e-6)
        assert (got[b, len(c):] == 0).all()
    if temperature != 1.0:  # teeth: the same tokens at T=1 differ by far more than the tolerance
        assert (naive_logps(model, prompts[0], completions[0], 1.0) - got[0, :4]).abs().max() > 1e-2


def test_sampler_logps_use_the_sampling_temperature(peaked):
    model, tok = peaked
    sampler = Sampler(model, tok, SamplingConfig(temperature=0.7, max_new_tokens=5))
    r = sampler.sample(PROMPTS, seed=0)
    for i in range(len(PROMPTS)):
        p = r.prompt_ids[i][r.prompt_mask[i]].tolist()
        c = r.completion_ids[i][r.completion_mask[i]].tolist()
        # rtol as above (this comparison failed at rtol=0 by 1.3e-5 on a log-prob of -5.3 before the move too)
        torch.testing.assert_close(r.logps[i, :len(c)], naive_logps(model, p, c, 0.7), atol=1e-5, rtol=1e-6)


def test_left_padding_does_not_change_a_prompts_completion_logps(peaked):
    model, tok = peaked
    completion = [400, 500, 600, tok.eos_token_id]
    short, long_ = tokenize_prompt(tok, PROMPTS[0]), tokenize_prompt(tok, PROMPTS[1])
    alone = completion_logps(model, pad_completions([short], [completion], tok.pad_token_id))
    padded = pad_completions([short, long_], [completion, completion], tok.pad_token_id)
    assert not padded.prompt_mask[0].all()  # the short prompt is padded
    batched = completion_logps(model, padded)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)
    assert (batched[1] - batched[0]).abs().max() > 1e-2  # the other prompt conditions differently


@pytest.mark.parametrize("row_tokens", [None, 40])
def test_shared_layout_equals_the_padded_batch_with_gradients(peaked, row_tokens):
    """GRPO-shaped batch (each prompt K=3 times, shuffled, ragged completions): the shared-prompt,
    padding-free layout gives the padded batch's log-probs, entropies and gradients; with a 40-token row
    budget the batch is split into several packed rows and still matches."""
    model, tok = peaked
    model = copy.deepcopy(model).train()
    sampler = Sampler(model, tok, SamplingConfig(temperature=0.7, max_new_tokens=6))
    prompts = [PROMPTS[i] for i in (0, 2, 0, 1, 2, 0, 1, 2, 1)]
    g = torch.Generator().manual_seed(1)
    completions = [c + [tok.eos_token_id] for c in random_ids(g, (3, 0, 5, 2, 1, 4, 5, 2, 3))]
    prompt_ids, prompt_mask = sampler.encode_prompts(prompts)
    width = max(map(len, completions)) + 2  # wider than any completion, as a rollout batch can be
    c_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completions])
    c_mask = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in completions])
    batch = CompletionBatch(prompt_ids, prompt_mask, c_ids, c_mask)
    results = {}
    for layout in ("padded", "shared"):
        model.zero_grad(set_to_none=True)
        logps, entropy = completion_logps(model, batch, layout=layout, temperature=0.7, with_entropy=True,
                                          max_row_tokens=row_tokens)
        assert logps.shape == entropy.shape == c_ids.shape
        assert logps.requires_grad and not entropy.requires_grad  # entropy is a metric: no graph kept for it
        logps.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[layout] = (logps, entropy, grads)
    (lp0, h0, g0), (lp1, h1, g1) = results["padded"], results["shared"]
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=0)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):  # float sums in another order: compare each parameter's gradient as a whole
        assert (b - a).norm() <= 1e-4 * a.norm() + 1e-6
    # teeth: a completion scored after another prompt differs by far more than the tolerance
    swapped = completion_logps(model, dataclasses.replace(batch, prompt_ids=prompt_ids.roll(1, 0),
                                                          prompt_mask=prompt_mask.roll(1, 0)),
                               layout="shared", temperature=0.7)
    assert (swapped - lp1).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompts_equal_separate_prompts(attn):
    """Prompts repeated in a batch are computed once under a 4D mask (sdpa, eager); a model whose
    attention cannot take that mask (here: one that declares sliding-window layers) gets each sequence
    its own prompt copy in the packed row. Both equal the naive values."""
    model, tok = load_model("tiny", seed=2)
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(1)
    uniq = random_ids(g, (5, 9, 3))
    prompts = [uniq[0], uniq[1], uniq[0], uniq[2], uniq[1], uniq[0]]
    completions = random_ids(g, (4, 1, 7, 2, 5, 3))
    batch = pad_completions(prompts, completions, tok.pad_token_id)
    with torch.no_grad():
        shared = completion_logps(model, batch, layout="shared")
        model.config.sliding_window, model.config.use_sliding_window = 4096, True  # Llama ignores it
        separate = completion_logps(model, batch, layout="shared")
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        torch.testing.assert_close(shared[b, :len(c)], naive_logps(model, p, c), atol=1e-5, rtol=0)


def test_bad_logps_input(tiny):
    model, tok = tiny
    batch = pad_completions([[1, 2], [3]], [[4], []], tok.pad_token_id)
    with pytest.raises(ValueError, match="at least one prompt and one completion token"):
        completion_logps(model, batch)
    with pytest.raises(ValueError, match="layout must be one of"):
        completion_logps(model, pad_completions([[1]], [[2]], 0), layout="ragged")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pad_completions([[1], [2]], [[3]], 0)
