"""DAPO's two reward-side techniques (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale", arXiv 2503.14476), as pure functions. (Its clip-higher is ``clip_eps_high`` of
``ppo_policy_loss``; its token-level loss is ``aggregation='token_mean'``.)

- Dynamic sampling (§3.2, eq. 11): a group whose K rewards are all equal has zero group advantage
  and so no policy gradient; DAPO keeps sampling until the batch holds only groups with
  ``0 < #correct < K``. :func:`informative_groups` says which groups pass; the refill loop is the
  trainer's (``rlhfkit/train/grpo.py``).
- Overlong reward shaping (§3.4, eq. 13, "soft overlong punishment"): a length penalty that ramps
  linearly from 0 to -1 over the last ``buffer`` tokens before the length limit.

Shapes: B sequences, K completions per group (consecutive rows), B = number of groups x K.
"""

from __future__ import annotations

import torch

from rlhfkit.ops import exact_div


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B / K,) bool: True for each group whose K scores are not all equal (DAPO eq. 11's constraint
    ``0 < |{o_i : correct}| < G``, generalised to any scores: a group passes when its scores differ).

    Args: ``scores`` (B,) the sequence rewards the advantage will see; ``group_size`` K (consecutive
    rows [g*K, (g+1)*K) share a prompt). Exact equality: scores that differ by rounding pass.
    """
    groups = scores.reshape(exact_div(scores.shape[0], group_size, "batch / group_size"), group_size)
    return (groups != groups[:, :1]).any(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO eq. 13 times ``penalty``: the (B,) reward to add for completions of ``lengths`` tokens::

        0                                      |y| <= L_max - L_cache
        penalty * ((L_max - L_cache) - |y|) / L_cache     L_max - L_cache < |y| <= L_max
        -penalty                               |y| > L_max

    with ``L_max = max_length`` (here: ``max_new_tokens``, so a completion cut at the limit gets
    exactly ``-penalty``) and ``L_cache = buffer`` tokens (DAPO: 4096 of 20480). ``buffer = 0``: no
    penalty. Sign: <= 0; longer is never rewarded.
    """
    if buffer < 0 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in [0, max_length={max_length}], got {buffer}")
    lengths = lengths.float()
    if buffer == 0:
        return torch.zeros_like(lengths)
    start = max_length - buffer
    ramp = (start - lengths) / buffer  # 0 at the start of the buffer, -1 at max_length
    return penalty * torch.clamp(ramp, min=-1.0, max=0.0)
