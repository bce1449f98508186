"""Built-in tasks: prompt sets, gold rewards worked out by hand, and the `rlhfkit tasks` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from rlhfkit.data.tasks import TASKS, ConciseTask, ConstraintsTask, content_words, get_task


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_at_least_three_tasks_and_unknown_name_lists_them():
    assert {"sentiment", "concise", "constraints", "arith"} <= set(TASKS)
    for name, task in TASKS.items():
        assert task.name == name and task.description
    with pytest.raises(ValueError, match="unknown task 'nope'; built-in tasks: sentiment, concise, constraints, arith"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompts_are_chats_and_splits_disjoint(name):
    task = get_task(name)
    train, heldout = task.prompts("train"), task.prompts("heldout")
    assert len(train) >= 150 and len(heldout) >= 40
    for p in train[:5] + heldout[:5]:
        assert p[-1]["role"] == "user" and p[-1]["content"].strip()
    ids = lambda split: {r["id"] for r in task.prompt_rows(split)}  # noqa: E731
    assert not ids("train") & ids("heldout")
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        task.prompts("test")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_is_deterministic_and_in_range(name):
    task = get_task(name)
    prompts = task.prompts("heldout")[:6]
    replies = ["Sure! Here is a great idea:\n- one\n- two\nWhat do you think?", "No.", "I hate this, it is awful.",
               "Lantern music ocean.", "A " * 80, "Thanks!"]
    g1, g2 = task.gold(prompts, replies), task.gold(prompts, replies)
    assert g1 == g2
    assert all(0.0 <= g <= 1.0 for g in g1)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        task.gold(prompts[:2], replies[:1])


def test_sentiment_orders_positive_over_negative():
    task = get_task("sentiment")
    p = user("Write a short review of an electric kettle.")
    good, bad, neutral = task.gold([p] * 3, ["I love it. It is wonderful and works great!",
                                             "It is awful. I hate it and it broke.", "It is a kettle. It boils water."])
    assert good > 0.8 and bad < 0.2 and abs(neutral - 0.5) < 0.1
    assert task.gold([p], ["..."]) == [0.5]  # no words: neutral


def test_concise_by_hand():
    """Prompt 'Why does bread go stale?': content words = {bread, stale} ('why', 'does' are stop words,
    'go' is under 3 letters). A 10-word reply using both: length 1, coverage 1 → gold 1.0.
    A reply of 4 words using 'bread' only: length 4/8 = 0.5, coverage 1/2 → 0.5·0.5 + 0.5·0.5 = 0.5.
    A reply of 75 words without either: length max(0, 1 - (75-25)/25) = 0, coverage 0 → 0."""
    task = ConciseTask()
    prompt = "Why does bread go stale?"
    assert content_words(prompt) == ["bread", "stale"]
    replies = ["Bread goes stale because its starch slowly crystallises and dries.", "Bread dries out quickly.",
               " ".join(["word"] * 75)]
    assert task.gold([user(prompt)] * 3, replies) == pytest.approx([1.0, 0.5, 0.0])
    assert task.length_score(30) == pytest.approx(1 - 5 / 25)


def test_concise_caps_keywords_for_long_passages():
    task = ConciseTask()
    prompt = "Summarize: alpha bravo charlie delta echoes foxtrot golfing hotel india juliet kilo"
    reply = "alpha bravo charlie delta echoes foxtrot"
    assert task.coverage(prompt, reply) == 1.0  # 6 of 11 content words reach the cap of 6


def test_constraints_are_appended_and_read_back():
    task = ConstraintsTask()
    rows = task.prompt_rows("heldout")
    kinds = set()
    for r in rows:
        text = r["messages"][0]["content"]
        checks = task.check(text, "")
        assert len(checks) == 2, text
        kinds |= {k.split(":")[0] for k in checks}
    assert kinds == {"include", "bullets", "avoid", "question"}
    assert task.prompt_rows("heldout")[0] == rows[0]  # deterministic


def test_constraint_checks_by_hand():
    """include 'ocean' → present: 1. exactly 3 bullets with 2 given: 1 - |2-3|/3 = 2/3.
    avoid 'water' → used: 0. question → ends with '?': 1; mean = (1 + 2/3 + 0 + 1) / 4 = 0.6667."""
    prompt = ('Tell me about the sea.\n\nInclude the word "ocean". Use exactly 3 bullet points (lines starting with '
              '"- "). Do not use the word "water". End your reply with a question.')
    reply = "The ocean is big.\n- salty water\n- waves\nDo you like it?"
    checks = ConstraintsTask.check(prompt, reply)
    assert checks == pytest.approx({"include:ocean": 1.0, "bullets:3": 2 / 3, "avoid:water": 0.0, "question": 1.0})
    assert get_task("constraints").gold([user(prompt)], [reply]) == pytest.approx([(1 + 2 / 3 + 0 + 1) / 4])
    assert ConstraintsTask.check(prompt, "Is it? It is.")["question"] == 0.5


def test_constraints_gold_on_prompt_without_constraints_is_an_error():
    with pytest.raises(ValueError, match="no constraints found in the prompt"):
        get_task("constraints").gold([user("Hello")], ["Hi"])


def test_tasks_command_lists(capsys):
    from rlhfkit.cli.tasks import main

    assert main([]) == 0
    listing = capsys.readouterr().out
    for name, task in TASKS.items():
        assert name in listing and task.description in listing


def test_tasks_command_measures():
    out = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "tasks", "--measure", "--model", "tiny", "--task", "concise",
                          "--num-prompts", "4", "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["task"] == "concise" and row["n"] == 4 and 0 <= row["gold_mean"] <= 1 and row["model"] == "tiny"


# --- arith: generated problems with exact answers, gold = verify:math -----------------------------------

def test_arith_splits_are_deterministic_disjoint_and_carry_their_answers():
    from rlhfkit.data.tasks import ArithTask

    task, again = get_task("arith"), ArithTask()
    train, heldout = task.prompt_rows("train"), task.prompt_rows("heldout")
    assert len(train) == task.train_size and len(heldout) == task.heldout_size
    assert train == again.prompt_rows("train") and heldout == again.prompt_rows("heldout")  # a fresh build agrees
    questions = lambda rows: {r["question"] for r in rows}  # noqa: E731
    assert not questions(train) & questions(heldout)
    for r in train[:50] + heldout[:50]:
        a, op, b = re.search(r"(\d+) ([-+x]) (\d+)", r["question"]).groups() if r["category"] in ("add", "sub", "mul") \
            else (None, None, None)
        if a is not None:
            assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        assert r["messages"] == user(f"{r['question']} {task.instruction}")
        assert int(r["answer"]) >= 0


def test_arith_word_problems_by_hand():
    """One problem per kind at max_operand 20: the question's numbers give the answer worked here."""
    import random

    from rlhfkit.data.tasks import _arith_problem

    seen = {}
    for i in range(200):
        kind, q, answer = _arith_problem(random.Random(i), 20)
        seen.setdefault(kind, (q, answer))
    assert set(seen) == {"add", "sub", "mul", "word_add", "word_sub", "word_mul"}
    for kind, (q, answer) in seen.items():
        a, b = (int(x) for x in re.findall(r"\d+", q)[:2])
        expected = {"add": a + b, "sub": a - b, "mul": a * b, "word_add": a + b, "word_sub": a - b,
                    "word_mul": a * b}[kind]
        assert answer == expected, (kind, q)


def test_arith_gold_is_the_math_verifier_against_the_rows_answer():
    """A problem whose answer is N: 'The answer is N.' and a boxed N score 1; a wrong number, a right
    number followed by another number, and no number score 0."""
    task = get_task("arith")
    row = task.prompt_rows("heldout")[0]
    n = int(row["answer"])
    replies = [f"The answer is {n}.", f"So \\boxed{{{n}}}", f"The answer is {n + 1}.", f"{n} and then {n + 3}",
               "I do not know."]
    assert task.gold([row["messages"]] * 5, replies) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_arith_gold_refuses_a_prompt_it_did_not_generate():
    with pytest.raises(ValueError, match="not an arith prompt: 'What is 2 \\+ 2\\?'"):
        get_task("arith").gold([user("What is 2 + 2?")], ["4"])
