"""The labeling screen: what one screen shows (Screen), the rich TerminalUI that fits the prompt and K responses
to the terminal, the PlainUI for pipes and scripts, and the text helpers (printable, wrap, clip, line_budgets).

Both UIs have the same methods (show, ask, say, help, page, waiting); pick_ui chooses one. Uses `commands`
(the key help) and instruct_cli.core.console; reads and writes no files.
"""

from __future__ import annotations

import contextlib
import sys
import unicodedata
from dataclasses import dataclass
from typing import Iterator

from instruct_cli.core.console import console, info
from instruct_cli.steps.label.commands import HELP, KEYS_HELP


@dataclass
class Screen:
    """What one labeling screen shows."""

    sample: dict
    position: int
    """1-based position of this prompt among the labeler's prompts."""
    total: int
    labeler: str
    judged: int
    """Judgments made this session."""


def prompt_text(messages: list[dict]) -> str:
    """A prompt's messages as text: the content alone for one user message, else `role: content` per message."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)


def printable(text: str) -> str:
    """`text` safe to put on a terminal: control characters (a model may sample ESC) shown as escapes."""
    return "".join(
        ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else ch.encode("unicode_escape").decode() for ch in text
    )


def wrap(text: str, width: int) -> list[str]:
    """`text` as the lines the terminal shows at `width` cells (rich's wrapping, so wide characters count)."""
    from rich.text import Text

    return [line.plain.rstrip() for line in Text(text).wrap(console, max(width, 10))]


def clip(text: str, width: int, max_lines: int) -> tuple[str, int]:
    """`text` wrapped to `width` cells and cut to `max_lines` lines -> (shown text, lines left out)."""
    lines = wrap(text, width)
    if len(lines) <= max_lines:
        return text, 0
    return "\n".join(lines[:max_lines]), len(lines) - max_lines


def more(lines: int) -> str:
    """How much a clipped panel leaves out: `+1 line`, `+12 lines`."""
    return f"+{lines} line" + ("s" if lines != 1 else "")


def line_budgets(needs: list[int], room: int, minimum: int = 2) -> list[int]:
    """Share `room` lines among panels that need `needs` lines: short ones get all they need, the long ones
    split what is left evenly; every panel gets at least `minimum` lines (or its need), even past `room`."""
    budgets = [0] * len(needs)
    left = room
    order = sorted(range(len(needs)), key=lambda i: needs[i])
    for done, i in enumerate(order):
        share = left // (len(needs) - done)
        budgets[i] = max(min(needs[i], share), min(needs[i], minimum))
        left -= budgets[i]
    return budgets


class TerminalUI:
    """The rich screen: the prompt and K numbered panels fitted to the terminal, commands read with readline."""

    plain = False

    def __init__(self):
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())

    def show(self, screen: Screen) -> None:
        """Clear the terminal and draw one prompt with its K responses, each cut to fit the terminal's height."""
        from rich.markup import escape
        from rich.panel import Panel
        from rich.text import Text

        width, height = console.size
        responses = [printable(text) or "(empty response)" for text in screen.sample["responses"]]
        inner = width - 4
        prompt, prompt_hidden = clip(printable(prompt_text(screen.sample["prompt"])), inner, max(2, height // 5))
        # header, keys line, input line, and two spare lines (a message + input again); the prompt panel
        room = height - 5 - (len(wrap(prompt, inner)) + 2)
        needs = [len(wrap(text, inner)) for text in responses]
        budgets = line_budgets(needs, room - 2 * len(responses))  # each panel has two border lines
        console.clear()
        console.print(
            f"[bold]instruct label[/bold] · prompt {screen.position} of {screen.total} "
            f"(#{screen.sample['index']}) · labeler [bold]{escape(screen.labeler)}[/bold] · "
            f"{screen.judged} judged this session",
            overflow="ellipsis",
            no_wrap=True,
        )
        console.print(
            Panel(
                Text(prompt),
                title="prompt",
                title_align="left",
                border_style="cyan",
                subtitle=f"{more(prompt_hidden)} · m more" if prompt_hidden else None,
                subtitle_align="right",
            )
        )
        for number, (text, budget) in enumerate(zip(responses, budgets), start=1):
            shown, hidden = clip(text, inner, budget)
            console.print(
                Panel(
                    Text(shown),
                    title=f"[bold]{number}[/bold]",
                    title_align="left",
                    subtitle=f"{more(hidden)} · v {number}" if hidden else None,
                    subtitle_align="right",
                )
            )
        console.print(f"[dim]{KEYS_HELP}[/dim]", overflow="ellipsis", no_wrap=True)

    def ask(self) -> str | None:
        """One typed line (None at end of input)."""
        try:
            return console.input("[bold]rank>[/bold] ")
        except EOFError:
            return None

    def say(self, message: str, style: str = "yellow") -> None:
        console.print(f"[{style}]{message}[/{style}]")

    def help(self) -> None:
        console.print(HELP, markup=False)

    def page(self, screen: Screen, only: int | None = None) -> None:
        """Show the prompt and every response (or response `only`) in full, through the pager."""
        from rich.panel import Panel
        from rich.text import Text

        with console.pager(styles=False):
            if only is None:
                console.print(
                    Panel(Text(printable(prompt_text(screen.sample["prompt"]))), title="prompt", title_align="left")
                )
            for number, text in enumerate(screen.sample["responses"], start=1):
                if only is None or only == number - 1:
                    console.print(
                        Panel(Text(printable(text) or "(empty response)"), title=str(number), title_align="left")
                    )

    @contextlib.contextmanager
    def waiting(self, message: str) -> Iterator[None]:
        with console.status(message):
            yield


class PlainUI:
    """Plain text for pipes and scripts: every text in full, commands read line by line from stdin."""

    plain = True

    def show(self, screen: Screen) -> None:
        """Print the prompt and its K responses in full."""
        out = [
            f"== prompt {screen.position} of {screen.total} (#{screen.sample['index']}) · labeler {screen.labeler} ==",
            "[prompt]",
            printable(prompt_text(screen.sample["prompt"])),
        ]
        for number, text in enumerate(screen.sample["responses"], start=1):
            out += [f"[{number}]", printable(text) or "(empty response)"]
        out.append(KEYS_HELP)
        console.print("\n".join(out), markup=False, highlight=False)

    def ask(self) -> str | None:
        line = sys.stdin.readline()
        if not line:
            return None
        console.print(f"> {line.strip()}", markup=False, highlight=False)
        return line

    def say(self, message: str, style: str = "yellow") -> None:
        console.print(message, markup=False, highlight=False)

    def help(self) -> None:
        console.print(HELP, markup=False, highlight=False)

    def page(self, screen: Screen, only: int | None = None) -> None:
        if only is None:
            self.show(screen)
        else:
            console.print(
                f"[{only + 1}]\n{printable(screen.sample['responses'][only]) or '(empty response)'}",
                markup=False,
                highlight=False,
            )

    @contextlib.contextmanager
    def waiting(self, message: str) -> Iterator[None]:
        info(message)
        yield


def pick_ui() -> TerminalUI | PlainUI:
    """The rich screen when a person is at a terminal (stdin and the console both TTYs), else plain text."""
    return TerminalUI() if sys.stdin.isatty() and console.is_terminal else PlainUI()
