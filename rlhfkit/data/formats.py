"""Converters from the common public dataset layouts to rlhfkit records, detected row by row.

Preference formats (``to_preference``), tried in this order by ``format="auto"``:

- ``native``: ``PreferenceRecord.to_dict()``; ``prompt`` messages, ``chosen``/``rejected`` assistant
  message objects, optional tie/strength/rationale/... fields.
- ``trl_conversational``: TRL; ``prompt`` messages, ``chosen``/``rejected`` one-message lists.
- ``trl_standard``: TRL; ``prompt``, ``chosen``, ``rejected`` plain strings.
- ``ultrafeedback``: UltraFeedback-binarized; ``prompt`` string, ``chosen``/``rejected`` full chats
  ``[user, assistant]``; ``prompt_id`` and ``score_*`` go to ``metadata``.
- ``trl_implicit``: TRL implicit prompt; no ``prompt``, ``chosen``/``rejected`` full chats that share
  every message but the last.
- ``hh``: Anthropic HH; no ``prompt``, ``chosen``/``rejected`` transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` sharing all but the final turn.
- ``trl_implicit_standard``: TRL's standard implicit prompt; no ``prompt``, ``chosen``/``rejected``
  plain strings whose longest common prefix is the prompt (TRL's ``maybe_extract_prompt``); the
  prompt becomes the user turn and the two remainders the replies (whitespace at the seam stripped).
  A string starting with ``Human:`` (after blank lines) is read as ``hh`` instead.

Conversation formats (``to_conversation``): ``native`` (``{"messages": [...]}``), ``sharegpt``
(``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``) and ``prompt_completion``
(``prompt``/``completion`` strings, or TRL's conversational message lists).

A format is recognised from the keys present and the types of ``prompt`` and ``chosen`` only; the
converter then validates everything else, so a row that is recognisably TRL but has a broken
``rejected`` fails with ``field 'rejected'`` rather than a vague "unknown format". Keys a format does
not use are kept in ``metadata``, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.records import (
    NOWHERE,
    ComparisonPair,
    Conversation,
    DataError,
    PreferenceRecord,
    Where,
    check_messages,
)

_PREFERENCE_FIELDS = tuple(f.name for f in dataclasses.fields(PreferenceRecord))
_PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(ComparisonPair))


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]
    """Keys a row must have."""
    shape: str
    """The layout in words, for error messages and docs."""
    fits: Callable[[dict], bool]
    """Cheap structural test on a row that has all ``keys``; the converter validates the rest."""
    convert: Callable[[dict, Where], Any]


# ---------------------------------------------------------------------------------------------------
# metadata: unknown keys are kept, never dropped


def _metadata(row: dict, used: set[str], where: Where) -> dict:
    """``row["metadata"]`` (an object, or JSON text of one as the Arrow writers store it) plus every
    key of ``row`` the format did not use."""
    meta = row.get("metadata")
    if meta is None:
        meta = {}
    elif isinstance(meta, str):
        # Parquet / save_to_disk store metadata as JSON text (Arrow needs one schema for all rows).
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as e:
            raise where.error(f"expected an object or the JSON text of one, got a string that is not JSON ({e.msg})",
                              "metadata") from None
    if not isinstance(meta, dict):
        raise where.error(f"expected an object, got {type(meta).__name__}", "metadata")
    extras = {k: v for k, v in row.items() if k not in used and k != "metadata"}
    for key in extras:
        if key in meta:
            raise where.error("present both as a column and inside 'metadata'; rename one of them", key)
    return {**meta, **extras}


# ---------------------------------------------------------------------------------------------------
# preference converters


def _native(row: dict, where: Where) -> PreferenceRecord:
    known = {k: row[k] for k in _PREFERENCE_FIELDS if k in row and k != "metadata"}
    return PreferenceRecord.from_dict({**known, "metadata": _metadata(row, set(_PREFERENCE_FIELDS), where)}, where)


def _trl_standard(row: dict, where: Where) -> PreferenceRecord:
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str):
            raise where.error(f"expected a string (TRL standard format), got {type(row[key]).__name__}", key)
    return PreferenceRecord.from_dict({
        "prompt": [{"role": "user", "content": row["prompt"]}], "chosen": row["chosen"], "rejected": row["rejected"],
        "metadata": _metadata(row, {"prompt", "chosen", "rejected"}, where),
    }, where)


def _trl_conversational(row: dict, where: Where) -> PreferenceRecord:
    if not isinstance(row["rejected"], list):
        raise where.error(f"expected a list with one assistant message (TRL conversational format), "
                          f"got {type(row['rejected']).__name__}", "rejected")
    return PreferenceRecord.from_dict({
        "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
        "metadata": _metadata(row, {"prompt", "chosen", "rejected"}, where),
    }, where)


def _split_shared_prompt(chosen: Any, rejected: Any, where: Where) -> tuple[list[dict], dict, dict]:
    """Two full chats that differ only in their final assistant turn → (prompt, chosen, rejected)."""
    c = check_messages(chosen, where, "chosen", must_end_with="assistant")
    r = check_messages(rejected, where, "rejected", must_end_with="assistant")
    if len(c) != len(r) or c[:-1] != r[:-1]:
        i = next((i for i, (a, b) in enumerate(zip(c[:-1], r[:-1])) if a != b), min(len(c), len(r)) - 1)
        raise where.error(f"'chosen' and 'rejected' must share every message but the last; they differ at message {i} "
                          f"('chosen' has {len(c)} messages, 'rejected' {len(r)})", f"rejected[{i}]")
    if len(c) < 2:
        raise where.error("the conversation has no prompt: expected a user turn before the final assistant turn", "chosen")
    return c[:-1], c[-1], r[-1]


def _ultrafeedback(row: dict, where: Where) -> PreferenceRecord:
    if not isinstance(row["rejected"], list):
        raise where.error(f"expected a list of messages (UltraFeedback format), got {type(row['rejected']).__name__}",
                          "rejected")
    prompt, chosen, rejected = _split_shared_prompt(row["chosen"], row["rejected"], where)
    if prompt[-1]["content"].strip() != row["prompt"].strip():
        raise where.error("does not match the last user turn of 'chosen'", "prompt")
    used = {"prompt", "chosen", "rejected"}
    # The dataset repeats the chosen chat as `messages` (for SFT); drop it only when it is that copy.
    if row.get("messages") == row["chosen"]:
        used.add("messages")
    return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, metadata=_metadata(row, used, where))


def _trl_implicit(row: dict, where: Where) -> PreferenceRecord:
    prompt, chosen, rejected = _split_shared_prompt(row["chosen"], row["rejected"], where)
    return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected,
                            metadata=_metadata(row, {"chosen", "rejected"}, where))


def split_implicit_prompt(chosen: str, rejected: str, where: Where = NOWHERE) -> tuple[str, str, str]:
    """TRL's standard implicit prompt: ``chosen``/``rejected`` plain strings whose longest common
    prefix is the prompt (what TRL's ``maybe_extract_prompt`` does). When the two part right after a
    space, the space goes with the completions (``"Sky: blue"``/``"Sky: red"`` -> ``"Sky:"``,
    ``" blue"``, ``" red"``), so the prompt does not end in a dangling space. Returns
    (prompt, chosen, rejected) as given: the caller strips them for chat messages."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n == min(len(chosen), len(rejected)):
        which = "'chosen' and 'rejected' are identical" if chosen == rejected else \
            "one of 'chosen' and 'rejected' is a prefix of the other"
        raise where.error(f"{which}: an implicit prompt needs two different completions after their shared prefix",
                          "rejected")
    if n and chosen[n - 1] == " ":
        n -= 1
    if not chosen[:n].strip():
        raise where.error("'chosen' and 'rejected' share no prefix, so there is no prompt (TRL's implicit-prompt "
                          "format: both strings start with the same prompt); give a 'prompt' field", "chosen")
    return chosen[:n], chosen[n:], rejected[n:]


def _trl_implicit_standard(row: dict, where: Where) -> PreferenceRecord:
    if not isinstance(row["rejected"], str):
        raise where.error(f"expected a string like 'chosen', got {type(row['rejected']).__name__}", "rejected")
    prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"], where)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise where.error("empty completion after the shared prompt", key)
    return PreferenceRecord.from_dict({
        "prompt": [{"role": "user", "content": prompt.strip()}], "chosen": chosen.strip(), "rejected": rejected.strip(),
        "metadata": _metadata(row, {"chosen", "rejected"}, where),
    }, where)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: Any, where: Where = NOWHERE, field: str = "chosen") -> list[dict]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` → ``[{"role": "user", ...}, {"role": "assistant", ...}]``.

    Turn contents are stripped of surrounding whitespace. The transcript must start with a Human turn,
    alternate, and end with an Assistant turn; error fields index turns, e.g. ``chosen[3].content``.
    """
    if not isinstance(text, str):
        raise where.error(f"expected an Anthropic HH transcript string, got {type(text).__name__}", field)
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise where.error("not an Anthropic HH transcript: expected it to start with '\\n\\nHuman:'", field)
    speakers = parts[1::2]
    if "Assistant" not in speakers:
        raise where.error("not an Anthropic HH transcript: no '\\n\\nAssistant:' turn", field)
    msgs = [{"role": _HH_ROLE[s], "content": c.strip()} for s, c in zip(speakers, parts[2::2])]
    return check_messages(msgs, where, field, must_end_with="assistant")


def _hh(row: dict, where: Where) -> PreferenceRecord:
    chosen = parse_hh_transcript(row["chosen"], where, "chosen")
    rejected = parse_hh_transcript(row["rejected"], where, "rejected")
    prompt, c, r = _split_shared_prompt(chosen, rejected, where)
    return PreferenceRecord(prompt=prompt, chosen=c, rejected=r, metadata=_metadata(row, {"chosen", "rejected"}, where))


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


PREFERENCE_FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("native", ("prompt", "chosen", "rejected"),
           "'prompt': list of messages, 'chosen'/'rejected': assistant message objects",
           lambda r: _is_list(r["prompt"]) and isinstance(r["chosen"], dict), _native),
    Format("trl_conversational", ("prompt", "chosen", "rejected"),
           "'prompt': list of messages, 'chosen'/'rejected': lists with one assistant message",
           lambda r: _is_list(r["prompt"]) and _is_list(r["chosen"]), _trl_conversational),
    Format("trl_standard", ("prompt", "chosen", "rejected"),
           "'prompt', 'chosen', 'rejected': strings",
           lambda r: _is_str(r["prompt"]) and _is_str(r["chosen"]), _trl_standard),
    Format("ultrafeedback", ("prompt", "chosen", "rejected"),
           "'prompt': string, 'chosen'/'rejected': full chats ending in an assistant turn",
           lambda r: _is_str(r["prompt"]) and _is_list(r["chosen"]), _ultrafeedback),
    Format("trl_implicit", ("chosen", "rejected"),
           "no 'prompt'; 'chosen'/'rejected': full chats sharing all but the last message",
           lambda r: "prompt" not in r and _is_list(r["chosen"]), _trl_implicit),
    Format("hh", ("chosen", "rejected"),
           "no 'prompt'; 'chosen'/'rejected': '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts",
           lambda r: "prompt" not in r and _is_str(r["chosen"]) and r["chosen"].lstrip().startswith("Human:"), _hh),
    Format("trl_implicit_standard", ("chosen", "rejected"),
           "no 'prompt'; 'chosen'/'rejected': plain strings that start with the same prompt",
           lambda r: "prompt" not in r and _is_str(r["chosen"]), _trl_implicit_standard),
]}


# ---------------------------------------------------------------------------------------------------
# conversation converters


def _conv_native(row: dict, where: Where) -> Conversation:
    return Conversation.from_dict({"messages": row["messages"], "metadata": _metadata(row, {"messages"}, where)}, where)


_SHAREGPT_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt(row: dict, where: Where) -> Conversation:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise where.error("expected a non-empty list of {'from': ..., 'value': ...} turns", "conversations")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise where.error(f"expected a turn object, got {type(t).__name__}", f"conversations[{i}]")
        if t.get("from") not in _SHAREGPT_ROLE:
            raise where.error(f"must be one of human, gpt, system, got {t.get('from')!r}", f"conversations[{i}].from")
        if not isinstance(t.get("value"), str):
            raise where.error(f"must be a string, got {type(t.get('value')).__name__}", f"conversations[{i}].value")
        msgs.append({"role": _SHAREGPT_ROLE[t["from"]], "content": t["value"]})
    # Errors name ShareGPT's own keys, 'from'/'value', not 'role'/'content'.
    msgs = _checked(msgs, where, lambda f: f.replace("messages", "conversations", 1)
                    .replace(".role", ".from").replace(".content", ".value"))
    return _conversation(msgs, _metadata(row, {"conversations"}, where), where, "conversations")


def _prompt_completion(row: dict, where: Where) -> Conversation:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise where.error(f"expected a string like 'prompt', got {type(completion).__name__}", "completion")
        if not completion.strip():
            raise where.error("empty assistant turn", "completion")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        p = check_messages(prompt, where, "prompt", must_end_with="user")
        if not isinstance(completion, list) or not completion:
            raise where.error("expected a non-empty list of assistant messages like 'prompt'", "completion")
        # Check the whole chat so turn order is checked across the seam; name the completion's index.
        msgs = _checked(p + completion, where, lambda f: _INDEX.sub(lambda m: f"completion[{int(m[1]) - len(p)}]", f))
    return _conversation(msgs, _metadata(row, {"prompt", "completion"}, where), where, "completion")


_INDEX = re.compile(r"^messages\[(\d+)\]")


def _checked(msgs: list, where: Where, rename: Callable[[str], str]) -> list[dict]:
    """``check_messages`` on a chat assembled from differently-named input keys; ``rename`` maps the
    error's ``messages[i]...`` field back to the key the user wrote."""
    try:
        return check_messages(msgs, where, "messages")
    except DataError as e:
        if e.field is None or not e.field.startswith("messages"):
            raise
        raise where.error(e.problem, rename(e.field)) from None


def _conversation(msgs: list[dict], metadata: dict, where: Where, field: str) -> Conversation:
    if not any(m["role"] == "assistant" for m in msgs):
        raise where.error("a training conversation needs at least one assistant turn", field)
    return Conversation(messages=msgs, metadata=metadata)


CONVERSATION_FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("native", ("messages",), "'messages': list of {'role', 'content'} messages",
           lambda r: True, _conv_native),
    Format("sharegpt", ("conversations",), "'conversations': list of {'from': human|gpt|system, 'value'} turns",
           lambda r: True, _sharegpt),
    Format("prompt_completion", ("prompt", "completion"),
           "'prompt'/'completion': strings, or lists of messages",
           lambda r: (_is_str(r["prompt"]) or _is_list(r["prompt"])), _prompt_completion),
]}


# ---------------------------------------------------------------------------------------------------
# detection


def _describe(row: dict) -> str:
    return ", ".join(f"{k} ({type(v).__name__})" for k, v in row.items()) or "none"


def _pick(row: Any, formats: dict[str, Format], format: str, what: str, where: Where) -> Format:
    if not isinstance(row, dict):
        raise where.error(f"expected an object, got {type(row).__name__}")
    if format != "auto":
        if format not in formats:
            raise ValueError(f"unknown {what} format {format!r}; choose 'auto' or one of {', '.join(formats)}")
        fmt = formats[format]
        for key in fmt.keys:
            if key not in row:
                raise where.error(f"missing field (format '{fmt.name}': {fmt.shape})", key)
        if not fmt.fits(row):
            raise where.error(f"row does not fit format '{fmt.name}' ({fmt.shape}); keys seen: {_describe(row)}")
        return fmt
    for fmt in formats.values():
        if all(k in row for k in fmt.keys) and fmt.fits(row):
            return fmt
    tried = ", ".join(formats)
    complete = [f for f in formats.values() if all(k in row for k in f.keys)]
    near = [f for f in formats.values() if any(k in row for k in f.keys)]
    if near and not complete:
        # It has some of a format's keys and no format's full set: most likely a field is missing.
        best = min(near, key=lambda f: sum(k not in row for k in f.keys))
        missing = next(k for k in best.keys if k not in row)
        raise where.error(f"missing field (tried {what} formats: {tried}; keys seen: {_describe(row)})", missing)
    raise where.error(f"row fits no known {what} format (tried: {tried}); keys seen: {_describe(row)}")


def detect_preference_format(row: dict) -> str | None:
    """Name of the first preference format whose keys and shape ``row`` fits, else None."""
    fmt = next((f for f in PREFERENCE_FORMATS.values() if all(k in row for k in f.keys) and f.fits(row)), None)
    return fmt.name if fmt else None


def detect_conversation_format(row: dict) -> str | None:
    fmt = next((f for f in CONVERSATION_FORMATS.values() if all(k in row for k in f.keys) and f.fits(row)), None)
    return fmt.name if fmt else None


def to_preference(row: Any, where: Where = NOWHERE, format: str = "auto") -> PreferenceRecord:
    """One row in any of ``PREFERENCE_FORMATS`` (or the one named by ``format``) → PreferenceRecord."""
    return _pick(row, PREFERENCE_FORMATS, format, "preference", where).convert(row, where)


def to_conversation(row: Any, where: Where = NOWHERE, format: str = "auto") -> Conversation:
    """One row in any of ``CONVERSATION_FORMATS`` (or the one named by ``format``) → Conversation."""
    return _pick(row, CONVERSATION_FORMATS, format, "conversation", where).convert(row, where)


def to_pair(row: Any, where: Where = NOWHERE) -> ComparisonPair:
    """One ``ComparisonPair.to_dict()`` row (metadata may be JSON text; unknown keys join metadata)."""
    if not isinstance(row, dict):
        raise where.error(f"expected an object, got {type(row).__name__}")
    known = {k: row[k] for k in _PAIR_FIELDS if k in row and k != "metadata"}
    return ComparisonPair.from_dict({**known, "metadata": _metadata(row, set(_PAIR_FIELDS), where)}, where)
