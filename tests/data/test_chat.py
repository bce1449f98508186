"""Chat tokenization: the assistant-only loss mask, completions ending in EOS, prompt-length errors."""

from __future__ import annotations

import json

import pytest

from rlhfkit.data.chat import tokenize_chat, tokenize_completion, tokenize_prompt
from rlhfkit.data.records import DataError, Where
from rlhfkit.train.sft import load_sft_data

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]


def masked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The maximal runs of consecutive masked tokens, in order."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("with_system", [True, False], ids=["system", "no-system"])
def test_mask_covers_exactly_each_assistant_reply_and_its_eos(tokenizer, with_system):
    messages = ([SYSTEM] if with_system else []) + TURNS
    chat = tokenize_chat(tokenizer, messages)
    assert len(chat.input_ids) == len(chat.loss_mask) and not chat.truncated
    runs = [tokenizer.decode(r) for r in masked_runs(chat.input_ids, chat.loss_mask)]
    eos = tokenizer.eos_token
    assert eos == "<|im_end|>"
    assert runs == [m["content"] + eos for m in messages if m["role"] == "assistant"]
    # the system and user texts are rendered, but never trained on
    text = tokenizer.decode(chat.input_ids)
    for m in messages:
        assert m["content"] in text
    unmasked = tokenizer.decode([i for i, m in zip(chat.input_ids, chat.loss_mask) if not m])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in unmasked


def test_tokenized_chat_is_the_template_rendering(tokenizer):
    chat = tokenize_chat(tokenizer, [SYSTEM] + TURNS)
    rendered = tokenizer.apply_chat_template([SYSTEM] + TURNS, tokenize=False)
    assert tokenizer.decode(chat.input_ids) == rendered


def test_completion_ends_with_eos_and_continues_the_prompt(tokenizer):
    prompt = [SYSTEM, TURNS[0]]
    ids = tokenize_completion(tokenizer, prompt, "Paris.")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == "Paris." + tokenizer.eos_token
    # prompt tokens followed by the completion tokens = the whole conversation's tokens
    whole = tokenize_chat(tokenizer, prompt + [{"role": "assistant", "content": "Paris."}]).input_ids
    head = tokenize_prompt(tokenizer, prompt)
    assert whole[:len(head) + len(ids)] == head + ids


def test_truncation_keeps_the_beginning(tokenizer):
    full = tokenize_chat(tokenizer, [SYSTEM] + TURNS)
    first_loss = full.loss_mask.index(True)
    cut = tokenize_chat(tokenizer, [SYSTEM] + TURNS, max_length=first_loss + 3)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:first_loss + 3]
    assert cut.loss_mask == full.loss_mask[:first_loss + 3]


def test_prompt_longer_than_max_length_names_file_line_and_field(tokenizer):
    with pytest.raises(DataError) as e:
        tokenize_chat(tokenizer, [SYSTEM] + TURNS, max_length=8, where=Where("chats.jsonl", 7))
    assert e.value.path == "chats.jsonl" and e.value.line == 7 and e.value.field == "messages"
    assert "chats.jsonl:7" in str(e.value) and "messages" in str(e.value) and "max_length=8" in str(e.value)


def test_prompt_too_long_in_a_file_reports_its_line(tokenizer, tmp_path):
    rows = [{"messages": TURNS[:2]}, {"messages": [{"role": "user", "content": "word " * 200}, TURNS[1]]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_sft_data(str(path), tokenizer, max_length=64)
    assert f"{path}:2:" in str(e.value) and "'messages'" in str(e.value)
