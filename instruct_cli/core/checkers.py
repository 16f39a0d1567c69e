"""Ready-made reward functions that check an answer by rule, with TRL's signature
`NAME(prompts, completions, **columns)`, and the table of them (`--reward-fn final_number`).

Each returns 1.0 for a right answer, 0.0 for a wrong one and None for a sample it cannot judge (its data row
has no answer): TRL's convention, so they also run unchanged in TRL. Maths answers are compared by
`math-verify` (the `math` extra), not by code of our own; nothing here runs model-written code.
May use: nothing.
"""

from __future__ import annotations

import re
from typing import Callable

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
"""A number as answers write it: 1,234 or -3.5 (the commas are dropped before comparing)."""


def _text(completion) -> str:
    """A completion's text: TRL passes chat completions as [{"role": "assistant", "content": text}]."""
    if isinstance(completion, list):
        return " ".join(str(message.get("content", "")) for message in completion)
    return str(completion)


def number_in(text: str, last: bool = True) -> float | None:
    """The last (or first) number written in `text`, as a float; None when there is none."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float((found[-1] if last else found[0]).replace(",", ""))
    except ValueError:
        return None


def expected_number(answer) -> float | None:
    """The number an `answer` column holds: a number itself, GSM8K's "... #### 42", or the last number in it."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        return float(answer)
    text = str(answer)
    return number_in(text.split("####")[-1], last=False) if "####" in text else number_in(text)


def final_number(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the last number of the completion equals the row's `answer` (GSM8K's `#### 42` form, a number,
    or text ending in one), 0.0 when it differs or there is none, None when the row has no answer."""
    answers = answer if answer is not None else [None] * len(completions)
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answers):
        target = expected_number(expected)
        if target is None:
            rewards.append(None)
            continue
        got = number_in(_text(completion))
        rewards.append(1.0 if got is not None and abs(got - target) < 1e-9 * max(1.0, abs(target)) else 0.0)
    return rewards


def answer_in_tags(prompts, completions, **kwargs) -> list[float]:
    """The format reward: 1.0 when the completion puts its answer inside <answer>...</answer>, else 0.0.
    (Other tags: a three-line function of your own around `inside_tags`.)"""
    return [1.0 if inside_tags(_text(completion), "answer") is not None else 0.0 for completion in completions]


def inside_tags(text: str, tag: str) -> str | None:
    """What `text` holds between <tag> and </tag> (the first such pair), or None."""
    match = re.search(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
    return match.group(1).strip() if match else None


def math_answer(prompts, completions, solution=None, answer=None, **kwargs) -> list[float | None]:
    """1.0 when math-verify finds the completion's answer equal to the row's `solution` (or `answer`): LaTeX,
    fractions, sets and intervals compared as mathematics; None when the row has neither."""
    from math_verify import parse, verify

    references = solution if solution is not None else answer
    references = references if references is not None else [None] * len(completions)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, references):
        if reference is None:
            rewards.append(None)
            continue
        gold = parse(str(reference))
        rewards.append(1.0 if gold and verify(gold, parse(_text(completion))) else 0.0)
    return rewards


CHECKERS: dict[str, Callable] = {
    "final_number": final_number,
    "answer_in_tags": answer_in_tags,
    "math_answer": math_answer,
}
"""The checkers --reward-fn takes by name alone."""
NEEDS = {"math_answer": ("math_verify", "math-verify", "pip install 'instruct-cli[math]' (math-verify)")}
"""Checkers that need an optional package: name -> (module, package, how to install it)."""
