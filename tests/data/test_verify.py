"""rlhfkit.data.verify: final-answer extraction and the verifiers, on hand-worked strings."""

from __future__ import annotations

import pytest

from rlhfkit.data.verify import (
    answers_match,
    extract_answer,
    last_boxed,
    parse_number,
    verify_exact,
    verify_math,
    verify_regex,
)


@pytest.mark.parametrize("text,expected", [
    ("so x = \\boxed{42}.", "42"),
    ("first \\boxed{1}, then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),    # the last box, nested braces kept
    ("\\boxed{x^{2}} and the answer is 7", "x^{2}"),                     # a box wins over "answer is"
    ("3 apples plus 4: the answer is 7.\nCheck: 3 + 4 = 7", "7"),        # up to the end of that line, '.' dropped
    ("Answer: -2/3", "-2/3"),
    ("I think 12, no wait, 13", "13"),                                   # the last number
    ("It costs 1,234.5 dollars", "1,234.5"),
    ("no number here", None),
    ("unclosed \\boxed{12", "12"),                                       # an unclosed box is ignored
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_returns_none_without_a_closed_box():
    assert last_boxed("\\boxed{a{b}") is None and last_boxed("none") is None


@pytest.mark.parametrize("text,value", [
    ("42", 42.0), ("-3", -3.0), ("1,234", 1234.0), ("0.5", 0.5), (".5", 0.5), ("3/4", 0.75), ("-1/8", -0.125),
    ("\\frac{3}{4}", 0.75), ("-\\frac{1}{2}", -0.5), ("\\dfrac{6}{4}", 1.5), ("$5", 5.0), ("5%", 5.0), ("7.", 7.0),
    ("1/0", None), ("x", None), ("12,34", None), ("inf", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_answers_match_numbers_within_the_relative_tolerance_and_strings_normalised():
    assert answers_match("0.75", "3/4") and answers_match("\\frac{1}{3}", "0.3333333333")
    assert not answers_match("0.333", "1/3")                    # |diff| / (1/3) = 1e-3 > 1e-6
    assert answers_match("0.333", "1/3", rel_tol=1e-2)
    assert answers_match("1000000", "1000000.5")                # 5e-7 relative: inside 1e-6
    assert answers_match(" Paris. ", "paris") and not answers_match("Lyon", "Paris")


def test_verify_math_against_the_answer_column():
    assert verify_math("We add: 2 + 2 = 4. The answer is 4.", "4") == 1.0
    assert verify_math("We add: 2 + 2 = 4. The answer is 5.", "4") == 0.0
    assert verify_math("half of 3 is \\boxed{\\frac{3}{2}}", 1.5) == 1.0     # a number as the answer
    assert verify_math("no idea", "4") == 0.0


def test_verify_exact_and_regex():
    assert verify_exact("  Paris\n", "Paris") == 1.0
    assert verify_exact("paris", "Paris") == 0.0                  # case is kept
    assert verify_exact("New   York", "New York") == 1.0
    fmt = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
    assert verify_regex("<think>a\nb</think> <answer>4</answer>", fmt) == 1.0   # '.' spans the newline
    assert verify_regex("<answer>4</answer>", fmt) == 0.0
