"""Records, readers and writers, chat templating, and the built-in prompt collection."""

from rlhfkit.data.formats import CONVERSATION_FORMATS, PREFERENCE_FORMATS, to_conversation, to_preference
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
from rlhfkit.data.prompts import CATEGORIES, load_prompts
from rlhfkit.data.records import ComparisonPair, Conversation, DataError, PreferenceRecord, Where

__all__ = [
    "CATEGORIES", "CONVERSATION_FORMATS", "PREFERENCE_FORMATS", "ComparisonPair", "Conversation", "DataError",
    "PreferenceRecord", "Where", "load_conversations", "load_pairs", "load_preferences", "load_prompts",
    "read_jsonl", "read_rows", "save_conversations", "save_pairs", "save_preferences", "to_conversation",
    "to_preference", "write_jsonl", "write_rows",
]
