"""Model loading (bundled GGUF, local dirs, hub ids, tiny test models), heads and checkpoints."""

from rlhfkit.models.loading import (
    BUNDLED,
    TINY,
    ModelNotFoundError,
    bundled_cache_state,
    load_model,
    load_tokenizer,
)

__all__ = ["BUNDLED", "TINY", "ModelNotFoundError", "bundled_cache_state", "load_model", "load_tokenizer"]
