"""The built-in prompt collection: size, categories, the held-out split, and load_prompts' arguments."""

import re
from collections import Counter

import pytest

from rlhfkit.data.prompts import CATEGORIES, load_prompts


def test_size_ids_and_texts_are_unique():
    prompts = load_prompts("all")
    assert len(prompts) >= 320
    ids = [p["id"] for p in prompts]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"p\d{4}", i) for i in ids)
    # unique even after ignoring case, punctuation and spacing
    norm = [re.sub(r"[^a-z0-9]+", " ", p["prompt"].lower()).strip() for p in prompts]
    assert len(set(norm)) == len(norm)
    assert all(set(p) == {"id", "category", "prompt", "split"} for p in prompts)


def test_every_category_has_at_least_25_and_nothing_else():
    counts = Counter(p["category"] for p in load_prompts("all"))
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= 25, counts


def test_heldout_is_about_a_fifth_per_category_and_disjoint_from_train():
    train, held, everything = load_prompts("train"), load_prompts("heldout"), load_prompts("all")
    assert 0.15 <= len(held) / len(everything) <= 0.25
    assert {p["id"] for p in train}.isdisjoint({p["id"] for p in held})
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in held})
    assert len(train) + len(held) == len(everything)
    for cat in CATEGORIES:
        n_held, n_all = len(load_prompts("heldout", [cat])), len(load_prompts("all", [cat]))
        assert 0.15 <= n_held / n_all <= 0.25, cat


def test_prompts_are_short():
    """Answerable in ~50 words by a small model: at most two sentences, except summarize prompts,
    which quote a short passage."""
    for p in load_prompts("all"):
        words = len(p["prompt"].split())
        assert 3 <= words <= (70 if p["category"] == "summarize" else 30), p


def test_category_filter_and_bad_arguments():
    reviews = load_prompts("train", ["review"])
    assert reviews and all(p["category"] == "review" and p["split"] == "train" for p in reviews)
    with pytest.raises(ValueError, match=r"unknown prompt categories \['poetry'\]; choose from advice"):
        load_prompts("all", ["review", "poetry"])
    with pytest.raises(ValueError, match="split must be one of train, heldout, all, got 'test'"):
        load_prompts("test")
    with pytest.raises(TypeError, match=r"categories must be a list of names, e\.g\. \['review'\]"):
        load_prompts("train", "review")


def test_returned_dicts_are_copies():
    load_prompts("all")[0]["prompt"] = "changed"
    assert load_prompts("all")[0]["prompt"] != "changed"
