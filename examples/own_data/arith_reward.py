"""A reward function with TRL's signature, for ``--reward fn:examples/own_data/arith_reward.py:score``.

It scores the same thing as the built-in ``verify:math`` (1 when the reply's final answer equals the
row's ``answer`` column, else 0), written as a user would write their own: ``docs/rewards.md`` shows
that a run with it and a run with ``verify:math`` on the same rows and seed give the same result.
"""

from rlhfkit.data.verify import verify_math


def score(prompts, completions, answer, **kwargs):
    """One float per completion; ``completions`` are message lists for conversational rows."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [verify_math(text, a) for text, a in zip(texts, answer)]
