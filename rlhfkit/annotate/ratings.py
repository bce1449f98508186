"""Ratings: an optional per-project schema of aspects, each rated on an integer scale per reply
(e.g. helpfulness, harmlessness, honesty 1-5, as in Anthropic's HH and UltraFeedback), asked next to
the pairwise answer or ranking and exported alongside it.

Schema: ``[{"name": "helpfulness", "min": 1, "max": 5}, ...]``; on the command line
``--ratings "helpfulness=1-5,harmlessness=1-5"`` (``""`` removes it). A rating may be left blank
(None); an answer without ratings is fine.

An answer carries ``{aspect: [rating per reply as shown]}``; it is stored by reply index (pair
terms: ``[a, b]`` or a ranking's replies), like the rest of the answer.
"""

from __future__ import annotations

import re

from rlhfkit.annotate.values import Refused

ASPECT = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_ASPECTS = 8


def parse_schema(spec: str) -> list[dict] | None:
    """``"helpfulness=1-5,honesty=1-3"`` -> the schema; ``""`` -> None (no ratings)."""
    spec = spec.strip()
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d{1,2})\s*-\s*(\d{1,2})\s*", part)
        if m is None:
            raise ValueError(f"--ratings: {part.strip()[:40]!r} is not NAME=MIN-MAX (e.g. helpfulness=1-5)")
        name, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
        if not ASPECT.match(name):
            raise ValueError(f"--ratings: aspect {name[:40]!r}: lower-case letters, digits and '_', starting with a letter")
        if not lo < hi <= 10:
            raise ValueError(f"--ratings: {name}={lo}-{hi}: need MIN < MAX <= 10")
        if any(a["name"] == name for a in out):
            raise ValueError(f"--ratings: aspect {name!r} given twice")
        out.append({"name": name, "min": lo, "max": hi})
    if len(out) > MAX_ASPECTS:
        raise ValueError(f"--ratings: at most {MAX_ASPECTS} aspects, got {len(out)}")
    return out


def schema_spec(schema: list[dict] | None) -> str:
    """The schema written back as ``--ratings`` takes it."""
    return ",".join(f"{a['name']}={a['min']}-{a['max']}" for a in schema or [])


def to_pair_terms(ratings: dict | None, schema: list[dict] | None, shown: list[int]) -> dict | None:
    """Validate screen-order ratings against the schema and re-index them by reply; ``shown[s]`` is
    the reply index shown at position s. Refusals name the field ``ratings``."""
    if ratings is None:
        return None
    if not schema:
        raise Refused(422, "this project asks for no ratings", "ratings")
    if not isinstance(ratings, dict):
        raise Refused(422, "must be an object {aspect: [rating per reply as shown]}", "ratings")
    known = {a["name"]: a for a in schema}
    out = {}
    for name, values in ratings.items():
        aspect = known.get(name)
        if aspect is None:
            raise Refused(422, f"unknown aspect {str(name)[:40]!r}; this project rates {', '.join(known)}", "ratings")
        if not isinstance(values, list) or len(values) != len(shown):
            raise Refused(422, f"{name}: give one rating (or null) per reply, {len(shown)} in all", "ratings")
        for v in values:
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not aspect["min"] <= v <= aspect["max"]):
                raise Refused(422, f"{name}: ratings are whole numbers from {aspect['min']} to {aspect['max']} "
                                   f"(or null), got {str(v)[:20]}", "ratings")
        by_reply = [None] * len(shown)
        for s, reply in enumerate(shown):
            by_reply[reply] = values[s]
        if any(v is not None for v in by_reply):
            out[name] = by_reply
    return out or None


def given(ratings: dict | None) -> dict | None:
    """Screen-order ratings as stored and read back: aspects left entirely blank dropped."""
    if not ratings:
        return None
    return {k: v for k, v in ratings.items() if any(x is not None for x in v)} or None


def to_screen(ratings: dict | None, shown: list[int]) -> dict | None:
    return None if ratings is None else {name: [values[r] for r in shown] for name, values in ratings.items()}


def shown_replies(left: str, order: list[int] | None) -> list[int]:
    """Reply indices in the order shown: a pair's ``left`` side first, or a ranking's order."""
    if order is not None:
        return list(order)
    return [0, 1] if left == "a" else [1, 0]
