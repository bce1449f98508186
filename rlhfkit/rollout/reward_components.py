"""The components a ``reward`` spec is made of (:mod:`rlhfkit.rollout.rewards` parses the spec and sums
them): ``gold``, ``rm:PATH``, ``fn:`` functions with TRL's signature, ``verify:`` verifiers, the
pointwise ``judge:MODEL`` and the pairwise ``judge:MODEL:pairwise`` (against the reference policy's reply). Each has ``needs()`` (the dataset columns it reads) and ``__call__(rollout)``
returning (B,) float32 scores on the CPU, NaN where it gave no score.
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
from rlhfkit.models.heads import RewardModel
from rlhfkit.models.loading import load_model
from rlhfkit.rollout.engine import Rollout, Sampler, SamplingConfig
from rlhfkit.rollout.judge_core import LMJudge, answer_logodds, conversation_text, single_token_ids


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
JUDGE_MODES = ("pointwise", "pairwise")
"""``judge:MODEL`` (= ``judge:MODEL:pointwise``) or ``judge:MODEL:pairwise``."""


def judge_mode(arg: str) -> tuple[str, str]:
    """``'MODEL'`` -> (MODEL, 'pointwise'); ``'MODEL:pairwise'`` -> (MODEL, 'pairwise'). ValueError on
    an unknown ``:MODE`` suffix (a word after the last colon) or a missing model."""
    model, colon, mode = arg.rpartition(":")
    if not colon or not mode.isidentifier():  # no suffix (a colon inside a path stays part of the model)
        model, mode = arg, "pointwise"
    if mode not in JUDGE_MODES:
        raise ValueError(f"reward: 'judge:{arg}': unknown judge mode '{mode}'; use judge:MODEL (pointwise) or "
                         "judge:MODEL:pairwise")
    if not model:
        raise ValueError(f"reward: 'judge:{arg}': no judge model; use judge:MODEL or judge:MODEL:pairwise")
    return model, mode


def load_judge(model_name: str, device):
    """The judge model (a chat model: ValueError naming it otherwise), frozen, on ``device``."""
    model, tok = load_model(model_name)
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"reward: judge model '{model_name}' has no chat template; use a chat/instruct model")
    return model.eval().requires_grad_(False).to(device), tok


class PointwiseJudge:
    """``judge:MODEL``: p(Yes) / (p(Yes) + p(No)) of the judge's next token after a yes/no question
    about the reply, in [0, 1], read from log-probs (``judge_core.answer_logodds``), not parsed text."""

    def __init__(self, model_name: str, device, batch_size: int = 8):
        self.name = "judge"
        self.model, self.tok = load_judge(model_name, device)
        self.batch_size = batch_size
        self.yes, self.no = self._ids("Yes"), self._ids("No")

    def _ids(self, word: str) -> list[int]:
        ids = single_token_ids(self.tok, word)
        if not ids:
            raise ValueError(f"reward: the judge's tokenizer has no single token for {word!r}")
        return ids

    def needs(self) -> set[str]:
        return set()

    def render(self, prompt: list[dict], reply: str) -> str:
        question = JUDGE_QUESTION.format(conversation=conversation_text(prompt), reply=reply)
        messages = [{"role": "user", "content": question}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + JUDGE_ANSWER_PREFIX

    def __call__(self, r: Rollout) -> torch.Tensor:
        texts = [self.render(p, c) for p, c in zip(r.prompts, r.completions)]
        logodds = answer_logodds(self.model, self.tok, texts, self.yes, self.no, self.batch_size)
        return torch.sigmoid(logodds)  # p(yes) / (p(yes) + p(no))


def pairwise_scores(judge, prompts: list[list[dict]], replies: list[str], references: list[str]) -> torch.Tensor:
    """(B,) P(reply preferred over the reference reply), averaged over both orders to cancel the judge's
    position bias: ``judge`` (an ``LMJudge``: items -> log-odds of the reply shown first) is asked with the
    reply first (s1) and with the reference first (s2); the score is ½[σ(s1) + σ(-s2)]. Swapping the two
    replies gives 1 - score exactly; a reply equal to the reference scores 0.5."""
    n = len(replies)
    items = [(p, a, b) for p, a, b in zip(prompts, replies, references)]
    items += [(p, b, a) for p, a, b in zip(prompts, replies, references)]
    s = judge(items).float().cpu()
    if s.shape != (2 * n,):
        raise ValueError(f"the judge returned shape {tuple(s.shape)} for {2 * n} questions")
    return 0.5 * (torch.sigmoid(s[:n]) + torch.sigmoid(-s[n:]))


class ReferenceReplies:
    """The reference policy's greedy reply to each prompt, cached by prompt: the reference is frozen, so
    a prompt seen again (the next epoch, the K copies of a group) costs no generation."""

    def __init__(self, model, tok, max_new_tokens: int, max_prompt_length: int = 512, batch_size: int = 16):
        self.sampler = Sampler(model, tok, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                               max_prompt_length=max_prompt_length)
        self.batch_size = batch_size
        self.cache: dict[str, str] = {}

    @staticmethod
    def key(prompt: list[dict]) -> str:
        return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt)

    def __call__(self, prompts: list[list[dict]]) -> list[str]:
        todo = list({self.key(p): p for p in prompts if self.key(p) not in self.cache}.items())
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s:s + self.batch_size]
            out = self.sampler.sample([p for _, p in chunk], seed=0, with_logps=False)
            self.cache.update(zip([k for k, _ in chunk], out.completions))
        return [self.cache[self.key(p)] for p in prompts]


class PairwiseJudge:
    """``judge:MODEL:pairwise``: P(the judge prefers the policy's reply over the reference policy's reply
    to the same prompt), both orders averaged (:func:`pairwise_scores`), in [0, 1]. The reference replies
    come from :meth:`attach_reference` (a ``prompts -> replies`` callable, e.g. :class:`ReferenceReplies`
    over the run's frozen reference model); the trainer or ``rlhfkit eval`` attaches it."""

    name = "judge_pairwise"

    def __init__(self, model_name: str, device, batch_size: int = 8, judge=None):
        # judge: an items -> log-odds callable in place of the model (tests)
        self.model_name = model_name
        self.judge = judge if judge is not None else LMJudge(*load_judge(model_name, device), batch_size=batch_size)
        self.reference = None

    def needs(self) -> set[str]:
        return set()

    def attach_reference(self, replies) -> None:
        self.reference = replies

    def __call__(self, r: Rollout) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError(f"reward judge:{self.model_name}:pairwise needs the reference policy's replies and none "
                               "is attached (RewardSource.attach_reference)")
        references = self.reference(r.prompts)
        return pairwise_scores(self.judge, r.prompts, r.completions, references)


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

    def __init__(self, path: str, device, source):
        # source: the RewardSource this component belongs to (it knows the policy's tokenizer)
        self.rm = RewardModel.load(path)
        self.rm.model.to(device)
        self.source = source

    def needs(self) -> set[str]:
        return set()

    def __call__(self, r: Rollout) -> torch.Tensor:
        if self.source.shares_vocab(self.rm):
            return self.source.score_rollout_ids(self.rm, r)
        return self.rm.score(r.prompts, r.completions).float().cpu()  # another tokenizer: re-encode the text
