"""Format converters: each public layout → our records, auto-detection, and the error for each bad row."""

import re

import pytest

from rlhfkit.data.formats import (
    CONVERSATION_FORMATS,
    PREFERENCE_FORMATS,
    detect_conversation_format,
    detect_preference_format,
    parse_hh_transcript,
    to_conversation,
    to_pair,
    to_preference,
)
from rlhfkit.data.records import Conversation, DataError, PreferenceRecord, Where

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}
HERE = Where("prefs.jsonl", 7)

# One row per preference format, each with an extra key that must survive into metadata, and the
# record it must become.
PREFERENCE_EXAMPLES = {
    "native": (
        {"prompt": [U("Name a fruit.")], "chosen": A("An apple."), "rejected": A("A chair."), "tie": False,
         "strength": 2, "rationale": "a chair is not a fruit", "annotator_id": "ann-3",
         "presented_order": "rejected", "source": "human", "metadata": {"batch": 4}, "extra": "kept"},
        PreferenceRecord(prompt=[U("Name a fruit.")], chosen=A("An apple."), rejected=A("A chair."), strength=2,
                         rationale="a chair is not a fruit", annotator_id="ann-3", presented_order="rejected",
                         source="human", metadata={"batch": 4, "extra": "kept"}),
    ),
    "trl_conversational": (
        {"prompt": [S("Be brief."), U("Capital of Peru?")], "chosen": [A("Lima.")], "rejected": [A("Cusco.")],
         "id": 11},
        PreferenceRecord(prompt=[S("Be brief."), U("Capital of Peru?")], chosen=A("Lima."), rejected=A("Cusco."),
                         metadata={"id": 11}),
    ),
    "trl_standard": (
        {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you.", "rejected": "What.", "lang": "en"},
        PreferenceRecord(prompt=[U("Say hello politely.")], chosen=A("Hello, nice to meet you."), rejected=A("What."),
                         metadata={"lang": "en"}),
    ),
    "ultrafeedback": (
        {"prompt": "Why is the sky blue?", "prompt_id": "ab12",
         "chosen": [U("Why is the sky blue?"), A("Air scatters blue light more than red light.")],
         "rejected": [U("Why is the sky blue?"), A("Because it reflects the ocean.")],
         "messages": [U("Why is the sky blue?"), A("Air scatters blue light more than red light.")],
         "score_chosen": 9.0, "score_rejected": 3.5},
        PreferenceRecord(prompt=[U("Why is the sky blue?")], chosen=A("Air scatters blue light more than red light."),
                         rejected=A("Because it reflects the ocean."),
                         metadata={"prompt_id": "ab12", "score_chosen": 9.0, "score_rejected": 3.5}),
    ),
    "trl_implicit": (
        {"chosen": [U("Hi"), A("Hello!"), U("Count to three.")] + [A("1, 2, 3.")],
         "rejected": [U("Hi"), A("Hello!"), U("Count to three.")] + [A("No.")]},
        PreferenceRecord(prompt=[U("Hi"), A("Hello!"), U("Count to three.")], chosen=A("1, 2, 3."), rejected=A("No.")),
    ),
    "hh": (
        {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.\n\nHuman: Thanks."
                   "\n\nAssistant: You're welcome!",
         "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.\n\nHuman: Thanks."
                     "\n\nAssistant: Whatever.",
         "split_tag": "helpful-base"},
        PreferenceRecord(prompt=[U("How do I boil an egg?"), A("Simmer it for nine minutes."), U("Thanks.")],
                         chosen=A("You're welcome!"), rejected=A("Whatever."), metadata={"split_tag": "helpful-base"}),
    ),
    # TRL's documented standard implicit-prompt row: the shared prefix "The sky is" is the prompt.
    "trl_implicit_standard": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green.", "source_id": 5},
        PreferenceRecord(prompt=[U("The sky is")], chosen=A("blue."), rejected=A("green."), metadata={"source_id": 5}),
    ),
}

CONVERSATION_EXAMPLES = {
    "native": (
        {"messages": [S("You are kind."), U("Hi"), A("Hello!")], "metadata": {"src": "x"}, "lang": "en"},
        Conversation(messages=[S("You are kind."), U("Hi"), A("Hello!")], metadata={"src": "x", "lang": "en"}),
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}], "id": "sg-1"},
        Conversation(messages=[S("Be terse."), U("2+2?"), A("4")], metadata={"id": "sg-1"}),
    ),
    "prompt_completion": (
        {"prompt": "Write a haiku about rain.", "completion": "Soft rain on the roof", "n": 1},
        Conversation(messages=[U("Write a haiku about rain."), A("Soft rain on the roof")], metadata={"n": 1}),
    ),
}


@pytest.mark.parametrize("name", PREFERENCE_EXAMPLES)
def test_each_preference_format_is_detected_and_converted(name):
    row, expected = PREFERENCE_EXAMPLES[name]
    assert detect_preference_format(row) == name
    assert to_preference(row, HERE) == expected
    assert to_preference(row, HERE, format=name) == expected


def test_every_preference_format_has_an_example():
    assert set(PREFERENCE_EXAMPLES) == set(PREFERENCE_FORMATS)
    assert set(CONVERSATION_EXAMPLES) == set(CONVERSATION_FORMATS)


@pytest.mark.parametrize("name", CONVERSATION_EXAMPLES)
def test_each_conversation_format_is_detected_and_converted(name):
    row, expected = CONVERSATION_EXAMPLES[name]
    assert detect_conversation_format(row) == name
    assert to_conversation(row, HERE) == expected
    assert to_conversation(row, HERE, format=name) == expected


def test_native_record_round_trips_through_to_dict():
    _, rec = PREFERENCE_EXAMPLES["native"]
    assert to_preference(rec.to_dict()) == rec


def test_conversational_prompt_completion():
    row = {"prompt": [U("Hi")], "completion": [A("Hello.")]}
    assert to_conversation(row) == Conversation(messages=[U("Hi"), A("Hello.")])
    with pytest.raises(DataError) as e:
        to_conversation({"prompt": [U("Hi")], "completion": [A("Hello."), A("Again.")]}, HERE)
    assert "prefs.jsonl:7: field 'completion[1].role': wrong role order" in str(e.value)


def test_metadata_as_json_text_is_decoded():
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "metadata": '{"k": [1, 2]}'}
    assert to_preference(row).metadata == {"k": [1, 2]}
    with pytest.raises(DataError, match="prefs.jsonl:7: field 'metadata': expected an object or the JSON text"):
        to_preference({**row, "metadata": "not json"}, HERE)


def test_key_both_in_row_and_metadata_is_an_error():
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "metadata": {"lang": "fr"}, "lang": "en"}
    with pytest.raises(DataError, match="prefs.jsonl:7: field 'lang': present both as a column and inside"):
        to_preference(row, HERE)


def test_ultrafeedback_keeps_messages_that_differ_from_chosen():
    row = dict(PREFERENCE_EXAMPLES["ultrafeedback"][0], messages=[U("other"), A("x")])
    assert to_preference(row).metadata["messages"] == [U("other"), A("x")]


def test_hh_parser():
    assert parse_hh_transcript("Human: a\n\nAssistant: b  ") == [U("a"), A("b")]
    assert parse_hh_transcript("\n\nHuman: one\ntwo\n\nAssistant: three") == [U("one\ntwo"), A("three")]


# --- bad rows: each error names the line and the field ---------------------------------------------


def err(row, fn=to_preference, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(row, HERE, **kw)
    return str(e.value)


def test_missing_field():
    assert err({"prompt": "q", "chosen": "a"}).startswith("prefs.jsonl:7: field 'rejected': missing field")
    assert err({"prompt": [U("q")], "chosen": A("a")}).startswith("prefs.jsonl:7: field 'rejected': missing field")
    assert err({"prompt": "q"}, to_conversation).startswith("prefs.jsonl:7: field 'completion': missing field")


def test_wrong_role_order():
    row = {"prompt": [U("q"), U("again")], "chosen": A("a"), "rejected": A("b")}
    assert ("prefs.jsonl:7: field 'prompt[1].role': wrong role order: expected 'assistant' at position 1, got 'user'"
            in err(row))
    conv = {"messages": [U("q"), A("a"), A("b")]}
    assert "prefs.jsonl:7: field 'messages[2].role': wrong role order" in err(conv, to_conversation)
    sharegpt = {"conversations": [{"from": "gpt", "value": "hi"}]}
    assert "prefs.jsonl:7: field 'conversations[0].from': wrong role order" in err(sharegpt, to_conversation)


def test_empty_assistant_turn():
    assert "prefs.jsonl:7: field 'chosen.content': empty completion" in err(
        {"prompt": "q", "chosen": "  ", "rejected": "b"})
    assert "prefs.jsonl:7: field 'messages[1].content': empty assistant turn" in err(
        {"messages": [U("q"), A("")]}, to_conversation)
    assert "prefs.jsonl:7: field 'conversations[1].value': empty assistant turn" in err(
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, to_conversation)
    assert "prefs.jsonl:7: field 'completion': empty assistant turn" in err(
        {"prompt": "q", "completion": ""}, to_conversation)
    hh = {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    assert "prefs.jsonl:7: field 'chosen[1].content': empty assistant turn" in err(hh)


def test_hh_transcript_without_assistant_turn():
    row = {"chosen": "\n\nHuman: hello there", "rejected": "\n\nHuman: hello there\n\nAssistant: hi"}
    assert "prefs.jsonl:7: field 'chosen': not an Anthropic HH transcript: no '\\n\\nAssistant:' turn" in err(row)
    row = {"chosen": "Human: hi", "rejected": "Human: hi\n\nAssistant: hello"}  # HH without the leading blank lines
    assert "field 'chosen': not an Anthropic HH transcript: no '\\n\\nAssistant:' turn" in err(row)


def test_trl_implicit_prompt_strings_split_at_their_common_prefix():
    """The prefix up to the first differing character is the prompt; a space right before the split
    goes with the replies, and the seam's whitespace is stripped. Rows that used to fail as 'not an
    Anthropic HH transcript' are read; rows with no shared prompt fail saying so."""
    row = {"chosen": "Question: what is 2 + 2?\nAnswer: 4", "rejected": "Question: what is 2 + 2?\nAnswer: five"}
    rec = to_preference(row)
    assert rec.prompt == [U("Question: what is 2 + 2?\nAnswer:")]
    assert (rec.chosen, rec.rejected) == (A("4"), A("five"))
    assert "'chosen' and 'rejected' share no prefix, so there is no prompt" in err(
        {"chosen": "just some text", "rejected": "more text"})
    assert "field 'rejected': 'chosen' and 'rejected' are identical" in err({"chosen": "Hi there", "rejected": "Hi there"})
    assert "field 'rejected': one of 'chosen' and 'rejected' is a prefix of the other" in err(
        {"chosen": "Hi there", "rejected": "Hi there, friend"})
    assert "prefs.jsonl:7: field 'rejected': expected a string like 'chosen', got int" in err(
        {"chosen": "Hi there", "rejected": 3})


def test_hh_transcripts_with_different_prompts():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}
    assert "prefs.jsonl:7: field 'rejected[0]': 'chosen' and 'rejected' must share every message but the last" in err(row)


def test_ultrafeedback_prompt_mismatch():
    row = dict(PREFERENCE_EXAMPLES["ultrafeedback"][0], prompt="Something else?")
    assert "prefs.jsonl:7: field 'prompt': does not match the last user turn of 'chosen'" in err(row)


def test_unknown_format():
    msg = err({"text": "hello", "label": 1})
    assert msg == ("prefs.jsonl:7: row fits no known preference format (tried: native, trl_conversational, "
                   "trl_standard, ultrafeedback, trl_implicit, hh, trl_implicit_standard); keys seen: text (str), label (int)")
    assert "row fits no known preference format" in err({"prompt": 3, "chosen": "a", "rejected": "b"})
    assert "row fits no known conversation format (tried: native, sharegpt, prompt_completion); keys seen: text" in err(
        {"text": "x"}, to_conversation)
    assert "prefs.jsonl:7: expected an object, got list" in err([1, 2])


def test_format_override():
    row, _ = PREFERENCE_EXAMPLES["native"]
    assert "prefs.jsonl:7: row does not fit format 'trl_standard'" in err(row, format="trl_standard")
    assert "prefs.jsonl:7: field 'prompt': missing field (format 'ultrafeedback'" in err(
        {"chosen": [], "rejected": []}, format="ultrafeedback")
    with pytest.raises(ValueError, match="unknown preference format 'dpo'; choose 'auto' or one of native"):
        to_preference(row, format="dpo")


def test_trl_standard_with_a_non_string_rejected():
    assert "prefs.jsonl:7: field 'rejected': expected a string (TRL standard format), got int" in err(
        {"prompt": "q", "chosen": "a", "rejected": 5})


def test_sharegpt_unknown_speaker():
    row = {"conversations": [{"from": "narrator", "value": "x"}]}
    assert "prefs.jsonl:7: field 'conversations[0].from': must be one of human, gpt, system, got 'narrator'" in err(
        row, to_conversation)


def test_pair_keeps_unknown_keys():
    row = {"id": "p1", "prompt": [U("q")], "a": A("x"), "b": A("y"), "metadata": '{"seed": 3}', "temp": 0.7}
    assert to_pair(row).metadata == {"seed": 3, "temp": 0.7}
    assert "prefs.jsonl:7: field 'b': missing field" in err({"id": "p1", "prompt": [U("q")], "a": A("x")}, to_pair)


def test_examples_in_the_docs_are_detected_as_the_format_they_document():
    import json
    import pathlib

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "data.md").read_text()
    doc = doc[doc.index("## Formats"):doc.index("## Errors")]
    found = re.findall(r"\*\*`(\w+)`\*\*[^\n]*\n(?:[^\n]*\n)*?```json\n(.*?)```", doc, re.S)
    assert {name for name, _ in found} == set(PREFERENCE_FORMATS)
    for name, block in found:
        row = json.loads(block)
        assert detect_preference_format(row) == name
        to_preference(row)
