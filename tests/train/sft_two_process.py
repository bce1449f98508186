"""SFT under two processes, for tests/test_sft.py::test_two_processes_match_one.

Run with ``python -m torch.distributed.run --nproc_per_node 2 tests/sft_two_process.py DATA OUT_DIR STEPS``
(not ``accelerate launch --cpu``, which starts one process on this machine: see DESIGN.md). It
trains the tiny model with a global batch of 8 (micro-batch 2 x accumulation 2 x 2 processes) and
writes ``OUT_DIR/processes.json`` with the process count the run really had and its per-step losses.
It exits non-zero unless there were exactly two processes: a "distributed" test that ran one
process would prove nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(data: str, out_dir: str, steps: int) -> None:
    from accelerate import PartialState

    from rlhfkit.tracking import read_metrics
    from rlhfkit.train.sft import SFTConfig, train

    cfg = SFTConfig(model="tiny", data=data, output_dir=out_dir, max_steps=steps, batch_size=8, micro_batch_size=2,
                    lr=1e-2, lr_schedule="constant", warmup_ratio=0.0, eval_fraction=0.0, progress=False)
    train(cfg)
    # the state the trainer's Accelerator set up (a singleton): read after train, not created before it,
    # so this checks what rlhfkit's runtime chose rather than what this script asked for
    state = PartialState()
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes} (backend {state.backend})"
    if state.is_main_process:
        losses = [row["loss/sft"] for row in read_metrics(out_dir)]
        record = {"num_processes": state.num_processes, "backend": state.backend, "losses": losses}
        (Path(out_dir) / "processes.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
