"""GRPO with LoRA under two processes, for tests/train/test_lora_train.py.

Run with ``python -m torch.distributed.run --nproc_per_node 2 tests/train/lora_two_process.py OUT_DIR``
(tests/train/torchrun.py). The settings and the row-seeded sampling of grpo_two_process.py, plus a LoRA
adapter: DDP then all-reduces only the adapter's gradients (the frozen base has none).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_two_process  # noqa: E402

LORA = dict(lora_r=4, lora_alpha=8.0, lr=2e-2)
"""A larger LR than the full fine-tuning script's 1e-3: the adapter starts at B = 0, and steps 2-3 must run
on an adapter the first updates changed (a wrong gradient then shows)."""


def config(out_dir: str):
    from rlhfkit.train.grpo import GRPOConfig

    return GRPOConfig(**{**grpo_two_process.SETTINGS, **LORA}, output_dir=out_dir)


if __name__ == "__main__":
    from rlhfkit.train.grpo import train

    grpo_two_process.run(train, config(sys.argv[1]), sys.argv[1])
