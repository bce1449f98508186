"""The built-in prompt collection: 330 short user prompts in 10 categories, written for rlhfkit.

Each prompt is answerable in about 50 words, so that a 135M-parameter chat model gives replies worth
comparing. ``prompts/prompts.jsonl`` holds one ``{"id", "category", "prompt", "split"}`` object a
line. The split is fixed in the file, not drawn at load time: within each category (in file order)
every fifth prompt starting with the third is ``heldout`` (about 20%, stratified by category), the rest
``train``. Train on ``train``; evaluate win rates on ``heldout`` so evaluation prompts were never seen.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from importlib import resources

from rlhfkit.data.io import read_jsonl

CATEGORIES = (
    "advice",       # personal and practical advice
    "explanation",  # why/how questions about science and everyday things
    "creative",     # short poems and stories
    "opinion",      # opinions and recommendations
    "howto",        # step-by-step instructions
    "review",       # reviews of products, films, restaurants (the sentiment task draws on these)
    "summarize",    # a short passage in the prompt, to be summarised
    "brainstorm",   # lists of ideas
    "message",      # emails, notes and text messages
    "factual",      # short factual questions
)
SPLITS = ("train", "heldout", "all")


@functools.lru_cache(maxsize=1)
def _all_prompts() -> tuple[dict, ...]:
    with resources.as_file(resources.files("rlhfkit.data").joinpath("prompts/prompts.jsonl")) as path:
        return tuple(row for _, row in read_jsonl(path))


def load_prompts(split: str = "train", categories: Iterable[str] | None = None) -> list[dict]:
    """Prompts as ``{"id", "category", "prompt", "split"}`` dicts, in file order.

    ``split``: ``"train"``, ``"heldout"`` or ``"all"``. ``categories``: names from ``CATEGORIES``
    (all when None). The returned dicts are copies; changing them does not change later calls.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(categories, str):
        raise TypeError(f"categories must be a list of names, e.g. [{categories!r}], not a string")
    wanted = set(CATEGORIES if categories is None else categories)
    unknown = sorted(wanted - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown prompt categories {unknown}; choose from {', '.join(CATEGORIES)}")
    return [copy.deepcopy(p) for p in _all_prompts()
            if p["category"] in wanted and (split == "all" or p["split"] == split)]
