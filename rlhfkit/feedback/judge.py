"""An LM judge: a pairwise judging prompt to any chat model, asked in both orders.

The verdict is read from the next-token log-probabilities of the two answer labels ("A"/"B" or
"1"/"2") right after the question, not parsed from generated text: there is nothing to parse
wrongly, and the log-odds log p(A) - log p(B) is a graded preference (G-Eval, Liu et al. 2023, reads
verdicts from token probabilities the same way). LM judges favour a position (Zheng et al. 2023,
"Judging LLM-as-a-judge", §3.3: position bias); asking with the replies swapped and keeping only
verdicts that survive the swap cancels it. When the two orders disagree the pair is a tie, and the
fraction of such pairs is reported as the judge's position-bias rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from rlhfkit.data.records import ComparisonPair, PreferenceRecord
from rlhfkit.models.loading import load_model

JUDGE_SYSTEM = "You are a fair and careful judge of replies written by AI assistants."
JUDGE_TEMPLATE = """Read the conversation and the two replies to it, then say which reply is better: more helpful, \
more accurate, and better at following the user's instructions.

[Conversation]
{conversation}

[Reply {first_label}]
{first}

[Reply {second_label}]
{second}

Which reply is better, {first_label} or {second_label}? Answer with the label only."""
# Continued after the assistant turn opens, so the very next token is the label.
ANSWER_PREFIX = "The better reply is Reply"
LABEL_SETS = {"AB": ("A", "B"), "12": ("1", "2")}

# items: (prompt messages, reply shown first, reply shown second) -> (N,) log p(first) - log p(second)
Scorer = Callable[[Sequence[tuple[list[dict], str, str]]], torch.Tensor]


class LMJudge:
    """Next-token log-odds of the first label over the second, from a causal chat LM."""

    def __init__(self, model, tokenizer, labels: str = "AB", batch_size: int = 8):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the judge model's tokenizer ({tokenizer.name_or_path}) has no chat template; the judge "
                             "asks a chat question. Use a chat/instruct model as the judge (default: the bundled "
                             "smollm2-135m-instruct)")
        if labels not in LABEL_SETS:
            raise ValueError(f"labels must be one of {', '.join(LABEL_SETS)}, got {labels!r}")
        self.model, self.tok, self.labels, self.batch_size = model, tokenizer, LABEL_SETS[labels], batch_size
        self.label_ids = [self._variants(lab) for lab in self.labels]

    @classmethod
    def from_name(cls, name: str, labels: str = "AB", batch_size: int = 8) -> LMJudge:
        try:
            model, tok = load_model(name)
        except ValueError as e:
            if "chat template" in str(e):
                raise ValueError(f"judge model '{name}' has no chat template; the judge asks a chat question. Use a "
                                 "chat/instruct model as the judge (default: the bundled smollm2-135m-instruct)") from e
            raise
        model.eval()
        return cls(model, tok, labels, batch_size)

    def _variants(self, label: str) -> list[int]:
        """Single-token spellings of a label ("A" and " A"); their probabilities are summed."""
        ids = []
        for text in (label, " " + label):
            enc = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise ValueError(f"the judge's tokenizer has no single token for the answer label {label!r}; "
                             "try labels='12'")
        return ids

    def render(self, prompt: list[dict], first: str, second: str) -> str:
        conversation = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
        question = JUDGE_TEMPLATE.format(conversation=conversation, first=first, second=second,
                                         first_label=self.labels[0], second_label=self.labels[1])
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": question}]
        head = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + ANSWER_PREFIX

    @torch.no_grad()
    def __call__(self, items: Sequence[tuple[list[dict], str, str]]) -> torch.Tensor:
        out = []
        device = next(self.model.parameters()).device
        for s in range(0, len(items), self.batch_size):
            texts = [self.render(*it) for it in items[s:s + self.batch_size]]
            enc = self.tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)  # left padding
            att = enc["attention_mask"].to(device)
            pos = (att.cumsum(1) - 1).clamp(min=0)
            logits = self.model(input_ids=enc["input_ids"].to(device), attention_mask=att, position_ids=pos,
                                use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (b, V)
            logp = logits.log_softmax(-1)
            first = logp[:, self.label_ids[0]].logsumexp(-1)
            second = logp[:, self.label_ids[1]].logsumexp(-1)
            out.append((first - second).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def judge_pairs(pairs: list[ComparisonPair], scorer: Scorer, annotator_id: str = "judge") -> list[PreferenceRecord]:
    """Label each pair by asking ``scorer`` with a shown first, then with b shown first.

    With s_ab = log-odds of the first position when a is first and s_ba the same when b is first:
    order 1 votes a iff s_ab > 0, order 2 votes a iff s_ba < 0. Both agree → that side wins; they
    disagree → tie (the verdict followed the position, not the reply). ``p_a`` = ½[σ(s_ab) + σ(-s_ba)].
    """
    items = [(p.prompt, p.a["content"], p.b["content"]) for p in pairs]
    items += [(p.prompt, p.b["content"], p.a["content"]) for p in pairs]
    s = scorer(items)
    if s.shape != (2 * len(pairs),):
        raise ValueError(f"the scorer returned shape {tuple(s.shape)} for {2 * len(pairs)} questions")
    s_ab, s_ba = s[:len(pairs)].tolist(), s[len(pairs):].tolist()
    out = []
    for p, x, y in zip(pairs, s_ab, s_ba):
        vote1, vote2 = ("a" if x > 0 else "b"), ("a" if y < 0 else "b")
        winner = vote1 if vote1 == vote2 else "tie"
        p_a = 0.5 * (_sigmoid(x) + _sigmoid(-y))
        out.append(p.label(winner, source="judge", annotator_id=annotator_id, metadata={
            "judge_logodds_ab": x, "judge_logodds_ba": y, "p_a": p_a, "position_consistent": vote1 == vote2,
            "first_position_votes": int(x > 0) + int(y > 0),
        }))
    return out


def judge_prefs(scorer: Scorer, prompts: list[list[dict]], a: list[str], b: list[str]) -> list[float]:
    """Per-prompt preference for ``a[i]`` over ``b[i]``: 1, 0, or 0.5 for a tie (the two orders disagreed).
    Identical or empty replies leave nothing to judge and count as ties without asking."""
    prefs = [0.5] * len(prompts)
    pairs = [ComparisonPair(id=str(i), prompt=p, a={"role": "assistant", "content": x},
                            b={"role": "assistant", "content": y})
             for i, (p, x, y) in enumerate(zip(prompts, a, b)) if x != y and x.strip() and y.strip()]
    for pair, rec in zip(pairs, judge_pairs(pairs, scorer)):
        prefs[int(pair.id)] = 0.5 if rec.tie else 1.0 if rec.chosen["content"] == pair.a["content"] else 0.0
    return prefs


def position_stats(records: list[PreferenceRecord]) -> dict:
    """Position-bias rate (fraction of pairs whose verdict flipped with the order) and the fraction of
    single verdicts that chose whichever reply was shown first (0.5 = no preference for a position)."""
    n = len(records)
    if n == 0:
        return {"position_bias_rate": None, "first_position_rate": None}
    inconsistent = sum(not r.metadata["position_consistent"] for r in records)
    first = sum(r.metadata["first_position_votes"] for r in records)
    return {"position_bias_rate": inconsistent / n, "first_position_rate": first / (2 * n)}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 700.0), -700.0)))
