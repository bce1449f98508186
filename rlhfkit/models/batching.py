"""Every padding, position-id and mask helper, once.

The padded layout of a batch of (prompt, completion) sequences, used by the sampler, the reward model,
the critic and the ``"padded"`` log-prob layout (B sequences, P prompt columns, C completion columns;
``.`` is the pad token)::

                 prompt_ids (B, P)          completion_ids (B, C)
    row 0    .  .  p  p  p  p  p    |    c  c  c  EOS .  .
    row 1    p  p  p  p  p  p  p    |    c  c  c  c   c  c       <- truncated: no EOS within C
    row 2    .  .  .  .  p  p  p    |    c  EOS .  .  .  .
             prompt_mask: True on p     completion_mask: True through the first EOS

Prompts are left-padded and completions right-padded, so every completion starts in column P and a
model's logits at columns P-1 .. P+C-2 predict the completion tokens. Position ids count real tokens
only (``cumsum(attention_mask) - 1``), so left padding never shifts a token's position (N
implementation details #2): the values equal running each sequence alone.

The padding-free layouts (one packed row, position ids restarting per sequence, prompts shared by
their completions) are built in :mod:`rlhfkit.models.logps` (log-probs) and :func:`pack_groups`
(reward model training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class CompletionBatch:
    """(prompt, completion) sequences in the padded layout above; what every log-prob, value and
    reward pass reads. A :class:`rlhfkit.rollout.Rollout` has the same four fields and can be passed
    wherever a CompletionBatch is expected."""

    prompt_ids: torch.Tensor
    """(B, P) long, left-padded."""
    prompt_mask: torch.Tensor
    """(B, P) bool, True on real prompt tokens."""
    completion_ids: torch.Tensor
    """(B, C) long, right-padded."""
    completion_mask: torch.Tensor
    """(B, C) bool, a prefix of each row: True on the completion's tokens (through its EOS, if any)."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], 1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, longest): each sequence right-aligned, ``pad_id`` before it."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = True
    return ids, mask


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, max(1, longest)): each sequence left-aligned, ``pad_id`` after it (a
    batch of empty sequences still has one column, so it can be concatenated and indexed)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[r, :len(s)] = True
    return ids, mask


def pad_columns(x: torch.Tensor, width: int, fill, left: bool = False) -> torch.Tensor:
    """(B, T) -> (B, width): ``fill`` added on the left (a prompt tensor) or on the right (a
    completion-aligned tensor), so batches of different widths can be stacked."""
    if width < x.shape[1]:
        raise ValueError(f"pad_columns: width {width} is narrower than the tensor's {x.shape[1]} columns")
    extra = width - x.shape[1]
    return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=fill)


def pad_completions(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                    pad_id: int) -> CompletionBatch:
    """Ragged token lists to a :class:`CompletionBatch` (prompts left-padded, completions right-padded)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("an empty batch: at least one (prompt, completion) is needed")
    p_ids, p_mask = left_pad(prompt_ids, pad_id)
    c_ids, c_mask = right_pad(completion_ids, pad_id)
    return CompletionBatch(p_ids, p_mask, c_ids, c_mask)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens only: ``cumsum(mask) - 1``, 0 on left padding."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended) of generated ids (B, C): mask True through the first EOS of each row (the EOS is
    an action the policy takes and is credited); ``ended`` (B,) = an EOS occurred within C."""
    is_eos = completion_ids == eos_id
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.int().argmax(1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long))
    mask = torch.arange(completion_ids.shape[1], device=completion_ids.device)[None] <= first[:, None]
    return mask, ended


# --- reward-model training: one row per prompt, the prompt shared by its replies ----------------------


def pack_groups(prompt_ids: list[list[int]], replies: list[list[list[int]]], pad_id: int,
                dtype: torch.dtype = torch.float32) -> dict:
    """One row per prompt, ``[prompt ; reply 1 ; ... ; reply n ; right pad]``, the prompt computed once.

    Each reply must see the prompt but not the other replies, so the mask is a custom 4D additive
    mask (R, 1, T, T): a token attends causally to the prompt and to its own reply only; pad tokens
    attend to themselves (no all-masked softmax rows). Position ids restart at P for every reply, so
    each reply sits at the positions it would have alone: the rewards equal scoring every
    [prompt ; reply] separately (tests check this). ``read_at`` (R, N) holds the index of each reply's
    last token (its EOS), where the head is read; ``reply_mask`` (R, N) marks real replies (rows have
    different reply counts). Against one sequence per reply this saves the prompt's forward and
    backward for all but one reply, and scores a reply shared by several pairs once (InstructGPT,
    Ouyang et al. 2022, §3.5: one forward pass per completion, not per comparison).
    """
    R = len(prompt_ids)
    rows = [p + [t for r in rs for t in r] for p, rs in zip(prompt_ids, replies)]
    T, N = max(len(r) for r in rows), max(len(rs) for rs in replies)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    segment = torch.full((R, T), -1, dtype=torch.long)  # 0 prompt, j + 1 reply j, -1 pad
    pos = torch.zeros((R, T), dtype=torch.long)
    read_at = torch.zeros((R, N), dtype=torch.long)
    reply_mask = torch.zeros((R, N), dtype=torch.bool)
    for b, (p, rs) in enumerate(zip(prompt_ids, replies)):
        input_ids[b, :len(rows[b])] = torch.tensor(rows[b], dtype=torch.long)
        P = len(p)
        segment[b, :P], pos[b, :P] = 0, torch.arange(P)
        at = P
        for j, r in enumerate(rs):
            segment[b, at:at + len(r)] = j + 1
            pos[b, at:at + len(r)] = torch.arange(P, P + len(r))
            at += len(r)
            read_at[b, j], reply_mask[b, j] = at - 1, True
    q, k = segment[:, :, None], segment[:, None, :]  # (R, T, 1), (R, 1, T)
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    allowed = causal & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool)  # pad rows see themselves
    mask = torch.zeros((R, 1, T, T), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos, "read_at": read_at,
            "reply_mask": reply_mask, "num_tokens": int((segment >= 0).sum())}
