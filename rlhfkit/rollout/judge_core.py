"""The LM judge's scoring core: the judging prompts and the answer-token log-prob read-out.

A judge's verdict is read from the next-token log-probabilities of its answer labels right after the
question, not parsed from generated text: there is nothing to parse wrongly, and the log-odds
log p(first) - log p(second) is a graded preference (G-Eval, Liu et al. 2023, reads verdicts from
token probabilities the same way). Two users sit on different layers, so the core lives here, below
both: ``rlhfkit.feedback.judge`` labels pairs with :class:`LMJudge`, and the ``judge:`` reward
components (``rlhfkit.rollout.reward_components``) score rollouts with it (pairwise) or with
:func:`answer_logodds` (pointwise, Yes/No). The judged replies are model output: untrusted text that
is only ever placed in the prompt, never executed or parsed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def conversation_text(prompt: list[dict]) -> str:
    """The chat as the judge reads it: one ``Role: content`` line per message."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def single_token_ids(tok, word: str) -> list[int]:
    """Token ids of the single-token spellings of ``word`` ("A" and " A"); their probabilities are
    summed. Empty when the tokenizer has none (the caller says what to do)."""
    ids: list[int] = []
    for text in (word, " " + word):
        enc = tok(text, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


@torch.no_grad()
def answer_logodds(model, tok, texts: Sequence[str], first_ids: list[int], second_ids: list[int],
                   batch_size: int = 8) -> torch.Tensor:
    """(N,) log p(first) - log p(second) of the next token after each of ``texts`` (each already
    rendered up to the answer), summing the probabilities of each answer's token ids. Left-padded
    batches of ``batch_size`` with explicit position ids, so a row's result does not depend on its
    neighbours' lengths. On the CPU, float32."""
    out = []
    device = next(model.parameters()).device
    for s in range(0, len(texts), batch_size):
        enc = tok(list(texts[s:s + batch_size]), add_special_tokens=False, return_tensors="pt", padding=True)
        att = enc["attention_mask"].to(device)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=att, position_ids=pos,
                       use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (b, V)
        logp = logits.log_softmax(-1)
        out.append((logp[:, first_ids].logsumexp(-1) - logp[:, second_ids].logsumexp(-1)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


class LMJudge:
    """Pairwise: next-token log-odds of the first label over the second, from a causal chat LM.

    ``judge(items)`` with items ``(prompt messages, reply shown first, reply shown second)`` returns
    (N,) log p(first label) - log p(second label): > 0 prefers the reply shown first.
    """

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
        ids = single_token_ids(self.tok, label)
        if not ids:
            raise ValueError(f"the judge's tokenizer has no single token for the answer label {label!r}; "
                             "try labels='12'")
        return ids

    def render(self, prompt: list[dict], first: str, second: str) -> str:
        question = JUDGE_TEMPLATE.format(conversation=conversation_text(prompt), first=first, second=second,
                                         first_label=self.labels[0], second_label=self.labels[1])
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": question}]
        head = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + ANSWER_PREFIX

    def __call__(self, items: Sequence[tuple[list[dict], str, str]]) -> torch.Tensor:
        texts = [self.render(*it) for it in items]
        return answer_logodds(self.model, self.tok, texts, self.label_ids[0], self.label_ids[1], self.batch_size)
