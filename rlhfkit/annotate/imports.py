"""Reading the files ``rlhfkit annotate import`` takes. Parsing only; the store writes.

Every file is JSON Lines in UTF-8; blank lines are ignored; any bad line raises
:class:`~rlhfkit.data.records.DataError` naming file, line and field, before anything is written.
Text that cannot be stored (a lone surrogate such as JSON ``"\\ud800"``, a NUL character) is refused
wherever it appears in a line, keys included: see :func:`~rlhfkit.annotate.values.text_problem`.

- pairs: one :class:`~rlhfkit.data.records.ComparisonPair` per line. ``metadata.gold_winner``
  ('a' or 'b') marks a gold (attention-check) pair. A line with ``"replies": [K assistant
  messages]`` (3 <= K <= 9) instead of ``a``/``b`` is a ranking item.
- gold: ``{"id": pair id, "winner": "a" | "b"}`` per line.
- uncertainty: ``{"id": pair id, "p": P(a preferred)}`` per line, or ``"p": [p_1, ..., p_M]`` from an
  ensemble of reward models. See :func:`rlhfkit.annotate.assignment.uncertainty_score`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhfkit.annotate.values import text_problem
from rlhfkit.data.records import ComparisonPair, DataError, Where, check_message


def read_lines(path: str | Path) -> Iterator[tuple[Where, str]]:
    """The file's lines as text, each with its :class:`Where`; invalid UTF-8 names the line."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror}", path=path) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = Where(path, lineno)
            try:
                yield where, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise where.error(f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                  "line (save the file as UTF-8)") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[Where, Any]]:
    for where, line in read_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise where.error(f"not valid JSON: {e.msg} (column {e.colno})") from None
        check_text(value, where)
        yield where, value


def check_text(value: Any, where: Where, field: str = "") -> None:
    """Refuse the first string in ``value`` (keys too) that cannot be stored, naming its field."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise where.error(problem, field or None)
    elif isinstance(value, dict):
        for k, v in value.items():
            name = f"{field}.{k}" if field else str(k)
            if text_problem(k):
                raise where.error(f"a key {text_problem(k)}", field or None)
            check_text(v, where, name)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_text(v, where, f"{field}[{i}]")


def read_guidelines(path: str | Path) -> str:
    """A plain-text guidelines file, checked line by line (UTF-8, storable text)."""
    lines = []
    for where, line in read_lines(path):
        problem = text_problem(line)
        if problem:
            raise where.error(problem)
        lines.append(line)
    return "".join(lines)


MIN_REPLIES, MAX_REPLIES = 3, 9
"""A ranking item's size: 2 replies are a pair; InstructGPT ranked 4-9 (one digit key per reply)."""


def read_pairs(path: str | Path) -> list[tuple[Where, ComparisonPair, list[dict] | None]]:
    """Validated ``(where, pair, replies)``: ``replies`` is a ranking item's K messages (the pair then
    holds the first two as ``a`` and ``b``), None for a pair. A repeated id or a bad
    ``metadata.gold_winner`` is an error."""
    out, seen = [], {}
    for where, d in read_jsonl(path):
        replies = None
        if isinstance(d, dict):
            _check_pair_fields(d, where)
            if "replies" in d:
                replies = _check_replies(d, where)
                d = {**{k: v for k, v in d.items() if k != "replies"}, "a": replies[0], "b": replies[1]}
        pair = ComparisonPair.from_dict(d, where)
        if pair.id in seen:
            raise where.error(f"duplicate pair id {pair.id!r} (first on line {seen[pair.id]})", "id")
        seen[pair.id] = where.line
        gold = pair.metadata.get("gold_winner")
        if gold is not None and replies is not None:
            raise where.error("a ranking item cannot be a gold pair", "metadata.gold_winner")
        if gold is not None and gold not in ("a", "b"):
            raise where.error(f"must be 'a' or 'b' (the known better side), got {gold!r}", "metadata.gold_winner")
        out.append((where, pair, replies))
    if not out:
        raise DataError("no pairs in file", path=str(path))
    return out


def _check_replies(d: dict, where: Where) -> list[dict]:
    replies = d["replies"]
    if "a" in d or "b" in d:
        raise where.error("give either 'replies' (a ranking item) or 'a' and 'b' (a pair), not both", "replies")
    if not isinstance(replies, list) or not MIN_REPLIES <= len(replies) <= MAX_REPLIES:
        n = len(replies) if isinstance(replies, list) else type(replies).__name__
        raise where.error(f"must be a list of {MIN_REPLIES} to {MAX_REPLIES} assistant messages, got {n}", "replies")
    out = []
    for i, r in enumerate(replies):
        field = f"replies[{i}]"
        msg = check_message({"role": "assistant", "content": r} if isinstance(r, str) else r, where, field)
        if msg["role"] != "assistant":
            raise where.error(f"must be an assistant message, got role '{msg['role']}'", f"{field}.role")
        if not msg["content"].strip():
            raise where.error("empty completion", f"{field}.content")
        if any(o["content"] == msg["content"] for o in out):
            raise where.error("repeats an earlier reply; a ranking needs different replies", field)
        out.append(msg)
    return out


def _check_pair_fields(d: dict, where: Where) -> None:
    """What ``ComparisonPair.from_dict`` does not check and the database needs."""
    meta, task = d.get("metadata"), d.get("task")
    if meta is not None and not isinstance(meta, dict):
        raise where.error(f"must be a JSON object (or absent), got {type(meta).__name__}", "metadata")
    if task is not None and not isinstance(task, str):
        raise where.error(f"must be a string (or absent), got {type(task).__name__} {json.dumps(task)[:40]}",
                          "task")
    if task is not None and len(task) > 200:  # the column's size (models.Pair.task)
        raise where.error(f"must be at most 200 characters, got {len(task)}", "task")
    if isinstance(d.get("id"), str) and len(d["id"]) > 300:  # models.Pair.key
        raise where.error(f"must be at most 300 characters, got {len(d['id'])}", "id")


def read_gold(path: str | Path) -> list[tuple[Where, str, str]]:
    """(where, pair id, winner) per line."""
    out = []
    for where, d in read_jsonl(path):
        if not isinstance(d, dict):
            raise where.error(f"expected a JSON object {{\"id\", \"winner\"}}, got {type(d).__name__}")
        pair_id, winner = d.get("id"), d.get("winner")
        if not isinstance(pair_id, str) or not pair_id:
            raise where.error(f"must be a non-empty string, got {pair_id!r}", "id")
        if winner not in ("a", "b"):
            raise where.error(f"must be 'a' or 'b' (the known better side), got {winner!r}", "winner")
        out.append((where, pair_id, winner))
    return out


def read_uncertainty(path: str | Path) -> list[tuple[Where, str, list[float]]]:
    """(where, pair id, [p, ...]) per line; every p must be a probability."""
    out = []
    for where, d in read_jsonl(path):
        if not isinstance(d, dict):
            raise where.error(f"expected a JSON object {{\"id\", \"p\"}}, got {type(d).__name__}")
        pair_id, p = d.get("id"), d.get("p")
        if not isinstance(pair_id, str) or not pair_id:
            raise where.error(f"must be a non-empty string, got {pair_id!r}", "id")
        ps = p if isinstance(p, list) else [p]
        if not ps or not all(_is_probability(x) for x in ps):
            raise where.error(f"must be a probability in [0, 1] or a non-empty list of them, got {p!r}", "p")
        out.append((where, pair_id, [float(x) for x in ps]))
    return out


def _is_probability(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 <= x <= 1.0
