"""The one place that prints: a rich console on stderr, progress bars with ETA, summary tables.

stdout is kept for the data a command produces (generated text, JSONL) so that shell pipelines stay clean;
everything meant for the person at the terminal goes to stderr through `console`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Under `accelerate launch` / torchrun every process runs the same command; only the first one talks.
MAIN_PROCESS = os.environ.get("RANK", "0") == "0"
console = Console(stderr=True, highlight=False, quiet=not MAIN_PROCESS)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 120  # logs and pipes: rich's 80 columns would wrap every path in the tables
_errors = Console(stderr=True, highlight=False)


def quiet_warnings() -> None:
    """Hide library deprecation notices and bitsandbytes' advice to install optional CPU kernels: they are
    for the developers of this tool, not its users. Cheap; runs before any library is imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: the GGUF converter's own bar
    for library in ("transformers", "peft", "accelerate", "bitsandbytes", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=library)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=library)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and advice so that only our output reaches the user."""
    quiet_warnings()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    # datasets costs a second to import, and sampling never needs it: when it is not loaded yet, the same
    # settings go through the variables it reads on import
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    datasets = sys.modules.get("datasets")
    if datasets is not None:
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


@contextmanager
def progress(description: str, total: int | None) -> Iterator["ProgressTask"]:
    """A progress bar with count, ETA and a live metrics field; yields an object with `advance(n, **metrics)`."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=False,
    )
    with bar:
        task_id = bar.add_task(description, total=total, metrics="")
        yield ProgressTask(bar, task_id)


class ProgressTask:
    """A handle on one progress bar: advance it and show the latest metrics next to it.

    When stderr is not a terminal (a log file, CI, `2>&1 | tee`) rich draws the bar only once, at the end;
    there a plain progress line is printed instead, at most every `PLAIN_LINE_EVERY_S` seconds.
    """

    PLAIN_LINE_EVERY_S = 30.0

    def __init__(self, bar: Progress, task_id):
        self._bar = bar
        self._task_id = task_id
        self._last_plain_line = time.monotonic()

    def advance(self, steps: int = 1, **metrics: float | str) -> None:
        """Move the bar forward by `steps` and replace the metrics shown beside it."""
        text = "  ".join(f"{name} {format_value(value)}" for name, value in metrics.items())
        self._bar.update(self._task_id, advance=steps, metrics=text)
        if not console.is_terminal and time.monotonic() - self._last_plain_line >= self.PLAIN_LINE_EVERY_S:
            self._last_plain_line = time.monotonic()
            self._print_plain_line()

    def _print_plain_line(self) -> None:
        task = next(task for task in self._bar.tasks if task.id == self._task_id)
        done = f"{task.completed:.0f}/{task.total:.0f}" if task.total else f"{task.completed:.0f}"
        eta = f"  eta {_clock(task.time_remaining)}" if task.time_remaining is not None else ""
        console.print(
            f"{task.description}  {done}  elapsed {_clock(task.elapsed or 0)}{eta}  {task.fields['metrics']}",
            soft_wrap=True,
            markup=False,
        )

    def set_completed(self, completed: int) -> None:
        """Jump the bar to `completed` (used when resuming part-way)."""
        self._bar.update(self._task_id, completed=completed)


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_value(value) -> str:
    """Numbers at four significant digits, anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(title: str, rows: Mapping[str, object]) -> None:
    """Print a two-column table (name, value): the summary every command shows at its end."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows.items():
        table.add_row(name, format_value(value))
    console.print(table)


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Print a table with a header row. Cells are plain text (model output may contain [brackets])."""
    table = Table(title=escape(title), title_justify="left")
    for column in columns:
        table.add_column(escape(column), overflow="fold")
    for row in rows:
        table.add_row(*(escape(format_value(cell)) for cell in row))
    console.print(table)


def display_path(path) -> str:
    """A path as the user would type it: relative to the working directory when it is below it, else as given."""
    relative = os.path.relpath(Path(str(path)).resolve())
    return relative if not relative.startswith("..") else str(path)


def info(message: str) -> None:
    """A short status line for the user."""
    console.print(message)


def warn(message: str) -> None:
    """A warning the user should read but that does not stop the command."""
    console.print(f"[yellow]warning:[/yellow] {message}")


def error(message: str) -> None:
    """The one-paragraph error a command ends with (plain text: brackets such as `instruct-cli[tensorboard]` or
    in a path are printed, not read as rich markup)."""
    _errors.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
