"""Records, readers and writers, chat templating, and the built-in prompt collection."""

from rlhfkit.data.records import ComparisonPair, Conversation, DataError, PreferenceRecord, Where

__all__ = ["ComparisonPair", "Conversation", "DataError", "PreferenceRecord", "Where"]
