"""Built-in tasks: the built-in prompts plus a hidden *gold* reward that code computes.

A task stands in for the human whose preferences RLHF tries to learn (AlpacaFarm's simulated
annotators; Gao et al. 2022's "gold" reward model): the simulated labeler draws preferences from
the gold score, a reward model is trained on those labels, and the policy's gold score shows whether
optimising the learned reward improved the thing that was wanted (or only the proxy).

Every ``gold`` is deterministic, cheap (no model calls) and lies in [0, 1]. docs/tasks.md lists
the bundled model's measured starting score for each task (``rlhfkit tasks --measure``, which
samples a model: ``rlhfkit.evaluate.gold.measure``).
"""

from __future__ import annotations

import functools
import random
import re
import zlib

from rlhfkit.data import verify
from rlhfkit.data.prompts import load_prompts

_WORD = re.compile(r"[A-Za-z0-9']+")

# Function words and instruction verbs that say nothing about a prompt's topic; a reply is not
# credited for repeating them (the `concise` task's keyword coverage and the `avoid` constraint).
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having
he her here hers him his how i if in into is it its itself just me more most my no nor not now of off on
once only or other our out over own same she should so some such than that the their them then there these
they this those through to too under until up very was we were what when where which while who whom why
will with would you your yours yourself give write tell explain describe suggest list share make get
short brief briefly small some few one two three four five sentence sentences words reply answer please
think view opinion summary summarize help want need like
""".split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes)."""
    return [w.lower().strip("'") for w in _WORD.findall(text) if w.strip("'")]


def stem(word: str) -> str:
    """A crude suffix stripper so 'gardens'/'gardening'/'garden' match; deterministic, no lexicon."""
    for suffix in ("ing", "ies", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def content_words(text: str) -> list[str]:
    """Distinct stems of the words of ``text`` that carry its topic, in order of first appearance."""
    seen: dict[str, None] = {}
    for w in words(text):
        if len(w) >= 3 and w not in STOPWORDS and not w.isdigit():
            seen.setdefault(stem(w), None)
    return list(seen)


class Task:
    """A prompt set plus a gold reward. Subclasses set ``name``, ``description``, ``categories``
    and implement ``_gold_one``; ``_prompt_text`` may rewrite a built-in prompt (e.g. add constraints)."""

    name: str = ""
    description: str = ""
    categories: tuple[str, ...] | None = None
    """Built-in prompt categories the task draws on (None: all ten)."""

    def prompt_rows(self, split: str = "train") -> list[dict]:
        """``{"id", "category", "messages"}`` for each of the task's prompts in ``split``."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        return [{"id": f"{self.name}/{r['id']}", "category": r["category"],
                 "messages": [{"role": "user", "content": self._prompt_text(r)}]}
                for r in load_prompts(split, self.categories)]

    def prompts(self, split: str = "train") -> list[list[dict]]:
        """Chat prompts (each a one-message list ending with the user turn) from the built-in collection."""
        return [r["messages"] for r in self.prompt_rows(split)]

    def gold(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        """Gold score of each completion to its prompt (the prompt's last user message is read)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [float(self._gold_one(_last_user(p), c)) for p, c in zip(prompts, completions)]

    def _prompt_text(self, row: dict) -> str:
        return row["prompt"]

    def _gold_one(self, prompt: str, completion: str) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


def _last_user(prompt: list[dict]) -> str:
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict):
        raise ValueError(f"a prompt must be a non-empty list of chat messages, got {prompt!r:.80}")
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("the prompt has no user message")
    return users[-1]


# --- sentiment --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class SentimentTask(Task):
    """Positive sentiment, by VADER (Hutto & Gilbert 2014), on prompts that invite a judgement.

    VADER's ``compound`` score of a whole text saturates towards ±1 as it grows (it normalises the
    summed valence by x/sqrt(x² + 15)), so most multi-sentence replies would score near 1 and leave
    nothing to learn. The gold is therefore the *mean of the per-sentence compound scores*, mapped from
    [-1, 1] to [0, 1]: every sentence has to be positive for a high score, and neutral sentences pull
    it towards 0.5.
    """

    name = "sentiment"
    description = ("positive sentiment: mean VADER compound score of the reply's sentences, mapped to [0, 1] "
                   "(reviews, opinions, messages, advice, stories)")
    categories = ("review", "opinion", "message", "advice", "creative", "howto", "explanation")

    def _gold_one(self, prompt: str, completion: str) -> float:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", completion) if words(s)]
        if not sentences:
            return 0.5  # no words: neutral
        compound = sum(_vader().polarity_scores(s)["compound"] for s in sentences) / len(sentences)
        return (compound + 1) / 2


# --- concise --------------------------------------------------------------------------------------


class ConciseTask(Task):
    """Short *and* on-topic: half length window, half keyword coverage.

    ``length``: 1 for ``min_words <= n <= max_words`` words, falling linearly to 0 at 0 words and at
    ``2 * max_words``. ``coverage``: the fraction of the prompt's content words (stems, stop words
    removed; at most ``max_keywords`` counted, so a long passage to summarise is not hopeless) that
    the reply uses. Length alone is easy to hack (reply "Yes."); coverage alone rewards rambling.
    """

    name = "concise"
    description = ("concise and on-topic: 0.5 x [reply of 8-25 words] + 0.5 x [coverage of the prompt's "
                   "content words]")
    min_words = 8
    max_words = 25
    max_keywords = 6

    def _gold_one(self, prompt: str, completion: str) -> float:
        return 0.5 * self.length_score(len(words(completion))) + 0.5 * self.coverage(prompt, completion)

    def length_score(self, n: int) -> float:
        if n < self.min_words:
            return n / self.min_words
        if n <= self.max_words:
            return 1.0
        return max(0.0, 1.0 - (n - self.max_words) / self.max_words)

    def coverage(self, prompt: str, completion: str) -> float:
        keys = content_words(prompt)
        if not keys:
            return 1.0
        used = {stem(w) for w in words(completion)}
        return min(1.0, sum(k in used for k in keys) / min(len(keys), self.max_keywords))


# --- constraints ----------------------------------------------------------------------------------

# Words to include: concrete, easy to fit into any reply, and rare in a reply that was not asked for them.
INCLUDE_WORDS = ("sunshine", "lantern", "compass", "garden", "ocean", "bridge", "river", "window", "music",
                 "coffee", "morning", "mountain", "friend", "journey", "kitchen", "library")
_CONSTRAINTS = {
    "include": re.compile(r'Include the word "([^"]+)"\.'),
    "bullets": re.compile(r"Use exactly (\d+) bullet points \(lines starting with \"- \"\)\."),
    "avoid": re.compile(r'Do not use the word "([^"]+)"\.'),
    "question": re.compile(r"End your reply with a question\."),
}
_BULLET = re.compile(r"^\s*[-*\u2022]\s+\S", re.M)


class ConstraintsTask(Task):
    """Instruction following checked by code (IFEval-style verifiable instructions).

    Each prompt gets two constraints, chosen from the prompt id by a hash, appended to the prompt
    text as fixed sentences; ``gold`` reads them back from the prompt with regular expressions (so
    it scores any prompt written in the same phrasing) and returns the mean of the checks:

    - ``Include the word "W".`` 1 if W (or W + s) occurs as a word.
    - ``Use exactly N bullet points (lines starting with "- ").`` 1 - |count - N| / N, floored at 0
      (lines starting with -, * or • count).
    - ``Do not use the word "W".`` 1 if W does not occur; W is a content word of the prompt itself.
    - ``End your reply with a question.`` 1 if the reply ends with '?', 0.5 if it asks one elsewhere.
    """

    name = "constraints"
    description = ("verifiable instructions appended to the prompt (include a word, exactly N bullets, avoid a "
                   "word, end with a question); gold = fraction satisfied")

    def _prompt_text(self, row: dict) -> str:
        return row["prompt"] + "\n\n" + " ".join(self.constraints_for(row["id"], row["prompt"]))

    @staticmethod
    def constraints_for(prompt_id: str, prompt: str) -> list[str]:
        h = zlib.crc32(prompt_id.encode())
        kinds = ["include", "bullets", "avoid", "question"]
        first = kinds[h % 4]
        second = [k for k in kinds if k != first][(h >> 2) % 3]
        out = []
        for kind in sorted((first, second), key=kinds.index):
            if kind == "include":
                out.append(f'Include the word "{INCLUDE_WORDS[(h >> 4) % len(INCLUDE_WORDS)]}".')
            elif kind == "bullets":
                out.append(f'Use exactly {2 + (h >> 8) % 3} bullet points (lines starting with "- ").')
            elif kind == "avoid":
                candidates = [w for w in words(prompt) if len(w) >= 4 and w not in STOPWORDS] or ["very"]
                out.append(f'Do not use the word "{candidates[(h >> 10) % len(candidates)]}".')
            else:
                out.append("End your reply with a question.")
        return out

    def _gold_one(self, prompt: str, completion: str) -> float:
        checks = self.check(prompt, completion)
        if not checks:
            raise ValueError(f"no constraints found in the prompt {prompt[-120:]!r}; the constraints task reads "
                             "sentences such as 'Include the word \"ocean\".' from the prompt's last user message")
        return sum(checks.values()) / len(checks)

    @staticmethod
    def check(prompt: str, completion: str) -> dict[str, float]:
        """Each constraint found in ``prompt`` -> its score in [0, 1] for ``completion``."""
        out: dict[str, float] = {}
        used = set(words(completion))
        for m in _CONSTRAINTS["include"].finditer(prompt):
            w = m.group(1).lower()
            out[f"include:{w}"] = float(w in used or w + "s" in used)
        for m in _CONSTRAINTS["bullets"].finditer(prompt):
            n = int(m.group(1))
            out[f"bullets:{n}"] = max(0.0, 1.0 - abs(len(_BULLET.findall(completion)) - n) / n)
        for m in _CONSTRAINTS["avoid"].finditer(prompt):
            w = m.group(1).lower()
            out[f"avoid:{w}"] = float(w not in used and w + "s" not in used)
        if _CONSTRAINTS["question"].search(prompt):
            text = completion.strip()
            out["question"] = 1.0 if text.endswith("?") else 0.5 if "?" in text else 0.0
        return out


# --- arith ----------------------------------------------------------------------------------------

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kai", "Lena")
_ITEMS = ("apples", "books", "marbles", "stickers", "pencils", "coins", "cards", "shells", "stamps", "cookies")


def _arith_problem(rng: random.Random, hi: int) -> tuple[str, str, int]:
    """One problem with operands up to ``hi``: (kind, question, exact integer answer)."""
    kind = rng.choice(("add", "sub", "mul", "word_add", "word_sub", "word_mul"))
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    if kind in ("sub", "word_sub") and b > a:
        a, b = b, a
    if kind in ("mul", "word_mul"):
        b = rng.randint(2, 9)  # one small factor: multiplication is harder than + and - at the same size
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    question = {
        "add": f"What is {a} + {b}?",
        "sub": f"What is {a} - {b}?",
        "mul": f"What is {a} x {b}?",
        "word_add": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "word_sub": f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
        "word_mul": f"{name} has {b} bags with {a} {item} in each bag. How many {item} does {name} have in all?",
    }[kind]
    answer = a + b if kind in ("add", "word_add") else a - b if kind in ("sub", "word_sub") else a * b
    return kind, question, answer


class ArithTask(Task):
    """Verifiable arithmetic: generated sums, differences, products and one-step word problems with exact
    integer answers; gold = ``rlhfkit.data.verify.verify_math`` of the reply against the answer (1 or 0).

    Deterministic: problem i of a split comes from ``random.Random(f"arith/{seed}/{i}")`` (string
    seeds hash the same in every process, unlike ``hash()``), and a problem belongs to the held-out
    split when the crc32 of its question is divisible by 5, so the splits are disjoint by construction
    (no question text is in both) and stay so whatever the sizes. Each row carries its ``answer``
    column (what ``verify:math`` reads); ``gold`` finds the answer from the question text, so the task's
    own prompts need nothing else. ``max_operand`` sets the difficulty: the bundled model's starting
    accuracy at the chosen value is in docs/tasks.md.
    """

    name = "arith"
    description = ("arithmetic and one-step word problems (+, -, x; operands up to {hi}); gold = verify:math "
                   "of the final answer against the exact answer (1 or 0)")
    max_operand = 20
    train_size = 2000
    heldout_size = 200
    seed = 0
    instruction = "Reply with the final answer in the form: The answer is N."

    def __init__(self):
        self.description = self.description.format(hi=self.max_operand)

    @functools.cached_property
    def _splits(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {"train": [], "heldout": []}
        seen: set[str] = set()
        i = 0
        while len(out["train"]) < self.train_size or len(out["heldout"]) < self.heldout_size:
            kind, question, answer = _arith_problem(random.Random(f"arith/{self.seed}/{i}"), self.max_operand)
            i += 1
            if question in seen:
                continue
            seen.add(question)
            split = "heldout" if zlib.crc32(question.encode()) % 5 == 0 else "train"
            rows = out[split]
            if len(rows) < (self.train_size if split == "train" else self.heldout_size):
                rows.append({"id": f"arith/{split}-{len(rows)}", "category": kind, "question": question,
                             "answer": str(answer), "messages": [{"role": "user",
                                                                   "content": f"{question} {self.instruction}"}]})
        return out

    @functools.cached_property
    def _answers(self) -> dict[str, str]:
        return {r["messages"][0]["content"]: r["answer"] for rows in self._splits.values() for r in rows}

    def prompt_rows(self, split: str = "train") -> list[dict]:
        """``{"id", "category", "messages", "answer"}`` per problem (``question``: the bare question)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        return [dict(r) for r in self._splits[split]]

    def answer(self, prompt: str) -> str:
        """The exact answer of one of this task's prompts (the last user message's text)."""
        if prompt not in self._answers:
            raise ValueError(f"not an arith prompt: {prompt[:120]!r}; the arith gold scores this task's own prompts "
                             "(for your own problems use --prompts FILE with an 'answer' column and --reward verify:math)")
        return self._answers[prompt]

    def _gold_one(self, prompt: str, completion: str) -> float:
        return verify.verify_math(completion, self.answer(prompt))


TASKS: dict[str, Task] = {t.name: t for t in (SentimentTask(), ConciseTask(), ConstraintsTask(), ArithTask())}


def get_task(name: str) -> Task:
    """The built-in task called ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]
