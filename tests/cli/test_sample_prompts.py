"""`rlhfkit sample --prompts`: the user's prompt dataset read as the trainers read `--prompts`
(rlhfkit.data.prompt_data), and `--split train|heldout --eval-fraction F`: the trainers' held-out split."""

from __future__ import annotations

import json

import pytest

from rlhfkit.cli.sample import main
from rlhfkit.data.io import load_pairs
from rlhfkit.data.prompt_data import load_prompt_rows, split_held_out
from rlhfkit.train.online import SPLIT_SEED

FAST = ["--model", "tiny", "--k", "2", "--max-new-tokens", "4", "--batch-size", "16"]


def prompts_file(tmp_path):
    """Ten rows in the three accepted forms, with extra columns; rows 0-3 have ids."""
    rows = []
    for i in range(10):
        text = f"Question {i}: what is {i} + {i}?"
        form = i % 3
        row = ({"prompt": text} if form == 0 else {"prompt": [{"role": "user", "content": text}]} if form == 1
               else {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]})
        row["answer"] = str(2 * i)
        if i < 4:
            row["id"] = f"q{i}"
        rows.append(row)
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_ids(path):
    return {p.metadata["prompt_id"] for p in load_pairs(path)}


def test_all_rows_by_default_with_ids_from_the_column_or_the_line(tmp_path, capsys):
    src = prompts_file(tmp_path)
    assert main([*FAST, "--prompts", str(src), "--temperature", "1.5", "--out", str(tmp_path / "all.jsonl")]) == 0
    pairs = load_pairs(tmp_path / "all.jsonl")
    assert prompt_ids(tmp_path / "all.jsonl") <= {"q0", "q1", "q2", "q3"} | {f"math:{n}" for n in range(5, 11)}
    assert len(prompt_ids(tmp_path / "all.jsonl")) >= 8  # (a prompt whose 2 samples coincide makes no pair)
    by_id = {p.metadata["prompt_id"]: p for p in pairs}
    if "math:9" in by_id:  # row 8 (line 9): the messages form keeps its system turn
        assert [m["role"] for m in by_id["math:9"].prompt] == ["system", "user"]
    assert all(p.metadata["split"] is None and p.task is None for p in pairs)


def test_heldout_and_train_are_the_trainers_split(tmp_path, capsys):
    src = prompts_file(tmp_path)
    train, held = split_held_out(load_prompt_rows(str(src)), 0.3, SPLIT_SEED)
    assert len(held) == 3 and len(train) == 7
    held_texts = {r.messages[-1]["content"] for r in held}
    assert main([*FAST, "--prompts", str(src), "--split", "heldout", "--eval-fraction", "0.3", "--temperature", "1.5",
                 "--out", str(tmp_path / "held.jsonl")]) == 0
    got = {p.prompt[-1]["content"] for p in load_pairs(tmp_path / "held.jsonl")}
    assert got and got <= held_texts
    assert all(p.metadata["split"] == "heldout" for p in load_pairs(tmp_path / "held.jsonl"))
    assert main([*FAST, "--prompts", str(src), "--split", "train", "--eval-fraction", "0.3", "--temperature", "1.5",
                 "--out", str(tmp_path / "train.jsonl")]) == 0
    got_train = {p.prompt[-1]["content"] for p in load_pairs(tmp_path / "train.jsonl")}
    assert got_train and not (got_train & held_texts)


@pytest.mark.parametrize("args, message", [
    (["--split", "heldout", "--eval-fraction", "1.5"], "--eval-fraction must be in (0, 1)"),
    (["--eval-fraction", "0.2"], "--eval-fraction splits a --prompts dataset; give --split train or heldout"),
])
def test_bad_split_options(tmp_path, args, message):
    src = prompts_file(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*FAST, "--prompts", str(src), *args, "--out", str(tmp_path / "o.jsonl")])
    assert message in str(e.value)


def test_split_all_needs_prompts_and_a_bad_row_names_its_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*FAST, "--task", "concise", "--split", "all", "--out", str(tmp_path / "o.jsonl")])
    assert "--split all is for --prompts" in str(e.value)
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x", "completions": "y"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main([*FAST, "--prompts", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert "bad.jsonl:2: field 'completions': 'completions' is the name rlhfkit passes" in str(e.value)
