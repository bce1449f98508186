"""A CPU generation engine for Llama-architecture policies, behind the :class:`HFBackend` interface.

Why it is faster than ``transformers.generate`` on a CPU (docs/generation.md has the measurements):
a decode step of a 135M model at batch 8-64 is bound by reading the weights and by small matrix
products, not by Python. So the engine

1. keeps an **int8 copy of every linear layer and of the lm head** (W8A8: per-output-channel symmetric
   weights, per-token dynamic activations, oneDNN's s8 GEMM through ``torch._int_mm``), q/k/v and gate/up
   fused into one matrix each, rebuilt from the fp32 policy after each update (:meth:`FastBackend.sync_weights`;
   a rounding pass, no prepacking);
2. **prefills in int8** too (each prompt's first token in fp32), and runs a **lean decode loop** over a
   **preallocated KV cache** (no cache objects, no mask builders, about 60 ops a layer);
3. **prefills each distinct prompt once**: GRPO/RLOO send K consecutive copies of a prompt; the prompt's
   keys/values are computed once and copied into the K rows;
4. **stops as soon as every row has emitted EOS**, and drops finished rows from the int8 decode batch.

Layout of one generate call (B rows, P prompt columns left-padded, C = max_new_tokens)::

    KV cache, per layer (B, n_kv_heads, P + C, head_dim)
    column:   0 ........ P-1 | P ........ P+C-1
              pad.. prompt   | token 0 .. token C-1 (written as they are fed back)
    key_mask  prompt_mask    | True

A quantized sampler is not exactly the policy: the log-probs of the tokens it sampled, under its own
(temperature-scaled, untruncated) distribution, are kept in :attr:`FastBackend.last_logps` so the trainer
can correct the gap with :mod:`rlhfkit.losses.importance`. With ``quantize=False`` the engine computes what
transformers' Llama computes, op for op, and its greedy output equals ``generate``'s (tests check it).
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.rollout.engine import SamplingConfig

SUPPORTED_MODEL_TYPES = ("llama",)
QUANTIZABLE = frozenset({"qkv", "o", "gate_up", "down", "lm_head"})
INT8_KERNELS = ("int_mm", "fbgemm")
_KERNEL: str | None = None


def int8_kernel() -> str:
    """The int8 GEMM for this CPU, chosen once per process by timing both on a decode-sized product.

    ``torch._int_mm`` (oneDNN) is fast where the CPU has VNNI (AVX-512 VNNI, AVX-VNNI, AMX) and falls back
    to a slow loop elsewhere (10-100x fp32 on an AVX2-only CPU); fbgemm's ``linear_dynamic`` is fast on
    both but needs a prepack at every re-quantization (half its cost). ``_int_mm`` is taken unless it is
    more than twice as slow as fbgemm on the product itself."""
    global _KERNEL
    if _KERNEL is None:
        g = torch.Generator().manual_seed(0)
        w8 = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=g)
        x = torch.randn(8, 576, generator=g)
        x8 = x.mul(40).round_().clamp_(-127, 127).to(torch.int8)

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        try:
            t_int = best(lambda: torch._int_mm(x8, w8.t()))
        except RuntimeError:
            t_int = float("inf")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                scale = torch.full((1536,), 0.01, dtype=torch.double)
                qw = torch._make_per_channel_quantized_tensor(w8, scale, torch.zeros(1536, dtype=torch.long), 0)
                packed = torch.ops.quantized.linear_prepack(qw, None)
            t_fb = best(lambda: torch.ops.quantized.linear_dynamic(x, packed, True))
        except RuntimeError:
            t_fb = float("inf")
        _KERNEL = "int_mm" if t_int <= 2 * t_fb else "fbgemm"
    return _KERNEL


class _Linear:
    """``y = x W^T + b`` for one or several weights sharing the input (q/k/v, gate/up).

    fp32 (``exact``): the policy's own tensors, applied one by one, op for op as transformers does.
    int8 (W8A8; the GEMM is ``torch._int_mm``, oneDNN's s8 x s8 -> s32, where the CPU has VNNI, else
    fbgemm's ``quantized::linear_dynamic``; :func:`int8_kernel` picks):
    SmoothQuant (Xiao et al. 2023, arXiv:2211.10438, eq. 4): a few input channels carry most of an LLM's
    activation range, so each input channel j is rescaled by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``:
    ``x W^T = (x / s) (W s)^T``. ``max|X_j|`` is observed on the real prompt tokens of prefills
    (:meth:`observe`). ``W s`` is concatenated over the group and quantized per output channel
    (symmetric, scale = max|w| / 127); ``x / s`` is quantized per token (per row) at call time, so one
    row's outliers never coarsen another row's rounding. ``_int_mm`` reads the plain (K, N) int8 view, so
    a re-quantization is one rounding pass over the weights; fbgemm needs a prepack besides, and quantizes
    activations per tensor itself, so each row is first divided by its own max |x| (per-token in effect)
    and multiplied back after, with 7-bit activations (``reduce_range``: without VNNI fbgemm sums u8 x s8
    products in pairs into int16, which 8-bit activations could saturate).
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        self.sizes = [w.shape[0] for w in weights]
        self.weights, self.biases = weights, biases  # the policy's own tensors (no copy)
        self.w8t = self.w_scale = self.packed = self.bias = self.inv_s = self.amax = None

    def observe(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Track the per-input-channel max |x| over the rows of ``x`` (N, T, K) where ``rows`` (N*T,) holds."""
        amax = x.reshape(-1, x.shape[-1])[rows].abs().amax(0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)

    @property
    def ready(self) -> bool:
        return self.w8t is not None or self.packed is not None

    def drop(self) -> None:
        self.w8t = self.w_scale = self.packed = None

    def quantize(self, alpha: float, kernel: str = "int_mm") -> None:
        """Build the int8 weight ``W s`` (per output channel, symmetric) from the current fp32 tensors."""
        # one fresh copy (cat), then in place: a re-quantization runs after every policy update, and each
        # temporary of the ~134M weights costs a pass over memory (this order halved the time)
        w = torch.cat([x.detach().float() for x in self.weights])  # (N, K)
        self.bias = None if all(x is None for x in self.biases) else torch.cat(
            [x.detach().float() if x is not None else w.new_zeros(n) for x, n in zip(self.biases, self.sizes)])
        s = torch.ones(w.shape[1])
        if self.amax is not None and alpha > 0:
            w_amax = w.abs().amax(0)  # max |w| per input channel (abs().amax: 10x linalg.vector_norm(inf) here)
            s = (self.amax.clamp_min(1e-5) ** alpha / w_amax.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-2, 1e2)
            w.mul_(s)
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (N, 1)
        w8 = w.div_(scale).round_().to(torch.int8)  # |w / scale| <= 127 by construction
        self.inv_s = 1 / s
        if kernel == "fbgemm":  # quantized tensors are deprecated (pytorch#184982: FastBackend._quantize
            # silences the warning), but fbgemm's kernel behind them is torch's fast int8 GEMM without VNNI
            scale = scale.squeeze(1).double()
            qw = torch._make_per_channel_quantized_tensor(w8, scale, torch.zeros_like(scale, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        else:
            self.w8t, self.w_scale = w8.t(), scale.squeeze(1)  # (K, N) view

    def int8(self, xs: torch.Tensor) -> torch.Tensor:
        """(M, K) input already divided by ``s`` (overwritten) -> (M, N) float32 output, all parts concatenated."""
        if self.packed is not None:  # fbgemm: rows scaled to max |x| = 1, so its per-tensor scale is per token
            x_max = xs.abs().amax(1, keepdim=True).clamp_min_(1e-12)
            y = torch.ops.quantized.linear_dynamic(xs.div_(x_max), self.packed, True).mul_(x_max)
        else:
            x_scale = xs.abs().amax(1, keepdim=True).clamp_min_(1e-12).mul_(1 / 127)  # (M, 1), per token
            x8 = xs.div_(x_scale).round_().to(torch.int8)  # |xs / x_scale| <= 127
            y = torch._int_mm(x8, self.w8t).float().mul_(self.w_scale).mul_(x_scale)  # (int32 * float: 3-5x slower)
        if self.bias is not None:
            y += self.bias
        return y

    def __call__(self, x: torch.Tensor, exact: bool = False, exact_rows: tuple | None = None) -> list[torch.Tensor]:
        """``exact_rows`` (int8 only): rows of ``x`` flattened to (M, K) computed in fp32 instead, as
        :meth:`FastBackend._first_token_rows` gives them."""
        if exact or not self.ready:
            return [F.linear(x, w, b) for w, b in zip(self.weights, self.biases)]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = self.int8(x * self.inv_s)
        if exact_rows is not None:  # (representative rows, all rows, each one's representative): fp32
            rep, rows, inverse = exact_rows
            xr = x.index_select(0, rep)
            y[rows] = torch.cat([F.linear(xr, w, b) for w, b in zip(self.weights, self.biases)], -1)[inverse]
        y = y.view(*shape[:-1], y.shape[-1])
        return list(y.split(self.sizes, -1)) if len(self.sizes) > 1 else [y]


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: _Linear
    o: _Linear
    ln2: torch.Tensor
    gate_up: _Linear
    down: _Linear
    ln1_s: torch.Tensor | None = None  # int8 decode: ln1 / s of qkv, the norm and the smoothing in one product
    ln2_s: torch.Tensor | None = None  # likewise for gate_up


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the order of transformers' LlamaRMSNorm, so fp32 results match bit for bit
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, ``x * cos + rotate_half(x) * sin`` (RoFormer eq. 34; transformers' layout:
    the two halves of head_dim, not interleaved pairs). x (N, h, T, D); cos/sin (N, 1, T, D)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class FastBackend:
    """Generation for Llama-architecture causal LMs on a CPU; same interface as :class:`HFBackend`.

    Args:
        model: the policy (``LlamaForCausalLM``); its weights are read (and int8-copied) by
            :meth:`sync_weights`, now and after every optimizer step.
        tokenizer: gives ``eos_token_id`` and ``pad_token_id``.
        quantize: True: every linear layer and the lm head in int8 (fast, approximately the
            policy; see :attr:`last_logps`); False: the policy's fp32 weights, exactly transformers'
            computation (1.19x ``generate`` at batch 8 greedy in one run, from the lean loop alone); or a
            set of parts from ``QUANTIZABLE`` to quantize (e.g. all but ``"down"``: half the log-prob gap).
        alpha: SmoothQuant's migration strength (0: no smoothing; 0.5 measured best on the bundled model).
        share_prefill: compute each distinct prompt's KV cache once for all its copies in the batch.
        kernel: the int8 GEMM, ``"int_mm"`` or ``"fbgemm"``; ``"auto"``: :func:`int8_kernel`'s pick.
        quantized_prefill: when quantizing, prefill in int8 too (False: the prefill stays fp32, the
            sampler's log-prob gap a little smaller, a prefill 2-3x slower).
    Attributes set by :meth:`generate`:
        last_logps: (B, C) float32, the sampler's own ``log softmax(logits / T)`` at each generated token
            (T = 1 when greedy), 0 after a row's EOS. At ``quantize=False`` they equal the policy's to float
            rounding; otherwise they are the behaviour policy for importance weighting.
        last_stats: seconds spent in prefill / decode, decode steps run, distinct prompts.
        sync_s: seconds the last :meth:`sync_weights` took (the int8 refresh cost per policy update).
    """

    def __init__(self, model, tokenizer, *, quantize: bool | set = True, share_prefill: bool = True,
                 alpha: float = 0.5, quantized_prefill: bool = True, kernel: str = "auto"):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"FastBackend supports {SUPPORTED_MODEL_TYPES} models, not {cfg.model_type!r}; use "
                             "HFBackend (rlhfkit.rollout.engine) for this model")
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
            raise ValueError("FastBackend expects a SiLU MLP without bias (standard Llama); use HFBackend")
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("FastBackend is a CPU engine; on a GPU use HFBackend or the vLLM backend")
        self.tok, self.quantize, self.share_prefill, self.alpha = tokenizer, quantize, share_prefill, alpha
        self.quantized_prefill = quantized_prefill
        if kernel not in ("auto", *INT8_KERNELS):
            raise ValueError(f"kernel must be 'auto' or one of {INT8_KERNELS}, got {kernel!r}")
        self.kernel = int8_kernel() if kernel == "auto" else kernel
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.last_logps: torch.Tensor | None = None
        self.last_stats: dict = {}
        self.sync_s = 0.0
        self.layers: list[_Layer] = []
        self.sync_weights(model)

    # ---- weights ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Rebuild the engine's weights from ``model`` (call after each optimizer step; int8: re-quantize)."""
        t0 = time.perf_counter()
        model = getattr(model, "module", model)  # DDP / accelerate wrappers
        inner = model.model
        # smoothing statistics survive a weight update (activations move slowly)
        amax = [lin.amax for _, lin in self._linears()] if self.layers else None
        self.rotary = inner.rotary_emb  # inv_freq is a buffer, never trained
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = _Linear([model.lm_head.weight], [getattr(model.lm_head, "bias", None)])
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight,
                qkv=_Linear([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight],
                            [att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
                o=_Linear([att.o_proj.weight], [att.o_proj.bias]),
                ln2=layer.post_attention_layernorm.weight,
                gate_up=_Linear([mlp.gate_proj.weight, mlp.up_proj.weight], [None, None]),
                down=_Linear([mlp.down_proj.weight], [None])))
        if amax is not None:
            for (_, lin), a in zip(self._linears(), amax):
                lin.amax = a
        self.stale = bool(self.quantize)  # int8 copies are (re)built at the next generate
        self.sync_s = time.perf_counter() - t0

    def release(self) -> None:
        """Free the int8 copies until the next :meth:`generate` (which rebuilds them from the current weights).

        The trainers call it once a step's rollout is sampled: the copies are stale after the coming optimizer
        update anyway, and freeing them lowers the peak memory of the update by their size (134 MB int8 for
        the bundled model)."""
        for _, lin in self._linears():
            lin.drop()
        for layer in self.layers:
            layer.ln1_s = layer.ln2_s = None
        self.stale = bool(self.quantize)

    def _linears(self) -> list[tuple[str, _Linear]]:
        named = [(name, getattr(layer, name)) for layer in self.layers for name in ("qkv", "o", "gate_up", "down")]
        return named + [("lm_head", self.lm_head)]

    def _has_statistics(self) -> bool:
        return all(lin.amax is not None for _, lin in self._linears())

    def _quantize(self) -> None:
        """Build the int8 copies from the current weights and the observed statistics."""
        parts = QUANTIZABLE if self.quantize is True else set(self.quantize)
        todo = [lin for name, lin in self._linears() if name in parts]
        todo.sort(key=lambda lin: -sum(w.numel() for w in lin.weights))  # largest first: the threads end together
        # one Python thread per core, each quantizing whole layers (torch's ops and fbgemm's prepack release the
        # GIL); the warning filter is set here, around the pool (catch_warnings is not thread-safe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                list(pool.map(lambda lin: lin.quantize(self.alpha, self.kernel), todo))
        if self.quantize is True:
            for layer in self.layers:
                layer.ln1_s, layer.ln2_s = layer.ln1 * layer.qkv.inv_s, layer.ln2 * layer.gate_up.inv_s
        self.stale = False

    @staticmethod
    def _first_token_rows(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        """The prefill rows (flattened N*T) that int8 leaves to fp32: each prompt's first real token.

        It carries the "massive activations" (Sun et al. 2024, arXiv:2402.17762): a few channels 100-1000x
        the others, which a per-token int8 scale would keep while rounding the rest of the token to zero
        (measured: the sampler's log-prob gap 0.22 nats with it in int8, 0.12 without). At position 0 a
        token attends only to itself, so its states depend on its id alone: one fp32 row per distinct id
        (a chat template starts every prompt with the same token), copied to the others.
        Returns (representative rows (U,), all first rows (F,), index of each first row's representative (F,)).
        """
        first = ((positions == 0) & mask).reshape(-1).nonzero().squeeze(1)
        _, inverse = torch.unique(ids.reshape(-1)[first], return_inverse=True)
        rep = torch.empty(int(inverse.max()) + 1 if len(first) else 0, dtype=torch.long).scatter_(0, inverse, first)
        return rep, first, inverse

    # ---- the transformer --------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, caches, col: int,
                 rows: torch.Tensor | None, exact: bool, observe: torch.Tensor | None = None,
                 exact_rows: tuple | None = None) -> torch.Tensor:
        """Run ``ids`` (N, T) at ``positions`` (N, T) through the decoder; return the last hidden (N, T, H).

        Prefill (``rows`` given, N = distinct prompts): attention over the T prompt tokens themselves with
        ``mask`` (N, 1, T, T); their keys/values go to cache columns [0, T) of batch rows ``rows`` (B,).
        Decode (``rows`` None, T = 1): the new key/value goes to column ``col`` of every row, attention reads
        columns [0, col] with ``mask`` (B, 1, 1, col + 1).
        ``observe`` (N*T,) bool: the tokens whose linear-layer inputs feed the smoothing statistics.
        """
        n, t = ids.shape
        h = F.embedding(ids, self.embed)  # (N, T, H)
        cos, sin = self.rotary(h, positions)  # (N, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        groups = self.n_heads // self.n_kv
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            x = _rms_norm(h, layer.ln1, self.eps)
            if observe is not None:
                layer.qkv.observe(x, observe)
            q, k, v = layer.qkv(x, exact, exact_rows)
            q = _rope(q.view(n, t, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)  # (N, h, T, D)
            k = _rope(k.view(n, t, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)  # (N, kv, T, D)
            v = v.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
            if rows is not None:
                k_cache[:, :, :t] = k.index_select(0, rows)
                v_cache[:, :, :t] = v.index_select(0, rows)
            else:
                k_cache[:, :, col:col + 1] = k
                v_cache[:, :, col:col + 1] = v
                k, v = k_cache[:, :, :col + 1], v_cache[:, :, :col + 1]
            if groups > 1 and t == 1 and not exact:
                # one query per head: the `groups` heads sharing a K/V head become its `groups` queries,
                # (N, h, 1, D) -> (N, kv, groups, D); repeat_kv would copy the whole cache every step
                a = F.scaled_dot_product_attention(q.view(n, self.n_kv, groups, self.head_dim), k, v,
                                                   attn_mask=mask, scale=self.head_dim ** -0.5)
            else:
                if groups > 1:  # transformers' repeat_kv: (N, kv, L, D) -> (N, h, L, D)
                    k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(n, self.n_heads, -1, self.head_dim)
                    v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(n, self.n_heads, -1, self.head_dim)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
            a = a.reshape(n, self.n_heads, t, self.head_dim)
            a = a.transpose(1, 2).reshape(n, t, -1)
            h = h + layer.o(a, exact, exact_rows)[0]
            x = _rms_norm(h, layer.ln2, self.eps)
            if observe is not None:
                layer.o.observe(a, observe)
                layer.gate_up.observe(x, observe)
            gate, up = layer.gate_up(x, exact, exact_rows)
            x = F.silu(gate) * up
            if observe is not None:
                layer.down.observe(x, observe)
            h = h + layer.down(x, exact, exact_rows)[0]
        return h

    def _decode_int8(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, caches, col: int) -> torch.Tensor:
        """One int8 decode step, every part quantized: ``ids`` (B, 1) at ``positions`` (B, 1) -> last hidden (B, H).

        What :meth:`_forward` computes at T = 1, in about half the operations (a decode step of a small
        model is ~100 small ops a layer, each a few microseconds): the RMSNorm weight and the smoothing
        divisor of the next linear are one vector; rotary runs once on q and k together, with
        ``rotate_half(x) = roll(x, D/2) * [-1 .. -1, 1 .. 1]``; the linears' outputs are sliced, not split.
        """
        b, d = ids.shape[0], self.head_dim
        nq, groups = self.n_heads * d, self.n_heads // self.n_kv
        h = F.embedding(ids[:, 0], self.embed)  # (B, H)
        cos, sin = self.rotary(h, positions)  # (B, 1, D)
        sign = torch.ones(d)
        sign[:d // 2] = -1
        sin = sin * sign
        width = h.shape[-1]
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            qkv = layer.qkv.int8(F.rms_norm(h, (width,), layer.ln1_s, self.eps))  # (B, nq + 2 nkv)
            qk = qkv[:, :nq + self.n_kv * d].view(b, -1, d)  # (B, heads + kv heads, D)
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
            k_cache[:, :, col] = qk[:, self.n_heads:]
            v_cache[:, :, col] = qkv[:, nq + self.n_kv * d:].view(b, self.n_kv, d)
            # one query per head: the `groups` heads sharing a K/V head become its `groups` queries
            a = F.scaled_dot_product_attention(qk[:, :self.n_heads].view(b, self.n_kv, groups, d),
                                               k_cache[:, :, :col + 1], v_cache[:, :, :col + 1],
                                               attn_mask=mask, scale=d ** -0.5)
            h = h + layer.o.int8(a.view(b, -1) * layer.o.inv_s)
            gate_up = layer.gate_up.int8(F.rms_norm(h, (width,), layer.ln2_s, self.eps))
            inter = gate_up.shape[1] // 2
            h = h + layer.down.int8(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]).mul_(layer.down.inv_s))
        return h

    def _logits(self, h: torch.Tensor, exact: bool) -> torch.Tensor:
        """(N, H) last hidden -> (N, V) float32 logits."""
        return self.lm_head(_rms_norm(h, self.norm, self.eps), exact)[0].float()

    # ---- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                 generator_seed: int | None = None) -> torch.Tensor:
        """(B, P) left-padded prompts -> (B, C) completion ids, pad after EOS (as ``HFBackend.generate``).

        Sampling follows transformers' order (temperature, top-k, top-p, then ``multinomial``) and, with a
        seed, draws from a generator seeded like ``torch.manual_seed(seed)``: at ``quantize=False`` the same
        seed gives ``HFBackend``'s samples. Without a seed the global RNG is used.
        """
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        b, p = prompt_ids.shape
        c = sampling.max_new_tokens
        prompt_mask = prompt_mask.bool()
        gen = None
        if generator_seed is not None:
            gen = torch.Generator().manual_seed(generator_seed)
        t0 = time.perf_counter()

        # 1. prefill: each distinct prompt once (GRPO's K copies arrive as consecutive equal rows)
        if self.share_prefill:
            uniq, rows = torch.unique(prompt_ids.masked_fill(~prompt_mask, -1), dim=0, return_inverse=True)
            keep = torch.empty(len(uniq), dtype=torch.long).scatter_(0, rows, torch.arange(b))  # one row per prompt
        else:
            keep, rows = torch.arange(b), torch.arange(b)
        u_ids, u_mask = prompt_ids[keep], prompt_mask[keep]
        positions = (u_mask.long().cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones(p, p, dtype=torch.bool).tril()
        # a pad query attends to itself only: no all-masked softmax row (NaN), and its K/V stay finite
        mask = (causal & u_mask[:, None, None, :]) | torch.eye(p, dtype=torch.bool)
        kv = (b, self.n_kv, p + c, self.head_dim)
        caches = [(self.embed.new_empty(kv), self.embed.new_empty(kv)) for _ in self.layers]
        # the first real token of a prompt carries the "massive activations" (Sun et al. 2024, arXiv:2402.17762)
        # that decode tokens never see: left out of the smoothing statistics, as pads are
        observe = (positions >= 1).reshape(-1) if self.stale else None
        quantize_s, int8_prefill = 0.0, bool(self.quantize) and self.quantized_prefill
        if int8_prefill and self.stale:
            # int8 prefill from the weights quantized with the statistics of earlier prompts (activations move
            # slowly between policy updates); the engine's first call gathers them with an fp32 prefill first
            if not self._has_statistics():
                h = self._forward(u_ids, positions, mask, caches, 0, rows, exact=True, observe=observe)
                self.lm_head.observe(_rms_norm(h, self.norm, self.eps), observe)
                observe = None
            t_q = time.perf_counter()
            self._quantize()
            quantize_s = time.perf_counter() - t_q
        exact_rows = self._first_token_rows(u_ids, positions, u_mask) if int8_prefill else None
        h = self._forward(u_ids, positions, mask, caches, 0, rows, exact=not int8_prefill, observe=observe,
                          exact_rows=exact_rows)
        logits = self._logits(h[:, -1], exact=not int8_prefill).index_select(0, rows)  # (B, V)
        if observe is not None:
            self.lm_head.observe(_rms_norm(h, self.norm, self.eps), observe)
        if self.stale:  # fp32 prefill: quantize for the decode
            t_q = time.perf_counter()
            self._quantize()
            quantize_s = time.perf_counter() - t_q
        t_prefill = time.perf_counter() - t0 - quantize_s

        # 2. decode: sample, feed back, until every row has ended or C tokens
        key_mask = torch.cat([prompt_mask, torch.ones(b, c, dtype=torch.bool)], 1)  # (B, P + C)
        next_pos = prompt_mask.sum(1, keepdim=True)  # (B, 1) position of token 0
        out = torch.full((b, c), pad, dtype=torch.long)
        logps = torch.zeros(b, c)
        alive = torch.ones(b, dtype=torch.bool)
        live = torch.arange(b)  # the batch rows the decoder still runs (int8: the rows still alive)
        steps = 0
        for t in range(c):
            # every row is sampled, finished ones included, as generate does: the seeded draws of the
            # live rows stay those of generate (a finished row's logits are its last ones, never used)
            tokens, token_logps = _sample(logits, sampling, gen, exact_draws=not self.quantize)
            tokens = torch.where(alive, tokens, pad)
            out[:, t] = tokens
            logps[:, t] = torch.where(alive, token_logps, 0.0)
            alive &= tokens != eos
            steps += 1
            if t == c - 1 or not bool(alive.any()):
                break
            if self.quantize and not bool(alive[live].all()):
                # finished rows leave the int8 batch: less work, and (when activations shared one scale per
                # tensor) a finished row fed pads grew outliers that put the live rows' log-probs 2-4 nats off
                keep = alive[live].nonzero().squeeze(1)
                live = live[keep]
                caches = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in caches]
            att = key_mask[live, None, None, :p + t + 1]  # (L, 1, 1, P + t + 1)
            if self.quantize is True:
                h = self._decode_int8(tokens[live, None], next_pos[live] + t, att, caches, p + t)
            else:
                h = self._forward(tokens[live, None], next_pos[live] + t, att, caches, p + t, None,
                                  exact=not self.quantize)[:, -1]
            logits[live] = self._logits(h, exact=not self.quantize)
        # columns never reached hold pad (every row ended), as generate's shorter output does
        self.last_logps = logps[:, :steps] if steps < c else logps
        self.last_stats = {"prefill_s": t_prefill, "quantize_s": quantize_s,
                           "decode_s": time.perf_counter() - t0 - t_prefill - quantize_s,
                           "steps": steps, "distinct_prompts": len(keep)}
        return out[:, :steps].to(prompt_ids.device)


def _sample(logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None, exact_draws: bool = True):
    """One token per row from (B, V) float32 logits; returns (tokens (B,), their log-probs (B,)).

    The warpers of transformers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``,
    applied in that order), then ``softmax`` and ``multinomial``; greedy = argmax when temperature is 0.
    The returned log-prob is under the tempered, *untruncated* distribution, the quantity
    ``completion_logps`` computes for the policy (top-k/top-p make the sampler differ from it anyway).
    ``exact_draws=False``: the same distribution drawn by :func:`_inverse_cdf` instead of ``multinomial``
    (other random numbers, so not ``generate``'s samples for a seed).
    """
    temperature = sampling.temperature
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    scores = logits / temperature if temperature != 1.0 else logits
    full = torch.log_softmax(scores, -1)
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]))[0][..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = F.softmax(scores, -1)
    tokens = torch.multinomial(probs, 1, generator=gen).squeeze(1) if exact_draws else _inverse_cdf(probs, gen)
    return tokens, full.gather(1, tokens[:, None]).squeeze(1)


def _inverse_cdf(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row of (B, V) probabilities, by inverting the row's CDF at one uniform draw.

    Why: ``torch.multinomial`` draws one exponential variate per vocabulary entry on a CPU (~1 ms a row
    of SmolLM2's 49,152 tokens here: 10 ms of a batch-8 decode step, 40 ms at batch 32, as much as the
    int8 model itself); one uniform per row gives the same distribution. The CDF is summed in float64,
    so a token's interval is its probability to ~1e-16, and a token of probability 0 (cut by top-k /
    top-p) has an empty interval and is never drawn.
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=gen) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)
    # u rounded up to the total (odds ~1e-16) lands past the last token with mass: take the likeliest
    empty = probs.gather(1, tokens[:, None]).squeeze(1) == 0
    return torch.where(empty, probs.argmax(-1), tokens) if bool(empty.any()) else tokens


def free_cpu_threads(window_s: float = 0.2) -> int:
    """How many of this process's allowed cores are idle right now (at least 1): the idle share of
    ``/proc/stat`` over ``window_s`` times the cores in the affinity mask. Linux only; elsewhere the
    allowed core count.

    Why (docs/generation.md, "Shared CPU"): an OpenMP team of N threads meets at a barrier after every
    parallel op; when another process holds a core, one team member waits for a scheduler time slice at
    each of the ~1000 ops of a decode step. Use ``torch.set_num_threads(free_cpu_threads())`` at start.
    """
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        def idle_total():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return v[3] + v[4], sum(v)  # idle + iowait, all
        i0, t0 = idle_total()
        time.sleep(window_s)
        i1, t1 = idle_total()
    except OSError:
        return allowed
    idle_share = (i1 - i0) / max(1, t1 - t0)  # of all cores of the machine
    return max(1, min(allowed, round(idle_share * (os.cpu_count() or allowed))))
