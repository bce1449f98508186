"""Reward sources for online RL: what scores a :class:`~rlhfkit.rollout.engine.Rollout` (docs/rewards.md).

The ``reward`` config string is a weighted comma list of components (:func:`parse_reward_spec`):

- ``gold`` — the task's programmatic reward; ``rm:PATH`` — a trained reward model;
- ``fn:package.module:name`` / ``fn:path/to/file.py:name`` — a Python function with TRL's reward
  signature ``fn(prompts, completions, **columns) -> list[float | None]`` (:class:`FunctionReward`);
- ``verify:math`` / ``verify:exact`` (against the ``answer`` column), ``verify:regex=PATTERN``
  (``rlhfkit.data.verify``);
- ``judge:MODEL`` — an LM judge's pointwise score (:class:`PointwiseJudge`).

A component may return None for a sample (no score). A sample's reward is the weighted sum over the
components that scored it (TRL's rule: NaN-sum); a sample no component scored is *unscored*, NaN in
the total, and the trainer excludes it from its group's baseline and from the loss
(``rlhfkit.train.online_rollout``). ``CustomReward`` adapts a ``reward_fn(rollout) -> (B,)``.
All scores are (B,) float32 on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from pathlib import Path

import torch

from rlhfkit.data import verify
from rlhfkit.data.prompt_data import check_columns
from rlhfkit.models.heads import RewardModel
from rlhfkit.models.loading import load_model
from rlhfkit.rollout.engine import Rollout

KINDS = ("gold", "rm:", "fn:", "verify:", "judge:")
VERIFIERS = ("math", "exact", "regex=PATTERN")
HELP = "use gold, rm:PATH, fn:MODULE:NAME, fn:FILE.py:NAME, verify:math|exact|regex=PATTERN, judge:MODEL, or a comma list with @weights"


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
    (model). A regex may hold commas; one ending in ``@NUMBER`` needs an explicit weight. Raises
    ValueError naming the ``reward`` field for an unknown source, a bad weight or regex, an empty spec.
    Nothing is loaded or imported."""
    parts = []
    for item in _split_items(spec):
        name, w = _weight(item, spec)
        kind, _, arg = name.partition(":")
        if name == "gold":
            parts.append(("gold", w, None))
        elif kind in ("rm", "judge") and arg:
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


def task_gold(task, r: Rollout) -> torch.Tensor:
    """(B,) the task's gold (programmatic) reward of each completion."""
    return torch.tensor(task.gold(r.prompts, r.completions), dtype=torch.float32)


def to_scores(values, n: int, name: str) -> torch.Tensor:
    """A component's output as (n,) float32 with NaN for None; ValueError naming ``name`` on a wrong
    length, a non-number or a non-finite number."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"reward {name} returned {type(values).__name__}, expected a list of n floats (or None)") from None
    if len(values) != n:
        raise ValueError(f"reward {name} returned {len(values)} scores for {n} completions; it must return one "
                         "float (or None) per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            out.append(float(v))
        else:
            raise ValueError(f"reward {name} returned {v!r} ({type(v).__name__}) for completion {i}; expected a "
                             "finite float or None")
    return torch.tensor(out, dtype=torch.float32)


def prompt_rows(r: Rollout) -> list:
    """The :class:`~rlhfkit.data.prompt_data.PromptRow` of each completion (``r.extras['rows']``), or
    None per completion when the rollout has none (a caller that built the Rollout itself)."""
    return r.extras.get("rows") or [None] * len(r.completions)


def columns_of(rows: list) -> dict[str, list]:
    """Column name -> one value per completion (None where a row lacks the column), TRL's ``**kwargs``."""
    names = dict.fromkeys(k for row in rows if row is not None for k in row.columns)
    return {k: [row.columns.get(k) if row is not None else None for row in rows] for k in names}


def row_name(row, i: int) -> str:
    if row is None:
        return f"completion {i}"
    ident = row.columns.get("id")
    return f"the row at {row.where}" + (f" (id {ident!r})" if ident is not None else "")


class FunctionReward:
    """A TRL-style reward function ``fn(prompts, completions, **kwargs) -> list[float | None]``.

    Called once per batch with keyword arguments, as TRL's GRPOTrainer calls it, one entry per
    completion (a prompt's K completions repeat its prompt and columns K times):

    - ``prompts``: each row's prompt as the dataset gave it — a string (standard rows, ``prompt``
      text) or a list of message dicts (conversational rows, ``messages`` or a message-list
      ``prompt``; the built-in tasks' prompts are conversational);
    - ``completions``: a string per completion for standard rows, ``[{"role": "assistant",
      "content": text}]`` for conversational rows;
    - ``completion_ids``: each completion's token ids (a list of ints, no padding);
    - every other dataset column by its name (None where a row lacks it).

    A function without ``**kwargs`` gets only the arguments it names. None = no score for that sample.
    """

    def __init__(self, fn, name: str | None = None, spec: str | None = None):
        self.fn, self.spec = fn, spec
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        params = inspect.signature(fn).parameters.values()
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        self.accepts = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self.required = {p.name for p in params
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty}

    def label(self) -> str:
        return f"reward function '{self.name}'" + (f" ({self.spec})" if self.spec else "")

    def needs(self) -> set[str]:
        """Dataset columns the function requires (named parameters without default)."""
        return self.required - {"prompts", "completions", "completion_ids"}

    def kwargs(self, r: Rollout) -> dict:
        rows = prompt_rows(r)
        ids = [row[m].tolist() for row, m in zip(r.completion_ids.cpu(), r.completion_mask.bool().cpu())] \
            if r.completion_ids is not None else None
        args = {"prompts": [row.prompt if row is not None else p for row, p in zip(rows, r.prompts)],
                "completions": [[{"role": "assistant", "content": c}] if row is None or row.conversational else c
                                for row, c in zip(rows, r.completions)],
                "completion_ids": ids, **columns_of(rows)}
        return args if self.takes_all else {k: v for k, v in args.items() if k in self.accepts}

    def __call__(self, r: Rollout) -> torch.Tensor:
        args = self.kwargs(r)
        try:
            out = self.fn(**args)
        except Exception as e:
            raise RuntimeError(f"{self.label()} raised {type(e).__name__}: {e} — on {self.culprit(args, r)}") from e
        try:
            return to_scores(out, len(r.completions), self.label())
        except ValueError as e:
            raise ValueError(f"{e} (first prompt of the batch: {row_name(prompt_rows(r)[0], 0)})") from None

    def culprit(self, args: dict, r: Rollout) -> str:
        """The first completion on which the function raises alone (its row's place and id), else 'the batch'."""
        for i, row in enumerate(prompt_rows(r)):
            one = {k: (v[i:i + 1] if isinstance(v, list) else v) for k, v in args.items()}
            try:
                self.fn(**one)
            except Exception:
                return f"prompt {i} of the batch, {row_name(row, i)}"
        return f"the batch of {len(r.completions)} completions (each alone scores without error)"


def load_function(target: str, spec: str):
    """The function named by ``'package.module:name'`` or ``'path/to/file.py:name'``; ValueError naming
    the spec and what was looked for."""
    where, _, name = target.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"reward: '{spec}': file not found: {path.resolve()}")
        module_name = f"rlhfkit_reward_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
        looked = f"file {path}"
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ValueError(f"reward: '{spec}': cannot import module '{where}' ({e}); the module must be importable "
                             "(on sys.path) or give a file: fn:path/to/file.py:NAME") from None
        looked = f"module {where} ({getattr(module, '__file__', '?')})"
    fn = getattr(module, name, None)
    if not callable(fn):
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward: '{spec}': no function '{name}' in {looked}; it defines: {', '.join(have) or 'none'}")
    return fn


class VerifierReward:
    """``verify:math|exact|regex=PATTERN`` (rlhfkit.data.verify): 1.0 or 0.0 per completion."""

    def __init__(self, arg: str):
        self.arg = arg
        self.name = "verify_regex" if arg.startswith("regex=") else f"verify_{arg}"
        self.pattern = re.compile(arg[6:], re.DOTALL) if arg.startswith("regex=") else None

    def needs(self) -> set[str]:
        return set() if self.pattern is not None else {"answer"}

    def __call__(self, r: Rollout) -> torch.Tensor:
        if self.pattern is not None:
            return torch.tensor([verify.verify_regex(c, self.pattern) for c in r.completions])
        check = verify.verify_math if self.arg == "math" else verify.verify_exact
        answers = columns_of(prompt_rows(r)).get("answer") or [None] * len(r.completions)
        for i, (a, row) in enumerate(zip(answers, prompt_rows(r))):
            if a is None:
                raise ValueError(f"reward verify:{self.arg} needs an 'answer' column; {row_name(row, i)} has none")
        return torch.tensor([check(c, a) for c, a in zip(r.completions, answers)])


JUDGE_QUESTION = """Here is a conversation and a reply to it.

[Conversation]
{conversation}

[Reply]
{reply}

Is the reply helpful, correct and does it follow the user's instructions? Answer Yes or No."""
JUDGE_ANSWER_PREFIX = "Answer:"


class PointwiseJudge:
    """``judge:MODEL``: p(Yes) / (p(Yes) + p(No)) of the judge's next token after a yes/no question
    about the reply, in [0, 1]. Read from log-probs, not parsed from generated text (as
    rlhfkit.feedback.judge reads its pairwise verdicts; that module sits on a higher layer)."""

    def __init__(self, model_name: str, device, batch_size: int = 8):
        self.name = "judge"
        self.model, self.tok = load_model(model_name)
        if getattr(self.tok, "chat_template", None) is None:
            raise ValueError(f"reward: judge model '{model_name}' has no chat template; use a chat/instruct model")
        self.model.eval().requires_grad_(False).to(device)
        self.batch_size = batch_size
        self.yes, self.no = self._ids("Yes"), self._ids("No")

    def _ids(self, word: str) -> list[int]:
        ids = {enc[0] for text in (word, " " + word)
               if len(enc := self.tok(text, add_special_tokens=False)["input_ids"]) == 1}
        if not ids:
            raise ValueError(f"reward: the judge's tokenizer has no single token for {word!r}")
        return sorted(ids)

    def needs(self) -> set[str]:
        return set()

    def render(self, prompt: list[dict], reply: str) -> str:
        conversation = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
        messages = [{"role": "user", "content": JUDGE_QUESTION.format(conversation=conversation, reply=reply)}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + JUDGE_ANSWER_PREFIX

    @torch.no_grad()
    def __call__(self, r: Rollout) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(r.completions), self.batch_size):
            texts = [self.render(p, c) for p, c in zip(r.prompts[s:s + self.batch_size],
                                                        r.completions[s:s + self.batch_size])]
            enc = self.tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)  # left padding
            att = enc["attention_mask"].to(device)
            pos = (att.cumsum(1) - 1).clamp(min=0)
            logp = self.model(input_ids=enc["input_ids"].to(device), attention_mask=att, position_ids=pos,
                              use_cache=False).logits[:, -1].float().log_softmax(-1)  # (b, V)
            yes, no = logp[:, self.yes].logsumexp(-1), logp[:, self.no].logsumexp(-1)
            out.append(torch.sigmoid(yes - no).cpu())  # p(yes) / (p(yes) + p(no))
        return torch.cat(out) if out else torch.zeros(0)


class GoldReward:
    name = "gold"

    def __init__(self, task):
        if task is None:
            raise ValueError("reward: 'gold' needs a task (its programmatic reward); with your own prompts and no "
                             "task, use fn:, verify: or judge:, or name a task")
        self.task = task

    def needs(self) -> set[str]:
        return set()

    def __call__(self, r: Rollout) -> torch.Tensor:
        return task_gold(self.task, r)


class ModelReward:
    """``rm:PATH``: a trained reward model's score."""

    name = "rm"

    def __init__(self, path: str, device, source: RewardSource):
        self.rm = RewardModel.load(path)
        self.rm.model.to(device)
        self.source = source

    def needs(self) -> set[str]:
        return set()

    def __call__(self, r: Rollout) -> torch.Tensor:
        if self.source.shares_vocab(self.rm):
            return self.source.score_rollout_ids(self.rm, r)
        return self.rm.score(r.prompts, r.completions).float().cpu()  # another tokenizer: re-encode the text


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
        return PointwiseJudge(arg, device)

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
        return rm.score_ids(ids, mask).float().cpu()


class CustomReward:
    """Adapter so a Python ``reward_fn(rollout) -> (B,)`` plugs in where a RewardSource goes."""

    uses_gold_only = False
    names: list[str] = []
    last_parts: dict = {}

    def __init__(self, fn):
        self.fn = fn

    def check(self, rows: list) -> None:
        pass

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
