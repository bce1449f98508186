"""The engine's fused decode ops (rlhfkit/rollout/decode_kernels.c) against the torch ops they replace.

Each C function is checked on random data against the torch expression ``FastBackend._decode_int8`` and
``QuantLinear.int8`` compute, for both GEMM kinds (fbgemm: fp32 in and out; ``_int_mm``: int8 in, int32
out); then a whole quantized generate call with the fused ops against the same engine with its torch ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.rollout import decode_kernels, int8
from rlhfkit.rollout.decode_kernels import ptr

MODES = [0, 1]  # 0: fbgemm's fp32 rows of max |x| = 1 (fp32 GEMM output); 1: int8 rows (int32 GEMM output)


@pytest.fixture(scope="module")
def lib():
    lib = decode_kernels.load()
    assert lib is not None, "the fused decode ops must build on this machine (a C compiler is installed)"
    return lib


def quant_ref(x: torch.Tensor, mode: int):
    """QuantLinear.int8's input side: the GEMM input and the per-row scale."""
    x_max = x.abs().amax(1, keepdim=True).clamp_min(1e-12)
    if mode == 0:
        return x / x_max, x_max.squeeze(1)
    s = x_max * (1 / 127)
    return (x / s).round().to(torch.int8), s.squeeze(1)


def gemm_out(b: int, n: int, mode: int, g: torch.Generator) -> torch.Tensor:
    if mode == 0:
        return torch.randn(b, n, generator=g) * 3
    return torch.randint(-20000, 20000, (b, n), generator=g, dtype=torch.int32)


def dequant_ref(y, wscale, xscale, bias=None):
    out = y.float() * wscale * xscale[:, None]
    return out + bias if bias is not None else out


def check_quantized(got, got_scale, x, mode):
    want, want_scale = quant_ref(x, mode)
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-5, atol=0)
    if mode == 0:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # rounding may land on the other side of .5 by float error: at most one step, rarely
        diff = (got.int() - want.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def empty_input(b, k, mode):
    return torch.empty(b, k, dtype=torch.float32 if mode == 0 else torch.int8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", [0, 1])
def test_prep(lib, mode, norm):
    g = torch.Generator().manual_seed(0)
    b, k = 5, 96
    x, w = torch.randn(b, k, generator=g), torch.rand(k, generator=g) + 0.5
    x[1, 7] = 40.0  # an outlier channel sets its row's scale only
    out, scale = empty_input(b, k, mode), torch.empty(b)
    lib.prep(ptr(x), ptr(w), 1e-5, norm, b, k, mode, ptr(out), ptr(scale), None)
    want_x = F.rms_norm(x, (k,), w, 1e-5) if norm else x * w
    check_quantized(out, scale, want_x, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_post_rotates_and_fills_the_cache_column(lib, mode, with_bias):
    g = torch.Generator().manual_seed(1)
    b, nh, nkv, d, length, col = 3, 6, 2, 16, 10, 7
    n = (nh + 2 * nkv) * d
    y, wscale, xscale = gemm_out(b, n, mode, g), torch.rand(n, generator=g), torch.rand(b, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    ang = torch.rand(b, 1, d, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    q = torch.empty(b, nh, d)
    kc, vc = torch.zeros(b, nkv, length, d), torch.zeros(b, nkv, length, d)
    seq, cols = torch.arange(b, dtype=torch.int32), torch.full((b,), col, dtype=torch.int32)  # a decode step
    lib.qkv_post(ptr(y), mode, ptr(wscale), ptr(xscale), ptr(bias), ptr(cos), ptr(sin), b, nh, nkv, d, ptr(q),
                 ptr(kc), ptr(vc), length, ptr(seq), ptr(cols))
    full = dequant_ref(y, wscale, xscale, bias)
    qk = full[:, :(nh + nkv) * d].view(b, nh + nkv, d)
    rotated = qk * cos + torch.cat((-qk[..., d // 2:], qk[..., :d // 2]), -1) * sin  # transformers' rotate_half
    torch.testing.assert_close(q, rotated[:, :nh], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kc[:, :, col], rotated[:, nh:], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vc[:, :, col], full[:, (nh + nkv) * d:].view(b, nkv, d), rtol=1e-6, atol=1e-6)
    others = torch.ones(length, dtype=torch.bool)
    others[col] = False
    assert not kc[:, :, others].any() and not vc[:, :, others].any()  # only the one column is written


@pytest.mark.parametrize("mode", MODES)
def test_residual_prep(lib, mode):
    g = torch.Generator().manual_seed(2)
    b, width = 4, 64
    y, wscale, xscale = gemm_out(b, width, mode, g), torch.rand(width, generator=g), torch.rand(b, generator=g)
    bias, w = torch.randn(width, generator=g), torch.rand(width, generator=g) + 0.5
    h = torch.randn(b, width, generator=g)
    want_h = h + dequant_ref(y, wscale, xscale, bias)
    out, scale = empty_input(b, width, mode), xscale.clone()  # the scale read and the one written share memory
    lib.residual_prep(ptr(y), mode, ptr(wscale), ptr(scale), ptr(bias), ptr(h), ptr(w), 1e-5, b, width, mode,
                      ptr(out), ptr(scale), None)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    check_quantized(out, scale, F.rms_norm(want_h, (width,), w, 1e-5), mode)


@pytest.mark.parametrize("mode", MODES)
def test_gate_up_post(lib, mode):
    g = torch.Generator().manual_seed(3)
    b, inter = 3, 80
    y, wscale = gemm_out(b, 2 * inter, mode, g), torch.rand(2 * inter, generator=g)
    xscale, inv_s = torch.rand(b, generator=g), torch.rand(inter, generator=g) + 0.5
    if mode == 0:
        y[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -1e-3])  # SiLU's far tails and its zero
    out, scale = empty_input(b, inter, mode), torch.empty(b)
    lib.gate_up_post(ptr(y), mode, ptr(wscale), ptr(xscale), ptr(inv_s), b, inter, mode, ptr(out), ptr(scale), None)
    full = dequant_ref(y, wscale, xscale)
    check_quantized(out, scale, F.silu(full[:, :inter]) * full[:, inter:] * inv_s, mode)


@pytest.mark.parametrize("mode", MODES)
def test_dequant_rows_writes_only_the_chosen_rows(lib, mode):
    g = torch.Generator().manual_seed(4)
    b, vocab = 2, 50
    y, wscale, xscale = gemm_out(b, vocab, mode, g), torch.rand(vocab, generator=g), torch.rand(b, generator=g)
    logits = torch.full((4, vocab), 7.0)
    rows = torch.tensor([3, 1])
    lib.dequant_rows(ptr(y), mode, ptr(wscale), ptr(xscale), None, b, vocab, ptr(rows), ptr(logits))
    want = dequant_ref(y, wscale, xscale)
    torch.testing.assert_close(logits[rows], want, rtol=1e-6, atol=1e-6)
    assert (logits[[0, 2]] == 7.0).all()


def test_build_reuses_the_compiled_library(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    first = decode_kernels.build()
    stamp = first.stat().st_mtime_ns
    assert decode_kernels.build() == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "kernels"


def test_build_without_a_compiler_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'no such compiler here' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="no such compiler here"):
        decode_kernels.build(str(bad))



# head size 16: the portable loop; 64 and 128: the AVX2 one (keys 8 at a time, here 2 blocks and a tail of 5)
@pytest.mark.parametrize("groups,d", [(1, 16), (3, 16), (3, 64), (2, 128)])
def test_attention_is_sdpa_over_the_unmasked_keys(lib, groups, d):
    g = torch.Generator().manual_seed(5)
    b, nkv, length, n = 3, 2, 24, 21  # the cache holds 24 columns, the step reads the first 21
    nh = nkv * groups
    q = torch.randn(b, nh, d, generator=g)
    kc, vc = torch.randn(b, nkv, length, d, generator=g), torch.randn(b, nkv, length, d, generator=g)
    mask = torch.ones(b, length + 2, dtype=torch.bool)  # wider than n: the row stride is the mask's own
    mask[0, :4] = False  # left padding
    mask[2, 5] = False
    out = torch.empty(b, nh, d)
    seq, col = torch.arange(b, dtype=torch.int32), torch.full((b,), n - 1, dtype=torch.int32)  # a decode step
    lib.attention(ptr(q), ptr(kc), ptr(vc), ptr(mask), mask.shape[1], b, nh, nkv, d, length, ptr(seq), ptr(col),
                  d ** -0.5, ptr(out))
    want = F.scaled_dot_product_attention(q.view(b, nkv, groups, d), kc[:, :, :n], vc[:, :, :n],
                                          attn_mask=mask[:, None, None, :n], scale=d ** -0.5)
    torch.testing.assert_close(out, want.reshape(b, nh, d), rtol=1e-5, atol=1e-5)


def test_quantize_rows_is_quantize_with_torch_ops(lib):
    from rlhfkit.rollout.int8 import QuantLinear

    g = torch.Generator().manual_seed(6)
    w = torch.randn(70, 48, generator=g)
    w[3, 5] = 30.0
    lin = QuantLinear([w], [None])
    lin.amax = torch.rand(48, generator=g) * 4
    lin.quantize(alpha=0.5, kernel="int_mm")  # through quantize_rows (the library is loaded)
    w8, scale = lin.w8t.t(), lin.w_scale
    s = 1 / lin.inv_s
    ws = w * s
    want_scale = ws.abs().amax(1) / 127
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    diff = (w8.int() - (ws / want_scale[:, None]).round().int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


@pytest.mark.parametrize("d", [8, 64])  # the portable loop, the AVX2 one
def test_attention_prefill_is_causal_sdpa_over_real_tokens(lib, d):
    """T queries a sequence (a prefill): token t reads keys 0..t that are real; a query with no real key to
    read (a left pad: the engine leaves them out, the kernel must not fail on one) gets zeros."""
    g = torch.Generator().manual_seed(7)
    s, t, nkv, groups = 2, 11, 2, 3
    nh = nkv * groups
    q = torch.randn(s * t, nh, d, generator=g)
    kc, vc = torch.randn(s, nkv, t, d, generator=g), torch.randn(s, nkv, t, d, generator=g)
    mask = torch.ones(s, t, dtype=torch.bool)
    mask[1, :2] = False  # sequence 1 is left-padded by two
    out = torch.empty(s * t, nh, d)
    seq, col = torch.arange(s * t, dtype=torch.int32) // t, torch.arange(s * t, dtype=torch.int32) % t
    lib.attention(ptr(q), ptr(kc), ptr(vc), ptr(mask), t, s * t, nh, nkv, d, t, ptr(seq), ptr(col), d ** -0.5,
                  ptr(out))
    causal = torch.ones(t, t, dtype=torch.bool).tril() & mask[:, None, None, :]  # (S, 1, T, T)
    qs = q.view(s, t, nkv, groups, d).permute(0, 2, 3, 1, 4).reshape(s, nkv, groups * t, d)
    want = F.scaled_dot_product_attention(qs, kc, vc, attn_mask=causal.repeat(1, 1, groups, 1), scale=d ** -0.5)
    want = want.view(s, nkv, groups, t, d).permute(0, 3, 1, 2, 4).reshape(s * t, nh, d)
    real = mask.reshape(-1)
    torch.testing.assert_close(out[real], want[real], rtol=1e-5, atol=1e-5)
    assert not out[~real].any()


def test_qkv_post_prefill_writes_each_token_to_its_column(lib):
    """A prefill's rows are the real tokens only: row r goes to column col[r] of sequence seq[r]'s cache."""
    g = torch.Generator().manual_seed(8)
    nh, nkv, d = 2, 1, 4
    seq, col = torch.tensor([0, 0, 0, 1, 1], dtype=torch.int32), torch.tensor([1, 2, 3, 2, 3], dtype=torch.int32)
    r, n = len(seq), (nh + 2 * nkv) * d
    y = torch.randn(r, n, generator=g)
    ones, unit = torch.ones(n), torch.ones(r)
    cos, sin = torch.ones(r, 1, d), torch.zeros(r, 1, d)  # no rotation: plain copies
    q, kc, vc = torch.empty(r, nh, d), torch.zeros(2, nkv, 5, d), torch.zeros(2, nkv, 5, d)
    lib.qkv_post(ptr(y), 0, ptr(ones), ptr(unit), None, ptr(cos), ptr(sin), r, nh, nkv, d, ptr(q), ptr(kc),
                 ptr(vc), 5, ptr(seq), ptr(col))
    rows = y.view(r, nh + 2 * nkv, d)
    torch.testing.assert_close(kc[seq.long(), 0, col.long()], rows[:, nh])
    torch.testing.assert_close(vc[seq.long(), 0, col.long()], rows[:, nh + 1])
    assert not kc[0, :, [0, 4]].any() and not kc[1, :, [0, 1, 4]].any()


def panels(w8: torch.Tensor) -> torch.Tensor:
    """gemm_u8s8's weight layout: panels of 16 rows, each group of 4 columns of the 16 rows side by side
    (rows padded to 16 and columns to 4 with zeros)."""
    n, k = w8.shape
    w = F.pad(w8, (0, -k % 4, 0, -n % 16))
    return w.view(w.shape[0] // 16, 16, w.shape[1] // 4, 4).permute(0, 2, 1, 3).reshape(-1)


# (M, N, K): ragged row tiles and panels, K tails of 1 to 3, a block of activation rows past the first
@pytest.mark.parametrize("shape", [(8, 96, 64), (37, 11, 102), (1, 3, 577), (6, 35, 1539), (700, 20, 576)])
def test_gemm_u8s8_is_the_exact_integer_product(lib, shape):
    m, n, k = shape
    g = torch.Generator().manual_seed(9)
    a = torch.randint(1, 128, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    rowsum = torch.nn.functional.pad(w.sum(1, dtype=torch.int32), (0, -n % 16))
    out, packed = torch.full((m, n), 7, dtype=torch.int32), panels(w)  # named: alive through the call
    lib.gemm_u8s8(ptr(a), ptr(packed), ptr(rowsum), m, n, k, ptr(out))
    assert torch.equal(out, (a.int() - 64) @ w.int().t())


@pytest.mark.parametrize("shape", [(8, 96, 64), (37, 11, 102), (1, 3, 577), (6, 35, 1539), (700, 20, 576),
                                   (15, 40, 64)])
def test_gemm_u8s8_vnni_is_the_exact_integer_product(lib, shape):
    """The AVX-512 VNNI tile (8 rows; 15 = a full tile and a 7-row rest) or, without VNNI, the scalar loop:
    8-bit activations with zero point 128, extremes included (no int16 step to saturate)."""
    m, n, k = shape
    g = torch.Generator().manual_seed(9)
    a = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    a[0, :8] = 255
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w[0, :8] = 127
    rowsum = torch.nn.functional.pad(w.sum(1, dtype=torch.int32), (0, -n % 16))
    out, packed = torch.full((m, n), 7, dtype=torch.int32), panels(w)
    lib.gemm_u8s8_vnni(ptr(a), ptr(packed), ptr(rowsum), m, n, k, ptr(out))
    assert torch.equal(out, (a.int() - 128) @ w.int().t())
    assert lib.rlhfkit_has_vnni() in (0, 1)


@pytest.mark.parametrize("shape", [(16, 16, 64), (40, 35, 128), (33, 96, 576), (17, 49, 64), (48, 20, 100)])
def test_gemm_u8s8_vnni_on_amx_tiles_is_the_same_exact_product(lib, shape):
    """Where the CPU has AMX, blocks of 16 rows run on its tiles (K a multiple of 64), the rest on the VNNI
    tile: with AMX on and off, the exact product (elsewhere both runs take the VNNI tile)."""
    m, n, k = shape
    g = torch.Generator().manual_seed(14)
    a = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    rowsum, packed = F.pad(w.sum(1, dtype=torch.int32), (0, -n % 16)), panels(w)
    want = (a.int() - 128) @ w.int().t()
    before = lib.rlhfkit_amx(-1)
    try:
        for on in (1, 0):
            assert lib.rlhfkit_amx(on) in ((0, 1) if on else (0,))
            out = torch.full((m, n), 7, dtype=torch.int32)
            lib.gemm_u8s8_vnni(ptr(a), ptr(packed), ptr(rowsum), m, n, k, ptr(out))
            assert torch.equal(out, want), f"AMX {'on' if on else 'off'}"
    finally:
        lib.rlhfkit_amx(before)


@pytest.mark.parametrize("mode", [2, 3])
def test_prep_writes_the_own_kernels_uint8_inputs(lib, mode):
    """Mode 2 (avx2): round(x / s) + 64, s = max |x| / 63; mode 3 (vnni): round(x / s) + 128, s = max |x| / 127."""
    g = torch.Generator().manual_seed(13)
    b, k = 4, 70
    x = torch.randn(b, k, generator=g)
    x[2, 5] = -30.0
    out, scale, ones = torch.empty(b, k, dtype=torch.uint8), torch.empty(b), torch.ones(k)  # named: alive in the call
    lib.prep(ptr(x), ptr(ones), 1e-5, 0, b, k, mode, ptr(out), ptr(scale), None)
    bits = 63 if mode == 2 else 127
    s = x.abs().amax(1) / bits
    torch.testing.assert_close(scale, s, rtol=1e-6, atol=0)
    diff = (out.int() - ((x / s[:, None]).round() + bits + 1).int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01 and int(out[2, 5]) == 1  # -max |x| -> 1


def test_quantize_rows_sums_each_row(lib):
    g = torch.Generator().manual_seed(10)
    w = torch.randn(9, 40, generator=g)
    w8, scale, rowsum = torch.empty(9, 40, dtype=torch.int8), torch.empty(9), torch.empty(9, dtype=torch.int32)
    lib.quantize_rows(ptr(w), None, 9, 40, ptr(w8), ptr(scale), ptr(rowsum), 1, -1)
    assert torch.equal(rowsum, w8.sum(1, dtype=torch.int32))
    assert lib.rlhfkit_has_avx2() in (0, 1)


def test_avx2_weights_are_rounded_straight_into_the_panels(lib):
    """QuantLinear.quantize(kernel='avx2') writes the kernel's layout in its rounding pass: the plain int8
    weight's bytes in panels, for a group of two weights (rows 18 + 7 = 25, K = 10 not a multiple of 4)."""
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(18, 10, generator=g), torch.randn(7, 10, generator=g)]
    plain, own = int8.QuantLinear(weights, [None, None]), int8.QuantLinear(weights, [None, None])
    amax = torch.rand(10, generator=g) + 0.1
    vnni = int8.QuantLinear(weights, [None, None])
    for lin, kernel in ((plain, "int_mm"), (own, "avx2"), (vnni, "vnni")):
        lin.amax = amax  # a smoothing vector too
        lin.quantize(alpha=0.5, kernel=kernel)
    w8 = plain.w8t.t()
    for lin in (own, vnni):  # the two own kernels share the layout
        assert torch.equal(lin.w8, panels(w8)) and torch.equal(lin.w_scale, plain.w_scale)
        assert torch.equal(lin.rowsum, F.pad(w8.sum(1, dtype=torch.int32), (0, 7)))


def test_col_amax_is_the_column_max_of_abs_over_a_group(lib):
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(13, 21, generator=g), torch.randn(5, 21, generator=g)  # K = 21: a vector tail
    b[2, 20] = -9.0  # a negative extreme
    out = torch.full((21,), 0.5)
    lib.col_amax(ptr(a), 13, 21, ptr(out))
    lib.col_amax(ptr(b), 5, 21, ptr(out))
    assert torch.equal(out, torch.cat([a, b]).abs().amax(0).clamp_min(0.5)) and out[20] == 9.0
