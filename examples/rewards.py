"""Example reward functions for `instruct ppo --reward-fn examples/rewards.py:NAME`.

A reward function is called once per rollout batch as `NAME(prompts, responses)` and returns one float per
response. `prompts` are message lists (`[{"role": "user", "content": "..."}]`), `responses` the decoded
answers. Use one instead of a reward model when the task has a checkable answer or a rule (a format, a
length, a test that passes), or add it to the reward model's score with `--reward-fn-weight`.
"""

import re

# The filler the example data's padded answers wrap around the answer (examples/make_data.py)
FILLER = re.compile(
    r"great question|happy to help|glad to explain|wonderful|let me help|thank you for asking|thanks again"
    r"|of course|i love this question|i hope (this|that)|let me know|feel free to ask|anything else",
    re.IGNORECASE,
)


def brevity(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """1.0 for an answer of one word, 0.25 less for each further word: a plain length preference."""
    return [1.0 - 0.25 * (max(len(response.split()), 1) - 1) for response in responses]


def concise(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """The example data's preference as a rule: -1 for each filler phrase, -0.02 per word beyond 20, and
    -1 for an empty answer. A concise, plain answer scores 0."""
    rewards = []
    for response in responses:
        words = len(response.split())
        penalty = len(FILLER.findall(response)) + 0.02 * max(words - 20, 0) + (1.0 if words == 0 else 0.0)
        rewards.append(-penalty)
    return rewards
