"""Chat templating and tokenization with assistant-only loss masks.

The model's own chat template renders the text; character offsets then say which tokens belong to
assistant replies, so the mask is right for any template (no per-model role markers hard-coded).
An assistant reply's span runs from its first character through the EOS token that closes it:
the model must learn to emit EOS, or it never stops (N implementation details #2).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.data.records import NOWHERE, DataError, Where


@dataclass
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[bool]
    """True on assistant tokens (content + closing EOS): the tokens the SFT loss is taken on."""
    truncated: bool = False


def render(tok, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant reply + its EOS."""
    full = render(tok, messages)
    eos = tok.eos_token
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tok, messages[:i], add_generation_prompt=True)
        upto = render(tok, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(head):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot build an assistant mask")
        start = len(head)
        content_at = upto.find(m["content"], start)
        eos_at = upto.find(eos, content_at + len(m["content"])) if content_at >= 0 else -1
        end = eos_at + len(eos) if eos_at >= 0 else len(upto.rstrip())
        spans.append((start, end))
    return full, spans


def tokenize_chat(tok, messages: list[dict], max_length: int | None = None, where: Where = NOWHERE) -> TokenizedChat:
    """Tokenize a conversation; ``loss_mask`` marks assistant tokens.

    Truncation keeps the beginning (right truncation). A conversation whose first assistant token
    falls beyond ``max_length`` would train on nothing: that is an error naming the record.
    """
    text, spans = _assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [any(s <= a < e for s, e in spans) for a, _ in offsets]
    truncated = False
    if max_length is not None and len(ids) > max_length:
        first = mask.index(True) if True in mask else len(ids)
        if first >= max_length:
            raise DataError(
                f"the prompt is {first} tokens, longer than max_length={max_length}; raise max_length or shorten it",
                path=where.path, line=where.line, field="messages",
            )
        ids, mask, truncated = ids[:max_length], mask[:max_length], True
    return TokenizedChat(input_ids=list(ids), loss_mask=mask, truncated=truncated)


def tokenize_prompt(tok, prompt: list[dict], max_length: int | None = None, where: Where = NOWHERE) -> list[int]:
    """Token ids of a prompt rendered with the generation prompt (what the policy continues)."""
    ids = tok(render(tok, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"the prompt is {len(ids)} tokens, longer than max_prompt_length={max_length}",
                        path=where.path, line=where.line, field="prompt")
    return list(ids)


def tokenize_completion(tok, prompt: list[dict], completion: str, max_length: int | None = None) -> list[int]:
    """Token ids of an assistant reply as the template would continue ``prompt``, ending with EOS."""
    text, spans = _assistant_spans(tok, prompt + [{"role": "assistant", "content": completion}])
    start, end = spans[-1]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [i for i, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if start <= a < end]
    return ids[:max_length] if max_length is not None else ids
