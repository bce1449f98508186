"""Readers and writers: every format through every container, and every bad input's message."""

import importlib.util
import json
import os
import pathlib

import pytest

from rlhfkit.data.io import (
    load_conversations,
    load_pairs,
    load_preferences,
    read_jsonl,
    read_rows,
    save_conversations,
    save_pairs,
    save_preferences,
    write_jsonl,
    write_rows,
)
from rlhfkit.data.records import ComparisonPair, DataError, PreferenceRecord

# The one example row per format lives in test_data_formats.py; load it by path so this works under
# any pytest import mode and whether or not tests/ is a package.
_spec = importlib.util.spec_from_file_location("_format_examples", pathlib.Path(__file__).with_name("test_data_formats.py"))
_examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_examples)
PREFERENCE_EXAMPLES, CONVERSATION_EXAMPLES = _examples.PREFERENCE_EXAMPLES, _examples.CONVERSATION_EXAMPLES
A, U = _examples.A, _examples.U

CONTAINERS = ["data.jsonl", "data.parquet", "data_dir"]


def two_rows(example_row: dict) -> list[dict]:
    """The example row and a variant with every 'o' in its string values made 'ö' (no role, speaker
    or enum value has an 'o'), so a table has two different rows and non-ASCII text is exercised."""

    def umlaut(v):
        if isinstance(v, str):
            return v.replace("o", "ö")
        if isinstance(v, list):
            return [umlaut(x) for x in v]
        if isinstance(v, dict):
            return {k: umlaut(x) for k, x in v.items()}
        return v

    return [example_row, umlaut(example_row)]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", PREFERENCE_EXAMPLES)
def test_preference_format_round_trips_through_container(tmp_path, name, container):
    rows = two_rows(PREFERENCE_EXAMPLES[name][0])
    expected = [load_preferences_from_memory(r) for r in rows]
    assert expected[0] == PREFERENCE_EXAMPLES[name][1]
    write_rows(tmp_path / container, rows)
    got = load_preferences(tmp_path / container)
    assert got == expected
    # and our own records, with every field set, survive a save/load in the same container
    out = tmp_path / ("saved_" + container)
    save_preferences(out, got)
    assert load_preferences(out) == expected


def load_preferences_from_memory(row):
    from rlhfkit.data.formats import to_preference

    return to_preference(row)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", CONVERSATION_EXAMPLES)
def test_conversation_format_round_trips_through_container(tmp_path, name, container):
    from rlhfkit.data.formats import to_conversation

    rows = two_rows(CONVERSATION_EXAMPLES[name][0])
    expected = [to_conversation(r) for r in rows]
    write_rows(tmp_path / container, rows)
    assert load_conversations(tmp_path / container) == expected
    save_conversations(tmp_path / ("saved_" + container), expected)
    assert load_conversations(tmp_path / ("saved_" + container)) == expected


@pytest.mark.parametrize("container", CONTAINERS)
def test_pairs_round_trip(tmp_path, container):
    pairs = [ComparisonPair(id="p1", prompt=[U("q")], a=A("x"), b=A("y"), task="sentiment",
                            metadata={"seed": 1, "temperature": 0.7}),
             ComparisonPair(id="p2", prompt=[U("r")], a=A("z"), b=A("w"))]
    save_pairs(tmp_path / container, pairs)
    assert load_pairs(tmp_path / container) == pairs


def test_metadata_with_different_keys_per_row_round_trips_through_parquet(tmp_path):
    """A struct column would give each row the other rows' keys as None; JSON text does not."""
    recs = [PreferenceRecord(prompt=[U("q")], chosen=A("a"), rejected=A("b"), metadata={"x": 1}),
            PreferenceRecord(prompt=[U("q")], chosen=A("a"), rejected=A("b"), metadata={"y": [1.5, "s"]}),
            PreferenceRecord(prompt=[U("q")], chosen=A("a"), rejected=A("b"))]
    save_preferences(tmp_path / "m.parquet", recs)
    assert load_preferences(tmp_path / "m.parquet") == recs


def test_mixed_formats_in_one_file_are_detected_per_row(tmp_path):
    rows = [PREFERENCE_EXAMPLES[n][0] for n in ("hh", "trl_standard", "native")]
    write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert load_preferences(tmp_path / "mixed.jsonl") == [PREFERENCE_EXAMPLES[n][1] for n in ("hh", "trl_standard", "native")]


def test_json_array_and_json_lines_with_json_extension(tmp_path):
    rows = [PREFERENCE_EXAMPLES["trl_standard"][0]] * 2
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_preferences(tmp_path / "arr.json") == load_preferences(tmp_path / "lines.json")
    (tmp_path / "bad.json").write_text('[{"prompt": "q", "chosen": "a", "rejected": ""}]')
    with pytest.raises(DataError, match=r"bad.json: row 0: field 'rejected.content': empty completion"):
        load_preferences(tmp_path / "bad.json")


# --- JSONL reader errors ---------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines_and_counts_from_one(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"a": 2}\r\n')
    assert list(read_jsonl(p)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_malformed_json_on_line_3(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{"prompt": "q" "chosen": "a"}\n')
    with pytest.raises(DataError) as e:
        load_preferences(p)
    # column 16 is the '"' opening "chosen", where the missing ',' should be
    assert str(e.value) == f"{p}:3: malformed JSON: Expecting ',' delimiter (column 16)"
    assert (e.value.path, e.value.line) == (str(p), 3)


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        list(read_jsonl(p))
    # line 1 is 9 bytes with its newline; on line 2, '{"a": "caf' is bytes 0..9, so 0xe9 is byte 10
    assert str(e.value) == f"{p}:2: not valid UTF-8: byte 0xe9 at byte offset 19 (byte 10 of the line)"


def test_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=f"{p}:2: expected a JSON object on each line, got list"):
        list(read_jsonl(p))


BAD_ROWS = {
    "missing field": ({"prompt": "q", "chosen": "a"}, "field 'rejected': missing field"),
    "wrong role order": ({"prompt": [U("q"), U("q")], "chosen": A("a"), "rejected": A("b")},
                         "field 'prompt[1].role': wrong role order"),
    "empty assistant turn": ({"prompt": "q", "chosen": "a", "rejected": " "}, "field 'rejected.content': empty completion"),
    "hh without assistant": ({"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q\n\nAssistant: b"},
                             "field 'chosen': not an Anthropic HH transcript: no '\\n\\nAssistant:' turn"),
    "unknown format": ({"text": "q"}, "row fits no known preference format (tried: native,"),
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_names_file_line_or_row_and_field(tmp_path, case, container):
    bad, message = BAD_ROWS[case]
    good = PREFERENCE_EXAMPLES["trl_standard"][0]
    path = tmp_path / container
    if container == "data.jsonl":
        write_jsonl(path, [good, good, bad])  # Arrow wants one schema, so tables get only the bad row
        where = f"{path}:3: "
    else:
        write_rows(path, [bad])
        where = f"{path}: row 0: "
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert where + message in str(e.value)


def test_bad_conversation_row(tmp_path):
    p = tmp_path / "sft.jsonl"
    write_jsonl(p, [{"messages": [U("q"), A("a")]}, {"messages": [U("q"), A("")]}])
    with pytest.raises(DataError, match=f"{p}:2: field 'messages\\[1\\].content': empty assistant turn"):
        load_conversations(p)


# --- sources ---------------------------------------------------------------------------------------


def test_file_not_found(tmp_path):
    for missing in (tmp_path / "nope.jsonl", "no/such/dir/prefs.parquet", "./local-name"):
        with pytest.raises(DataError, match=f"{missing}: file not found"):
            load_preferences(missing)


def test_unsupported_extension(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="x.csv: unsupported file type '.csv'"):
        load_preferences(tmp_path / "x.csv")
    with pytest.raises(DataError, match="cannot tell what to write from the extension '.csv'"):
        write_rows(tmp_path / "y.csv", [{"a": 1}])


def test_unknown_format_name_fails_before_reading(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="unknown preference format 'trl'; choose 'auto' or one of native,"):
        load_preferences(tmp_path / "empty.jsonl", format="trl")
    with pytest.raises(ValueError, match="unknown conversation format 'chatml'"):
        load_conversations(tmp_path / "empty.jsonl", format="chatml")


def test_split_on_a_single_table_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [PREFERENCE_EXAMPLES["trl_standard"][0]])
    assert len(load_preferences(tmp_path / "a.jsonl", split="train")) == 1
    with pytest.raises(DataError, match=r"a.jsonl: a .jsonl file has one table and no splits; got split='test'"):
        load_preferences(tmp_path / "a.jsonl", split="test")


def test_dataset_dict_splits(tmp_path):
    import datasets

    train = [PREFERENCE_EXAMPLES["trl_standard"][0]]
    test = [dict(PREFERENCE_EXAMPLES["trl_standard"][0], prompt="other")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(tmp_path / "dd"))
    assert load_preferences(tmp_path / "dd")[0].prompt_text == "Say hello politely."  # default split: train
    assert load_preferences(tmp_path / "dd", split="test")[0].prompt_text == "other"
    with pytest.raises(DataError) as e:
        load_preferences(tmp_path / "dd", split="validation")
    assert str(e.value) == f"{tmp_path / 'dd'}: split 'validation' not found; available splits: train, test"
    write_rows(tmp_path / "dd_bad", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "", "rejected": "b"}])
    with pytest.raises(DataError, match="dd_bad: row 1: field 'chosen.content': empty completion"):
        load_preferences(tmp_path / "dd_bad")


def test_folder_of_data_files_goes_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "snap").mkdir()
    write_jsonl(tmp_path / "snap" / "train.jsonl", [PREFERENCE_EXAMPLES["hh"][0]])
    assert load_preferences(tmp_path / "snap") == [PREFERENCE_EXAMPLES["hh"][1]]
    with pytest.raises(DataError, match=r"snap: split 'test' not found: Unknown split \"test\""):
        load_preferences(tmp_path / "snap", split="test")


def test_offline_absent_hub_dataset(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # Both libraries read these variables once at import, so patch their constants as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_preferences("rlhfkit-tests/no-such-dataset", split="train")
    msg = str(e.value)
    assert msg.startswith("rlhfkit-tests/no-such-dataset: not a local path, and the hub dataset "
                          "'rlhfkit-tests/no-such-dataset' is not available offline")
    assert "pass a local path instead: a .jsonl, .json or .parquet file" in msg


# --- writers ---------------------------------------------------------------------------------------


def test_failed_write_keeps_the_old_file_and_appending_keeps_earlier_lines(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"n": 1}, {"n": 2}])

    def failing():
        yield {"n": 99}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        write_jsonl(p, failing())  # atomic: the old file stays as it was, no temp file left behind
    assert [r for _, r in read_jsonl(p)] == [{"n": 1}, {"n": 2}]
    assert os.listdir(tmp_path) == ["out.jsonl"]

    with pytest.raises(DataError, match=f"{p}: row 2 cannot be written as JSON: Object of type set"):
        write_jsonl(p, [{"n": 3}, {"n": {1, 2}}], append=True)  # row 3 is kept, the bad row adds nothing
    write_jsonl(p, [{"n": 4}], append=True)
    assert [r for _, r in read_jsonl(p)] == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]


def test_append_after_a_torn_last_line_keeps_the_new_rows_whole(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"n": 1}\n{"n": 2, "te')
    write_jsonl(p, [{"n": 3}], append=True)
    assert p.read_bytes() == b'{"n": 1}\n{"n": 2, "te\n{"n": 3}\n'
    with pytest.raises(DataError, match=f"{p}:2: malformed JSON"):
        list(read_jsonl(p))


def test_write_rows_replaces_a_saved_dataset_but_not_another_folder(tmp_path):
    rows = [PREFERENCE_EXAMPLES["trl_standard"][0]]
    write_rows(tmp_path / "ds", rows)
    write_rows(tmp_path / "ds", rows * 3)
    assert len(load_preferences(tmp_path / "ds")) == 3
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="runs: is a folder that is not a saved dataset; refusing to replace it"):
        write_rows(tmp_path / "runs", rows)
    assert (tmp_path / "runs" / "keep.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["ds", "runs"]  # no temporary folders left behind


def test_read_rows_where_labels(tmp_path):
    write_rows(tmp_path / "t.parquet", [{"a": 1}, {"a": 2}])
    assert [(str(w.path), w.line, r) for w, r in read_rows(tmp_path / "t.parquet")] == [
        (str(tmp_path / "t.parquet"), 0, {"a": 1}), (str(tmp_path / "t.parquet"), 1, {"a": 2})]


def test_metadata_struct_column_from_other_tools(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "metadata": {"k": 1}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    assert load_preferences(tmp_path / "s.parquet")[0].metadata == {"k": 1}


def test_written_files_get_normal_permissions_and_keep_existing_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "new.jsonl", [{"a": 1}])
        write_rows(tmp_path / "new.parquet", [{"a": 1}])
    finally:
        os.umask(old)
    assert (tmp_path / "new.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "new.parquet").stat().st_mode & 0o777 == 0o644
    (tmp_path / "new.jsonl").chmod(0o600)
    write_jsonl(tmp_path / "new.jsonl", [{"a": 2}])
    assert (tmp_path / "new.jsonl").stat().st_mode & 0o777 == 0o600


def test_json_array_with_byte_order_mark(tmp_path):
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf [{"prompt": "q", "chosen": "a", "rejected": "b"}]')
    assert load_preferences(tmp_path / "bom.json")[0].prompt_text == "q"
