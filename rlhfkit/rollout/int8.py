"""The int8 linear layers of the CPU engine (rlhfkit/rollout/fast.py), and the choice of int8 GEMM.

:class:`QuantLinear` is one linear group of a Llama layer (q/k/v fused, gate/up fused, o, down, the lm
head) with both ways to apply it: the policy's own fp32 tensors, op for op as transformers does, and
an int8 copy (W8A8, per-token activations) rebuilt from them after every policy update.
docs/generation.md has the measurements behind each choice.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import torch
import torch.nn.functional as F

from rlhfkit.rollout import decode_kernels

INT8_KERNELS = ("int_mm", "fbgemm", "avx2", "vnni")
OWN_KERNELS = ("avx2", "vnni")  # rlhfkit's own GEMM (decode_kernels.c), weights in its panel layout
_KERNEL: str | None = None
_CHUNK_ROWS = 1024  # rows of a weight re-quantized at a time (QuantLinear.quantize)
_SCRATCH = threading.local()  # each quantizing thread's fp32 buffer for one chunk


def _scratch(numel: int) -> torch.Tensor:
    """This thread's scratch buffer, at least ``numel`` floats: reused chunk after chunk, so it stays in cache."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel)
    return buf[:numel]


def avx2_available() -> bool:
    """Whether rlhfkit's own AVX2 GEMM (``gemm_u8s8`` in decode_kernels.c) is built and vectorized here."""
    lib = decode_kernels.load()
    return lib is not None and bool(lib.rlhfkit_has_avx2())


def vnni_available() -> bool:
    """Whether the ``vnni`` kernel (``gemm_u8s8_vnni``) is built with AVX-512 VNNI here (elsewhere it runs
    as an exact scalar loop: correct, slow)."""
    lib = decode_kernels.load()
    return lib is not None and bool(lib.rlhfkit_has_vnni())


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""``/proc/cpuinfo`` flags of an x86 CPU with an int8 dot-product instruction, where ``_int_mm`` is fast."""


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU lists one of :data:`VNNI_FLAGS`; None where the file or its ``flags`` line is
    missing (not Linux, not x86)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(VNNI_FLAGS & set(line.partition(":")[2].split()))
    except OSError:
        pass
    return None


def int8_kernel() -> str:
    """The int8 GEMM for this CPU, chosen once per process: ``$RLHFKIT_INT8_KERNEL`` when set (one of
    :data:`INT8_KERNELS`), else by the CPU's flags, else by timing.

    Where ``/proc/cpuinfo`` lists a VNNI flag (:data:`VNNI_FLAGS`): ``vnni``, rlhfkit's own GEMM with an
    AVX-512 VNNI tile (``gemm_u8s8_vnni`` in decode_kernels.c), wherever its library is built with it
    and AMX tiles for blocks of 16 rows where the CPU has them (docs/generation.md, "The own GEMM's VNNI
    tile": decode GEMMs at 8 rows 1.3-2.2x ``_int_mm``'s, at 32-100 rows 1.4-1.8x with AMX; the same
    integer products, so the same samples), else
    ``int_mm`` (``torch._int_mm``, oneDNN, fast only with VNNI: elsewhere a loop 10-100x slower than fp32).
    Where it lists none: ``avx2``, rlhfkit's own with its AVX2 tile (``gemm_u8s8``), wherever its library
    is built with AVX2: inside the engine it is 1.1-1.3x fbgemm's kernel and needs no prepack
    (docs/generation.md, "The own AVX2 GEMM"); ``fbgemm`` where it is not.
    The flags decide, not a timing, wherever they can: on a VNNI CPU ``_int_mm``'s GEMM alone is 1.5x
    fbgemm's at decode size, close enough that a timing against a 2x bar flipped with the machine's load,
    and each kernel rounds differently, so two runs of one seed sampled different completions. Without
    the flags (no ``/proc/cpuinfo``), ``_int_mm`` is timed against fbgemm's ``linear_dynamic`` on a
    decode-sized product (576 -> 1536 at 8 rows) and taken unless more than twice as slow."""
    global _KERNEL
    if _KERNEL is None:
        asked = os.environ.get("RLHFKIT_INT8_KERNEL")
        if asked:
            if asked not in INT8_KERNELS:
                raise ValueError(f"RLHFKIT_INT8_KERNEL must be one of {INT8_KERNELS}, got {asked!r}")
            _KERNEL = asked
            return _KERNEL
        vnni = cpu_has_vnni()
        if vnni is None:
            vnni = _int_mm_is_fast()
        if vnni:
            _KERNEL = "vnni" if vnni_available() else "int_mm"
        else:
            _KERNEL = "avx2" if avx2_available() else "fbgemm"
    return _KERNEL


def resolve_kernel(kernel: str) -> str:
    """``kernel`` (``"auto"``: :func:`int8_kernel`'s pick) checked against what this machine can run: an
    own kernel needs the C library (``avx2`` its AVX2 build; ``vnni`` without AVX-512 VNNI runs, slowly,
    with a warning)."""
    if kernel not in ("auto", *INT8_KERNELS):
        raise ValueError(f"kernel must be 'auto' or one of {INT8_KERNELS}, got {kernel!r}")
    kernel = int8_kernel() if kernel == "auto" else kernel
    if kernel == "avx2" and not avx2_available():
        raise ValueError("kernel 'avx2' needs rlhfkit's C library built with AVX2 (decode_kernels.c: a C compiler "
                         "and an AVX2 CPU); use 'fbgemm' or 'int_mm'")
    if kernel == "vnni" and decode_kernels.load() is None:
        raise ValueError("kernel 'vnni' needs rlhfkit's C library (decode_kernels.c: a C compiler); use 'int_mm'")
    if kernel == "vnni" and not vnni_available():
        warnings.warn("kernel 'vnni': this CPU or compiler has no AVX-512 VNNI, so its GEMM runs as an exact "
                      "scalar loop (slow); 'auto' picks the fast kernel here", stacklevel=3)
    return kernel


def kernel_in_use(kernel: str) -> str:
    """``kernel``, or ``"vnni+amx"`` where the vnni kernel runs blocks of 16 rows on AMX tiles
    (decode_kernels.c; ``RLHFKIT_AMX=0`` switches them off)."""
    lib = decode_kernels.load()
    return "vnni+amx" if kernel == "vnni" and lib is not None and lib.rlhfkit_amx(-1) else kernel


def _int_mm_is_fast() -> bool:
    """``_int_mm`` at most twice as slow as fbgemm's ``linear_dynamic`` on a decode-sized product (the
    GEMMs alone: the per-token ops around them would let machine noise decide at this size)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 576, generator=g)
    x8 = x.mul(40).round_().clamp_(-127, 127).to(torch.int8)
    w = torch.randn(1536, 576, generator=g)
    gemms = {"int_mm": lambda lin: torch._int_mm(x8, lin.w8t),
             "fbgemm": lambda lin: torch.ops.quantized.linear_dynamic(x, lin.packed, True)}
    times = {}
    for kernel, gemm in gemms.items():
        lin = QuantLinear([w], [None])
        try:
            with warnings.catch_warnings():  # fbgemm's quantized tensors are deprecated (see quantize)
                warnings.simplefilter("ignore", UserWarning)
                lin.quantize(alpha=0.0, kernel=kernel)
            gemm(lin)
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                gemm(lin)
                runs.append(time.perf_counter() - t0)
            times[kernel] = min(runs)
        except RuntimeError:  # a build without the kernel
            times[kernel] = float("inf")
    return times["int_mm"] <= 2 * times["fbgemm"]


class QuantLinear:
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
        self.w8 = self.rowsum = None  # the own kernel's int8 weight (in its panels) and its row sums
        self.kernel: str | None = None  # the kernel of the int8 copy (quantize)

    def observe(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Track the per-input-channel max |x| over the rows of ``x`` (N, T, K) where ``rows`` (N*T,) holds."""
        amax = x.reshape(-1, x.shape[-1])[rows].abs().amax(0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)

    @property
    def ready(self) -> bool:
        return self.w8t is not None or self.packed is not None or self.w8 is not None

    def drop(self) -> None:
        self.w8t = self.w_scale = self.packed = self.w8 = self.rowsum = None

    def quantize(self, alpha: float, kernel: str = "int_mm") -> None:
        """Build the int8 weight ``W s`` (per output channel, symmetric) from the current fp32 tensors.

        A re-quantization runs after every policy update, so it is written for memory passes: the
        smoothing reads the weights once (column max and min, no temporaries), then ``_CHUNK_ROWS`` rows at
        a time are scaled into a small scratch buffer, rounded there and written to the int8 result. Each
        full-size fp32 temporary would cost a pass over fresh pages (their first touch, not the arithmetic,
        was 80% of the time: 0.34 s -> 0.06 s for the bundled model's lm head, same int8 values).
        """
        weights = [x.detach() for x in self.weights]
        k = weights[0].shape[1]
        self.bias = None if all(x is None for x in self.biases) else torch.cat(
            [x.detach().float() if x is not None else torch.zeros(n) for x, n in zip(self.biases, self.sizes)])
        s = None
        lib = decode_kernels.load()
        if self.amax is not None and alpha > 0:
            # max |w| per input channel over the group: one pass in C, else max and -min (abs() would be a
            # full-size temporary)
            if lib is not None and all(w.dtype == torch.float32 and w.is_contiguous() for w in weights):
                w_amax = torch.zeros(k)
                for w in weights:
                    lib.col_amax(w.data_ptr(), w.shape[0], k, w_amax.data_ptr())
            else:
                w_amax = torch.stack([torch.maximum(w.amax(0), w.amin(0).neg()).float() for w in weights]).amax(0)
            s = (self.amax.clamp_min(1e-5) ** alpha / w_amax.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-2, 1e2)
        total = sum(self.sizes)
        # avx2 / vnni: rows written straight into the kernel's panel layout (decode_kernels.c: gemm_u8s8)
        panels = kernel in OWN_KERNELS
        self.kernel = kernel
        w8 = torch.empty(-(-total // 16) * 16 * (-(-k // 4) * 4) if panels else total * k, dtype=torch.int8)
        scale = torch.empty(total, 1)
        rowsum = torch.zeros(-(-total // 16) * 16 if panels else total, dtype=torch.int32)
        row = 0
        for w in weights:
            if panels:  # the kernel is this library's, so it is loaded
                w = w.float().contiguous()
            if lib is not None and w.dtype == torch.float32 and w.is_contiguous():
                # the same two passes a row, fused in C, on this thread (the engine quantizes several at once)
                n = w.shape[0]
                lib.quantize_rows(w.data_ptr(), None if s is None else s.data_ptr(), n, k,
                                  w8.data_ptr() if panels else w8[row * k:].data_ptr(), scale[row:].data_ptr(),
                                  rowsum[row:].data_ptr(), 1, row if panels else -1)
                row += n
                continue
            for part in w.split(_CHUNK_ROWS):
                n = part.shape[0]
                buf = _scratch(n * k).view(n, k)
                if s is None:
                    buf.copy_(part)
                else:
                    torch.mul(part, s, out=buf)
                sc = torch.maximum(buf.amax(1, keepdim=True), buf.amin(1, keepdim=True).neg_())
                sc = sc.div_(127).clamp_min_(1e-12)  # (n, 1)
                scale[row:row + n] = sc
                w8.view(total, k)[row:row + n] = buf.div_(sc).round_()  # |w / scale| <= 127 by construction
                row += n
        self.inv_s = 1 / s if s is not None else torch.ones(k)
        self.w_scale = scale.squeeze(1)
        if panels:
            if total % 16:  # the last panel's rows past the group's last row: zeros
                w8.view(-1, -(-k // 4), 16, 4)[-1, :, total % 16:] = 0
            self.w8, self.rowsum = w8, rowsum
        elif kernel == "fbgemm":  # quantized tensors are deprecated (pytorch#184982: callers
            # silence the warning), but fbgemm's kernel behind them is torch's fast int8 GEMM without VNNI.
            # Packed per tensor with scale 1, the per-channel scales applied to the output (int8 below): the
            # per-channel prepack reads each channel's scale and zero point one by one (half its time)
            q = torch._make_per_tensor_quantized_tensor(w8.view(total, k), 1.0, 0)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        else:
            self.w8t = w8.view(total, k).t()  # (K, N) view

    def int8(self, xs: torch.Tensor) -> torch.Tensor:
        """(M, K) input already divided by ``s`` (overwritten) -> (M, N) float32 output, all parts concatenated."""
        x_max = xs.abs().amax(1, keepdim=True).clamp_min_(1e-12)  # (M, 1): one scale per token
        if self.packed is not None:  # fbgemm: rows scaled to max |x| = 1, so its per-tensor scale is per token
            x_scale = x_max
            y = self.gemm(xs.div_(x_scale))
        elif self.w8 is not None:  # avx2: 7 bits, zero point 64; vnni: 8 bits, zero point 128
            bits = 63 if self.kernel == "avx2" else 127
            x_scale = x_max.mul_(1 / bits)
            y = self.gemm(xs.div_(x_scale).round_().add_(bits + 1).to(torch.uint8)).float()
        else:
            x_scale = x_max.mul_(1 / 127)
            x8 = xs.div_(x_scale).round_().to(torch.int8)  # |xs / x_scale| <= 127
            y = self.gemm(x8).float()  # (then int32 * float: 2-5x slower)
        y = y.mul_(self.w_scale).mul_(x_scale)  # both kernels: per-channel weight scales, per-token input scales
        if self.bias is not None:
            y += self.bias
        return y

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 kernel alone, on an input already scaled (fbgemm: fp32 rows of max |x| = 1) or rounded
        (``_int_mm``: int8; ``avx2``: uint8, zero point 64; ``vnni``: uint8, zero point 128): everything else
        :meth:`int8` does is per-token
        scaling around it.
        ``bench/generate.py`` times this call to bound what the engine could reach with these kernels."""
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(x, self.packed, True)
        if self.w8 is not None:
            n = sum(self.sizes)
            out = torch.empty(x.shape[0], n, dtype=torch.int32)
            x = x.contiguous()
            lib = decode_kernels.load()
            gemm = lib.gemm_u8s8_vnni if self.kernel == "vnni" else lib.gemm_u8s8
            gemm(x.data_ptr(), self.w8.data_ptr(), self.rowsum.data_ptr(), x.shape[0], n, x.shape[1], out.data_ptr())
            return out
        return torch._int_mm(x, self.w8t)

    def exact(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The fp32 products with the policy's own tensors, one per part."""
        return [F.linear(x, w, b) for w, b in zip(self.weights, self.biases)]

    def __call__(self, x: torch.Tensor, exact: bool = False, exact_rows: tuple | None = None) -> list[torch.Tensor]:
        """``exact_rows`` (int8 only): rows of ``x`` flattened to (M, K) computed in fp32 instead, as
        :meth:`FastBackend._first_token_rows` gives them."""
        if exact or not self.ready:
            return self.exact(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = self.int8(x * self.inv_s)
        if exact_rows is not None:  # (representative rows, all rows, each one's representative): fp32
            rep, rows, inverse = exact_rows
            y[rows] = torch.cat(self.exact(x.index_select(0, rep)), -1)[inverse]
        y = y.view(*shape[:-1], y.shape[-1])
        return list(y.split(self.sizes, -1)) if len(self.sizes) > 1 else [y]
