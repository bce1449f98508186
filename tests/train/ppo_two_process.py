"""PPO under two processes, for tests/train/test_online_distributed.py.

Run with ``python -m torch.distributed.run --nproc_per_node 2 tests/train/ppo_two_process.py OUT_DIR``.
Trains the tiny model (policy and critic) 3 steps on a global batch of 8 prompts x 1 completion (4 per
process), 2 PPO epochs of one full-batch update each, and writes ``OUT_DIR/processes.json``; exits
non-zero unless there were 2 processes. Samples are made identical to a one-process run's the same way
as GRPO's (grpo_two_process.row_seeded_generation).

One mini-batch per epoch: ``online.optimize`` shuffles each process's own rows, so with several
mini-batches the two runs would group different rows into each update.
"""

from __future__ import annotations

import sys

from grpo_two_process import run

STEPS = 3
SETTINGS = dict(model="tiny", task="sentiment", rollout_backend="hf", prompts_per_step=8, samples_per_prompt=1,
                max_new_tokens=12, total_steps=STEPS, epochs_per_step=2, mini_batch_size=None, lr=1e-3,
                lr_schedule="constant", eval_every=0, sample_every=0, progress=False, missing_eos_penalty=None, seed=3)


def config(out_dir: str):
    from rlhfkit.train.ppo import PPOConfig

    return PPOConfig(**SETTINGS, output_dir=out_dir)


if __name__ == "__main__":
    from rlhfkit.train.ppo import train

    run(train, config(sys.argv[1]), sys.argv[1])
