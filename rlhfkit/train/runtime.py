"""Plumbing shared by the trainers: accelerator and seeds, schedules, checkpoints, perf figures.

No math lives here (that is in ops/losses/advantages); only the machinery every loop needs.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import resource
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rlhfkit.config import to_dict
from rlhfkit.models.loading import quiet_transformers
from rlhfkit.models.lora import is_lora, save_adapter
from rlhfkit.tracking import RunDir, default_run_dir


def make_accelerator(mixed_precision: str = "auto"):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if mixed_precision == "auto":
        if torch.cuda.is_available():
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed_precision = "no"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {mixed_precision!r}")
    # Without cpu=True, accelerate (checked on 1.15) sees a torchrun launch on a machine with no GPU as
    # a single process: each rank would train alone on its own shard, never averaging gradients.
    # broadcast_buffers=False: by default every forward through the DDP wrapper broadcasts the module's
    # buffers (a collective), and the packed log-prob pass makes a length-dependent number of forwards per
    # micro-batch, which can differ between processes: a hang. The buffers are constants (rotary inv_freq).
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not _has_accelerator(), kwargs_handlers=[ddp])


def _has_accelerator() -> bool:
    devices = getattr(torch, "accelerator", None)  # torch >= 2.6 knows CUDA, XPU, MPS, ...
    return devices.is_available() if devices is not None else torch.cuda.is_available()


def fused_optimizer_ok(device: torch.device) -> bool | None:
    """True where torch has fused AdamW kernels for ``device`` (CPU since torch 2.4, CUDA), else None
    (torch's default choice)."""
    return True if device.type == "cuda" or (device.type == "cpu" and _torch_at_least(2, 4)) else None


def adamw(params, acc, lr: float, eps: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with fused kernels where torch has them: on CPU the default per-tensor loop is ~10x
    slower (SmolLM2-135M on 2 cores: ~1.5 s vs 16-30 s per step, measured here)."""
    return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused_optimizer_ok(acc.device))


def _torch_at_least(major: int, minor: int) -> bool:
    found = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return found >= (major, minor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_report(acc) -> str:
    if acc.device.type == "cuda":
        return f"{torch.cuda.get_device_name(acc.device)} x{acc.num_processes}, mixed precision {acc.mixed_precision}"
    return f"CPU, {torch.get_num_threads()} threads per process x{acc.num_processes} processes"


def open_run(cfg, method: str, acc, total_steps: int | None) -> RunDir:
    """Create the run directory (on the main process) and record the resolved config."""
    if cfg.output_dir is None:
        # every process must agree on the directory: take the main process's choice
        from accelerate.utils import broadcast_object_list

        name = [str(default_run_dir(method))]
        if acc.num_processes > 1:
            broadcast_object_list(name, from_process=0)
        cfg.output_dir = name[0]
    run = RunDir(cfg.output_dir, to_dict(cfg), method=method, is_main=acc.is_main_process,
                 report_to=cfg.report_to, total_steps=total_steps, progress=cfg.progress)
    run.keep_checkpoints = getattr(cfg, "keep_checkpoints", None)
    run.save_optimizer = getattr(cfg, "save_optimizer", True)
    if acc.is_main_process:
        print(f"[rlhfkit] {method}: run dir {run.path} | {device_report(acc)}", flush=True)
    return run


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup then ``kind`` decay (cosine / linear to 0, or constant); transformers' schedules."""
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if kind not in names:
        raise ValueError(f"lr_schedule must be one of {', '.join(names)}, got {kind!r}")
    return get_scheduler(names[kind], optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_MALLOC_TRIM = None


def trim_heap() -> None:
    """Give the C heap's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    Why: a step's generation and scoring free hundreds of MB of mid-sized tensors that glibc keeps mapped
    (per-thread arenas, fragmentation); the optimizer update then allocates gradients and activations
    beside them, and the process's peak RSS counts both. Measured on the GRPO bench (bench/online.py,
    fast backend): peak RSS 3926-4039 MiB without, 3730-3797 MiB with one trim before the update."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def sparse_tied_embedding_grad(model, acc) -> bool:
    """Let the input-embedding lookup of a model with tied input/output embeddings (SmolLM2, Llama 3.2 1B,
    Qwen2.5 0.5B) return a sparse gradient; return whether it was set.

    The output head's gradient is dense anyway, and autograd adds the lookup's rows into it: the
    parameter's ``.grad`` is the same dense tensor as before (to float rounding on the looked-up rows), so
    clipping and the optimizer see what they did. What goes: the (vocab, hidden) zero tensor the dense
    lookup backward scatters a few hundred rows into, and its addition to the head's gradient (113 MB
    each for SmolLM2-135M). Measured on the GRPO bench's step (bench/online.py settings): peak RSS
    3777 -> 3642 MiB, backward 2.1 -> 1.8 s. Single process only: DDP, FSDP and ZeRO reduce gradients in
    dense buckets, so there the lookup stays dense."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(emb, torch.nn.Embedding) and head is not None and head.weight is emb.weight
    if not tied or not emb.weight.requires_grad or acc.num_processes > 1:
        return False
    emb.sparse = True
    return True


def perf_metrics(tokens: int, seconds: float, acc) -> dict:
    out = {"perf/tokens_per_s": tokens / max(seconds, 1e-9), "perf/step_s": seconds, "perf/peak_rss_mb": peak_rss_mb()}
    if acc.device.type == "cuda":
        out["perf/peak_mem_mb"] = torch.cuda.max_memory_allocated(acc.device) / 2**20
    return out


# --- checkpoints ---------------------------------------------------------------------------------
#
# Trainer state and RNG files hold only tensors and plain Python values (dict, list, str, int, float,
# bool, None) and are read back with torch.load(weights_only=True): unpickling arbitrary objects would
# let a checkpoint directory from someone else run code on resume. numpy's and Python's RNG states are
# therefore stored as tensors and converted back exactly (rng_state / set_rng_state).

STATE_FILE = "trainer_state.pt"
PROCESS_FILE = "process-{rank}.pt"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects that ``torch.load(weights_only=True)`` refuses to build."""


def save_checkpoint(acc, run: RunDir, step: int, models: dict, tokenizer, optimizer, scheduler, state: dict,
                    process_state: dict | None = None) -> Path:
    """``checkpoints/step-N/``: the policy in Hugging Face format at the top level (loadable by plain
    ``transformers`` and vLLM), other models (value, reward) in sub-folders, trainer state beside. A LoRA
    model is saved as its adapter (peft, safetensors; ``rlhfkit export --merge`` makes it a plain model).
    ``process_state``: what is this process's own (its sampler engine's statistics), in ``process-RANK.pt``
    (:func:`load_process_state`)."""
    path = run.path / "checkpoints" / f"step-{step}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            target = path if name == "policy" else path / name
            with quiet_transformers(False):  # no "Writing model shards" bar
                if is_lora(model):  # the adapter and trained heads (safetensors) + its base's name; docs/lora.md
                    save_adapter(acc.unwrap_model(model), target)
                else:
                    acc.unwrap_model(model).save_pretrained(target, safe_serialization=True)
            tokenizer.save_pretrained(target)
        optim = {"optimizer": optimizer.state_dict()} if getattr(run, "save_optimizer", True) else {}
        torch.save(_plain({"step": step, **optim, "scheduler": scheduler.state_dict() if scheduler else None,
                           "rng": rng_state(), **state}, "trainer state"), path / STATE_FILE)
    acc.wait_for_everyone()
    if acc.num_processes > 1:  # every process's own generators: a resumed rank continues its own streams
        torch.save(rng_state(), path / f"rng-{acc.process_index}.pt")
    if process_state:
        torch.save(_plain(process_state, "process state"), path / PROCESS_FILE.format(rank=acc.process_index))
    acc.wait_for_everyone()
    keep = getattr(run, "keep_checkpoints", None)
    if keep and acc.is_main_process:
        for old in checkpoints(run.path)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return path


def _plain(value, where: str):
    """``value`` with numpy scalars/arrays turned into Python numbers/tensors; anything else that
    ``torch.load(weights_only=True)`` could not read back is an error here, at save time, not on resume."""
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if value is None or isinstance(value, (torch.Tensor, str, bytes, bool, int, float)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a checkpoint; trainer state holds only "
                    "tensors and plain Python values (dict, list, str, int, float, bool, None)")


def restore(ckpt: Path | None, optimizer, scheduler, rank: int = 0) -> tuple[int, dict]:
    """Resume: the optimizer, scheduler and this process's RNG states from a checkpoint; returns (step,
    the rest of the trainer state). No checkpoint: (0, {}). A checkpoint saved with
    ``save_optimizer=False`` has no optimizer state: the optimizer then starts afresh (AdamW's moments
    from zero, so the first updates are larger), with a warning."""
    if not ckpt:
        return 0, {}
    state = load_trainer_state(ckpt, rank)
    saved = state.pop("optimizer", None)
    if saved is not None:
        optimizer.load_state_dict(saved)
    else:
        warnings.warn(f"{ckpt}: the checkpoint has no optimizer state (saved with save_optimizer=False); "
                      "the optimizer restarts from zero moments", stacklevel=2)
    scheduler.load_state_dict(state.pop("scheduler"))
    return state.pop("step"), state


def checkpoints(run_path: Path) -> list[Path]:
    """The run's ``checkpoints/step-N`` folders, oldest first."""
    return sorted((Path(run_path) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def rng_state() -> dict:
    """This process's torch, numpy, Python (and CUDA) generator states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # legacy MT19937 tuple
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        # uint32 words widened to int64: exact, and a dtype every torch version serialises
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of ``rng_state``: every generator continues exactly where it was saved."""
    n, p = state["numpy"], state["python"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_checkpoint(resume: str | None, output_dir: str | None) -> Path | None:
    """Resolve ``resume``: a checkpoint dir, or 'auto' = the latest step-N in output_dir (if any)."""
    if resume is None:
        return None
    if resume == "auto":
        ckpts = checkpoints(Path(output_dir or "."))
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).exists():
        raise FileNotFoundError(f"resume: {p} is not a checkpoint directory (no {STATE_FILE})")
    return p


def load_trainer_state(path: Path, rank: int = 0) -> dict:
    """The checkpoint's trainer state; restores this process's RNG streams (``rng-RANK.pt`` when the run
    had several processes, else the single state saved with the trainer state)."""
    state = _load_plain(path / STATE_FILE)
    rng = state.pop("rng", None)
    own = path / f"rng-{rank}.pt"
    if own.exists():
        rng = _load_plain(own)
    if rng:
        set_rng_state(rng)
    return state


def load_process_state(path: Path | None, rank: int = 0) -> dict:
    """This process's own state saved with checkpoint ``path`` (``save_checkpoint(process_state=...)``);
    {} when there is no checkpoint or it has none (a checkpoint from before, or from an 'hf' run)."""
    file = Path(path) / PROCESS_FILE.format(rank=rank) if path else None
    return _load_plain(file) if file is not None and file.exists() else {}


def _load_plain(file: Path) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain values only; nothing in the file can run code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the first global it refused ("Unsupported global: GLOBAL posix.system was not ...")
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        refused = f"it refers to {found.group(1)}" if found else "torch.load(weights_only=True) refused it"
        older = found is not None and found.group(1).startswith("numpy")  # rlhfkit 0.1.0 pickled numpy RNG state
        raise UnsafeCheckpointError(
            f"resume: {file} holds pickled Python objects, which rlhfkit does not load because unpickling them "
            f"could run code ({refused}). "
            + ("It was probably written by an older rlhfkit (before checkpoints held only tensors and plain "
               "values): resume it with that rlhfkit version, or restart the run without --resume."
               if older else "If you did not write this checkpoint yourself, do not use it; otherwise restart "
               "the run without --resume.")) from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"resume: {file} does not hold a trainer-state dict (found {type(state).__name__})")
    return state

class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def num_threads_note() -> str:
    return f"torch threads={torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
