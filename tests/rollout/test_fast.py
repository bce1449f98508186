"""The CPU engine (rlhfkit.rollout.fast.FastBackend) against transformers' ``generate`` (HFBackend).

At full precision (``quantize=False``) the engine runs transformers' Llama op for op, so greedy output
and seeded samples equal ``generate``'s exactly. Quantized (int8), its own log-probs stay within a
documented gap of the policy's (``completion_logps``); ``sync_weights`` makes it sample from new weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from rlhfkit.data.chat import tokenize_prompt
from rlhfkit.models.batching import CompletionBatch, completion_mask_from_ids, left_pad
from rlhfkit.models.logps import completion_logps
from rlhfkit.rollout.engine import HFBackend, SamplingConfig
from rlhfkit.rollout.fast import FastBackend
from rlhfkit.rollout.int8 import INT8_KERNELS, int8_kernel

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Tell me, at some length, what you think about rainy autumn afternoons."}],
    [{"role": "user", "content": "Name a colour."}],
]
GROUP = 2  # each prompt twice in a row, as a GRPO group arrives


class Tok:
    """The two ids the engines read, with a chosen EOS (the tiny model rarely emits the real one)."""

    def __init__(self, pad: int, eos: int):
        self.pad_token_id, self.eos_token_id = pad, eos


def encode(tok, prompts=PROMPTS, group=GROUP):
    seqs = [tokenize_prompt(tok, p, 512) for p in prompts for _ in range(group)]
    return left_pad(seqs, tok.pad_token_id)


def gap(model, ids, mask, out, sampler_logps, eos):
    """Mean |sampler log-prob - policy log-prob| over real completion tokens."""
    cm, _ = completion_mask_from_ids(out, eos)
    batch = CompletionBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=out.masked_fill(~cm, 0), completion_mask=cm)
    return (completion_logps(model, batch) - sampler_logps).abs()[cm].mean().item()


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama with init std 0.1: the default 0.02 greedily repeats one token in every row, which
    would make equality with ``generate`` an empty check. Read-only."""
    from rlhfkit.models import load_model

    model, tok = load_model("tiny:0.1", seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def eos_mid_batch(tiny):
    """A prompt batch and an EOS id that row 0's greedy completion emits after its first token and the last
    row's never does: one row ends mid-batch, another runs to the cap."""
    model, tok = tiny
    ids, mask = encode(tok)
    free = HFBackend(model, Tok(tok.pad_token_id, -1)).generate(ids, mask, SamplingConfig(0.0, max_new_tokens=12))
    candidates = [int(x) for x in free[0, 1:] if int(x) not in free[-1].tolist()]
    assert candidates, f"no token of row 0 missing from the last row: {free.tolist()}"
    return ids, mask, candidates[0]


def test_full_precision_greedy_equals_generate(tiny, eos_mid_batch):
    model, _ = tiny
    ids, mask, eos = eos_mid_batch
    tok = Tok(0, eos)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12)
    ref = HFBackend(model, tok).generate(ids, mask, sampling)
    out = FastBackend(model, tok, quantize=False).generate(ids, mask, sampling)
    assert torch.equal(out, ref)
    ended = (out == eos).any(1)
    assert ended[0] and not ended.all(), "the test needs one row to end mid-batch and one to run on"
    first = int((out[0] == eos).nonzero()[0])
    assert (out[0, first + 1:] == 0).all(), "after its EOS a row holds pad"


def test_full_precision_seeded_samples_equal_generate(tiny, eos_mid_batch):
    """Same warpers (temperature, top-k, top-p) in the same order, same RNG draws: the same samples."""
    model, _ = tiny
    ids, mask, eos = eos_mid_batch
    tok = Tok(0, eos)
    sampling = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=10)
    hf, fast = HFBackend(model, tok), FastBackend(model, tok, quantize=False)
    for seed in (0, 1):
        assert torch.equal(fast.generate(ids, mask, sampling, seed), hf.generate(ids, mask, sampling, seed))


def test_shared_prefill_equals_one_prefill_per_row(tiny):
    model, tok = tiny
    ids, mask = encode(tok, group=3)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=8)
    shared = FastBackend(model, tok, quantize=False)
    out = shared.generate(ids, mask, sampling)
    assert shared.last_stats["distinct_prompts"] == len(PROMPTS)
    assert torch.equal(out, FastBackend(model, tok, quantize=False, share_prefill=False).generate(ids, mask, sampling))


def test_full_precision_sampler_logps_are_the_policys(tiny):
    model, tok = tiny
    ids, mask = encode(tok)
    fast = FastBackend(model, tok, quantize=False)
    out = fast.generate(ids, mask, SamplingConfig(temperature=0.7, max_new_tokens=10), generator_seed=0)
    assert fast.last_logps.shape == out.shape
    cm, _ = completion_mask_from_ids(out, tok.eos_token_id)
    batch = CompletionBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=out, completion_mask=cm)
    torch.testing.assert_close(fast.last_logps, completion_logps(model, batch, temperature=0.7), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_quantized_seeds_reproduce(tiny, kernel):
    model, tok = tiny
    ids, mask = encode(tok)
    fast = FastBackend(model, tok, kernel=kernel)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    a, b, c = (fast.generate(ids, mask, sampling, s) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "the copies of a prompt must get different samples"


@pytest.mark.parametrize("fused", [True, False])
def test_the_vnni_kernel_samples_exactly_as_int_mm(tiny, fused):
    """Both take 8-bit activations with one scale a row: int_mm's round(x / s) and vnni's round(x / s) + 128
    with the zero point folded out give the same integer products, so the same samples and log-probs to the
    bit (a VNNI CPU may run either). Without VNNI the vnni kernel's exact scalar loop runs."""
    model, tok = tiny
    ids, mask = encode(tok)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'vnni' on a CPU without it: slow, says a warning
        for kernel in ("int_mm", "vnni"):
            fast = FastBackend(model, tok, kernel=kernel, fused=fused)
            runs.append((fast.generate(ids, mask, sampling, 3), fast.last_logps))
    (a, la), (b, lb) = runs
    assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_quantized_logp_gap_on_tiny(tiny, kernel):
    """Bound 0.05 nats: the random tiny model's activations have no outlier channels, so int8 is close."""
    model, tok = tiny
    ids, mask = encode(tok)
    fast = FastBackend(model, tok, kernel=kernel)
    out = fast.generate(ids, mask, SamplingConfig(temperature=1.0, max_new_tokens=16), generator_seed=0)
    assert 0 < gap(model, ids, mask, out, fast.last_logps, tok.eos_token_id) < 0.05


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_quantized_finished_row_never_reaches_the_live_rows(tiny, eos_mid_batch, kernel):
    """What a finished row would be fed (the pad id) cannot change the live rows. Finished rows leave the
    int8 batch; when activations shared one scale per tensor, a finished row fed pads set the live rows'
    rounding (on the bundled model it put the sampler 2-4 nats off the policy once a row ended)."""
    model, tok = tiny
    ids, mask, eos = eos_mid_batch
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12)
    outs = []
    for pad in (tok.pad_token_id, 7):
        fast = FastBackend(model, Tok(pad, eos), kernel=kernel)
        outs.append((fast.generate(ids, mask, sampling), fast.last_logps))
    (a, la), (b, lb) = outs
    ended = (a == eos).any(1)
    assert ended[0] and not ended.all(), "the batch must have a row that ends and rows that go on"
    live = ~ended
    assert torch.equal(a[live], b[live]) and torch.equal(la[live], lb[live])


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_sync_weights_samples_from_the_new_weights(kernel):
    """After a weight change, the int8 engine matches the new policy's log-probs only once synced
    (prefill and decode both read the int8 copies, which only a sync refreshes)."""
    from rlhfkit.models import load_model

    model, tok = load_model("tiny:0.1", seed=1)
    ids, mask = encode(tok)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    fast = FastBackend(model, tok, kernel=kernel)
    fast.generate(ids, mask, sampling, 0)
    with torch.no_grad():  # a large update: every weight moves
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    stale = fast.generate(ids, mask, sampling, 0)
    stale_gap = gap(model, ids, mask, stale, fast.last_logps, tok.eos_token_id)
    fast.sync_weights(model)
    synced = fast.generate(ids, mask, sampling, 0)
    synced_gap = gap(model, ids, mask, synced, fast.last_logps, tok.eos_token_id)
    assert synced_gap < 0.05 < 0.5 < stale_gap, (synced_gap, stale_gap)
    assert fast.sync_s > 0 and fast.last_stats["quantize_s"] > 0


def test_int8_kernel_is_chosen_once_and_a_bad_one_is_refused(tiny):
    assert int8_kernel() in INT8_KERNELS and int8_kernel() == int8_kernel()
    model, tok = tiny
    with pytest.raises(ValueError, match="kernel must be"):
        FastBackend(model, tok, kernel="cublas")


def test_unsupported_model_raises(tiny):
    model, tok = tiny
    other = copy.deepcopy(model)
    other.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="use HFBackend"):
        FastBackend(other, tok)


@pytest.mark.slow
def test_quantized_logp_gap_on_the_bundled_model():
    """Bound on the mean |log mu - log pi| per token, for the kernel this CPU gets: 0.2 nats with
    ``_int_mm``'s 8-bit activations (measured 0.11-0.14 at temperature 1; 0.35 with the earlier
    per-tensor 7-bit activations), 0.35 with fbgemm's 7-bit ones (CPUs without VNNI; measured 0.20-0.27):
    per-token activations after SmoothQuant, int8 prefill with each prompt's first token in fp32
    (docs/generation.md, "Accuracy"). Two calls: the first gathers the smoothing statistics with an fp32
    pass, the second (after a sync) quantizes with the kept ones."""
    from rlhfkit.data.tasks import get_task
    from rlhfkit.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    prompts = get_task("sentiment").prompts("train")[:8]
    ids, mask = encode(tok, prompts, group=1)
    fast = FastBackend(model, tok)
    bound = {"int_mm": 0.2, "fbgemm": 0.35, "avx2": 0.35, "vnni": 0.2}[fast.kernel]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=32)
    for seed in (0, 1):
        out = fast.generate(ids, mask, sampling, generator_seed=seed)
        assert gap(model, ids, mask, out, fast.last_logps, tok.eos_token_id) < bound
        fast.sync_weights(model)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_release_frees_the_int8_copies_and_the_next_call_rebuilds_them(tiny, kernel):
    model, tok = tiny
    ids, mask = encode(tok)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    fast = FastBackend(model, tok, kernel=kernel)
    a = fast.generate(ids, mask, sampling, 3)
    assert all(lin.ready for _, lin in fast._linears())
    fast.release()
    assert not any(lin.ready for _, lin in fast._linears()) and fast.stale
    assert torch.equal(fast.generate(ids, mask, sampling, 3), a)  # same weights, same statistics: same copies
    assert fast.last_stats["quantize_s"] > 0


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_state_dict_lets_a_new_engine_sample_as_the_old_one(tiny, kernel, tmp_path):
    """The statistics are the engine's history (a running max over every prompt it has prefilled): saved and
    loaded into a fresh engine (through a file read with weights_only, as a checkpoint is), the next call's
    log-probs are the old engine's bit for bit; a fresh engine without them quantizes otherwise."""
    model, tok = tiny
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
    history = [encode(tok, PROMPTS[:1]), encode(tok, PROMPTS[1:2], group=1)]
    ids, mask = encode(tok, PROMPTS[2:])
    old = FastBackend(model, tok, kernel=kernel)
    for h_ids, h_mask in history:
        old.generate(h_ids, h_mask, sampling, 0)
    torch.save(old.state_dict(), tmp_path / "engine.pt")
    out = old.generate(ids, mask, sampling, 7)

    new = FastBackend(model, tok, kernel=kernel)
    new.load_state_dict(torch.load(tmp_path / "engine.pt", weights_only=True))
    assert torch.equal(new.generate(ids, mask, sampling, 7), out)
    assert torch.equal(new.last_logps, old.last_logps)
    fresh = FastBackend(model, tok, kernel=kernel)
    fresh.generate(ids, mask, sampling, 7)
    assert not torch.equal(fresh.last_logps, old.last_logps)
    assert FastBackend(model, tok, kernel=kernel).state_dict() == {}  # nothing observed yet


def test_load_state_dict_names_the_bad_entry(tiny):
    model, tok = tiny
    fast = FastBackend(model, tok)
    fast.generate(*encode(tok, PROMPTS[:1]), SamplingConfig(temperature=1.0, max_new_tokens=2), 0)
    state = fast.state_dict()
    with pytest.raises(ValueError, match=r"ckpt/process-0.pt: 'layers.99.qkv' is not a linear group of this model"):
        fast.load_state_dict({**state, "layers.99.qkv": state["lm_head"]}, source="ckpt/process-0.pt")
    with pytest.raises(ValueError, match=r"'lm_head' must be a tensor of shape \(\d+,\)"):
        fast.load_state_dict({**state, "lm_head": state["lm_head"][:-1]})
    with pytest.raises(ValueError, match="statistics missing for 'layers.0.o'"):
        fast.load_state_dict({k: v for k, v in state.items() if k != "layers.0.o"})
    assert torch.equal(fast.state_dict()["lm_head"], state["lm_head"])  # a refused state changes nothing


def test_first_token_rows_one_fp32_row_per_distinct_id():
    ids = torch.tensor([[0, 0, 5, 6], [0, 5, 7, 8], [9, 1, 2, 3]])  # 0 = pad
    mask = ids != 0
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    rep, rows, inverse = FastBackend._first_token_rows(ids, positions, mask)
    assert rows.tolist() == [2, 5, 8]  # flattened (row * 4 + column) of each prompt's first real token
    flat = ids.reshape(-1)
    assert torch.equal(flat[rep[inverse]], flat[rows])  # each first row gets a representative with its id
    assert len(rep) == 2  # ids 5 and 9


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_exact_rows_of_an_int8_linear_are_the_fp32_product(kernel):
    import warnings

    from rlhfkit.rollout.int8 import QuantLinear

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    lin = QuantLinear([w1, w2], [None, None])
    with warnings.catch_warnings():  # fbgemm's quantized tensors are deprecated (FastBackend silences it too)
        warnings.simplefilter("ignore", UserWarning)
        lin.quantize(alpha=0.5, kernel=kernel)
    x = torch.randn(5, 8, generator=g)
    rows = (torch.tensor([1]), torch.tensor([1, 3]), torch.tensor([0, 0]))  # rows 1 and 3 from row 1's input
    y1, y2 = lin(x, exact_rows=rows)
    exact = torch.cat([torch.nn.functional.linear(x[1:2], w) for w in (w1, w2)], 1)[0]
    for r in (1, 3):
        torch.testing.assert_close(torch.cat([y1[r], y2[r]]), exact, rtol=0, atol=1e-6)
    approx = torch.cat([x @ w1.T, x @ w2.T], 1)
    assert (torch.cat([y1, y2], 1)[[0, 2, 4]] - approx[[0, 2, 4]]).abs().max() < 0.05 * approx.abs().max()


@pytest.mark.parametrize("idle_delta, expected", [(100, 2), (0, 1), (200, 4)])
def test_free_cpu_threads_counts_idle_cores(monkeypatch, idle_delta, expected):
    """4 allowed cores; between the two /proc/stat reads 200 jiffies pass, ``idle_delta`` of them
    idle (idle + iowait): half idle -> 2 threads, none -> 1 (never 0), all -> 4."""
    import io

    import rlhfkit.cli.cpu as threads

    reads = iter(["cpu 100 0 100 1000 0 0 0 0\n",
                  f"cpu {100 + (200 - idle_delta)} 0 100 {1000 + idle_delta} 0 0 0 0\n"])
    monkeypatch.setattr(threads, "open", lambda path: io.StringIO(next(reads)), raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.free_cpu_threads() == expected


def test_inverse_cdf_draws_follow_the_distribution_and_never_a_cut_token():
    """The quantized engine's draw (one uniform per row) against the exact probabilities: a chi-square
    test over 40,000 draws of a 6-token row, a top-k-cut row never yields a cut token, and a seed
    reproduces its draws. A draw off by one token (searchsorted's side) fails the chi-square."""
    from scipy.stats import chisquare

    from rlhfkit.rollout.draw import inverse_cdf

    p = torch.tensor([0.05, 0.0, 0.4, 0.15, 0.3, 0.1])
    n = 40_000
    draws = inverse_cdf(p.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6)
    assert counts[1] == 0
    keep = p > 0
    assert chisquare(counts[keep].numpy(), (p[keep] * n).numpy()).pvalue > 1e-3, counts
    cut = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(2_000, -1)
    assert set(inverse_cdf(cut, None).tolist()) == {1, 3}
    a, b = (inverse_cdf(p.expand(64, -1), torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_generate_with_the_fused_ops_matches_the_torch_ops(tiny, kernel):
    """The whole quantized engine, its decode step fused in C (the default) against its torch ops: the same
    arithmetic in another order, so the first decoded token's log-probs agree to the int8 rounding a
    last-bit difference can flip (measured 0.02 nats with fbgemm, 1e-6 with ``_int_mm``), and both stay
    as close to the policy (tests/rollout/test_decode_kernels.py checks each fused op on its own)."""
    model, tok = tiny
    ids, mask = encode(tok)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12)
    runs = {}
    for fused in (True, False):
        fast = FastBackend(model, tok, kernel=kernel, fused=fused)
        out = fast.generate(ids, mask, sampling)
        assert fast.last_stats["fused"] is fused
        runs[fused] = out, fast.last_logps, gap(model, ids, mask, out, fast.last_logps, tok.eos_token_id)
    (a, la, ga), (b, lb, gb) = runs[True], runs[False]
    assert torch.equal(a[:, :2], b[:, :2])
    assert (la[:, 1] - lb[:, 1]).abs().max() < 0.1
    assert 0 < ga < 0.05 and 0 < gb < 0.05


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_fused_prefill_of_a_one_token_prompt_reads_its_fp32_states(tiny, kernel):
    """A one-token prompt's last token is its first, whose states the fused prefill computes in fp32 apart
    from the int8 rows: its first log-prob is the torch path's (same fp32 states, same int8 lm head) to
    float rounding, while the longer prompts beside it agree to int8 rounding."""
    model, tok = tiny
    ids, mask = encode(tok)
    ids[0, :-1], mask[0, :-1] = tok.pad_token_id, False  # row 0: one real token
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=2)
    logps = {}
    for fused in (True, False):
        fast = FastBackend(model, tok, kernel=kernel, fused=fused)
        fast.generate(ids, mask, sampling)
        fast.sync_weights(model)  # the second call prefills in int8 (the first gathers statistics in fp32)
        fast.generate(ids, mask, sampling)
        logps[fused] = fast.last_logps[:, 0]
    assert (logps[True][0] - logps[False][0]).abs() < 1e-3
    assert (logps[True] - logps[False]).abs().max() < 0.1


def test_int8_kernel_can_be_asked_for(monkeypatch):
    from rlhfkit.rollout import int8

    monkeypatch.setattr(int8, "_KERNEL", None)
    monkeypatch.setenv("RLHFKIT_INT8_KERNEL", "avx2")
    assert int8.int8_kernel() == "avx2"
    monkeypatch.setattr(int8, "_KERNEL", None)
    monkeypatch.setenv("RLHFKIT_INT8_KERNEL", "cublas")
    with pytest.raises(ValueError, match="RLHFKIT_INT8_KERNEL must be one of"):
        int8.int8_kernel()


def test_the_kernel_is_picked_by_the_cpu_flags_where_they_are_listed(monkeypatch, tmp_path):
    """VNNI listed: the own vnni kernel where it is built with VNNI, else int_mm; not listed: the own avx2
    kernel where it is built, else fbgemm; no flags line (not Linux/x86): the timing decides. The flags, not
    a timing, so two runs of one seed sample alike."""
    from rlhfkit.rollout import int8

    monkeypatch.delenv("RLHFKIT_INT8_KERNEL", raising=False)
    vnni, plain, arm = (tmp_path / n for n in ("vnni", "plain", "arm"))
    vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_int8\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert int8.cpu_has_vnni(str(vnni)) is True and int8.cpu_has_vnni(str(plain)) is False
    assert int8.cpu_has_vnni(str(arm)) is None and int8.cpu_has_vnni(str(tmp_path / "absent")) is None
    timed = []
    monkeypatch.setattr(int8, "_int_mm_is_fast", lambda: timed.append(1) or True)
    cases = [(True, True, "vnni"), (True, False, "int_mm"), (False, True, "avx2"), (False, False, "fbgemm"),
             (None, False, "int_mm")]
    for has, built, want in cases:
        monkeypatch.setattr(int8, "_KERNEL", None)
        monkeypatch.setattr(int8, "cpu_has_vnni", lambda has=has: has)
        monkeypatch.setattr(int8, "avx2_available", lambda built=built: built)
        monkeypatch.setattr(int8, "vnni_available", lambda built=built: built)
        assert int8.int8_kernel() == want, (has, built)
    assert timed == [1]  # only where the flags are unknown


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_a_shared_prefix_runs_once_with_the_same_results(tiny, kernel):
    """The chat template's opening tokens, common to every prompt, run once in the fused prefill and their
    keys/values go to every row: each token's arithmetic is unchanged (same positions, same keys in the
    same order), so samples and log-probs are those of the prefill without it, over three calls (the
    smoothing statistics the prefill gathers included)."""
    model, tok = tiny
    ids, mask = encode(tok)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    runs = {}
    for share in (True, False):
        fast = FastBackend(model, tok, kernel=kernel, share_prefix=share)
        for seed in range(3):
            fast.sync_weights(model)
            out = fast.generate(ids, mask, sampling, seed)
        runs[share] = out, fast.last_logps, fast.last_stats["shared_prefix"]
    (a, la, shared), (b, lb, none) = runs[True], runs[False]
    assert shared >= 2 and none == 0
    assert torch.equal(a, b)
    # equal to the bit with each kernel (measured); fbgemm's input range is per tensor, so its bound is looser
    assert torch.equal(la, lb) if kernel != "fbgemm" else (la - lb).abs().max() < 0.05
