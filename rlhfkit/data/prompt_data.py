"""A user's prompt dataset for online RL: one :class:`PromptRow` per row, its other columns kept.

A row gives its prompt in one of three forms (the two of TRL's prompt-only datasets, and ours):

- ``{"prompt": "text", ...}`` — standard: the reward function gets the prompt as this string and
  each completion as a string;
- ``{"prompt": [{"role": ..., "content": ...}, ...], ...}`` — conversational (TRL): the reward
  function gets the message list and each completion as ``[{"role": "assistant", "content": text}]``;
- ``{"messages": [...], ...}`` — conversational, as ``rlhfkit sample`` reads.

Every other column (``answer``, ``tests``, ``category``, ``id``, ...) travels with its prompt to the
reward. A bad row fails with where it is (``prompts.jsonl:7: field 'prompt': ...``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data.io import RowWhere, read_rows
from rlhfkit.data.records import DataError, Where, check_messages

RESERVED = ("prompts", "completions", "completion_ids")
"""Keyword names a reward function gets from rlhfkit itself; a column may not take them."""


@dataclass
class PromptRow:
    """One prompt and its row's other columns."""

    messages: list[dict]
    """The chat the policy continues (ends with a user turn)."""
    prompt: Any
    """The prompt as the row gave it: a string (standard) or the message list (conversational)."""
    columns: dict = field(default_factory=dict)
    """Every other column of the row, by name."""
    where: str = ""
    """Where the row came from (``file:line``, or ``file: row N`` for tables and Python lists, 0-based), for errors."""

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    def key(self) -> str:
        """The prompt's text identity (the held-out split is by prompt: equal prompts stay together)."""
        return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in self.messages)


def prompt_row(row: Any, where: Where) -> PromptRow:
    """A :class:`PromptRow` from one dataset row; DataError naming the place and field on a bad row."""
    if not isinstance(row, dict):
        raise where.error(f"expected an object with a 'prompt' or 'messages' field, got {type(row).__name__}")
    row = dict(row)
    if "prompt" in row and "messages" in row:
        raise where.error("both 'prompt' and 'messages' are given; keep one of them", "prompt")
    name = "prompt" if "prompt" in row else "messages" if "messages" in row else None
    if name is None:
        raise where.error(f"no 'prompt' (a string or a message list) or 'messages' field; the row has "
                          f"{', '.join(map(repr, row)) or 'no fields'}")
    value = row.pop(name)
    if isinstance(value, str):
        if name == "messages":
            raise where.error("expected a list of messages, got a string (a plain prompt goes in 'prompt')", name)
        if not value.strip():
            raise where.error("empty prompt", name)
        messages = [{"role": "user", "content": value}]
    else:
        messages = check_messages(value, where, name, must_end_with="user")
        value = messages
    for reserved in RESERVED:
        if reserved in row:
            raise where.error(f"'{reserved}' is the name rlhfkit passes to reward functions itself; rename the column",
                              reserved)
    place = f"{where.path}: row {where.line}" if isinstance(where, RowWhere) else f"{where.path}:{where.line}"
    return PromptRow(messages=messages, prompt=value, columns=row, where=place)


def load_prompt_rows(source, split: str | None = None) -> list[PromptRow]:
    """Rows of a prompt dataset: a path or hub id (anything ``rlhfkit.data.io.read_rows`` reads), a
    ``datasets.Dataset``, or an iterable of dicts (Python API). Raises DataError on the first bad row
    and on an empty dataset."""
    if isinstance(source, (str, os.PathLike)):
        name, rows = str(source), read_rows(source, split)
    else:
        name = "prompts"
        rows = ((RowWhere(name, i), row) for i, row in enumerate(_iter(source)))  # 0-based, as dataset[i]
    out = [prompt_row(row, where) for where, row in rows]
    if not out:
        raise DataError("no prompts (the dataset is empty)", path=name)
    return out


def _iter(source) -> Iterable:
    if isinstance(source, dict):
        raise DataError("expected a list of rows (dicts), a datasets.Dataset or a path, got one dict", path="prompts")
    return source


def split_held_out(rows: list[PromptRow], fraction: float, seed: int = 0) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, held-out): a ``fraction`` of the distinct prompts, chosen by a hash of (seed, prompt), held out.

    The split is by prompt, so repeated prompts never sit on both sides, and it depends only on the
    prompt texts and ``seed`` (not on row order or on the run's seed). Held out: the ceil(fraction x
    distinct) prompts with the smallest hash; at least one prompt stays in train.
    """
    keys = sorted({r.key() for r in rows}, key=lambda k: hashlib.sha256(f"{seed}\x1d{k}".encode()).hexdigest())
    n = min(len(keys) - 1, -int(-fraction * len(keys) // 1)) if fraction > 0 else 0
    held = set(keys[:n])
    return [r for r in rows if r.key() not in held], [r for r in rows if r.key() in held]


def check_columns(rows: list[PromptRow], needed: Iterable[str], by: str) -> None:
    """DataError naming the first row without one of the ``needed`` columns (``by`` names who needs it)."""
    for column in needed:
        for r in rows:
            if column not in r.columns or r.columns[column] is None:
                raise DataError(f"{by} needs the '{column}' column; this row has "
                                f"{', '.join(map(repr, r.columns)) or 'no column besides the prompt'}",
                                path=r.where or None, field=column)
