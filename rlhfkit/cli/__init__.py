"""The one entry point: ``rlhfkit <command>``.

Training commands build their options from their config dataclass (``--field-name VALUE`` for every
field, plus ``--config FILE.yaml``), so the command line, YAML files and the Python API agree.
Modules are imported only for the command being run, so ``rlhfkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from rlhfkit.cli import cpu
from rlhfkit.cli.cpu import SPIN_COUNT  # noqa: F401  (rlhfkit.cli.SPIN_COUNT)

# command -> (module, config class, one-line description)
TRAINERS = {
    "sft": ("rlhfkit.train.sft", "SFTConfig", "supervised fine-tuning on chat data (assistant-only loss)"),
    "dpo": ("rlhfkit.pipelines.iterative_dpo", "IterativeDPOConfig", "offline preference optimisation: DPO, IPO, cDPO, SLiC, SimPO, ORPO, KTO"),
    "ppo": ("rlhfkit.train.ppo", "PPOConfig", "PPO with a critic (the N implementation details of RLHF with PPO)"),
    "grpo": ("rlhfkit.train.grpo", "GRPOConfig", "GRPO / Dr. GRPO / REINFORCE++: critic-free, group baselines"),
    "rloo": ("rlhfkit.train.grpo", "RLOOConfig", "RLOO: REINFORCE with a leave-one-out baseline"),
    "cmpo": ("rlhfkit.train.cmpo", "CMPOConfig", "CMPO: Muesli-style regularised policy optimisation"),
}
# command -> (module, function(argv) -> int, description)
TOOLS = {
    "demo": ("rlhfkit.cli.demo", "main", "the whole RLHF loop on the bundled model, offline, with a report"),
    "tasks": ("rlhfkit.cli.tasks", "main", "built-in tasks with hidden gold rewards"),
    "sample": ("rlhfkit.cli.sample", "main", "sample K completions per prompt into comparison pairs"),
    "label": ("rlhfkit.cli.label", "main", "label pairs: simulated annotator, LM judge or reward model"),
    "reward": ("rlhfkit.cli.reward", "main", "train / evaluate a Bradley-Terry reward model"),
    "annotate": ("rlhfkit.cli.annotate", "main", "human preference annotation web app"),
    "eval": ("rlhfkit.cli.evaluate", "eval_main", "win rate of a policy over a reference, with CIs"),
    "compare": ("rlhfkit.cli.evaluate", "compare_main", "compare groups of runs: IQM, CIs, P(A > B)"),
    "report": ("rlhfkit.cli.evaluate", "report_main", "self-contained HTML report of runs"),
    "export": ("rlhfkit.cli.export", "main", "merge a LoRA checkpoint into a plain Hugging Face model"),
    "serve-rollouts": ("rlhfkit.cli.serve", "main", "serve rollout generation over HTTP to a remote trainer"),
    "info": ("rlhfkit.cli", "info", "versions, device, threads and the bundled model's cache state"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhfkit",
        description="Train dialogue models from human feedback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(
            f"  {name:<10} {desc}" for name, (*_, desc) in {**TRAINERS, **TOOLS}.items()
        ) + "\n\nrun `rlhfkit COMMAND --help` for a command's options",
    )
    p.add_argument("command", choices=sorted({**TRAINERS, **TOOLS}), metavar="COMMAND")
    return p


def run_trainer(name: str, argv: list[str]) -> int:
    from rlhfkit.config import ConfigError, add_config_arguments, config_from_args

    module_name, cls_name, desc = TRAINERS[name]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    parser = argparse.ArgumentParser(prog=f"rlhfkit {name}", description=desc)
    add_config_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(cls, args)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    from rlhfkit.data.records import DataError
    from rlhfkit.models.loading import ModelNotFoundError
    from rlhfkit.models.lora import LoraError
    from rlhfkit.train.runtime import UnsafeCheckpointError

    try:
        result = module.train(cfg)
    except (DataError, ModelNotFoundError, UnsafeCheckpointError, LoraError) as e:
        # the user's input, not rlhfkit, is at fault and the message says where: no traceback
        print(f"rlhfkit {name}: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


def info(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="rlhfkit info", description=TOOLS["info"][2]).parse_args(argv)
    import platform

    import torch
    import transformers

    import rlhfkit
    from rlhfkit.models import bundled_cache_state

    rows = {
        "rlhfkit": rlhfkit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu threads": torch.get_num_threads(),
    }
    for mod in ("accelerate", "peft", "datasets", "vllm", "trl"):
        try:
            rows[mod] = importlib.import_module(mod).__version__
        except ImportError:
            rows[mod] = "not installed"
    for k, v in bundled_cache_state().items():
        rows[f"bundled model {k}"] = v
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    return 0


COMPUTE_COMMANDS = frozenset({*TRAINERS, "demo", "sample", "label", "reward", "eval", "serve-rollouts"})
"""Commands that run a model: their torch thread count follows the cores free at start."""


def setup_cpu_env(name: str, rest: list[str]) -> None:
    """Threading for this CPU, idle or shared with other processes (docs/generation.md, "Shared CPU").
    libgomp reads its environment once, when torch loads it, so this runs before anything imports torch.

    For a command that computes, unless ``OMP_NUM_THREADS`` is set: ``torch.set_num_threads`` to the cores
    idle right now (``cpu.free_cpu_threads``, 0.2 s). Then how libgomp's idle threads wait at the barrier
    that ends every parallel op, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``:

    - every allowed core idle (or not measured): ``GOMP_SPINCOUNT=10000``, a short spin, then sleep. A
      decode step is ~1000 small ops, each ending at a barrier: sleeping at once (``PASSIVE``) pays a
      wake-up at each (batch-8 engine 74.5 tok/s against 123.6 with the short spin, HF ``generate`` 41.4
      against 66.5); libgomp's default 300000-iteration spin 99.7 / 55.4.
    - some cores busy: ``OMP_WAIT_POLICY=PASSIVE``. With another busy process on the cores, a spinning
      thread holds the core its descheduled partner needs: the engine fell to 2.5 tok/s with the default
      spin, 35.1 with the short one, 56.2 with PASSIVE.

    ``THP_MEM_ALLOC_ENABLE=1`` unless the user set it: PyTorch's CPU allocator then asks for transparent
    huge pages for every allocation of 2 MB or more (it reads the variable at its first allocation). A
    training step allocates hundreds of MB of fresh gradients, logits and activations, and with 4 kB pages
    each first touch is a page fault: zeroing a fresh 113 MB tensor took 48-53 ms, 11 ms with huge pages.
    The GRPO bench's step (bench/online.py settings) fell 6.94 -> 6.18 s (three alternating pairs of
    runs; each pair faster with it) at +50-100 MiB peak RSS. ``THP_MEM_ALLOC_ENABLE=0`` turns it off."""
    threads = None
    if name in COMPUTE_COMMANDS and "OMP_NUM_THREADS" not in os.environ and not {"-h", "--help"} & set(rest):
        threads = cpu.free_cpu_threads()
    os.environ.update(cpu.command_env(os.environ, busy=threads is not None and threads < cpu.allowed_cpus()))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_cpu_env(argv[0] if argv else "", argv[1:])  # before any command module imports torch
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name in TRAINERS:
        return run_trainer(name, rest)
    if name in TOOLS:
        module_name, func, _ = TOOLS[name]
        return int(getattr(importlib.import_module(module_name), func)(rest) or 0)
    _top_parser().parse_args(argv[:1])  # prints the usage error and exits 2
    return 2

