"""Scalar heads on a causal LM body. The reward model: a causal LM body with a one-output head on a
*read-out* of its hidden states (``rlhfkit.models.readout``: which layers, pooled how over the reply).
The value model (PPO's critic): a one-output head at every position (:func:`load_value_model`,
:func:`completion_values`).

Layout of every scored batch (shapes: B sequences, P prompt tokens, C completion tokens)::

    input_ids       (B, P + C)  [left-padded prompt ; completion ending with EOS ; right pad]
    attention_mask  (B, P + C)  True on real tokens

This is the layout of a :class:`rlhfkit.rollout.Rollout` (``rollout.input_ids``), so the RL trainers
score rollouts without re-tokenising. ``transformers``' sequence-classification head reads the
rightmost non-pad token, which here is the completion's last token — its EOS (N implementation
details #1); that needs pad != EOS, which ``load_model`` guarantees (#2). Position ids are
``cumsum(attention_mask) - 1`` so left padding does not shift positions.

Read-out (``config.rlhfkit_reward_readout``, saved with the checkpoint next to the normalisation):
``pooling`` "last" (the reply's EOS) or "mean" (over the reply's tokens) of ``layers`` ("last", or
"A-B" hidden states averaged). A checkpoint without the setting reads last/last, what every RM before
it was trained with. The same ``read_features`` serves the padded layout (``score``, ``score_ids``) and
the packed one (:class:`PackedScorer`, training), so their scores are equal (tests check this).

Normalisation (N implementation details #4): ``score`` returns ``(raw - mean) / std`` with the
constants stored in the saved config as ``rlhfkit_reward_norm`` and fitted after training so that the
starting policy's completions score mean 0, std 1. Plain ``transformers`` loading ignores them and
returns the raw head output.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
from rlhfkit.models.batching import CompletionBatch, pad_completions, position_ids
from rlhfkit.models.loading import (
    TINY,
    disable_dropout,
    hub_load,
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve,
    tiny_config,
)
from rlhfkit.models.lora import (
    apply_lora,
    is_adapter_dir,
    is_lora,
    load_adapter,
    read_base,
    record_base,
    settings_of,
)
from rlhfkit.models.readout import (
    ReadOut,
    generation_header,
    infer_prompt_width,
    read_features,
    readout_of,
    set_readout,
)

NORM_KEY = "rlhfkit_reward_norm"


def init_head(head: nn.Linear, seed: int = 0) -> None:
    """Reward head ~ N(0, 1/sqrt(d + 1)), bias 0 (N implementation details #3; the std, not the
    variance, is 1/sqrt(d+1), as in OpenAI's lm-human-preferences ``layer_init``)."""
    d = head.in_features
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / math.sqrt(d + 1))
        if head.bias is not None:
            head.bias.zero_()


def reward_head(model) -> nn.Linear:
    """The one-output linear head of a ``*ForSequenceClassification`` decoder (``score`` in
    transformers' decoder classes)."""
    head = getattr(model, "score", None)
    if hasattr(head, "modules_to_save"):  # peft's wrapper of a head trained in full next to LoRA: its live copy
        head = head.modules_to_save[head.active_adapter]
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear `score` head; rlhfkit reward models are decoder "
                         "LMs loaded with AutoModelForSequenceClassification (num_labels=1)")
    return head


def raw_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B,) head output on each row's read-out, before normalisation; rows are [left-padded prompt
    (``prompt_width`` columns) ; reply ; right pad]."""
    att = attention_mask.long()
    B, T = att.shape
    end = (T - 1 - att.flip(1).argmax(1))[:, None]  # (B, 1) last real token: the reply's EOS
    start = torch.full_like(end, prompt_width)
    if bool((end < start).any()):
        raise ValueError(f"a row has no reply tokens after its {prompt_width} prompt columns")
    feats = read_features(model, input_ids, att, position_ids(att), start, end)  # (B, 1, d)
    return reward_head(model)(feats)[:, 0, 0].float()


class RewardModel:
    """A sequence-classification model (num_labels=1) and its tokenizer, scoring prompt/completion pairs."""

    def __init__(self, model, tokenizer, norm: tuple[float, float] | None = None):
        self.model, self.tok = model, tokenizer
        reward_head(model)
        if norm is not None:
            self.set_normalization(*norm)
        self._warned_unnormalized = False
        self._header: list[int] | None = None

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def init_from(cls, model_name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, pooling: str = "last",
                  layers: str = "last") -> RewardModel:
        """A new reward model: the body of ``model_name`` (any name ``load_model`` takes), a freshly
        initialised head (N details #3) and the read-out ``pooling``/``layers`` (:class:`ReadOut`). Not
        normalised until :meth:`fit_normalization`."""
        model, tok = load_model(model_name, kind="reward", seed=seed, dtype=dtype)
        init_head(reward_head(model), seed)
        if hasattr(model.config, NORM_KEY):
            delattr(model.config, NORM_KEY)  # a stale normalisation from a previous reward model
        rm = cls(model, tok)
        rm.set_readout(pooling, layers)
        return rm

    @classmethod
    def load(cls, path_or_name: str, *, dtype: torch.dtype = torch.float32) -> RewardModel:
        """A saved reward model: a directory written by :meth:`save` (or ``rlhfkit reward train``), or
        any ``*ForSequenceClassification`` checkpoint with one output. A causal-LM directory has no
        trained head: that is an error, not a silently random reward."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        where = resolve(path_or_name)
        config = hub_load(AutoConfig, where)
        archs = getattr(config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
            raise ValueError(
                f"{path_or_name} is not a reward model: its config has architectures={archs} and "
                f"num_labels={config.num_labels}, and a reward model needs a trained one-output "
                "*ForSequenceClassification head. Train one with `rlhfkit reward train --model "
                f"{path_or_name} --data prefs.jsonl`, or start one with RewardModel.init_from({path_or_name!r})."
            )
        with quiet_transformers(False):
            model, info = AutoModelForSequenceClassification.from_pretrained(
                where, dtype=dtype, output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if k.startswith("score")]
        if missing:
            raise ValueError(f"{path_or_name}: the checkpoint has no weights for the reward head ({missing}); "
                             "it would score with a random head. Point at a directory written by "
                             "`rlhfkit reward train` or RewardModel.save")
        tok = load_tokenizer(where)
        if len(tok) > model.get_input_embeddings().num_embeddings:
            raise ValueError(f"{path_or_name}: the tokenizer has {len(tok)} tokens but the model only "
                             f"{model.get_input_embeddings().num_embeddings} embeddings")
        model.config.pad_token_id = tok.pad_token_id
        disable_dropout(model)
        model.eval()
        return cls(model, tok)

    def save(self, path: str | Path) -> Path:
        """Write the model (with its normalisation in ``config.json``) and tokenizer; loadable by
        :meth:`load` and by ``AutoModelForSequenceClassification.from_pretrained``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tok.save_pretrained(path)
        return path

    # --- read-out -----------------------------------------------------------------------------------

    @property
    def readout(self) -> ReadOut:
        return readout_of(self.model)

    def set_readout(self, pooling: str, layers: str) -> ReadOut:
        """Set (and store in the config) which hidden states the head reads; ``layers`` is resolved
        ("middle" -> "A-B"). A trained head belongs to its read-out: set this before training."""
        return set_readout(self.model, pooling, layers)

    # --- normalisation ------------------------------------------------------------------------------

    @property
    def norm(self) -> tuple[float, float] | None:
        """``(mean, std)`` subtracted from / dividing the raw head output, or None when not fitted."""
        d = getattr(self.model.config, NORM_KEY, None)
        return (float(d["mean"]), float(d["std"])) if d else None

    def set_normalization(self, mean: float, std: float, **info) -> None:
        if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
            raise ValueError(f"normalisation needs a finite mean and a positive std, got mean={mean}, std={std}")
        setattr(self.model.config, NORM_KEY, {"mean": float(mean), "std": float(std), **info})

    @torch.no_grad()
    def fit_normalization(self, prompts: list[list[dict]], completions: list[str], batch_size: int = 16
                          ) -> tuple[float, float]:
        """Set the constants so these completions (the starting policy's) score mean 0, std 1."""
        if len(completions) < 2:
            raise ValueError(f"normalisation needs at least 2 completions, got {len(completions)}")
        raw = self.score(prompts, completions, batch_size=batch_size, normalized=False)
        mean, std = raw.mean().item(), raw.std().item()
        self.set_normalization(mean, max(std, 1e-6), n=len(completions))
        return self.norm

    def _normalize(self, raw: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if norm is None:
            if not self._warned_unnormalized:
                warnings.warn("this reward model has no normalisation constants (config.rlhfkit_reward_norm); "
                              "scores are the raw head output. Call fit_normalization(prompts, completions) on the "
                              "starting policy's samples, or pass normalized=False to silence this.", stacklevel=3)
                self._warned_unnormalized = True
            return raw
        return (raw - norm[0]) / norm[1]

    # --- scoring ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalized: bool = True,
                  prompt_width: int | None = None) -> torch.Tensor:
        """(B,) scores of [left-padded prompt (``prompt_width`` columns) ; completion ending with EOS ;
        right pad] rows. Without ``prompt_width`` the replies start after the chat template's
        generation prompt (:func:`infer_prompt_width`); only the "mean" pooling needs it."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if prompt_width is None:
            if self.readout.pooling == "last":
                prompt_width = 0
            else:
                if self._header is None:
                    self._header = generation_header(self.tok)
                prompt_width = infer_prompt_width(self._header, input_ids, attention_mask)
        raw = raw_scores(self.model, input_ids, attention_mask, prompt_width)
        return self._normalize(raw) if normalized else raw

    def tokenize(self, prompt: list[dict], completion: str) -> tuple[list[int], list[int]]:
        """Prompt ids (with the generation prompt) and completion ids (ending with EOS)."""
        return tokenize_prompt(self.tok, prompt), tokenize_completion(self.tok, prompt, completion)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], completions: list[str], batch_size: int = 16,
              normalized: bool = True) -> torch.Tensor:
        """(B,) scores of each completion to its prompt, in input order (on the CPU)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not completions:
            return torch.zeros(0)
        was_training = self.model.training
        self.model.eval()
        encoded = [self.tokenize(p, c) for p, c in zip(prompts, completions)]
        # similar lengths together: less padding; results are put back in input order
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        out = torch.empty(len(encoded))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = pad_completions([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], self.tok.pad_token_id)
            ids, mask = b.input_ids, b.attention_mask
            out[idx] = self.score_ids(ids, mask, normalized=False, prompt_width=b.prompt_ids.shape[1]).cpu()
        self.model.train(was_training)
        return self._normalize(out) if normalized else out


class PackedScorer(nn.Module):
    """(R, N) raw rewards of the replies of a :func:`rlhfkit.models.batching.pack_groups` batch (entries where
    ``reply_mask`` is False hold garbage), read out as the model's :class:`ReadOut` says; ``reply_start``
    (R, N), the first column of each reply, is needed by the "mean" pooling.

    A module (not a function) so that ``accelerate.prepare`` can wrap it: DDP's gradient sync hooks
    fire on the wrapper's forward, which calls the body and the head of the reward model directly.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = reward_head(model)

    def features(self, input_ids, attention_mask, position_ids, read_at, reply_start=None) -> torch.Tensor:
        """(R, N, d) the read-out each reply's head sees."""
        if reply_start is None:
            if readout_of(self.model).pooling != "last":
                raise ValueError("the 'mean' read-out needs reply_start (reward_data.collate provides it)")
            reply_start = read_at
        return read_features(self.model, input_ids, attention_mask, position_ids, reply_start, read_at)

    def forward(self, input_ids, attention_mask, position_ids, read_at, reply_start=None) -> torch.Tensor:
        picked = self.features(input_ids, attention_mask, position_ids, read_at, reply_start)  # (R, N, d)
        return self.head(picked).squeeze(-1).float()  # (R, N)


# --- the value model (critic) ----------------------------------------------------------------------


def load_value_model(source: str | None, base_model: str, seed: int = 0, lora=None):
    """A token-level value model: ``AutoModelForTokenClassification`` with one output, (B, T) -> (B, T, 1).

    ``source``: a directory holding a saved critic (a checkpoint's ``value/``) or a reward model (body
    and head are kept; the token head's ``score.bias``, absent from a sequence head, starts at 0).
    None: a new head on ``base_model``'s body (any name ``load_model`` takes; a tiny model is built
    from ``seed``), weights and bias at zero, so the first values are 0 (N implementation details #3).
    Dropout is off (N details #6). ``lora``: a config with ``lora_r > 0`` wraps the critic in a LoRA adapter
    with its head trained in full (models/lora.py); a saved LoRA critic (``source`` an adapter folder) is
    rebuilt on the start it was trained from, then its adapter loaded.
    """
    # transformers' auto classes are heavy to import: loaded on first use, as in RewardModel.load
    from transformers import AutoModelForTokenClassification

    adapter = source if is_adapter_dir(source) else None
    if adapter is not None:
        start = read_base(adapter)
        source, seed = (None if start["model"] == base_model else start["model"]), start["seed"]
    if source is not None:
        with quiet_transformers(True):  # from a reward model: score.bias (token head only) is reported MISSING
            critic = AutoModelForTokenClassification.from_pretrained(source, num_labels=1)
    else:
        if base_model.startswith(TINY):
            tok = load_tokenizer(base_model)
            _, _, init = base_model.partition(":")
            config = tiny_config(tok, init_std=float(init) if init else 0.02)
            config.num_labels = 1
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                critic = AutoModelForTokenClassification.from_config(config)
        else:
            with quiet_transformers(True):  # the value head is new: its MISSING report is expected
                critic = AutoModelForTokenClassification.from_pretrained(resolve(base_model), num_labels=1)
        torch.nn.init.zeros_(critic.score.weight)
        if getattr(critic.score, "bias", None) is not None:
            torch.nn.init.zeros_(critic.score.bias)
    disable_dropout(critic)
    if adapter is not None:
        critic = load_adapter(critic, adapter)
    elif lora is not None and settings_of(lora)["r"] > 0:
        critic = apply_lora(critic, lora, head_names=("score",), seed=seed)
    if is_lora(critic):
        record_base(critic, source or base_model, seed, "value")
    return critic


def completion_values(critic, batch: CompletionBatch) -> torch.Tensor:
    """(B, C) float32: V(s_t) for each completion step t, read at the position *before* token t is
    emitted (the position whose logits give the token's log-prob in ``rlhfkit.models.logps``)::

        input_ids   [pad pad p0 p1 p2 | c0 c1 c2 pad]     P = 5 prompt columns, C = 4
        read at                  ^  ^    ^  ^             positions P-1 .. P-1+C-1 -> V(s_0) .. V(s_3)
    """
    att = batch.attention_mask.long()
    out = critic(input_ids=batch.input_ids, attention_mask=att, position_ids=position_ids(att), use_cache=False).logits
    p, c = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return out[:, p - 1:p - 1 + c, 0].float()
