"""A policy's gold score on a built-in task: sample held-out prompts, score them with the task's gold.

``data/tasks.py`` holds the tasks and their gold rewards (pure code, no model); this module is the
part that needs a model: it samples and averages. ``rlhfkit tasks --measure`` and iterative DPO's
per-round gold curve both call ``measure``.
"""

from __future__ import annotations

import numpy as np

from rlhfkit.data.tasks import Task
from rlhfkit.rollout.engine import Sampler, SamplingConfig


def measure(task: Task, model, tokenizer, *, num_prompts: int = 48, split: str = "heldout", temperature: float = 0.7,
            max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0) -> dict:
    """Mean gold score of ``model``'s samples on ``num_prompts`` prompts of ``split`` (a seeded subset)."""
    rows = task.prompt_rows(split)
    if len(rows) > num_prompts:
        keep = sorted(np.random.default_rng(seed).choice(len(rows), num_prompts, replace=False).tolist())
        rows = [rows[i] for i in keep]
    sampler = Sampler(model, tokenizer, SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens))
    scores, ended = [], []
    for i in range(0, len(rows), batch_size):
        prompts = [r["messages"] for r in rows[i:i + batch_size]]
        out = sampler.sample(prompts, seed=seed + i, with_logps=False)
        scores += task.gold(prompts, out.completions)
        ended += out.ended.tolist()
    g = np.array(scores)
    return {"task": task.name, "n": len(g), "gold_mean": float(g.mean()), "gold_std": float(g.std(ddof=1)) if len(g) > 1
            else 0.0, "gold_sem": float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else 0.0,
            "ended_frac": float(np.mean(ended)), "split": split, "temperature": temperature,
            "max_new_tokens": max_new_tokens, "seed": seed}
