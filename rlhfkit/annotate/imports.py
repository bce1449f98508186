"""Reading the files ``rlhfkit annotate import`` takes. Parsing only; the store writes.

Every file is JSON Lines; blank lines are ignored; any bad line raises
:class:`~rlhfkit.data.records.DataError` naming file, line and field, before anything is written.

- pairs: one :class:`~rlhfkit.data.records.ComparisonPair` per line. ``metadata.gold_winner``
  ('a' or 'b') marks a gold (attention-check) pair.
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

from rlhfkit.data.records import ComparisonPair, DataError, Where


def read_jsonl(path: str | Path) -> Iterator[tuple[Where, Any]]:
    path = str(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror}", path=path) from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = Where(path, lineno)
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise where.error(f"not valid JSON: {e.msg} (column {e.colno})") from None


def read_pairs(path: str | Path) -> list[tuple[Where, ComparisonPair]]:
    """Validated pairs; a repeated id or a bad ``metadata.gold_winner`` is an error."""
    out, seen = [], {}
    for where, d in read_jsonl(path):
        pair = ComparisonPair.from_dict(d, where)
        if pair.id in seen:
            raise where.error(f"duplicate pair id {pair.id!r} (first on line {seen[pair.id]})", "id")
        seen[pair.id] = where.line
        gold = pair.metadata.get("gold_winner")
        if gold is not None and gold not in ("a", "b"):
            raise where.error(f"must be 'a' or 'b' (the known better side), got {gold!r}", "metadata.gold_winner")
        out.append((where, pair))
    if not out:
        raise DataError("no pairs in file", path=str(path))
    return out


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
