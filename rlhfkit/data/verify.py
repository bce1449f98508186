"""Verifiers: rule-based rewards that check a completion's text (the ``verify:`` reward specs).

Pure text functions, no model and no torch, each returning 1.0 (correct) or 0.0:

- :func:`verify_math` — the completion's final answer equals the reference ``answer`` (numbers within
  a tolerance, fractions and ``\\frac{a}{b}`` read as numbers; otherwise the normalised strings);
- :func:`verify_exact` — the whole completion equals ``answer`` up to surrounding and repeated whitespace;
- :func:`verify_regex` — the completion matches a pattern (a format reward, as in DeepSeek-R1's
  ``<think>...</think>`` check; anchor the pattern with ``^``/``$`` to require the whole text).

The final answer (:func:`extract_answer`) is, in order of preference: the content of the last
``\\boxed{...}`` (what MATH and most reasoning models write), the text after the last "the answer is"
/ "answer:", else the last number in the text.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*:?\s*(.+)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
FRAC = re.compile(r"^(-?)\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")
REL_TOL = 1e-6
"""Relative tolerance of a numeric match (|a - b| <= REL_TOL * max(|a|, |b|), or ABS_TOL)."""
ABS_TOL = 1e-9


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept), None when there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The completion's final answer: last ``\\boxed{}``, else after the last "the answer is"/"answer:"
    (up to the end of that line, a trailing period dropped), else the last number; None if none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    found = list(ANSWER_IS.finditer(text))
    if found:
        answer = found[-1].group(1).splitlines()[0].strip().rstrip(".").strip()
        boxed = last_boxed(answer)
        return boxed if boxed is not None else answer
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> float | None:
    """``'1,234'`` -> 1234.0, ``'-3/4'`` and ``'\\frac{3}{4}'`` -> fractions, ``'$5'``/``'5%'``/``'5.'`` -> 5.0; else None."""
    s = text.strip().strip("$").replace("\\!", "").replace(" ", "")
    s = s.removeprefix("\\$").rstrip(".").rstrip("%")
    if s.startswith("\\left("):
        return None
    m = FRAC.match(s)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        return (-1 if m.group(1) else 1) * num / den
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    try:
        if "/" in s:
            return float(Fraction(s))
        value = float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def normalize(text: str) -> str:
    """Whitespace collapsed, surrounding ``$``, spaces and a final period removed, lower-cased."""
    return " ".join(text.split()).strip("$ ").rstrip(".").lower()


def answers_match(predicted: str, reference: str, rel_tol: float = REL_TOL) -> bool:
    """Numbers compared within ``rel_tol`` (relative) when both parse as numbers; else normalised text equality."""
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=ABS_TOL)
    return normalize(predicted) == normalize(reference)


def verify_math(completion: str, answer, rel_tol: float = REL_TOL) -> float:
    """1.0 when the completion's final answer (:func:`extract_answer`) matches ``answer`` (a string or number)."""
    predicted = extract_answer(completion)
    return float(predicted is not None and answers_match(predicted, str(answer), rel_tol))


def verify_exact(completion: str, answer) -> float:
    """1.0 when the completion equals ``answer`` once surrounding and repeated whitespace is collapsed (case kept)."""
    return float(" ".join(completion.split()) == " ".join(str(answer).split()))


def verify_regex(completion: str, pattern: str | re.Pattern) -> float:
    """1.0 when ``re.search(pattern, completion)`` finds a match ('.' matches newlines: re.DOTALL)."""
    compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.DOTALL)
    return float(compiled.search(completion) is not None)
