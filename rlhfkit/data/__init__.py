"""Records, readers and writers, chat templating, and the built-in prompt collection."""

from rlhfkit.data.records import Conversation, DataError, PreferenceRecord, Where

__all__ = ["Conversation", "DataError", "PreferenceRecord", "Where"]
