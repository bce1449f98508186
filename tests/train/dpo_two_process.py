"""DPO under two processes, for tests/test_dpo.py::test_two_processes_match_one.

Run with ``python -m torch.distributed.run --nproc_per_node 2 tests/dpo_two_process.py DATA OUT_DIR`` (not
``accelerate launch --cpu``, which starts one process on this machine: see DESIGN.md). Trains the tiny
model two steps with a global batch of 8 (micro-batch 2 x accumulation 2 x 2 processes), with eval and
the KL estimate, and writes ``OUT_DIR/processes.json`` with the process count the run really had. It
exits non-zero unless there were exactly two processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def config(data: str, out_dir: str):
    from rlhfkit.train.dpo import DPOConfig

    return DPOConfig(model="tiny", data=data, output_dir=out_dir, max_steps=2, batch_size=8, micro_batch_size=2,
                     lr=3e-3, lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.25, eval_every=1,
                     kl_prompts=2, kl_max_new_tokens=4, progress=False)


def main(data: str, out_dir: str) -> None:
    from accelerate import PartialState

    from rlhfkit.train.dpo import train

    train(config(data, out_dir))
    state = PartialState()  # the trainer's Accelerator state: what rlhfkit's runtime really set up
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes} (backend {state.backend})"
    if state.is_main_process:
        (Path(out_dir) / "processes.json").write_text(json.dumps({"num_processes": state.num_processes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
