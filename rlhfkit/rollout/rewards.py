"""Reward sources for online RL: what scores a :class:`~rlhfkit.rollout.engine.Rollout` (docs/rewards.md).

The ``reward`` config string is a weighted comma list of components (:func:`parse_reward_spec`):

- ``gold`` — the task's programmatic reward; ``rm:PATH`` — a trained reward model;
- ``fn:package.module:name`` / ``fn:path/to/file.py:name`` — a Python function with TRL's reward
  signature ``fn(prompts, completions, **columns) -> list[float | None]`` (:class:`~rlhfkit.rollout.reward_components.FunctionReward`);
- ``verify:math`` / ``verify:exact`` (against the ``answer`` column), ``verify:regex=PATTERN``
  (``rlhfkit.data.verify``);
- ``judge:MODEL`` — an LM judge's pointwise score (:class:`~rlhfkit.rollout.reward_components.PointwiseJudge`);
  ``judge:MODEL:pairwise`` — P(the judge prefers the policy's reply over the reference policy's), both
  orders (:class:`~rlhfkit.rollout.reward_components.PairwiseJudge`; :meth:`RewardSource.attach_reference`).

A component may return None for a sample (no score). A sample's reward is the weighted sum over the
components that scored it (TRL's rule: NaN-sum); a sample no component scored is *unscored*, NaN in
the total, and the trainer excludes it from its group's baseline and from the loss
(``rlhfkit.train.online_rollout``). ``CustomReward`` adapts a ``reward_fn(rollout) -> (B,)``.
All scores are (B,) float32 on the CPU.
"""

from __future__ import annotations

import inspect
import math
import re

import torch

from rlhfkit.data.prompt_data import check_columns
from rlhfkit.rollout.engine import Rollout
from rlhfkit.rollout.reward_components import (
    FunctionReward,
    GoldReward,
    ModelReward,
    PairwiseJudge,
    PointwiseJudge,
    ReferenceReplies,
    VerifierReward,
    judge_mode,
    load_function,
)

KINDS = ("gold", "rm:", "fn:", "verify:", "judge:")
VERIFIERS = ("math", "exact", "regex=PATTERN")
HELP = ("use gold, rm:PATH, fn:MODULE:NAME, fn:FILE.py:NAME, verify:math|exact|regex=PATTERN, judge:MODEL, "
        "judge:MODEL:pairwise, or a comma list with @weights")


def _split_items(spec: str) -> list[str]:
    """Comma-separated items; a piece that does not start like a source continues the previous item
    (a regex such as ``\\d{1,3}`` keeps its comma)."""
    items: list[str] = []
    for piece in spec.split(","):
        if items and not piece.strip().startswith(KINDS) and items[-1].strip().startswith("verify:regex="):
            items[-1] += "," + piece
        else:
            items.append(piece)
    return [s.strip() for s in items if s.strip()]


def _weight(item: str, spec: str) -> tuple[str, float]:
    name, at, weight = item.rpartition("@")
    if not at:
        return item, 1.0
    try:
        w = float(weight)
    except ValueError:
        if item.startswith("verify:regex="):  # an '@' inside the pattern
            return item, 1.0
        raise ValueError(f"reward: bad weight {weight!r} in {spec!r}; write NAME@NUMBER, e.g. gold@0.5") from None
    if not math.isfinite(w):
        raise ValueError(f"reward: weight {weight!r} in {spec!r} is not finite")
    return name, w


def parse_reward_spec(spec: str) -> list[tuple[str, float, str | None]]:
    """``'rm:runs/rm@1.0,gold@0.5'`` -> ``[("rm", 1.0, "runs/rm"), ("gold", 0.5, None)]``: (kind, weight,
    argument) per comma-separated item, weight 1 when no ``@w`` is given. Kinds: gold (no argument),
    rm (path), fn ('MODULE:NAME' or 'FILE.py:NAME'), verify ('math', 'exact' or 'regex=PATTERN'), judge
    ('MODEL' or 'MODEL:pairwise'; an unknown ':MODE' is an error). A regex may hold commas; one ending in ``@NUMBER`` needs an explicit weight. Raises
    ValueError naming the ``reward`` field for an unknown source, a bad weight or regex, an empty spec.
    Nothing is loaded or imported."""
    parts = []
    for item in _split_items(spec):
        name, w = _weight(item, spec)
        kind, _, arg = name.partition(":")
        if name == "gold":
            parts.append(("gold", w, None))
        elif kind in ("rm", "judge") and arg:
            if kind == "judge":
                judge_mode(arg)  # raises on an unknown mode
            parts.append((kind, w, arg))
        elif kind == "fn":
            target, _, func = arg.rpartition(":")
            if not target or not func.isidentifier():
                raise ValueError(f"reward: '{name}' in '{spec}' is not fn:MODULE:NAME or fn:FILE.py:NAME")
            parts.append(("fn", w, arg))
        elif kind == "verify" and (arg in ("math", "exact") or arg.startswith("regex=")):
            if arg.startswith("regex="):
                try:
                    re.compile(arg[6:])
                except re.error as e:
                    raise ValueError(f"reward: bad pattern in '{name}': {e}") from None
            parts.append(("verify", w, arg))
        else:
            raise ValueError(f"reward: unknown source '{name}' in '{spec}'; {HELP}")
    if not parts:
        raise ValueError(f"reward: empty spec; {HELP}")
    return parts


class RewardSource:
    """Scores a Rollout: the weighted components of the ``reward`` spec, or of ``functions``
    (TRL-style reward functions given from Python, weight 1 each, replacing the spec)."""

    def __init__(self, spec: str, task, device, tokenizer=None, functions=None):
        self.tokenizer, self.task = tokenizer, task
        self.parts: list[tuple[str, float, object]] = []
        if functions is not None:
            fns = functions if isinstance(functions, (list, tuple)) else [functions]
            self.parts = [("fn", 1.0, FunctionReward(f)) for f in fns]
        else:
            for kind, w, arg in parse_reward_spec(spec):
                self.parts.append((kind, w, self._component(kind, arg, spec, task, device)))
        self.names = self._names()
        self.last_parts: dict[str, torch.Tensor] = {}

    def _component(self, kind, arg, spec, task, device):
        if kind == "gold":
            return GoldReward(task)
        if kind == "rm":
            return ModelReward(arg, device, self)
        if kind == "fn":
            return FunctionReward(load_function(arg, f"fn:{arg}"), spec=f"fn:{arg}")
        if kind == "verify":
            return VerifierReward(arg)
        model, mode = judge_mode(arg)
        return PairwiseJudge(model, device) if mode == "pairwise" else PointwiseJudge(model, device)

    def _names(self) -> list[str]:
        """Each component's metric name (``reward/<name>/mean``), made unique with _2, _3, ..."""
        names: list[str] = []
        for _, _, c in self.parts:
            base = c.name
            name, n = base, 1
            while name in names:
                n += 1
                name = f"{base}_{n}"
            names.append(name)
        return names

    @property
    def uses_gold_only(self) -> bool:
        return all(kind == "gold" for kind, _, _ in self.parts)

    @property
    def needs_reference(self) -> bool:
        """True when a component (``judge:MODEL:pairwise``) compares against the reference policy's replies."""
        return any(isinstance(c, PairwiseJudge) for _, _, c in self.parts)

    def attach_reference(self, replies) -> None:
        """Give the pairwise judges the reference policy's replies: a ``prompts -> replies`` callable, or
        ``(model, tokenizer, max_new_tokens)`` for the greedy, per-prompt cached :class:`ReferenceReplies`
        of a frozen reference model (the online loop's ``Start.ref``). A no-op without such a component."""
        if not self.needs_reference:
            return
        if isinstance(replies, tuple):
            replies = ReferenceReplies(*replies)
        for _, _, c in self.parts:
            if isinstance(c, PairwiseJudge):
                c.attach_reference(replies)

    def check(self, rows: list) -> None:
        """Start-up check that every prompt row has the columns the components need (``verify:math``
        needs ``answer``; a reward function needs its named parameters): DataError naming the row."""
        for (kind, _, c), name in zip(self.parts, self.names):
            by = f"reward {c.spec or c.label()}" if isinstance(c, FunctionReward) else f"reward '{kind}:{c.arg}'" \
                if isinstance(c, VerifierReward) else f"reward '{name}'"
            check_columns(rows, sorted(c.needs()), by)

    @torch.no_grad()
    def score(self, r: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total (B,), {component name: (B,)}): NaN where unscored. The total sums the weighted
        components that scored the sample; NaN when none did."""
        parts = {name: c(r).float().cpu() for (_, _, c), name in zip(self.parts, self.names)}
        total = torch.zeros(len(r.completions))
        scored = torch.zeros(len(r.completions), dtype=torch.bool)
        for (_, w, _), s in zip(self.parts, parts.values()):
            ok = ~s.isnan()
            total = total + torch.where(ok, w * s, torch.zeros_like(s))
            scored |= ok
        return torch.where(scored, total, torch.full_like(total, math.nan)), parts

    def __call__(self, r: Rollout) -> torch.Tensor:
        total, self.last_parts = self.score(r)
        return total

    def shares_vocab(self, rm) -> bool:
        tok = self.tokenizer
        return (tok is not None and len(tok) == len(rm.tok) and tok.eos_token_id == rm.tok.eos_token_id
                and tok.get_vocab() == rm.tok.get_vocab())

    @staticmethod
    def score_rollout_ids(rm, r: Rollout) -> torch.Tensor:
        """Score the sampled token ids as they are (no re-tokenisation). A truncated completion gets an
        EOS appended before scoring, as a reward model's training pairs close every reply (sampled
        pairs are truncated too): the head is then always read at an EOS, where it was trained."""
        c_ids, c_mask = r.completion_ids, r.completion_mask.bool()
        if not bool(r.ended.all()):
            n = c_mask.sum(1)
            c_ids = torch.cat([c_ids, torch.full_like(c_ids[:, :1], rm.tok.pad_token_id)], 1)
            c_mask = torch.cat([c_mask, torch.zeros_like(c_mask[:, :1])], 1)
            rows = (~r.ended.bool()).nonzero().flatten().to(c_ids.device)
            c_ids[rows, n[rows]] = rm.tok.eos_token_id
            c_mask[rows, n[rows]] = True
        ids = torch.cat([r.prompt_ids, c_ids], 1)
        mask = torch.cat([r.prompt_mask.bool(), c_mask], 1)
        return rm.score_ids(ids, mask, prompt_width=r.prompt_ids.shape[1]).float().cpu()


class CustomReward:
    """Adapter so a Python ``reward_fn(rollout) -> (B,)`` plugs in where a RewardSource goes."""

    uses_gold_only = False
    needs_reference = False
    names: list[str] = []
    last_parts: dict = {}

    def __init__(self, fn):
        self.fn = fn

    def check(self, rows: list) -> None:
        pass

    def attach_reference(self, replies) -> None:
        """No pairwise judge here: nothing to attach (so a trainer may call it on any reward)."""

    def score(self, r: Rollout) -> tuple[torch.Tensor, dict]:
        return self(r), {}

    def __call__(self, r: Rollout) -> torch.Tensor:
        return torch.as_tensor(self.fn(r), dtype=torch.float32).cpu()


def is_rollout_fn(fn) -> bool:
    """True for a ``reward_fn(rollout)`` (one required positional parameter, no ``completions``), False
    for a TRL-style ``fn(prompts, completions, **kwargs)`` or a list of them."""
    if isinstance(fn, (list, tuple)):
        return False
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params) or any(p.name == "completions" for p in params):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1


def make_reward(spec: str, reward_fn, task, device, tokenizer=None):
    """The run's reward: the ``spec``'s components, or ``reward_fn`` (Python API) in its place: a
    ``reward_fn(rollout)`` (CustomReward) or TRL-style function(s) (a RewardSource of them)."""
    if reward_fn is None:
        return RewardSource(spec, task, device, tokenizer)
    if is_rollout_fn(reward_fn):
        return CustomReward(reward_fn)
    return RewardSource(spec, task, device, tokenizer, functions=reward_fn)
