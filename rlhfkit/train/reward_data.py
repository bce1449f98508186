"""The reward model's data: preference records read and checked, split by prompt, tokenized into
``EncodedPair`` rows, and packed into ``Unit`` rows (a prompt with its distinct replies) that
``rlhfkit.train.reward`` scores in one forward pass.

Layout: one row per prompt, ``[prompt ; reply 1 ; ... ; reply n]``, with a mask that hides the replies
from each other (:func:`rlhfkit.models.batching.pack_groups`): the prompt is computed once, and a reply
that appears in several pairs (K samples per prompt give C(K, 2) pairs) is computed once (InstructGPT
§3.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
from rlhfkit.data.formats import to_pair, to_preference
from rlhfkit.data.io import read_rows
from rlhfkit.data.records import PreferenceRecord, Where
from rlhfkit.models.batching import pack_groups
from rlhfkit.train.offline import split_off_eval


def prompt_key(prompt: list[dict]) -> str:
    """The prompt as canonical JSON: records with the same key share a prompt (and maybe replies)."""
    return json.dumps(prompt, sort_keys=True)


def read_preferences(source: str) -> list[tuple[Where, PreferenceRecord]]:
    """Preference records with where each came from (``data.io.load_preferences`` without the check
    and the places); a pair whose two replies are the same text is an error (it teaches nothing, and
    usually means a broken export)."""
    out = []
    for where, row in read_rows(source):
        rec = to_preference(row, where)
        if rec.chosen["content"] == rec.rejected["content"]:
            raise where.error("chosen and rejected are the same text; a comparison needs two different replies",
                              "rejected")
        out.append((where, rec))
    if not out:
        raise ValueError(f"{source}: no preference records")
    return out


def split_by_prompt(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded ``fraction`` of distinct prompts, with all their pairs, goes to eval, so
    held-out accuracy is on unseen prompts (pairs of one prompt share replies: a pair-level split leaks)."""
    keys = sorted({prompt_key(r.prompt) for _, r in records})
    _, held = split_off_eval(keys, fraction, seed, rounding=round)
    held_keys = set(held)
    train = [x for x in records if prompt_key(x[1].prompt) not in held_keys]
    evals = [x for x in records if prompt_key(x[1].prompt) in held_keys]
    return train, evals


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    tie: bool
    margin: float
    record: PreferenceRecord
    prompt_key: str
    """The prompt as canonical JSON: pairs with the same key share a prompt (and maybe replies)."""


def encode(records: list[tuple[Where, PreferenceRecord]], tok, max_length: int, margin_scale: float,
           ties: str) -> tuple[list[EncodedPair], int]:
    """Token ids per pair (prompt once, both replies ending with EOS); returns (pairs, replies cut)."""
    out, cut = [], 0
    prompt_cache: dict[str, list[int]] = {}
    for where, rec in records:
        if rec.tie and ties == "drop":
            continue
        key = prompt_key(rec.prompt)
        if key not in prompt_cache:
            prompt_cache[key] = tokenize_prompt(tok, rec.prompt, max_length - 1, where or Where())
        p = prompt_cache[key]
        reply = []
        for side in (rec.chosen, rec.rejected):
            ids = tokenize_completion(tok, rec.prompt, side["content"])
            if len(p) + len(ids) > max_length:
                ids, cut = ids[:max_length - len(p)], cut + 1
            reply.append(ids)
        margin = margin_scale * rec.strength if (rec.strength is not None and not rec.tie) else 0.0
        out.append(EncodedPair(p, reply[0], reply[1], rec.tie, margin, rec, key))
    return out, cut


@dataclass
class Unit:
    """One packed row: a prompt, its distinct replies, and the pairs (index of chosen, of rejected) among them."""

    prompt_ids: list[int]
    replies: list[list[int]]
    pairs: list[tuple[int, int]]
    ties: list[bool]
    margins: list[float]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.replies)


def make_units(pairs: list[EncodedPair], share: bool = True) -> list[Unit]:
    """Pairs → rows. ``share``: pairs of one prompt share a row and every distinct reply appears once
    in it; else one row [prompt ; chosen ; rejected] per pair."""
    units: dict = {}
    for n, p in enumerate(pairs):
        u = units.setdefault(p.prompt_key if share else n, (Unit(p.prompt_ids, [], [], [], []), {}))
        unit, index = u
        ids = []
        for reply in (p.chosen_ids, p.rejected_ids):
            key = tuple(reply)
            if key not in index or not share:
                index[key] = len(unit.replies)
                unit.replies.append(reply)
            ids.append(index[key])
        unit.pairs.append((ids[0], ids[1]))
        unit.ties.append(p.tie)
        unit.margins.append(p.margin)
    return [u for u, _ in units.values()]


def micro_batches(units: list[Unit], micro_batch_size: int) -> list[list[Unit]]:
    """Rows sorted by length (less padding), cut into micro-batches of at most ``micro_batch_size``
    pairs; a row is never split, so a prompt with more pairs than that is a micro-batch of its own.
    The optimizer step sums over the whole local batch, so how rows are grouped does not change it."""
    out: list[list[Unit]] = []
    n = 0
    for u in sorted(units, key=lambda u: u.length):
        if out and n + len(u.pairs) <= micro_batch_size:
            out[-1].append(u)
            n += len(u.pairs)
        else:
            out.append([u])
            n = len(u.pairs)
    return out


def collate(units: list[Unit], pad_id: int, device) -> dict:
    """``pack_groups``'s rows, ``reply_start`` (R, N: each reply's first column, for the "mean"
    read-out; its last is ``read_at``) and, per pair, its row, the columns of its chosen and rejected
    reply, its tie flag and margin (all (m,) for m pairs)."""
    b = pack_groups([u.prompt_ids for u in units], [u.replies for u in units], pad_id)
    lengths = torch.zeros_like(b["read_at"])
    for r, u in enumerate(units):
        lengths[r, :len(u.replies)] = torch.tensor([len(x) for x in u.replies])
    b["reply_start"] = (b["read_at"] - lengths + 1).clamp(min=0)
    rows = [r for r, u in enumerate(units) for _ in u.pairs]
    b["pair_row"] = torch.tensor(rows, dtype=torch.long)
    b["pair_chosen"] = torch.tensor([c for u in units for c, _ in u.pairs], dtype=torch.long)
    b["pair_rejected"] = torch.tensor([r for u in units for _, r in u.pairs], dtype=torch.long)
    b["tie_mask"] = torch.tensor([t for u in units for t in u.ties], dtype=torch.bool)
    b["margin"] = torch.tensor([m for u in units for m in u.margins], dtype=torch.float32)
    b["num_pairs"] = len(rows)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def normalisation_set(norm_data: str | None, train_records: list, norm_samples: int, seed: int
                      ) -> tuple[list[list[dict]], list[str]]:
    """Distinct (prompt, completion) pairs of the starting policy, a seeded subset of ``norm_samples``:
    from ``norm_data`` (a pairs or preference file), else both sides of the training records."""
    if norm_data:
        rows = []
        for where, row in read_rows(norm_data):
            if "a" in row and "b" in row:
                pr = to_pair(row, where)
                rows += [(pr.prompt, pr.a["content"]), (pr.prompt, pr.b["content"])]
            else:
                rec = to_preference(row, where)
                rows += [(rec.prompt, rec.chosen["content"]), (rec.prompt, rec.rejected["content"])]
    else:
        rows = [(r.prompt, side["content"]) for _, r in train_records for side in (r.chosen, r.rejected)]
    uniq = list({(prompt_key(p), c): (p, c) for p, c in rows}.values())
    if len(uniq) > norm_samples:
        keep = np.random.default_rng(seed).choice(len(uniq), norm_samples, replace=False)
        uniq = [uniq[i] for i in sorted(keep.tolist())]
    return [p for p, _ in uniq], [c for _, c in uniq]
