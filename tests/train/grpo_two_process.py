"""GRPO under two processes, for tests/train/test_online_distributed.py.

Run with ``python -m torch.distributed.run --nproc_per_node 2 tests/train/grpo_two_process.py OUT_DIR``
(tests/train/torchrun.py; not ``accelerate launch --cpu``, which starts one process here). Trains the
tiny model 3 steps with a global batch of 4 prompts x 4 completions (2 prompts per process) and writes
``OUT_DIR/processes.json`` with the process count the run really had; exits non-zero unless it was 2.

Same samples in one and two processes: the trainer seeds each process's sampler with
``sampling_seed(seed, step, rank)`` and samples its rows as one batch, so a two-process run draws
different completions than one process would for the same global batch. :func:`row_seeded_generation`
makes the HF backend sample each row alone, seeded by the row's place in the *global* batch
(``rank * rows_per_process + i``), so the split no longer changes the samples: only then can the two
runs' losses be compared. Everything after sampling (log-probs, reward, advantages, the loss, DDP's
gradient all-reduce, the metric reduction) is the trainer's own code.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

STEPS = 3
SETTINGS = dict(model="tiny", task="sentiment", rollout_backend="hf", prompts_per_step=4, samples_per_prompt=4,
                max_new_tokens=12, total_steps=STEPS, lr=1e-3, lr_schedule="constant", eval_every=STEPS, eval_prompts=4,
                sample_every=0, progress=False, missing_eos_penalty=None, seed=3)
"""A large LR, so that steps 2-3 run on weights the first updates changed (a wrong gradient shows). No EOS
penalty: the tiny model rarely emits EOS in 12 tokens, and every score -1 would make every advantage 0.
The eval hook runs at steps 0 and 3 on 4 held-out prompts (every process samples all of them)."""


@contextlib.contextmanager
def row_seeded_generation():
    """Patch ``HFBackend.generate`` for the block: each row generated alone (its prompt unpadded), with
    the seed ``(generator_seed - rank) * 1000 + global row index``. ``generator_seed - rank`` is the
    same on every process (``sampling_seed`` adds the rank last); rows are split evenly and in order."""
    import torch
    import torch.distributed as dist

    from rlhfkit.rollout.engine import HFBackend

    original = HFBackend.generate

    def generate(self, prompt_ids, prompt_mask, sampling, generator_seed=None):
        rank = dist.get_rank() if dist.is_initialized() else 0
        base = (generator_seed - rank) * 1000 + rank * len(prompt_ids)
        rows = []
        for i in range(len(prompt_ids)):
            ids = prompt_ids[i][prompt_mask[i].bool()][None]
            rows.append(original(self, ids, torch.ones_like(ids, dtype=torch.bool), sampling, base + i)[0])
        width = max(len(row) for row in rows)
        pad = self.tok.pad_token_id
        return torch.stack([torch.cat([row, row.new_full((width - len(row),), pad)]) for row in rows])

    HFBackend.generate = generate
    try:
        yield
    finally:
        HFBackend.generate = original


def run(train, config, out_dir: str) -> None:
    """Train ``config`` under :func:`row_seeded_generation`; on two processes, check the accelerator saw
    both and write ``processes.json`` (main process)."""
    from accelerate import PartialState

    with row_seeded_generation():
        train(config)
    state = PartialState()  # the trainer's accelerator state (a singleton), read after train
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes} (backend {state.backend})"
    if state.is_main_process:
        record = {"num_processes": state.num_processes, "backend": state.backend}
        (Path(out_dir) / "processes.json").write_text(json.dumps(record))


def config(out_dir: str):
    from rlhfkit.train.grpo import GRPOConfig

    return GRPOConfig(**SETTINGS, output_dir=out_dir)


if __name__ == "__main__":
    from rlhfkit.train.grpo import train

    if len(sys.argv) > 2:  # ROW_TOKENS: packed log-prob rows that short (the processes then make unequal forwards)
        from rlhfkit.train import online_config

        online_config.SHARED_ROW_TOKENS = int(sys.argv[2])  # read by OnlineConfig.logps
    run(train, config(sys.argv[1]), sys.argv[1])
