"""DPO's data: preference pairs (and KTO's unpaired examples) read, validated and tokenized into
``Example`` rows, the unit that ``rlhfkit.train.dpo`` packs, scores and trains on."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
from rlhfkit.data.formats import to_conversation, to_preference
from rlhfkit.data.io import read_rows
from rlhfkit.data.records import DataError, Where

if TYPE_CHECKING:
    from rlhfkit.train.dpo import DPOConfig


@dataclass
class Example:
    """Token ids of one training example: two completions of one prompt.

    Pairwise losses: ``first`` = chosen, ``second`` = rejected. KTO: ``first`` = the labelled completion,
    ``second`` = a completion of *another* prompt, paired with this prompt to estimate KTO's reference
    point z0 (a fixed derangement chosen at load time, so its reference log-prob can be cached).
    """

    prompt_ids: list[int]
    first_ids: list[int]
    second_ids: list[int]
    tie: bool = False
    strength: float = 1.0
    desirable: bool = True
    where: str = ""

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.first_ids) + len(self.second_ids)


def _prompt(tok, prompt: list[dict], where: Where, cfg: DPOConfig, counts: dict) -> list[int] | None:
    try:
        return tokenize_prompt(tok, prompt, cfg.max_prompt_length, where)
    except DataError:
        if cfg.long_prompts == "error":
            raise
        counts["long_prompts"] += 1
        return None


def load_pair_examples(source: str, tok, cfg: DPOConfig, counts: dict) -> list[Example]:
    """Tokenized preference pairs from ``source``; ties dropped unless ``cfg.ties == 'half'``."""
    out, same = [], 0
    for where, row in read_rows(source):
        rec = to_preference(row, where, cfg.data_format)
        if rec.tie and cfg.ties == "skip":
            counts["ties_skipped"] += 1
            continue
        same += rec.chosen["content"] == rec.rejected["content"] and not rec.tie
        if (prompt := _prompt(tok, rec.prompt, where, cfg, counts)) is None:
            continue
        out.append(Example(
            prompt, tokenize_completion(tok, rec.prompt, rec.chosen["content"], cfg.max_completion_length),
            tokenize_completion(tok, rec.prompt, rec.rejected["content"], cfg.max_completion_length),
            tie=rec.tie, strength=1.0 if rec.strength is None else float(rec.strength),
            where=f"{where.path}:{where.line}"))
    if same:
        warnings.warn(f"{source}: {same} pairs have identical chosen and rejected replies (they carry no signal); "
                      "remove them or mark them tie", stacklevel=2)
    return out


def load_kto_examples(source: str, tok, cfg: DPOConfig, counts: dict) -> list[Example]:
    """Unpaired examples for KTO: rows ``{prompt, completion, label}`` (label true = desirable; a
    ``label`` column or ``metadata.label``), and preference rows, each split into a desirable chosen and
    an undesirable rejected example (ties skipped). ``second_ids`` is a derangement of completions."""
    rows = []  # (prompt ids, prompt messages, completion text, desirable, where)
    for where, row in read_rows(source):
        if isinstance(row, dict) and "chosen" in row and "rejected" in row:
            rec = to_preference(row, where, cfg.data_format)
            if rec.tie:
                counts["ties_skipped"] += 1
            elif (prompt := _prompt(tok, rec.prompt, where, cfg, counts)) is not None:
                rows += [(prompt, rec.prompt, rec.chosen["content"], True, where),
                         (prompt, rec.prompt, rec.rejected["content"], False, where)]
            continue
        conv = to_conversation(row, where)
        field = "label" if isinstance(row, dict) and "label" in row else "metadata.label"
        if "label" not in conv.metadata:
            raise where.error("missing: loss=kto needs a true/false label per unpaired example (a 'label' column or "
                              "metadata.label), or chosen/rejected pairs", "label")
        if not isinstance(conv.metadata["label"], bool):
            raise where.error(f"must be true or false, got {conv.metadata['label']!r}", field)
        *prompt_msgs, reply = conv.messages
        if reply["role"] != "assistant" or not prompt_msgs:
            raise where.error("an unpaired KTO example is a prompt followed by one assistant reply", "completion")
        if (prompt := _prompt(tok, prompt_msgs, where, cfg, counts)) is not None:
            rows.append((prompt, prompt_msgs, reply["content"], conv.metadata["label"], where))
    # z0's mismatched pairs: each example borrows the completion of the next example with a different
    # prompt in a seeded permutation (fixed at load time, so its reference log-prob is cached too)
    order = np.random.default_rng(cfg.seed).permutation(len(rows)).tolist()
    partner = {}
    for k, i in enumerate(order):
        later = (order[(k + s) % len(order)] for s in range(1, len(order)))
        partner[i] = next((j for j in later if rows[j][0] != rows[i][0]), None)
        if partner[i] is None:
            raise DataError("loss=kto needs at least two different prompts: its reference point z0 pairs "
                            "completions with other prompts", path=source)
    out = []
    for i, (prompt_ids, msgs, text, desirable, where) in enumerate(rows):
        out.append(Example(prompt_ids, tokenize_completion(tok, msgs, text, cfg.max_completion_length),
                           tokenize_completion(tok, msgs, rows[partner[i]][2], cfg.max_completion_length),
                           desirable=desirable, where=f"{where.path}:{where.line}"))
    return out


def load_examples(source: str, tok, cfg: DPOConfig) -> tuple[list[Example], dict]:
    """The training examples of ``cfg.loss`` from ``source`` (pairs, or KTO's unpaired examples) and
    the counts of what was skipped (ties, long prompts)."""
    counts = {"ties_skipped": 0, "long_prompts": 0}
    examples = (load_kto_examples if cfg.loss == "kto" else load_pair_examples)(source, tok, cfg, counts)
    if not examples:
        raise ValueError(f"{source}: no usable examples ({counts['ties_skipped']} ties skipped, "
                         f"{counts['long_prompts']} prompts over max_prompt_length skipped)")
    return examples, counts
