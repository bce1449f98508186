"""DAPO's dynamic sampling around phase 2 (generate and score) of ``rlhfkit/train/grpo.py``.

Yu et al. 2025 (DAPO, arXiv 2503.14476, §3.2, eq. 11): a group whose K rewards are all equal has
zero group advantage and gives no policy gradient, so the effective batch shrinks as the policy gets
every sample of a prompt right (or wrong). DAPO over-samples: drop those groups and sample further
prompts until the batch is full again. Here::

    round 0:        this step's prompts (the usual stream)           -> keep the informative groups
    round 1..R:     as many further prompts from a second stream     -> keep, until the batch is full
    still short:    top up with dropped groups (zero advantage: only the KL term trains on them)

so the batch size is fixed (mini-batches must divide it) and R = ``dynamic_sampling_rounds`` caps
the generation cost at (R + 1)x. Each process refills its own share of the prompts (a group never
spans processes, so no gather is needed; processes may run different numbers of rounds: nothing in
generate-and-score is collective).

Reproducibility: refill round j at step N is generated as if it were step ``REFILL_OFFSET +
refill_index(N, j, R)`` of a second prompt stream (seeded by :func:`refill_seed`): its prompts and its
sampling seed (``online_rollout.sampling_seed``) are functions of (seed, N, j), so a resumed run
refills exactly as the uninterrupted run did, and no refill round shares a real step's seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from rlhfkit.losses.dapo import informative_groups
from rlhfkit.models.batching import pad_columns
from rlhfkit.rollout.engine import Rollout

REFILL_OFFSET = 1_000_000
"""Refill rounds sample with the seeds of 'steps' from here on, apart from every real step's seed."""


def refill_seed(seed: int) -> int:
    """Seed of the refill prompt stream: its own stream of ``SeedSequence([seed, 2])`` (the
    mini-batch shuffle uses ``[seed, step, 1]``, the prompt stream ``[seed, epoch]``)."""
    return int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])


def refill_index(step: int, round_: int, rounds: int) -> int:
    """Position (in batches) of refill round ``round_`` (1..rounds) of ``step`` in the refill stream."""
    return step * rounds + round_ - 1


def fill(generate: Callable[[int], Rollout], groups: int, k: int, rounds: int, pad_id: int) -> tuple[Rollout, dict]:
    """Call ``generate(round)`` (round 0, then 1..``rounds``) until ``groups`` groups of ``k`` with
    unequal scores are in hand; return them (topped up with dropped groups when the rounds run out)
    as one Rollout of ``groups * k`` rows, and the metrics:

    ``sampling/dropped_frac``  fraction of all groups generated this step whose scores were all equal
    ``sampling/rounds``        refill rounds used (0 = the step's own prompts sufficed)
    ``sampling/filler_frac``   fraction of the batch that is dropped groups (the rounds ran out)
    ``sampling/reward_all``    mean raw score over everything generated and scored (reward/mean is over the
                               batch trained on, which the filter biases away from 0 and 1)
    """
    kept: list[Rollout] = []
    dropped: list[Rollout] = []
    n_kept = n_dropped = 0
    raw = []
    for round_ in range(rounds + 1):
        r = generate(round_)
        ok = informative_groups(r.scores.float().cpu(), k)  # (groups,)
        rows = ok.repeat_interleave(k)
        raw.append(r.extras["raw_scores"].float().cpu())
        if ok.any():
            kept.append(r.select(rows))
        if not ok.all():
            dropped.append(r.select(~rows))
        n_kept, n_dropped = n_kept + int(ok.sum()), n_dropped + int((~ok).sum())
        if n_kept >= groups:
            break
    filler = max(0, groups - n_kept)
    batch = cat_rollouts(kept + dropped, pad_id).select(torch.arange(groups * k))
    metrics = {"sampling/dropped_frac": n_dropped / (n_kept + n_dropped), "sampling/rounds": float(round_),
               "sampling/filler_frac": filler / groups, "sampling/reward_all": torch.cat(raw).nanmean().item()}
    return batch, metrics


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of ``parts`` stacked in order, each in the padded layout of ``rlhfkit.models.batching``:
    prompts left-padded to the widest (pad token, mask False), completion-aligned (B, C) tensors
    right-padded to the widest (pad token for ids, False for masks, 0 for log-probs and the like:
    masked everywhere they are read). (B,) tensors and lists are concatenated; None stays None."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    C = max(p.completion_ids.shape[1] for p in parts)

    def cat(values: list, left: bool, fill) -> object:
        if values[0] is None:
            return None
        if isinstance(values[0], list):
            return [x for v in values for x in v]
        if values[0].dim() == 1:
            return torch.cat(values)
        return torch.cat([pad_columns(v, P if left else C, fill, left) for v in values])

    fields = {}
    for name in Rollout.__dataclass_fields__:
        if name == "extras":
            continue
        values = [getattr(p, name) for p in parts]
        left = name.startswith("prompt_")
        fill = pad_id if name.endswith("_ids") else (False if name.endswith("_mask") else 0)
        fields[name] = cat(values, left, fill)
    extras = {key: cat([p.extras[key] for p in parts], False, 0) for key in parts[0].extras}
    return Rollout(**fields, extras=extras)
