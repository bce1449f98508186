"""The CPU engine's int8 prefill and decode step on the fused C ops (decode_kernels.c).

:class:`rlhfkit.rollout.fast.FastBackend` runs these when every part is quantized and the C library is
built; they compute what its torch path (``FastBackend._forward`` with ``exact_rows``, ``_decode_int8``)
computes, in the same order, with each stretch between two int8 GEMMs one C call. Both share
:func:`_layers`, the decoder stack: per layer the four GEMMs (torch's kernels, ``QuantLinear.gemm``) and six
calls (``prep``, ``qkv_post``, ``attention``, ``residual_prep``, ``gate_up_post``, ``residual_prep``).
docs/generation.md, item 7, has the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.rollout.decode_kernels import ptr

# how the fused ops meet each GEMM: input mode, output type, input dtype (decode_kernels.c's header).
# fbgemm: fp32 rows of max 1 in, fp32 out; _int_mm: int8 in, int32 out; avx2: uint8 (zero point 64) in, int32 out;
# vnni: uint8 (zero point 128) in, int32 out
GEMM_IO = {"fbgemm": (0, 0, torch.float32), "int_mm": (1, 1, torch.int8), "avx2": (2, 1, torch.uint8),
           "vnni": (3, 1, torch.uint8)}


def _layers(eng, lib, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches, mask: torch.Tensor,
            seq: torch.Tensor, col: torch.Tensor, on_kv=None, seen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder stack over ``h`` (R, H), one token a row (updated in place, the residual stream);
    returns the lm head's input rows (R, H) and their scales (R,).

    Row ``r`` is a token of sequence ``seq[r]`` at column ``col[r]`` (both (R,) int32): its key/value go to
    that column of ``caches`` (per layer (S, nkv, L, d)) and it attends to keys ``[0, col[r]]`` of its
    sequence where ``mask`` (S, >= max col + 1) holds. ``on_kv(i, k, v)``
    runs after layer ``i`` wrote its keys/values, before attention reads them. ``seen(lin, x, smoothed)``,
    when given, receives each linear's unrounded input (the smoothing statistics)."""
    r, d, nh, nkv = h.shape[0], eng.head_dim, eng.n_heads, eng.n_kv
    mode, ytype, dtype = GEMM_IO[eng.kernel]
    width, inter = h.shape[1], eng.layers[0].down.weights[0].shape[1]
    buf = torch.empty(r * max(width, inter, nh * d), dtype=dtype)
    x_w, x_q, x_i = (buf[:r * k].view(r, k) for k in (width, nh * d, inter))  # GEMM inputs by width
    raw = torch.empty(r * max(width, inter)) if seen is not None else None  # the unrounded inputs
    raw_w, raw_i = (None, None) if raw is None else (raw[:r * width].view(r, width), raw[:r * inter].view(r, inter))
    xs = torch.empty(r)  # the per-row scale of the GEMM input in `buf`
    q, a = torch.empty(r, nh, d), torch.empty(r, nh, d)  # the query, the attention's output
    eps = eng.eps
    lib.prep(ptr(h), ptr(eng.layers[0].ln1_s), eps, 1, r, width, mode, ptr(x_w), ptr(xs), ptr(raw_w))
    for i, (layer, (k_cache, v_cache)) in enumerate(zip(eng.layers, caches)):
        if seen:
            seen(layer.qkv, raw_w, True)
        lin = layer.qkv
        y = lin.gemm(x_w)  # held in a name: a temporary's memory would be freed before the C call reads it
        lib.qkv_post(ptr(y), ytype, ptr(lin.w_scale), ptr(xs), ptr(lin.bias), ptr(cos), ptr(sin),
                     r, nh, nkv, d, ptr(q), ptr(k_cache), ptr(v_cache), k_cache.shape[2], ptr(seq), ptr(col))
        if on_kv:
            on_kv(i, k_cache, v_cache)
        lib.attention(ptr(q), ptr(k_cache), ptr(v_cache), ptr(mask), mask.shape[1], r, nh, nkv, d,
                      k_cache.shape[2], ptr(seq), ptr(col), d ** -0.5, ptr(a))
        if seen:
            seen(layer.o, a.view(r, -1), False)
        lib.prep(ptr(a), ptr(layer.o.inv_s), eps, 0, r, nh * d, mode, ptr(x_q), ptr(xs), None)
        lin = layer.o
        y = lin.gemm(x_q)
        lib.residual_prep(ptr(y), ytype, ptr(lin.w_scale), ptr(xs), ptr(lin.bias), ptr(h), ptr(layer.ln2_s), eps,
                          r, width, mode, ptr(x_w), ptr(xs), ptr(raw_w))
        if seen:
            seen(layer.gate_up, raw_w, True)
        lin = layer.gate_up
        y = lin.gemm(x_w)
        lib.gate_up_post(ptr(y), ytype, ptr(lin.w_scale), ptr(xs), ptr(layer.down.inv_s), r, inter, mode,
                         ptr(x_i), ptr(xs), ptr(raw_i))
        if seen:
            seen(layer.down, raw_i, True)
        lin = layer.down
        after = eng.layers[i + 1].ln1_s if i + 1 < len(eng.layers) else eng.norm_s
        y = lin.gemm(x_i)
        lib.residual_prep(ptr(y), ytype, ptr(lin.w_scale), ptr(xs), ptr(lin.bias), ptr(h), ptr(after), eps,
                          r, width, mode, ptr(x_w), ptr(xs), ptr(raw_w))
    if seen:
        seen(eng.lm_head, raw_w, True)
    return x_w, xs


def _lm_head(eng, lib, x: torch.Tensor, xs: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> None:
    """The lm head on quantized rows ``x`` (N, H) with scales ``xs`` (N,), into rows ``rows`` of ``logits``."""
    lin, ytype = eng.lm_head, GEMM_IO[eng.kernel][1]
    y = lin.gemm(x)
    lib.dequant_rows(ptr(y), ytype, ptr(lin.w_scale), ptr(xs), ptr(lin.bias), x.shape[0], logits.shape[1],
                     ptr(rows), ptr(logits))


def decode_step(eng, lib, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, caches, col: int,
                logits: torch.Tensor, rows: torch.Tensor) -> None:
    """One int8 decode step (``FastBackend._decode_int8``, fused): ``ids`` (B, 1) at ``positions`` (B, 1),
    their keys/values into column ``col`` of ``caches``; ``mask`` (B, >= col + 1) bool, contiguous: the keys
    each row attends to. Writes the step's logits into rows ``rows`` (B,) of ``logits`` (R, V)."""
    h = F.embedding(ids[:, 0], eng.embed)  # (B, H), a new tensor: the residual stream, updated in place
    cos, sin = (x.contiguous() for x in eng.rotary(h, positions))  # (B, 1, D)
    b = ids.shape[0]
    x, xs = _layers(eng, lib, h, cos, sin, caches, mask, torch.arange(b, dtype=torch.int32),
                    torch.full((b,), col, dtype=torch.int32))
    _lm_head(eng, lib, x, xs, logits, rows)


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The number of leading real tokens every prompt of ``ids`` (N, T, left-padded; ``mask`` its real
    tokens) shares, at most the shortest prompt's length - 1 (each prompt keeps a token of its own, whose
    logits start its completion). A chat template's system turn makes this ~24 tokens of the bundled model's
    ~44-token prompts."""
    lengths = mask.sum(1)
    shortest = int(lengths.min())
    # each row's real tokens left-aligned, as far as the shortest reaches
    start = ids.shape[1] - lengths
    cols = (start[:, None] + torch.arange(shortest)).clamp_max(ids.shape[1] - 1)
    aligned = ids.gather(1, cols)
    same = (aligned == aligned[:1]).all(0).int().cumprod(0)  # 1 up to the first column where two differ
    return min(int(same.sum()), shortest - 1)


def prefill(eng, lib, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, caches, rows: torch.Tensor,
            observe: bool, share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The int8 prefill (``FastBackend._forward`` with ``exact_rows``, fused): ``ids`` (N, T) distinct prompts
    left-padded, ``mask`` (N, T) their real tokens; keys/values into cache rows ``rows`` (B,); ``observe``:
    feed the smoothing statistics (each real token after the first). Returns the (N, V) logits of each
    prompt's last token, the (N, T) mask of the real keys in the cache columns and the shared prefix's
    length (0: none run apart).

    With ``share_prefix`` and prompts sharing their first ``c >= 2`` tokens (:func:`shared_prefix`: a chat
    template's system turn), the prefix runs once, as one sequence, and the rest of each prompt after it:
    a cache row then holds [prefix | pads | the rest], the returned mask says so, and each token's
    arithmetic is the one it had in place (positions from the prompt, keys in the same order), so the
    logits agree to the bit. At batch 32 on the sentiment prompts: 672 token rows (real tokens only, see
    :func:`_prefill`) instead of 1,664."""
    n, t = ids.shape
    c = shared_prefix(ids, mask) if share_prefix and n > 1 else 0
    if c < 2:
        return _prefill(eng, lib, ids, positions, mask, caches, rows, observe), mask, 0
    before = []  # the prefix's keys/values, per layer (1, nkv, c, d)

    def keep(i, kt, vt):
        before.append((kt.clone(), vt.clone()))

    start = t - int(mask[0].sum())  # the first prompt's first real column
    _prefill(eng, lib, ids[:1, start:start + c], torch.arange(c).unsqueeze(0), torch.ones(1, c, dtype=torch.bool),
             keep, None, observe, logits=False)
    rest = mask[:, c:] & (positions[:, c:] >= c)  # the tokens after the prefix keep their columns
    layout = torch.cat([torch.ones(n, c, dtype=torch.bool), rest], 1)
    logits = _prefill(eng, lib, ids[:, c:], positions[:, c:].masked_fill(~rest, 0), layout, caches, rows, observe,
                      before=before)
    return logits, layout, c


def _prefill(eng, lib, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, caches, rows, observe: bool,
             before: list | None = None, logits: bool = True) -> torch.Tensor | None:
    """:func:`prefill` of the tokens ``ids`` (N, T') at cache columns ``c .. c + T' - 1``, c = ``mask``'s
    width - T' (0 but after a shared prefix, whose per-layer keys/values ``before`` holds). ``caches``: the
    cache list to fill (rows ``rows``), or a callable given each layer's keys/values (the prefix's run).

    Each prompt's first real token runs in fp32 on its own first (it attends only to itself: one pass for
    each distinct id, ``FastBackend._forward`` exact), and its keys/values replace the int8 ones in every
    layer before any later token reads them; its int8 row goes on unused (rows never mix but in attention).
    Only real tokens are rows (no left pads: 27% of a batch-32 prefill's rows after the shared prefix)."""
    n, t = ids.shape
    width = mask.shape[1]
    col = width - t
    d, nkv = eng.head_dim, eng.n_kv
    flat = ids.reshape(-1)
    real = mask[:, col:].reshape(-1).nonzero().squeeze(1)  # the rows: (prompt, column) in row-major order
    r = len(real)
    h = F.embedding(flat[real], eng.embed)  # (R, H)
    cos, sin = (x.contiguous() for x in eng.rotary(h, positions.reshape(-1)[real].view(r, 1)))  # (R, 1, D)

    # each distinct first token in fp32 (position 0, alone), its keys/values per layer
    rep, first, inverse = eng._first_token_rows(ids, positions, mask[:, col:])
    u = len(rep)
    first_kv = [(eng.embed.new_empty(u, nkv, 1, d), eng.embed.new_empty(u, nkv, 1, d)) for _ in eng.layers]
    h_first = None if not u else eng._forward(flat[rep].view(u, 1), torch.zeros(u, 1, dtype=torch.long),
                                              torch.ones(u, 1, 1, 1, dtype=torch.bool), first_kv, 0, torch.arange(u),
                                              exact=True)
    seq, at = first // t, col + first % t

    def on_kv(i, kt, vt):  # the prefix's and the fp32 first tokens' keys/values in, then to the cache rows
        if before:
            kt[:, :, :col], vt[:, :, :col] = before[i]
        if u:
            fk, fv = first_kv[i]
            kt[seq, :, at] = fk[inverse, :, 0]
            vt[seq, :, at] = fv[inverse, :, 0]
        if callable(caches):
            caches(i, kt, vt)
            return
        k_cache, v_cache = caches[i]
        k_cache[:, :, :width] = kt.index_select(0, rows)
        v_cache[:, :, :width] = vt.index_select(0, rows)

    seen = None
    if observe:
        rows_seen = (positions.reshape(-1)[real] >= 1).nonzero().squeeze(1)

        def seen(lin, x, smoothed):  # QuantLinear.observe on the unsmoothed input x * s = x / inv_s
            amax = x.index_select(0, rows_seen).abs().amax(0)
            amax = amax / lin.inv_s if smoothed else amax
            lin.amax = amax if lin.amax is None else torch.maximum(lin.amax, amax)

    kv = (torch.zeros(n, nkv, width, d), torch.zeros(n, nkv, width, d))  # this prefill's keys/values, per prompt
    x, xs = _layers(eng, lib, h, cos, sin, [kv] * len(eng.layers), mask.contiguous(), (real // t).int(),
                    (col + real % t).int(), on_kv, seen)
    if not logits:
        return None
    last = torch.arange(n) * t + t - 1  # each prompt's last token (left padding), in (prompt, column) terms
    rows_last = mask[:, col:].sum(1).cumsum(0) - 1  # ... and as a row of x
    x_last, xs_last = x.index_select(0, rows_last), xs.index_select(0, rows_last)
    alone = (first.unsqueeze(1) == last).any(0)  # a one-token prompt: its last token is its first
    if bool(alone.any()):
        which = (first.unsqueeze(0) == last[alone].unsqueeze(1)).int().argmax(1)  # its place in `first`
        h_alone = h_first[inverse[which], 0].contiguous()
        x_alone, xs_alone = torch.empty(len(h_alone), h.shape[1], dtype=x_last.dtype), torch.empty(len(h_alone))
        lib.prep(ptr(h_alone), ptr(eng.norm_s), eng.eps, 1, len(h_alone), h.shape[1], GEMM_IO[eng.kernel][0],
                 ptr(x_alone), ptr(xs_alone), None)
        x_last[alone], xs_last[alone] = x_alone, xs_alone
    out = torch.empty(n, eng.lm_head.w_scale.shape[0])
    _lm_head(eng, lib, x_last, xs_last, out, torch.arange(n))
    return out
