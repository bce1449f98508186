"""rlhfkit.data.prompt_data: reading a user's prompt dataset, its columns, bad rows, the held-out split."""

from __future__ import annotations

import json

import pytest

from rlhfkit.data.prompt_data import check_columns, load_prompt_rows, split_held_out
from rlhfkit.data.records import DataError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_three_prompt_forms_and_the_columns_they_keep(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write(tmp_path / "p.jsonl", [{"prompt": "What is 1+1?", "answer": "2", "id": "a"},
                                        {"prompt": chat, "answer": "4", "tests": ["t1"]},
                                        {"messages": chat, "category": "math"}])
    rows = load_prompt_rows(path)
    assert [r.conversational for r in rows] == [False, True, True]
    assert rows[0].messages == [{"role": "user", "content": "What is 1+1?"}] and rows[0].prompt == "What is 1+1?"
    assert rows[1].messages == chat and rows[1].prompt == chat
    assert [r.columns for r in rows] == [{"answer": "2", "id": "a"}, {"answer": "4", "tests": ["t1"]},
                                         {"category": "math"}]
    assert rows[2].where == f"{path}:3"


def test_a_list_of_dicts_and_a_parquet_file_read_the_same(tmp_path):
    from rlhfkit.data.io import write_rows

    data = [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}]
    write_rows(tmp_path / "p.parquet", data)
    for source in (data, tmp_path / "p.parquet"):
        rows = load_prompt_rows(source)
        assert [(r.prompt, r.columns) for r in rows] == [("a", {"answer": 1}), ("b", {"answer": 2})]


@pytest.mark.parametrize("row,match", [
    ({"question": "x"}, r"p.jsonl:2: no 'prompt' .* or 'messages' field; the row has 'question'"),
    ({"prompt": ""}, r"p.jsonl:2: field 'prompt': empty prompt"),
    ({"prompt": 3}, r"p.jsonl:2: field 'prompt'"),
    ({"messages": "hi"}, r"p.jsonl:2: field 'messages': expected a list of messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"p.jsonl:2: field 'messages'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, r"p.jsonl:2: field 'prompt': both"),
    ({"prompt": "a", "completions": "x"}, r"p.jsonl:2: field 'completions': 'completions' is the name rlhfkit passes"),
])
def test_a_bad_row_fails_with_file_line_and_field(tmp_path, row, match):
    path = write(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DataError, match=match):
        load_prompt_rows(path)


def test_an_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no prompts"):
        load_prompt_rows(tmp_path / "e.jsonl")


def test_held_out_split_is_by_prompt_and_fixed():
    rows = load_prompt_rows([{"prompt": f"q{i % 10}", "k": i} for i in range(30)])   # 10 prompts, 3 rows each
    train, held = split_held_out(rows, 0.2)
    assert len({r.prompt for r in held}) == 2 and len(held) == 6                      # ceil(0.2 x 10) prompts
    assert not {r.prompt for r in train} & {r.prompt for r in held}                   # never on both sides
    again, held_again = split_held_out(list(reversed(rows)), 0.2)                     # row order does not matter
    assert {r.prompt for r in held_again} == {r.prompt for r in held}
    assert split_held_out(rows, 0.0)[1] == [] and len(split_held_out(rows, 0.99)[0]) == 3   # one prompt stays


def test_check_columns_names_the_row_and_the_column(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "category": "x"}])
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'answer': reward 'verify:math' needs the 'answer' column; "
                                        r"this row has 'category'"):
        check_columns(load_prompt_rows(path), ["answer"], "reward 'verify:math'")


def test_a_datasets_dataset_is_read_row_by_row_and_a_bad_row_is_named_by_index():
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"}])
    with pytest.raises(DataError, match=r"prompts: row 1: field 'prompt': empty prompt"):
        load_prompt_rows(ds)
    rows = load_prompt_rows(ds.select([0]))
    assert rows[0].prompt == "a" and rows[0].columns == {"answer": "1"} and rows[0].where == "prompts: row 0"
