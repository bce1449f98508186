"""The engine's fused decode ops (decode_kernels.c), built with the system's C compiler on first use.

The C file is compiled once per machine into a cache folder (``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``),
named by a hash of the source, the flags and the CPU, and loaded with ``ctypes``: a plain C library with
no Python or torch headers, so a build takes about a second and its calls cost a few microseconds. Where no
compiler works, :func:`load` returns None and the engine runs its torch ops (``FastBackend.last_stats
['fused']`` says which ran; ``RLHFKIT_FUSED=0`` turns the library off).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_kernels.c")
VERSION = 10  # rlhfkit_kernels_version() of the source this module calls
# OpenMP where the compiler has it (its loops then share torch's libgomp and thread count), else one thread
# no -ffast-math: reassociated reductions would round differently with each buffer's alignment (a result that
# changes from one process to the next); the C code spells out its vector lanes instead
_MATH = ["-fno-math-errno", "-fno-trapping-math"]
_FLAG_SETS = (["-O3", "-march=native", *_MATH, "-fopenmp"], ["-O3", "-march=native", *_MATH], ["-O3", *_MATH])
_LIB: ctypes.CDLL | None = None
_TRIED = False
_LOCK = threading.Lock()  # the engine's quantizing threads may be the first callers

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "prep": [_p, _p, _f, _i, _i, _i, _i, _p, _p, _p],
    "qkv_post": [_p, _i, _p, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _p, _i, _p, _p],
    "residual_prep": [_p, _i, _p, _p, _p, _p, _p, _f, _i, _i, _i, _p, _p, _p],
    "gate_up_post": [_p, _i, _p, _p, _p, _i, _i, _i, _p, _p, _p],
    "dequant_rows": [_p, _i, _p, _p, _p, _i, _i, _p, _p],
    "attention": [_p, _p, _p, _p, ctypes.c_long, _i, _i, _i, _i, _i, _p, _p, _f, _p],
    "quantize_rows": [_p, _p, _i, _i, _p, _p, _p, _i, _i],
    "gemm_u8s8": [_p, _p, _p, _i, _i, _i, _p],
    "gemm_u8s8_vnni": [_p, _p, _p, _i, _i, _i, _p],
    "col_amax": [_p, _i, _i, _p],
}


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({x for x in lines if x.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("RLHFKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlhfkit")
    return Path(root) / "kernels"


def build(compiler: str | None = None) -> Path:
    """Compile the C file (or find it compiled) and return the library's path; ``RuntimeError`` saying why not."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join([cc, *flags]).encode(), _cpu_id().encode()])).hexdigest()[:16]
        target = cache_dir() / f"decode_kernels-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE), "-lm"],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                os.replace(out, target)  # atomic: another process building at once finds one whole file
                return target
            errors.append(f"{cc} {' '.join(flags)}: {run.stderr.strip()[-500:]}")
    raise RuntimeError("could not compile the engine's decode kernels:\n" + "\n".join(errors))


def load() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None where it cannot be built or ``RLHFKIT_FUSED=0``."""
    global _LIB, _TRIED
    if os.environ.get("RLHFKIT_FUSED", "1") == "0":
        return None
    with _LOCK:
        if not _TRIED:
            _load()
    return _LIB


def _load() -> None:
    global _LIB, _TRIED
    _TRIED = True
    try:
        lib = ctypes.CDLL(str(build()))
        if lib.rlhfkit_kernels_version() != VERSION:
            raise RuntimeError(f"{SOURCE.name} is version {lib.rlhfkit_kernels_version()}, this module {VERSION}")
        for name, args in _SIGNATURES.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = None
        lib.rlhfkit_amx.argtypes = [_i]  # AMX tiles for the vnni kernel where the CPU has them; RLHFKIT_AMX=0: off
        lib.rlhfkit_amx(0 if os.environ.get("RLHFKIT_AMX") == "0" else 1)
        _LIB = lib
    except (RuntimeError, OSError) as e:
        warnings.warn(f"the engine's fused decode ops are unavailable, its torch ops run instead ({e})",
                      RuntimeWarning, stacklevel=3)


def ptr(t: torch.Tensor | None) -> int | None:
    """A contiguous tensor's data address for a C call (None for an absent bias)."""
    if t is None:
        return None
    assert t.is_contiguous(), "the fused ops read and write contiguous memory"
    return t.data_ptr()
