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

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.rollout import decode_kernels
from rlhfkit.rollout import fused as fused_ops
from rlhfkit.rollout.draw import sample_tokens
from rlhfkit.rollout.engine import SamplingConfig
from rlhfkit.rollout.int8 import QuantLinear, kernel_in_use, resolve_kernel

SUPPORTED_MODEL_TYPES = ("llama",)
QUANTIZABLE = frozenset({"qkv", "o", "gate_up", "down", "lm_head"})


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: QuantLinear
    o: QuantLinear
    ln2: torch.Tensor
    gate_up: QuantLinear
    down: QuantLinear
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
        kernel: the int8 GEMM, ``"int_mm"``, ``"fbgemm"``, ``"avx2"`` or ``"vnni"`` (rlhfkit's own with its
            AVX2 / AVX-512 VNNI tile); ``"auto"``: :func:`int8_kernel`'s pick.
        quantized_prefill: when quantizing, prefill in int8 too (False: the prefill stays fp32, the
            sampler's log-prob gap a little smaller, a prefill 2-3x slower).
        fused: when every part is quantized, run the int8 prefill and decode steps on the small ops fused
            in C (:mod:`rlhfkit.rollout.fused` over :mod:`rlhfkit.rollout.decode_kernels`, compiled on first
            use; where that fails, a warning and the torch ops). Same arithmetic to float rounding.
        share_prefix: in the fused int8 prefill, run the tokens every prompt of the batch starts with (a
            chat template's system turn) once, as one sequence, and copy their keys/values to every row
            (:func:`rlhfkit.rollout.fused.prefill`; the same logits to the bit).
    Attributes set by :meth:`generate`:
        last_logps: (B, C) float32, the sampler's own ``log softmax(logits / T)`` at each generated token
            (T = 1 when greedy), 0 after a row's EOS. At ``quantize=False`` they equal the policy's to float
            rounding; otherwise they are the behaviour policy for importance weighting.
        last_stats: seconds spent in prefill / decode, decode steps run, distinct prompts, the shared
            prefix's length (0: none), whether the fused decode ops ran, the int8 kernel
            (:func:`rlhfkit.rollout.int8.kernel_in_use`; ``"fp32"`` when not quantizing).
        sync_s: seconds the last :meth:`sync_weights` took (the int8 refresh cost per policy update).
    """

    def __init__(self, model, tokenizer, *, quantize: bool | set = True, share_prefill: bool = True,
                 alpha: float = 0.5, quantized_prefill: bool = True, kernel: str = "auto", fused: bool = True,
                 share_prefix: bool = True):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"FastBackend supports {SUPPORTED_MODEL_TYPES} models, not {cfg.model_type!r}; use "
                             "HFBackend (rlhfkit.rollout.engine) for this model")
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
            raise ValueError("FastBackend expects a SiLU MLP without bias (standard Llama); use HFBackend")
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("FastBackend is a CPU engine; on a GPU use HFBackend or the vLLM backend")
        self.tok, self.quantize, self.share_prefill, self.alpha = tokenizer, quantize, share_prefill, alpha
        self.quantized_prefill, self.fused, self.share_prefix = quantized_prefill, fused, share_prefix
        self.kernel = resolve_kernel(kernel)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.rotate_sign = torch.ones(self.head_dim)  # rotate_half(x) = roll(x, D/2) * this
        self.rotate_sign[:self.head_dim // 2] = -1
        self.last_logps: torch.Tensor | None = None
        self.last_stats: dict = {}
        self.sync_s = 0.0
        self.layers: list[_Layer] = []
        self.norm_s: torch.Tensor | None = None  # int8 decode: the final norm's weight / s of the lm head
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
        self.lm_head = QuantLinear([model.lm_head.weight], [getattr(model.lm_head, "bias", None)])
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight,
                qkv=QuantLinear([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight],
                            [att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]),
                o=QuantLinear([att.o_proj.weight], [att.o_proj.bias]),
                ln2=layer.post_attention_layernorm.weight,
                gate_up=QuantLinear([mlp.gate_proj.weight, mlp.up_proj.weight], [None, None]),
                down=QuantLinear([mlp.down_proj.weight], [None])))
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
        self.norm_s = None
        self.stale = bool(self.quantize)

    def _linears(self) -> list[tuple[str, QuantLinear]]:
        named = [(name, getattr(layer, name)) for layer in self.layers for name in ("qkv", "o", "gate_up", "down")]
        return named + [("lm_head", self.lm_head)]

    def _named_linears(self) -> dict[str, QuantLinear]:
        """Every linear group by a unique name: ``layers.I.qkv`` ... ``layers.I.down``, ``lm_head``."""
        names = [f"layers.{i}.{name}" for i in range(len(self.layers)) for name in ("qkv", "o", "gate_up", "down")]
        return dict(zip([*names, "lm_head"], [lin for _, lin in self._linears()]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The engine's history: each linear group's smoothing statistics (the per-input-channel max |x| it
        has observed over every prefill since the engine was built). Its int8 weights are a function of the
        policy's weights and these, so a checkpoint keeps them (the online trainers save them per process)
        and a resumed run quantizes its first step's weights as the uninterrupted run did (later steps agree
        in distribution: docs/generation.md)."""
        return {name: lin.amax.clone() for name, lin in self._named_linears().items() if lin.amax is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "engine state") -> None:
        """Restore :meth:`state_dict`'s statistics (an empty dict: none observed yet); a name or shape that
        does not fit this model is a ``ValueError`` naming ``source`` and the entry."""
        linears = self._named_linears()
        for name, amax in state.items():
            lin = linears.get(name)
            if lin is None:
                raise ValueError(f"{source}: {name!r} is not a linear group of this model "
                                 f"({len(self.layers)} layers); was it saved for another model?")
            k = lin.weights[0].shape[1]
            if not isinstance(amax, torch.Tensor) or tuple(amax.shape) != (k,):
                raise ValueError(f"{source}: {name!r} must be a tensor of shape ({k},), "
                                 f"got {getattr(amax, 'shape', type(amax).__name__)}")
        missing = sorted(set(linears) - set(state))
        if state and missing:
            raise ValueError(f"{source}: statistics missing for {missing[0]!r} ({len(missing)} of {len(linears)} "
                             "linear groups): an engine observes all of them or none")
        for name, lin in linears.items():
            lin.amax = state[name].float().clone() if name in state else None
        self.stale = bool(self.quantize)  # re-quantize with these statistics at the next generate

    def _has_statistics(self) -> bool:
        return all(lin.amax is not None for _, lin in self._linears())

    def _quantize(self) -> float:
        """Build the int8 copies from the current weights and the observed statistics; return the seconds."""
        t0 = time.perf_counter()
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
            self.norm_s = self.norm * self.lm_head.inv_s
        self.stale = False
        return time.perf_counter() - t0

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
        sin = sin * self.rotate_sign
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
            quantize_s = self._quantize()
        lib = decode_kernels.load() if self.quantize is True and self.fused else None
        cache_mask, prefix = prompt_mask, 0  # which cache columns hold real keys
        if int8_prefill and lib is not None:
            logits, layout, prefix = fused_ops.prefill(self, lib, u_ids, positions, u_mask, caches, rows,
                                                       observe is not None, self.share_prefix)
            logits, cache_mask = logits.index_select(0, rows), layout.index_select(0, rows)  # (B, V), (B, P)
        else:
            exact_rows = self._first_token_rows(u_ids, positions, u_mask) if int8_prefill else None
            h = self._forward(u_ids, positions, mask, caches, 0, rows, exact=not int8_prefill, observe=observe,
                              exact_rows=exact_rows)
            logits = self._logits(h[:, -1], exact=not int8_prefill).index_select(0, rows)  # (B, V)
            if observe is not None:
                self.lm_head.observe(_rms_norm(h, self.norm, self.eps), observe)
        if self.stale:  # fp32 prefill: quantize for the decode
            quantize_s = self._quantize()
        t_prefill = time.perf_counter() - t0 - quantize_s

        # 2. decode: sample, feed back, until every row has ended or C tokens
        key_mask = torch.cat([cache_mask, torch.ones(b, c, dtype=torch.bool)], 1)  # (B, P + C)
        next_pos = prompt_mask.sum(1, keepdim=True)  # (B, 1) position of token 0
        out = torch.full((b, c), pad, dtype=torch.long)
        logps = torch.zeros(b, c)
        alive = torch.ones(b, dtype=torch.bool)
        live = torch.arange(b)  # the batch rows the decoder still runs (int8: the rows still alive)
        steps = 0
        for t in range(c):
            # every row is sampled, finished ones included, as generate does: the seeded draws of the
            # live rows stay those of generate (a finished row's logits are its last ones, never used)
            tokens, token_logps = sample_tokens(logits, sampling, gen, exact_draws=not self.quantize)
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
                still = alive[live].nonzero().squeeze(1)
                live = live[still]
                caches = [(k.index_select(0, still), v.index_select(0, still)) for k, v in caches]
            if lib is not None:
                fused_ops.decode_step(self, lib, tokens[live, None], next_pos[live] + t, key_mask[live], caches,
                                      p + t, logits, live)
                continue
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
                           "steps": steps, "distinct_prompts": len(keep), "shared_prefix": prefix,
                           "fused": lib is not None,
                           "kernel": kernel_in_use(self.kernel) if self.quantize is not False else "fp32"}
        return out[:, :steps].to(prompt_ids.device)
