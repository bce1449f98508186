"""Per-token log-probs of completions given their prompts, with logits only where they are needed.

Shared by the offline (DPO family) and online (PPO/GRPO/RLOO) trainers: every one of them needs
``log π(y_t | x, y_<t)`` for the completion tokens ``y`` of a batch of (prompt ``x``, completion ``y``)
pairs, and none needs a logit on a prompt token. The lm head is the single largest matrix of a small
model (SmolLM2-135M: 576 x 49152 = 28M of its 135M parameters) and its (T, V) output the largest
activation, so the positions are selected *before* the head through ``logits_to_keep``.

Two layouts (``packing``), which give the same values (``tests/test_dpo.py`` checks it):

``"padding_free"``
    one row, the sequences ``prompt + completion`` concatenated, ``position_ids`` restarting at 0 per
    sequence and ``attention_mask=None``: transformers then builds a block-diagonal causal mask from
    the position ids (``masking_utils.find_packed_sequence_indices``), and no pad token is computed.
    Needs ``use_cache=False`` (with a cache the packed-sequence detection is off).
``"padded"``
    one row per sequence, prompts left-padded to the longest prompt and completions right-padded to
    the longest completion, so every completion starts in the same column and the kept positions are
    one contiguous range (the layout TRL's DPO uses). Position ids are counted over real tokens only,
    so values match the packed layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhfkit.ops import selective_log_softmax

PACKINGS = ("padding_free", "padded")


def completion_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    packing: str = "padding_free",
    pad_id: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log π(completion token | prompt, earlier completion tokens)`` for a batch of sequences.

    Args:
        model: a causal LM taking ``input_ids, position_ids, attention_mask, use_cache, logits_to_keep``
            (every decoder-only model in transformers >= 4.50), possibly wrapped by accelerate/DDP.
        prompt_ids, completion_ids: B lists of token ids each (ragged; every one non-empty).
        packing: ``"padding_free"`` or ``"padded"`` (see the module docstring).
        pad_id: token placed in padding (its logits are never computed into a result).
        temperature: logits are divided by it (sampling temperature, for RL; 1 for DPO).
    Returns:
        ``per_token_logps`` (B, T) float32 and ``completion_mask`` (B, T) bool, T = longest completion;
        entry (b, t) is completion token t of sequence b; masked-out entries are 0.

    Naive equivalent (``tests/test_dpo.py`` compares them): run each ``prompt + completion`` alone,
    ``log_softmax(logits[len(prompt) - 1 : -1])`` gathered at the completion tokens.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("completion_logps needs at least one sequence")
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if len(p) == 0 or len(c) == 0:
            raise ValueError(f"sequence {b}: empty {'prompt' if len(p) == 0 else 'completion'}; the first completion "
                             "token is predicted from the last prompt token, so both need at least one token")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(c) for c in completion_ids])
    width = int(lengths.max())
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).to(device)  # (B, T)
    if packing == "padding_free":
        ids = torch.tensor([t for p, c in zip(prompt_ids, completion_ids) for t in (*p, *c)], device=device)  # (N,)
        pos = torch.cat([torch.arange(len(p) + len(c)) for p, c in zip(prompt_ids, completion_ids)]).to(device)
        starts = torch.tensor([0] + [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]).cumsum(0)[:-1]
        # the logit at position i predicts token i + 1: keep the last prompt token and every completion
        # token but the last of each sequence, in row-major (sequence, time) order
        keep = torch.cat([s + len(p) - 1 + torch.arange(len(c)) for s, p, c in zip(starts.tolist(), prompt_ids,
                                                                                   completion_ids)]).to(device)  # (K,)
        logits = model(input_ids=ids[None], position_ids=pos[None], attention_mask=None, use_cache=False,
                       logits_to_keep=keep).logits  # (1, K, V)
        flat = selective_log_softmax(logits.float() / temperature, ids[keep + 1][None])[0]  # (K,)
        # masked_scatter fills True entries in row-major order, the order of ``keep``
        return flat.new_zeros(completion_mask.shape).masked_scatter(completion_mask, flat), completion_mask
    plen = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), plen + width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[b, plen - len(p):plen + len(c)] = torch.tensor([*p, *c])
        att[b, plen - len(p):plen + len(c)] = 1
    pos = (att.cumsum(1) - 1).clamp(min=0)  # positions count real tokens, as in the packed layout
    ids, att, pos = ids.to(device), att.to(device), pos.to(device)
    keep = torch.arange(plen - 1, plen + width - 1, device=device)  # (T,): the columns predicting completions
    logits = model(input_ids=ids, position_ids=pos, attention_mask=att, use_cache=False,
                   logits_to_keep=keep).logits  # (B, T, V)
    per_token = selective_log_softmax(logits.float() / temperature, ids[:, plen:])  # (B, T)
    return torch.where(completion_mask, per_token, torch.zeros((), device=device)), completion_mask
