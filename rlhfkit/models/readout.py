"""The reward model's read-out: which hidden states its head reads and how they are pooled over the reply.

``pooling`` "last" reads the reply's last token (its EOS, as transformers' sequence-classification head
does); "mean" averages over the reply's tokens (EOS included). ``layers`` "last" is the final (normed)
layer; "A-B" the mean of transformers' ``hidden_states[A..B]`` (k = the output of block k, 0 = the
embeddings); "middle" resolves to blocks ceil(L/4)..floor(4L/5) (8-24 of SmolLM2-135M's 30); "auto" (reward
training with the probe) picks one of :func:`candidate_layers` by cross-validation on the training pairs.

Why (rlhfkit issue 18, docs/reward.md): frozen, the final layer's state at the appended EOS mostly
predicts the end of the turn (a probe on it: ~0.54 accuracy vs gold); the mean over the reply of the
middle layers carries what the reply says (~0.65, ceiling ~0.68). One :func:`read_features` serves the
padded layout (``RewardModel.score``/``score_ids``) and the packed one (``PackedScorer``, training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhfkit.data.chat import render

READOUT_KEY = "rlhfkit_reward_readout"
POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class ReadOut:
    """Which hidden states the reward head reads: ``layers`` ("last" or "A-B", resolved) pooled by
    ``pooling`` ("last" token or "mean" over the reply's tokens)."""

    pooling: str = "last"
    layers: str = "last"

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """Indices into transformers' ``hidden_states`` (0 = embeddings), or None for the final layer."""
        if self.layers == "last":
            return None
        lo, hi = layer_span(self.layers)
        return list(range(lo, hi + 1))


def resolve_readout(pooling: str, layers: str, num_layers: int) -> ReadOut:
    """Check ``pooling`` and ``layers`` against a body of ``num_layers`` blocks; "middle" and "A" become "A-B".
    A bad value is a ``ValueError`` naming the option and what is allowed."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    spec = str(layers).strip()
    check_layers_spec(spec)
    if spec == "auto":
        raise ValueError("layers 'auto' is chosen by `rlhfkit reward train`'s probe (cross-validation over "
                         "candidate_layers); a model's read-out needs 'last', 'middle', 'N' or 'A-B'")
    if spec == "last":
        return ReadOut(pooling, "last")
    if spec == "middle":  # blocks 8-24 of SmolLM2-135M's 30 (docs/reward.md)
        lo, hi = math.ceil(num_layers / 4), max(math.ceil(num_layers / 4), (4 * num_layers) // 5)
    else:
        lo, hi = int(spec.split("-")[0]), int(spec.split("-")[-1])
    if not 0 <= lo <= hi <= num_layers:
        raise ValueError(f"layers {layers!r}: needs 0 <= A <= B <= {num_layers} (this model has {num_layers} blocks; "
                         "0 is the embeddings)")
    return ReadOut(pooling, f"{lo}-{hi}")


def check_layers_spec(layers: str) -> None:
    """The form of a ``layers`` option ('last', 'middle', 'N', 'A-B' with A <= B), before a model is at
    hand to check the range; a bad one is a ``ValueError`` naming the option."""
    parts = str(layers).strip().split("-")
    if layers in ("last", "middle", "auto"):
        return
    if len(parts) not in (1, 2) or not all(x.isdigit() for x in parts) or int(parts[0]) > int(parts[-1]):
        raise ValueError(f"layers must be 'last', 'middle', 'auto', 'N' or 'A-B' with A <= B (hidden-state indices), "
                         f"got {layers!r}")


def candidate_layers(num_layers: int) -> list[str]:
    """The ranges ``layers='auto'`` chooses among, by the probe's prompt-grouped cross-validation on the
    training pairs (``reward_probe.fit_head``): "middle" first (it wins a tie), then the lower and the
    central part of the stack, every block, the final layer. 8-24, 4-16, 12-20, 1-30, 30-30 for
    SmolLM2-135M's 30 blocks: the ranges measured in docs/reward.md."""
    L = num_layers

    def span(a: float, b: float) -> str:
        lo = min(L, max(1, math.ceil(a * L)))
        return f"{lo}-{max(lo, min(L, math.floor(b * L)))}"

    return list(dict.fromkeys([span(1 / 4, 4 / 5), span(2 / 15, 8 / 15), span(2 / 5, 2 / 3), f"1-{L}", f"{L}-{L}"]))


def set_readout(model, pooling: str, layers: str) -> ReadOut:
    """Resolve ``pooling``/``layers`` for ``model`` ("middle" -> "A-B") and store them in its config
    (``READOUT_KEY``), where :func:`readout_of` and a saved checkpoint find them."""
    r = resolve_readout(pooling, layers, model.config.num_hidden_layers)
    setattr(model.config, READOUT_KEY, {"pooling": r.pooling, "layers": r.layers})
    return r


def layer_span(layers: str) -> tuple[int, int]:
    """(A, B) of an "A-B" range."""
    lo, hi = (int(x) for x in layers.split("-"))
    return lo, hi


def readout_of(model) -> ReadOut:
    """The model's read-out: its config's ``rlhfkit_reward_readout``, or last/last (checkpoints from before)."""
    d = getattr(model.config, READOUT_KEY, None)
    return ReadOut(d["pooling"], d["layers"]) if d else ReadOut()


def body_of(model):
    """The decoder body (``LlamaModel`` etc.) of a ``*ForSequenceClassification`` model, also through
    peft's wrapper (whose ``base_model`` is the LoRA model, not the body)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def unread_parameters(model) -> list:
    """Parameters the read-out never reaches: the blocks above its highest layer and the final norm
    (when it stops below the top). Frozen in training: they get no gradient, and DDP refuses
    parameters that take no part in the loss."""
    layers = readout_of(model).layer_indices(model.config.num_hidden_layers)
    body = body_of(model)
    if layers is None or max(layers) == model.config.num_hidden_layers:
        return []
    out = [p for block in body.layers[max(layers):] for p in block.parameters()]
    return out + list(body.norm.parameters())


def pool_weights(start: torch.Tensor, end: torch.Tensor, T: int, pooling: str) -> torch.Tensor:
    """(B, N, T) weights over positions: one-hot at ``end`` ("last") or uniform on ``start..end``
    inclusive ("mean"); ``start``, ``end``: (B, N) reply spans."""
    t = torch.arange(T, device=end.device)
    if pooling == "last":
        return (t == end[..., None]).float()
    inside = ((t >= start[..., None]) & (t <= end[..., None])).float()
    return inside / inside.sum(-1, keepdim=True).clamp(min=1)


def read_layer_features(model, input_ids, attention_mask, position_ids, start, end, layers: list[int]) -> torch.Tensor:
    """(B, N, len(layers), d): the read-out's pooling applied to each of ``hidden_states[i]``, i in ``layers``,
    separately (one forward pass for all; a range's features are the mean over its layers, pooling being
    linear)."""
    out = body_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, output_hidden_states=True)
    hidden = torch.stack([out.hidden_states[i] for i in layers])  # (K, B, T, d)
    w = pool_weights(start, end, hidden.shape[2], readout_of(model).pooling).to(hidden.dtype)  # (B, N, T)
    return torch.einsum("bnt,kbtd->bnkd", w, hidden)


def read_features(model, input_ids, attention_mask, position_ids, start, end) -> torch.Tensor:
    """(B, N, d) read-out features of the replies spanning ``start..end`` (both (B, N)) of each row."""
    readout = readout_of(model)
    layers = readout.layer_indices(model.config.num_hidden_layers)
    out = body_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, output_hidden_states=layers is not None)
    if layers is None:
        hidden = out.last_hidden_state  # (B, T, d), after the final norm
    else:
        hidden = sum(out.hidden_states[i] for i in layers) / len(layers)  # (B, T, d)
    w = pool_weights(start, end, hidden.shape[1], readout.pooling).to(hidden.dtype)  # (B, N, T)
    return torch.einsum("bnt,btd->bnd", w, hidden)


def generation_header(tok) -> list[int]:
    """The token ids the chat template puts between a prompt and its reply (``<|im_start|>assistant\n``)."""
    msgs = [{"role": "user", "content": "x"}]
    with_gen = tok(render(tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    without = tok(render(tok, msgs), add_special_tokens=False)["input_ids"]
    if with_gen[:len(without)] != without or len(with_gen) == len(without):
        raise ValueError("the chat template's generation prompt is not a suffix of the prompt; pass prompt_width")
    return with_gen[len(without):]


def infer_prompt_width(header: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """The column where the replies start in a padded batch: just after the rightmost column at which
    every row has the generation ``header``. For callers that do not pass ``prompt_width``; a reply
    that itself contains the header at the same column in every row would be misread."""
    h = len(header)
    if input_ids.shape[1] <= h:
        raise ValueError("no room for a prompt and a reply in these rows; pass prompt_width")
    win = input_ids.unfold(1, h, 1)  # (B, T - h + 1, h)
    hit = (win == torch.tensor(header, device=input_ids.device)).all(-1) & attention_mask.bool().unfold(1, h, 1).all(-1)
    cols = hit.all(0)[:-1].nonzero().flatten()  # a reply needs at least one column after the header
    if len(cols) == 0:
        raise ValueError("the rows share no generation prompt (chat template's assistant header) column; "
                         "pass prompt_width (the prompt columns of [left-padded prompt ; reply ; pad])")
    return int(cols[-1]) + h
