"""What the labeler types: one line parsed into a Command (a ranking with ties, or a command word), and the
key help shown under every screen.

Owns OrderError, Command, parse_command, parse_order, format_order, KEYS_HELP and HELP. Pure text handling:
uses only the standard library, no other module of the package and nothing of instruct_cli.core.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KEYS_HELP = "best first: 2 1 4 3 · ties: 2 1=4 3 · s skip · f flag · u undo · v N view · m more · ? help · q quit"
HELP = """\
  2 1 4 3     rank the responses, best first (also 2>1>4>3, 2,1,4,3, or 2143 when K < 10)
  2 1=4 3     1 and 4 are equally good (also 2>1=4>3); a tie is stored in `ties`
  s           skip this prompt (you will not be asked again; `u` brings it back)
  f           flag the prompt as unsafe or unanswerable (it is kept out of training)
  u           undo your last judgment and show its prompt again
  v N         view response N in full (paged)
  m           more: the prompt and every response in full (paged)
  q           quit; every judgment so far is saved, and the same command resumes"""


class OrderError(ValueError):
    """A typed command that cannot be read; the message says what is wrong and is shown to the labeler."""


@dataclass(frozen=True)
class Command:
    """One line typed by the labeler, parsed."""

    action: str
    """rank, skip, flag, undo, quit, more, view or help."""
    ranking: tuple[int, ...] = ()
    """For `rank`: response indices (0-based), best first; tied responses in the order typed."""
    ties: tuple[tuple[int, ...], ...] = ()
    """For `rank`: the groups of tied responses (0-based, in ranking order)."""
    response: int | None = None
    """For `view`: the response to show (0-based)."""


WORDS = {
    "s": "skip",
    "skip": "skip",
    "f": "flag",
    "flag": "flag",
    "u": "undo",
    "undo": "undo",
    "q": "quit",
    "quit": "quit",
    "exit": "quit",
    "m": "more",
    "more": "more",
    "?": "help",
    "h": "help",
    "help": "help",
}


def parse_command(text: str, k: int) -> Command:
    """Read one typed line: a ranking (see `parse_order`) or a command word; OrderError when it is neither."""
    text = text.strip()
    word = text.lower()
    if word in WORDS:
        return Command(WORDS[word])
    view = re.fullmatch(r"(?:v|view)\s*(\d+)", word)
    if view:
        number = int(view.group(1))
        if not 1 <= number <= k:
            raise OrderError(f"There is no response {number}; they are numbered 1 to {k}")
        return Command("view", response=number - 1)
    if word in ("v", "view"):
        raise OrderError(f"Say which response to view, e.g. `v 1` (1 to {k})")
    ranking, ties = parse_order(text, k)
    return Command("rank", ranking=tuple(ranking), ties=tuple(tuple(group) for group in ties))


def parse_order(text: str, k: int) -> tuple[list[int], list[list[int]]]:
    """A typed order of the K responses (numbered from 1), best first -> (ranking, ties), both 0-based.

    `2 1 4 3`, `2>1>4>3`, `2,1,4,3` and (for K < 10) `2143` are the same order; `=` ties neighbours:
    `2 1=4 3` gives ranking [1, 0, 3, 2] (the tie broken by typing order) and ties [[0, 3]].
    Every response must appear exactly once, and not all of them may be tied.
    """
    text = re.sub(r"\s*=\s*", "=", text.strip())
    if not text:
        raise OrderError(f"Type an order of the {k} responses, best first, e.g. {' '.join(map(str, range(k, 0, -1)))}")
    stray = sorted(set(re.sub(r"[\d\s>,=]", "", text)))
    if stray:
        raise OrderError(
            f"Cannot read {''.join(stray)!r} in {text!r}: use numbers, spaces or `>` between them, "
            "and `=` for ties (or a command: s, f, u, v N, m, q, ?)"
        )
    if k < 10 and re.fullmatch(r"\d(=?\d)+", text):
        text = re.sub(r"(\d)(?=\d)", r"\1 ", text)  # compact form: 21=43 -> 2 1=4 3
    groups = []
    for token in re.split(r"[\s>,]+", text):
        if not token:
            continue
        parts = token.split("=")
        if any(part == "" for part in parts):
            raise OrderError(f"`=` must stand between two responses, as in 1=4 (in {text!r})")
        groups.append([int(part) for part in parts])
    numbers = [number for group in groups for number in group]
    wrong = sorted({n for n in numbers if not 1 <= n <= k})
    if wrong:
        raise OrderError(f"There is no response {', '.join(map(str, wrong))}; they are numbered 1 to {k}")
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise OrderError(f"Response {', '.join(map(str, repeated))} appears more than once")
    missing = sorted(set(range(1, k + 1)) - set(numbers))
    if missing:
        raise OrderError(
            f"Rank all {k} responses: {', '.join(map(str, missing))} {'is' if len(missing) == 1 else 'are'} missing"
        )
    if len(groups) == 1:
        raise OrderError("Everything tied says nothing about which is better; type `s` to skip instead")
    ranking = [number - 1 for number in numbers]
    ties = [[number - 1 for number in group] for group in groups if len(group) > 1]
    return ranking, ties


def format_order(ranking: list[int], ties: list[list[int]] = ()) -> str:
    """A ranking (0-based) as the labeler would type it: [1, 0, 3, 2] with ties [[0, 3]] -> `2 > 1 = 4 > 3`."""
    tied = {index: tuple(group) for group in ties for index in group}
    text = str(ranking[0] + 1)
    for before, index in zip(ranking, ranking[1:]):
        same = index in tied and tied[index] == tied.get(before)
        text += (" = " if same else " > ") + str(index + 1)
    return text
