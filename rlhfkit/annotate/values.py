"""The values the annotation store takes and returns, and its refusal (with the HTTP status)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from rlhfkit.annotate import assignment as assign

MAX_ID = 2**31 - 1
"""Largest id or offset a request may name: PostgreSQL's INTEGER (SQLite's is 2**63 - 1). A larger
number cannot name anything, so it is refused (422) before it reaches the database driver."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None. A lone surrogate (JSON ``"\\ud800"``) is not Unicode
    text: it cannot be encoded as UTF-8, so SQLite, PostgreSQL and every export fail on it. A NUL
    character cannot be stored in a PostgreSQL text column (SQLite would accept it)."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored; remove it"
    if _SURROGATE.search(text):
        return "contains a lone surrogate (e.g. \\ud800), which is not valid Unicode text"
    return None


class Refused(Exception):
    """A request the store turns down. ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.message, self.field = status, message, field


@dataclass
class Principal:
    """Who a session belongs to: the admin, or one annotator of one project."""

    session_hash: str
    csrf_token: str
    is_admin: bool
    annotator_id: int | None = None
    annotator_name: str | None = None
    project_id: int | None = None
    queue: assign.Queue | None = None
    expires_at: datetime | None = None


@dataclass
class Item:
    """One assignment as the annotator sees it: a pair's two sides, or a ranking item's replies."""

    assignment_id: int
    prompt: list[dict]
    left: str | None
    right: str | None
    replies: list[str] | None = None
    """A ranking item's K replies in the order shown (``left``/``right`` are then None)."""


@dataclass
class LabelInput:
    submission_id: str
    assignment_id: int
    choice: str
    """'left', 'right', 'tie' or 'skip' (screen sides); 'rank' (or 'skip') for a ranking item."""
    ranks: list[int] | None = None
    """A ranking: one rank per reply as shown, 1 the best; equal ranks are a tie."""
    ratings: dict | None = None
    """{aspect: [rating per reply as shown, or None]} when the project asks for ratings (ratings.py)."""
    strength: int | None = None
    rationale: str | None = None
    unsafe: bool = False
    duration_ms: int | None = None


@dataclass
class ImportReport:
    project: str
    created_project: bool
    n_pairs: int
    n_gold: int
    n_scored: int
    n_existing_skipped: int
    gold_rate: float
    previous_gold_rate: float | None
