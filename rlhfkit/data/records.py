"""The data model every part of rlhfkit shares: chat messages, conversations and preference records.

A message is a plain dict ``{"role": "system"|"user"|"assistant", "content": str}`` so that records
round-trip through JSON, Parquet and Hugging Face ``datasets`` unchanged. The dataclasses below add
validation with errors that name where the bad value came from (file, line, field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
SOURCES = ("human", "judge", "simulated", "rm", "unknown")


class DataError(ValueError):
    """Bad input data. The message always says where: ``file:line: field: problem``."""

    def __init__(self, problem: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        self.problem, self.path, self.line, self.field = problem, path, line, field
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        elif line is not None:
            where = f"line {line}: "
        if field:
            where += f"field '{field}': "
        super().__init__(where + problem)


@dataclass
class Where:
    """Where a record came from, threaded through validation so errors can name it."""

    path: str | None = None
    line: int | None = None

    def error(self, problem: str, field: str | None = None) -> DataError:
        return DataError(problem, path=self.path, line=self.line, field=field)


NOWHERE = Where()


def check_message(msg: Any, where: Where = NOWHERE, field: str = "messages") -> dict:
    if not isinstance(msg, dict):
        raise where.error(f"expected a message object with 'role' and 'content', got {type(msg).__name__}", field)
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        raise where.error(f"role must be one of {', '.join(ROLES)}, got {role!r}", f"{field}.role")
    if not isinstance(content, str):
        raise where.error(f"content must be a string, got {type(content).__name__}", f"{field}.content")
    return {"role": role, "content": content}


def check_messages(msgs: Any, where: Where = NOWHERE, field: str = "messages", *, must_end_with: str | None = None) -> list[dict]:
    """Validate a chat: roles alternate user/assistant after an optional leading system message."""
    if not isinstance(msgs, list) or not msgs:
        raise where.error("expected a non-empty list of messages", field)
    out = [check_message(m, where, f"{field}[{i}]") for i, m in enumerate(msgs)]
    start = 1 if out[0]["role"] == "system" else 0
    for i, m in enumerate(out[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise where.error(f"wrong role order: expected '{expected}' at position {i}, got '{m['role']}'", f"{field}[{i}].role")
        if m["role"] == "assistant" and not m["content"].strip():
            raise where.error("empty assistant turn", f"{field}[{i}].content")
    if must_end_with and out[-1]["role"] != must_end_with:
        raise where.error(f"must end with a '{must_end_with}' message, ends with '{out[-1]['role']}'", field)
    return out


@dataclass
class Conversation:
    """A chat for supervised fine-tuning: the loss is taken on assistant turns only."""

    messages: list[dict]
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: Where = NOWHERE) -> Conversation:
        if not isinstance(d, dict):
            raise where.error(f"expected a JSON object, got {type(d).__name__}")
        if "messages" not in d:
            raise where.error("missing field", "messages")
        msgs = check_messages(d["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise where.error("a training conversation needs at least one assistant turn", "messages")
        return cls(messages=msgs, metadata=dict(d.get("metadata") or {}))

    def to_dict(self) -> dict:
        return {"messages": self.messages, "metadata": self.metadata}


@dataclass
class PreferenceRecord:
    """One comparison: two assistant replies to the same prompt, and which one was preferred.

    ``prompt`` is a list of chat messages ending with a user turn; ``chosen`` and ``rejected`` are
    the assistant replies (single messages, stored as ``{"role": "assistant", "content": ...}``).
    When ``tie`` is true the two replies were judged equally good and chosen/rejected is arbitrary.
    """

    prompt: list[dict]
    chosen: dict
    rejected: dict
    tie: bool = False
    strength: int | None = None
    """How strong the preference is, e.g. 1 (slight) .. 3 (strong); None when not collected."""
    rationale: str | None = None
    annotator_id: str | None = None
    presented_order: str | None = None
    """Which side was shown on the left to the annotator: 'chosen' or 'rejected' (None if unknown)."""
    source: str = "unknown"
    """Who labelled it: human, judge, simulated, rm or unknown."""
    metadata: dict = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        return self.prompt[-1]["content"]

    @classmethod
    def from_dict(cls, d: Any, where: Where = NOWHERE) -> PreferenceRecord:
        if not isinstance(d, dict):
            raise where.error(f"expected a JSON object, got {type(d).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if key not in d:
                raise where.error("missing field", key)
        prompt = check_messages(d["prompt"], where, "prompt", must_end_with="user")
        chosen = _reply(d["chosen"], where, "chosen")
        rejected = _reply(d["rejected"], where, "rejected")
        strength = d.get("strength")
        if strength is not None and (not isinstance(strength, int) or isinstance(strength, bool) or strength < 0):
            raise where.error(f"must be a non-negative integer, got {strength!r}", "strength")
        source = d.get("source") or "unknown"
        if source not in SOURCES:
            raise where.error(f"must be one of {', '.join(SOURCES)}, got {source!r}", "source")
        order = d.get("presented_order")
        if order not in (None, "chosen", "rejected"):
            raise where.error(f"must be 'chosen' or 'rejected', got {order!r}", "presented_order")
        tie = d.get("tie", False)
        if not isinstance(tie, bool):
            raise where.error(f"must be true or false, got {tie!r}", "tie")
        return cls(
            prompt=prompt, chosen=chosen, rejected=rejected, tie=tie, strength=strength,
            rationale=d.get("rationale"), annotator_id=d.get("annotator_id"), presented_order=order,
            source=source, metadata=dict(d.get("metadata") or {}),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _reply(value: Any, where: Where, field: str) -> dict:
    """A reply may be given as a string, one assistant message, or a one-message list."""
    if isinstance(value, str):
        value = {"role": "assistant", "content": value}
    elif isinstance(value, list):
        if len(value) != 1:
            raise where.error(f"expected exactly one assistant message, got {len(value)}", field)
        value = value[0]
    msg = check_message(value, where, field)
    if msg["role"] != "assistant":
        raise where.error(f"must be an assistant message, got role '{msg['role']}'", f"{field}.role")
    if not msg["content"].strip():
        raise where.error("empty completion", f"{field}.content")
    return msg


@dataclass
class ComparisonPair:
    """Two unlabelled replies to one prompt, as written by ``rlhfkit sample`` (one JSON line each).

    ``a`` and ``b`` are assistant messages; labelling (a person, a judge, a simulated annotator)
    turns a pair into a :class:`PreferenceRecord`. ``metadata`` holds how the replies were generated
    (model, checkpoint, seed, sampling settings) and, for built-in tasks, the task name.
    """

    id: str
    prompt: list[dict]
    a: dict
    b: dict
    task: str | None = None
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: Where = NOWHERE) -> ComparisonPair:
        if not isinstance(d, dict):
            raise where.error(f"expected a JSON object, got {type(d).__name__}")
        for key in ("id", "prompt", "a", "b"):
            if key not in d:
                raise where.error("missing field", key)
        if not isinstance(d["id"], str) or not d["id"]:
            raise where.error(f"must be a non-empty string, got {d['id']!r}", "id")
        a, b = _reply(d["a"], where, "a"), _reply(d["b"], where, "b")
        if a["content"] == b["content"]:
            raise where.error("the two sides are identical; a comparison needs two different replies", "b")
        return cls(
            id=d["id"], prompt=check_messages(d["prompt"], where, "prompt", must_end_with="user"),
            a=a, b=b, task=d.get("task"), metadata=dict(d.get("metadata") or {}),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def label(self, winner: str, **fields: Any) -> PreferenceRecord:
        """A PreferenceRecord with ``winner`` ('a', 'b' or 'tie'; a tie keeps a as 'chosen')."""
        if winner not in ("a", "b", "tie"):
            raise ValueError(f"winner must be 'a', 'b' or 'tie', got {winner!r}")
        chosen, rejected = (self.b, self.a) if winner == "b" else (self.a, self.b)
        meta = {"pair_id": self.id, "task": self.task, **self.metadata, **fields.pop("metadata", {})}
        return PreferenceRecord(prompt=self.prompt, chosen=chosen, rejected=rejected, tie=winner == "tie",
                                metadata=meta, **fields)
