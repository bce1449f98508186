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
    Prompt sharing: when a prompt occurs more than once in the batch (a DPO pair's two completions,
    GRPO's K samples) it is computed ONCE: the row holds ``prompt, completion_1, ..., completion_K``,
    each completion's positions continue from the prompt's end, and an explicit (1, 1, N, N) mask lets a
    completion token see the prompt and its own earlier tokens only. This needs an attention
    implementation that takes a dense 4D mask (``sdpa``, ``eager``) and no sliding-window layers (a
    custom mask replaces theirs); otherwise (FlashAttention's variable-length kernels, Mistral-style
    windows) every sequence gets its own copy of the prompt, separated by position ids.
    The dense mask costs N^2 bools for a row of N tokens (25 MB at N = 5000), and attention over the
    whole row costs N^2 too: ``max_row_tokens`` splits the batch into several rows (consecutive
    sequences, each row at most that many tokens where one sequence allows), one forward each.
``"padded"``
    one row per sequence, prompts left-padded to the longest prompt and completions right-padded to
    the longest completion, so every completion starts in the same column and the kept positions are
    one contiguous range (the layout TRL's DPO uses). Position ids are counted over real tokens only,
    so values match the packed layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhfkit.ops import entropy_from_logits, selective_log_softmax

PACKINGS = ("padding_free", "padded")


def completion_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    packing: str = "padding_free",
    pad_id: int = 0,
    temperature: float = 1.0,
    share_prompts: bool = True,
    with_entropy: bool = False,
    max_row_tokens: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """``log π(completion token | prompt, earlier completion tokens)`` for a batch of sequences.

    Args:
        model: a causal LM taking ``input_ids, position_ids, attention_mask, use_cache, logits_to_keep``
            (every decoder-only model in transformers >= 4.50), possibly wrapped by accelerate/DDP.
        prompt_ids, completion_ids: B lists of token ids each (ragged; every one non-empty).
        packing: ``"padding_free"`` or ``"padded"`` (see the module docstring).
        pad_id: token placed in padding (its logits are never computed into a result).
        temperature: logits are divided by it (sampling temperature, for RL; 1 for DPO).
        share_prompts: in ``padding_free``, compute a prompt that occurs several times once (see above).
        with_entropy: also return the per-token entropies of the (tempered) next-token distributions.
        max_row_tokens: in ``padding_free``, the most tokens in one packed row (None: one row).
    Returns:
        ``per_token_logps`` (B, T) float32 and ``completion_mask`` (B, T) bool, T = longest completion;
        entry (b, t) is completion token t of sequence b; masked-out entries are 0. With
        ``with_entropy``, a third (B, T) tensor of entropies, laid out the same way.

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
        pieces = [_packed_logps(model, [prompt_ids[b] for b in rows], [completion_ids[b] for b in rows], temperature,
                                share_prompts, device, with_entropy)
                  for rows in _row_chunks(prompt_ids, completion_ids, max_row_tokens)]
        # masked_scatter fills True entries in row-major (sequence, time) order, the order of the pieces
        out = [torch.cat([p[i] for p in pieces]) for i in range(2 if with_entropy else 1)]  # each (K,)
        out = [x.new_zeros(completion_mask.shape).masked_scatter(completion_mask, x) for x in out]
        return (out[0], completion_mask, *out[1:])
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
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    per_token = selective_log_softmax(logits, ids[:, plen:])  # (B, T)
    zero = torch.zeros((), device=device)
    if with_entropy:
        entropy = torch.where(completion_mask, entropy_from_logits(logits).float(), zero)
        return torch.where(completion_mask, per_token, zero), completion_mask, entropy
    return torch.where(completion_mask, per_token, zero), completion_mask


def _row_chunks(prompt_ids, completion_ids, max_row_tokens: int | None) -> list[range]:
    """Consecutive runs of sequences whose packed row (each distinct prompt counted once) stays within
    ``max_row_tokens``; a sequence longer than that on its own gets a row of its own."""
    if max_row_tokens is None:
        return [range(len(prompt_ids))]
    chunks, start, used, seen = [], 0, 0, set()
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        key = tuple(p)
        cost = len(c) + (0 if key in seen else len(p))
        if b > start and used + cost > max_row_tokens:
            chunks.append(range(start, b))
            start, used, seen, cost = b, 0, set(), len(p) + len(c)
        seen.add(key)
        used += cost
    chunks.append(range(start, len(prompt_ids)))
    return chunks


def _packed_logps(model, prompt_ids, completion_ids, temperature: float, share_prompts: bool, device,
                  with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """Log-probs (and entropies) of every completion token, flattened in (sequence, time) order, from
    one packed row."""
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt -> the sequences continuing it, in batch order
    for b, p in enumerate(prompt_ids):
        groups.setdefault(tuple(p), []).append(b)
    config = getattr(model, "config", None) or model.module.config  # model.module: DDP-wrapped
    attn = getattr(config, "_attn_implementation", None)
    # a custom 4D mask replaces every layer's own mask, sliding-window layers' included
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    share = share_prompts and attn in ("sdpa", "eager") and not sliding and len(groups) < len(prompt_ids)
    if not share:  # every sequence with its own prompt copy: one entry per sequence
        groups = {(b,): [b] for b in range(len(prompt_ids))}
    ids, pos, seg, branch = [], [], [], []
    predictors: list[list[int]] = [[] for _ in prompt_ids]  # row positions whose logits predict sequence b
    for g, members in enumerate(groups.values()):
        prompt = prompt_ids[members[0]]
        last_prompt = len(ids) + len(prompt) - 1
        ids += prompt
        pos += range(len(prompt))
        seg += [g] * len(prompt)
        branch += [0] * len(prompt)
        for b in members:
            c = completion_ids[b]
            start = len(ids)
            predictors[b] = [last_prompt] + list(range(start, start + len(c) - 1))
            ids += c
            pos += range(len(prompt), len(prompt) + len(c))
            seg += [g] * len(c)
            branch += [b + 1] * len(c)
    keep = torch.tensor([i for rows in predictors for i in rows], device=device)  # (K,), may repeat prompt ends
    targets = torch.tensor([t for c in completion_ids for t in c], device=device)  # (K,)
    ids_t = torch.tensor(ids, device=device)[None]  # (1, N)
    pos_t = torch.tensor(pos, device=device)[None]
    mask = None  # packed sequences without sharing: transformers derives the block-diagonal mask from pos_t
    if share:
        seg_t, br_t = torch.tensor(seg, device=device), torch.tensor(branch, device=device)
        n = len(ids)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        # a token sees earlier tokens of its own group that are prompt tokens or of its own completion
        mask = causal & (seg_t[:, None] == seg_t[None]) & ((br_t[None] == 0) | (br_t[:, None] == br_t[None]))
        if attn == "eager":  # eager attention adds the mask to the scores
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        mask = mask[None, None]  # (1, 1, N, N)
    logits = model(input_ids=ids_t, position_ids=pos_t, attention_mask=mask, use_cache=False,
                   logits_to_keep=keep).logits  # (1, K, V)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    logps = selective_log_softmax(logits, targets[None])[0]
    return (logps, entropy_from_logits(logits)[0].float()) if with_entropy else (logps,)
