"""Per-token log-probs of completions given their prompts, with logits only where they are needed.

The one log-prob path of rlhfkit: the sampler, the reference and training passes of the online
trainers (PPO/GRPO/RLOO/CMPO), the DPO family and the evaluator all call :func:`completion_logps`.
Every one of them needs
``log π(y_t | x, y_<t)`` for the completion tokens ``y`` of a batch of (prompt ``x``, completion ``y``)
pairs, and none needs a logit on a prompt token. The lm head is the single largest matrix of a small
model (SmolLM2-135M: 576 x 49152 = 28M of its 135M parameters) and its (T, V) output the largest
activation, so the positions are selected *before* the head through ``logits_to_keep``.

The batch always arrives in the padded layout of :mod:`rlhfkit.models.batching` (a Rollout, or a
``CompletionBatch``); ``layout`` chooses how the model sees it. Both give the same values to float
rounding (tests check it, gradients included):

``"shared"`` (padding-free, prompts shared)
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
    the batch as it is: one row per sequence, prompts left-padded to the longest prompt and
    completions right-padded to the longest completion, so every completion starts in the same column
    and the kept positions are one contiguous range (the layout TRL's DPO uses). Position ids are
    counted over real tokens only, so values match the packed layout.
"""

from __future__ import annotations

import torch

from rlhfkit.models.batching import position_ids
from rlhfkit.ops import entropy_from_logits, selective_log_softmax

LAYOUTS = ("padded", "shared")

SHARED_ROW_TOKENS = 2048
"""Most tokens in one packed row of the ``"shared"`` layout for the online trainers' batches. Attention
over a packed row costs N^2 (the mask is dense), linear layers N: at 2048 tokens on a 135M model the
masked-out attention is ~25% of the linear work; a larger batch is split into several rows."""


def completion_logps(model, batch, *, layout: str = "padded", temperature: float = 1.0, with_entropy: bool = False,
                     max_row_tokens: int | None = None):
    """``log π(completion token | prompt, earlier completion tokens)`` for a batch of sequences.

    Args:
        model: a causal LM taking ``input_ids, position_ids, attention_mask, use_cache, logits_to_keep``
            (every decoder-only model in transformers >= 4.50), possibly wrapped by accelerate/DDP.
        batch: a :class:`rlhfkit.models.batching.CompletionBatch` or anything with its four fields
            (a Rollout): ``prompt_ids``/``prompt_mask`` (B, P) left-padded, ``completion_ids``/
            ``completion_mask`` (B, C) right-padded; every prompt and completion has >= 1 token.
        layout: ``"padded"`` or ``"shared"`` (see the module docstring); the same values to float rounding.
        temperature: logits are divided by it (the sampling temperature, for RL; 1 for DPO).
        with_entropy: also return the per-token entropies of the (tempered) next-token distributions
            (without gradient: a metric, not a loss term).
        max_row_tokens: ``"shared"`` only: the most tokens in one packed row (None: one row).
    Returns:
        ``per_token_logps`` (B, C) float32, 0 where ``completion_mask`` is False; with ``with_entropy``,
        ``(per_token_logps, entropies)``, both (B, C).

    Naive equivalent (tests compare them): run each ``prompt + completion`` alone,
    ``log_softmax(logits[len(prompt) - 1 : -1] / temperature)`` gathered at the completion tokens.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    prompt_mask, completion_mask = batch.prompt_mask.bool(), batch.completion_mask.bool()
    if not bool(prompt_mask.any(1).all()) or not bool(completion_mask.any(1).all()):
        raise ValueError("completion_logps: every sequence needs at least one prompt and one completion token (the "
                         "first completion token is predicted from the last prompt token)")
    device = next(model.parameters()).device
    if layout == "shared":
        prompts = [row[m].tolist() for row, m in zip(batch.prompt_ids, prompt_mask)]
        completions = [row[:n].tolist() for row, n in zip(batch.completion_ids, completion_mask.sum(1).tolist())]
        pieces = [_packed_logps(model, [prompts[b] for b in rows], [completions[b] for b in rows], temperature,
                                device, with_entropy)
                  for rows in _row_chunks(prompts, completions, max_row_tokens)]
        # masked_scatter fills True entries in row-major (sequence, time) order, the order of the pieces
        mask = completion_mask.to(device)
        out = [torch.cat([p[i] for p in pieces]) for i in range(2 if with_entropy else 1)]  # each (K,)
        out = [x.new_zeros(mask.shape).masked_scatter(mask, x) for x in out]
        return tuple(out) if with_entropy else out[0]
    p, c = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1).to(device)
    att = torch.cat([prompt_mask, completion_mask], 1).long().to(device)
    mask = completion_mask.to(device)
    # the last C + 1 columns; the first C of them (P-1 .. P+C-2) predict the completion tokens
    logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids(att), use_cache=False,
                   logits_to_keep=c + 1).logits[:, :-1]  # (B, C, V)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    zero = torch.zeros((), device=device)
    per_token = torch.where(mask, selective_log_softmax(logits, ids[:, p:]), zero)
    if with_entropy:
        return per_token, torch.where(mask, _entropy(logits).float(), zero)
    return per_token


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropies of the rows of ``logits``, without gradient: every trainer logs them as a metric, and under
    autograd each (chunk, V) log-softmax and its exp would be kept for a backward that never comes
    (100 MB for 256 completion tokens of a 49152-token vocabulary)."""
    with torch.no_grad():
        return entropy_from_logits(logits)


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


def _packed_logps(model, prompt_ids, completion_ids, temperature: float, device,
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
    share = attn in ("sdpa", "eager") and not sliding and len(groups) < len(prompt_ids)
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
    return (logps, _entropy(logits)[0].float()) if with_entropy else (logps,)
