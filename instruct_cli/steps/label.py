"""`instruct label`: sample K responses per prompt and collect a person's ranking of them in the terminal.

InstructGPT's reward model learns from labelers who rank K sampled responses to each prompt. This command
closes that loop: it samples the K responses with an SFT run (in a background thread, ahead of the labeler),
shows one prompt at a time, reads a ranking typed as `2 1 4 3` (or `2>1>4>3`, ties as `2 1=4 3`), and
appends every judgment to the labels folder the moment it is typed.

The labels folder (`--out`)
  manifest.json   kind `labels`, K, where the prompts came from; written once, when the folder is created.
  samples.jsonl   `{"index", "prompt", "responses": [text, ...], "generation"}`, one row per prompt, appended
                  as soon as its K responses are sampled. The first row of an index wins, so a restart (or a
                  second labeler) shows the same K responses and nothing is sampled twice.
  rankings.jsonl  the live judgments, one per line, appended with flush + fsync (a crash, Ctrl-C or kill -9
                  loses at most the judgment being typed). A ranking row is InstructGPT's ranked format that
                  `prepare-data` reads: `{"prompt": [messages], "responses": [[{"role": "assistant", ...}], ...],
                  "ranking": [best index, ..., worst], "ties": [[tied indices], ...], "id", "index", "labeler",
                  "typed", "seconds", "time", "generation"}`. Skipped (`s`) and flagged (`f`, unsafe or
                  unanswerable) prompts are rows with `"skipped": true` / `"flagged": true` and no ranking;
                  prepare-data drops and counts them.
  undone.jsonl    judgments taken back with `u`, as they were, with `undone_at`: the audit trail of undo.

Undo removes the labeler's last live judgment from rankings.jsonl by rewriting the file atomically (temp file +
fsync + rename) after appending it to undone.jsonl, so every reader of rankings.jsonl sees only live judgments
and the file stays one an editor, `wc -l` or another labeler's appends can work with. Writers take a lock
file (`.lock`) so several labelers can share one folder at the same time.

Ties: the ranked format has no ties, so a row with ties lists a strict `ranking` (a tie broken by the order it
was typed in) and the tied groups in `ties`; today's `prepare-data`/`rm` train the tie-broken order. A row where
all K are tied says nothing and is refused (skip it instead).

Without a terminal (stdin or stderr not a TTY) the screen degrades to plain text and commands are read line by
line from stdin, so a session can be scripted: `printf '2 1 3 4\\nq\\n' | instruct label ...`.
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import json
import math
import os
import re
import statistics
import sys
import threading
import time
import unicodedata
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from instruct_cli.core import artifacts
from instruct_cli.core.config import GenerateConfig, LabelConfig
from instruct_cli.core.console import console, info, print_table, summary_table
from instruct_cli.core.errors import UserError

RANKINGS = "rankings.jsonl"
SAMPLES = "samples.jsonl"
UNDONE = "undone.jsonl"
LOCK = ".lock"
KIND = "labels"

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


# ------------------------------------------------------------------------------------- parsing commands
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


# -------------------------------------------------------------------------------------- the log on disk
def now() -> str:
    """The current time as ISO 8601 (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock file while writing, so labelers sharing a folder do not interleave writes."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one labeler per folder
        yield
        return
    with open(Path(folder) / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line and make it durable (flush + fsync) before returning."""
    with open(path, "a+b") as handle:
        prefix = b""
        if handle.tell() > 0:  # a line cut short by a crash must not swallow this one
            handle.seek(-1, os.SEEK_END)
            prefix = b"" if handle.read(1) == b"\n" else b"\n"
        handle.write(prefix + (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def append_judgment(folder: Path, row: dict) -> None:
    """Append one judgment to the folder's rankings.jsonl, durably, under the folder's lock."""
    with locked(folder):
        append_jsonl(Path(folder) / RANKINGS, row)


def live_judgments(rows: list[dict], labeler: str | None = None) -> list[dict]:
    """The judgments that count, in file order: one per (labeler, prompt), the latest; optionally one labeler's.

    rankings.jsonl holds only live judgments (undo rewrites it), but one labeler working in two terminals
    can judge a prompt twice; the later judgment is the one that stands.
    """
    latest: dict[tuple[str, int], int] = {}
    for position, row in enumerate(rows):
        if isinstance(row.get("index"), int) and isinstance(row.get("labeler"), str):
            latest[(row["labeler"], row["index"])] = position
    keep = sorted(position for (who, _), position in latest.items() if labeler is None or who == labeler)
    return [rows[position] for position in keep]


def undo_last(rows: list[dict], labeler: str) -> int | None:
    """Where in `rows` the judgment that `u` takes back is: the labeler's last row (None: nothing to undo)."""
    for position in range(len(rows) - 1, -1, -1):
        if rows[position].get("labeler") == labeler:
            return position
    return None


def undo_judgment(folder: Path, labeler: str) -> dict | None:
    """Take back the labeler's last judgment: log it to undone.jsonl, then rewrite rankings.jsonl without it.

    Returns the judgment taken back, or None when the labeler has none. Other lines are kept byte for byte.
    """
    path = Path(folder) / RANKINGS
    with locked(folder):
        if not path.is_file():
            return None
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        parsed = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            parsed.append(row if isinstance(row, dict) else {})
        position = undo_last(parsed, labeler)
        if position is None:
            return None
        undone = parsed[position]
        append_jsonl(Path(folder) / UNDONE, {**undone, "undone_at": now()})
        kept = [line if line.endswith("\n") else line + "\n" for i, line in enumerate(lines) if i != position]
        artifacts.atomic_write_text(path, "".join(kept))
        return undone


def judgment_row(sample: dict, labeler: str, command: Command, typed: str, seconds: float) -> dict:
    """The rankings.jsonl row of one judgment (rank, skip or flag) of a prompt's sample."""
    row: dict = {"prompt": sample["prompt"]}
    if command.action == "rank":
        row["responses"] = [[{"role": "assistant", "content": text}] for text in sample["responses"]]
        row["ranking"] = list(command.ranking)
        row["ties"] = [list(group) for group in command.ties]
    elif command.action == "skip":
        row["skipped"] = True
    elif command.action == "flag":
        row["flagged"] = True
    else:
        raise ValueError(f"{command.action} is not a judgment")
    row.update(
        id=uuid.uuid4().hex[:12],
        index=sample["index"],
        labeler=labeler,
        typed=typed.strip(),
        seconds=round(seconds, 2),
        time=now(),
        generation=sample.get("generation", {}),
    )
    return row


class SampleStore:
    """samples.jsonl: the K responses of each prompt, appended as they are sampled; the first row of an index wins.

    Safe to use from the sampling thread and the labeling thread; rows other processes append are picked up
    before every write, so two labelers sharing a folder never store two samples of one prompt.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / SAMPLES
        self._rows: dict[int, dict] = {}
        self._offset = 0
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Read the rows appended since the last read (complete lines only)."""
        with self._lock:
            if not self.path.is_file():
                return
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].splitlines():
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("index"), int):
                        self._rows.setdefault(row["index"], row)

    def get(self, index: int) -> dict | None:
        """The sample of prompt `index`, or None when it has not been sampled yet."""
        with self._lock:
            return self._rows.get(index)

    def indices(self) -> list[int]:
        """The prompt indices that have a sample."""
        with self._lock:
            return sorted(self._rows)

    def add(self, index: int, prompt: list[dict], responses: list[str], generation: dict) -> dict:
        """Store the K responses of prompt `index` (durably), unless it already has a sample; returns the one kept."""
        with locked(self.folder):
            self.refresh()
            existing = self.get(index)
            if existing is not None:
                return existing
            row = {"index": index, "prompt": prompt, "responses": responses, "generation": generation, "time": now()}
            append_jsonl(self.path, row)
            with self._lock:
                self._rows[index] = row
            return row


# ----------------------------------------------------------------------------------- sampling, ahead
def sample_responses(
    model, tokenizer, prompts: list[list[dict]], k: int, settings: GenerateConfig, stop: threading.Event | None = None
) -> list[list[str]] | None:
    """K sampled responses for each prompt, generated as one left-padded batch of len(prompts) x K sequences.

    Returns None when `stop` was set during generation (the batch is then incomplete and thrown away).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from instruct_cli.core.chat import encode_prompt
    from instruct_cli.core.sampling import left_pad, sampling_kwargs

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), bool(stop and stop.is_set()), dtype=torch.bool, device=input_ids.device
            )

    device = next(model.parameters()).device
    encoded = [ids for messages in prompts for ids in [encode_prompt(tokenizer, messages)] * k]
    input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id, device)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            stopping_criteria=StoppingCriteriaList([Stop()]),
            **sampling_kwargs(settings, tokenizer),
        )
    if stop is not None and stop.is_set():
        return None
    texts = [tokenizer.decode(row[input_ids.shape[1] :], skip_special_tokens=True).strip() for row in output]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


class Queue:
    """The prompts the labeler has still to judge, in the order they are shown; shared with the sampler."""

    def __init__(self, indices: list[int]):
        self.cond = threading.Condition()
        self._pending = deque(indices)

    def __len__(self) -> int:
        with self.cond:
            return len(self._pending)

    def current(self) -> int | None:
        """The prompt on screen (None when everything is judged)."""
        with self.cond:
            return self._pending[0] if self._pending else None

    def upcoming(self, count: int) -> list[int]:
        """The next `count` prompts, the one on screen first."""
        with self.cond:
            return list(itertools.islice(self._pending, count))

    def pop(self) -> None:
        """The prompt on screen was judged: move on."""
        with self.cond:
            self._pending.popleft()
            self.cond.notify_all()

    def push_front(self, index: int) -> None:
        """Show `index` next (after an undo)."""
        with self.cond:
            self._pending.appendleft(index)
            self.cond.notify_all()


class Sampler:
    """Samples the K responses of the prompts the labeler will see next, in a background thread, so that the
    labeler never waits once the first prompt is up: the one on screen first, then up to two batches ahead.

    The thread loads the model itself, so prompts sampled in an earlier session can be labelled meanwhile.
    An error in the thread (a bad --model, say) is raised in the labeling thread by `check` and `wait_for`.
    """

    def __init__(self, config: LabelConfig, prompts: list[list[dict]], store: SampleStore, queue: Queue):
        self.config, self.prompts, self.store, self.queue = config, prompts, store, queue
        self.generation = generation_settings(config)
        self.settings = GenerateConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k
        )
        self.loaded = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="instruct-label-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def next_batch(self) -> list[int]:
        """Which prompts to sample next: the one on screen alone if it is missing, else a batch ahead."""
        missing = [i for i in self.queue.upcoming(1 + 2 * self.config.batch_size) if self.store.get(i) is None]
        if missing and missing[0] == self.queue.current():
            return missing[:1]
        return missing[: self.config.batch_size]

    def _loop(self) -> None:
        import torch

        from instruct_cli.core import models

        try:
            model, tokenizer, _ = models.load_for_inference(
                self.config.model, self.config.quantization, self.config.device
            )
            self.loaded = True
            while not self._stop.is_set():
                with self.queue.cond:
                    batch = self.next_batch()
                    if not batch:
                        self.queue.cond.wait(timeout=1.0)
                        continue
                torch.manual_seed(self.config.seed * 1_000_003 + batch[0])
                responses = sample_responses(
                    model, tokenizer, [self.prompts[i] for i in batch], self.config.k, self.settings, self._stop
                )
                if responses is None:
                    break
                for index, texts in zip(batch, responses):
                    self.store.add(index, self.prompts[index], texts, self.generation)
                with self.queue.cond:
                    self.queue.cond.notify_all()
        except BaseException as exc:  # handed to the labeling thread, which raises it
            self.error = exc
            with self.queue.cond:
                self.queue.cond.notify_all()

    def check(self) -> None:
        """Raise the error that stopped the sampling thread, if any."""
        if self.error is not None:
            raise self.error

    def wait_for(self, index: int) -> dict:
        """Block until prompt `index` has its sample; re-raises an error of the sampling thread."""
        with self.queue.cond:
            while self.store.get(index) is None:
                self.check()
                self.queue.cond.wait(timeout=0.5)
        return self.store.get(index)

    def stop(self) -> None:
        """Stop sampling (a batch under way is abandoned at its next token) and wait for the thread."""
        self._stop.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        self._thread.join(timeout=30)


# ------------------------------------------------------------------------------------------- the screen
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


# ---------------------------------------------------------------------------------------- the folder
def read_prompts(config: LabelConfig) -> list[list[dict]]:
    """The prompts to label: the chosen split of the --prompts data folder, cut to --max-prompts.

    Reads only JSON files (no torch), so a resumed session starts at once.
    """
    from instruct_cli.core import data_folders

    folder = Path(config.prompts)
    if folder.is_file():
        raise UserError(
            "--prompts takes a data folder, not a file",
            where=str(folder),
            fix=f"Make one with `instruct prepare-data -i {folder} --task prompts -o data/prompts`",
        )
    prompts = data_folders.read_prompts(folder, config.split, flag="--prompts")
    if not prompts:
        raise UserError(
            f"The {config.split} split of the data folder has no prompts",
            where=str(folder),
            fix="Pick the other split with --split, or prepare the data with more rows",
        )
    return prompts[: config.max_prompts] if config.max_prompts else prompts


def open_folder(config: LabelConfig) -> dict:
    """Create the labels folder, or check that an existing one was started with the same K; its manifest."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder", where="--out", fix="Choose a folder for --out")
    manifest = artifacts.read_manifest(out) if out.is_dir() else None
    if manifest is not None:
        if manifest.get("kind") != KIND:
            raise UserError(
                f"{out} holds a {manifest.get('kind')!r} output, not labels",
                where="--out",
                fix="Choose a new folder for --out, or the labels folder you started",
            )
        if manifest.get("k") != config.k:
            raise UserError(
                f"{out} was started with --k {manifest.get('k')}, not {config.k}",
                where="--k",
                fix=f"Pass --k {manifest.get('k')} to go on labelling it, or choose a new --out",
            )
        return manifest
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"{out} exists, is not empty and is not a labels folder",
            where="--out",
            fix="Choose a new or empty folder for --out",
        )
    manifest = {
        "schema_version": artifacts.SCHEMA_VERSION,
        "kind": KIND,
        "status": artifacts.STATUS_COMPLETE,
        "k": config.k,
        "prompts": {"path": str(Path(config.prompts).resolve()), "split": config.split},
        "created": now(),
        "files": {"rankings": RANKINGS, "samples": SAMPLES, "undone": UNDONE},
        "note": "append-only logs, always consistent; `instruct label --stats` summarises them",
    }
    artifacts.atomic_write_json(out / artifacts.MANIFEST, manifest)
    return manifest


def check_samples_match(store: SampleStore, prompts: list[list[dict]], config: LabelConfig) -> None:
    """Refuse to go on when the stored samples were drawn for other prompts (another data folder or split)."""
    for index in store.indices():
        if index < len(prompts) and store.get(index)["prompt"] != prompts[index]:
            raise UserError(
                f"Prompt #{index} of {config.prompts} ({config.split}) is not the prompt the labels "
                "folder sampled responses for: it was started with other prompts",
                where=str(config.out),
                fix="Pass the --prompts folder and --split the folder was started with, or a new --out",
            )


def generation_settings(config: LabelConfig) -> dict:
    """The sampling settings stored with every sample and judgment."""
    model = config.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {
        "model": model,
        "quantization": config.quantization,
        "k": config.k,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }


def check_config(config: LabelConfig) -> None:
    """The checks the shared validation does not make."""
    if config.prompts is None or config.out is None:
        raise UserError(
            "`instruct label` needs --prompts (a data folder) and --out (the labels folder)",
            where="instruct label",
            fix="Run e.g. `instruct label --model runs/sft --prompts data/prompts --out labels/`, "
            "or `instruct label --stats labels/`",
        )
    if config.k < 2:
        raise UserError(
            f"--k must be at least 2 to rank anything, not {config.k}",
            where="--k",
            fix="Use --k 4 (InstructGPT sampled 4 to 9 responses per prompt)",
        )
    if config.max_prompts is not None and config.max_prompts <= 0:
        raise UserError(
            f"--max-prompts must be greater than 0, not {config.max_prompts}",
            where="--max-prompts",
            fix="Pass a positive number, or leave it out to label every prompt",
        )


# ------------------------------------------------------------------------------------------------ run
@dataclass
class Session:
    """What this labeling session did."""

    labeler: str
    rows: list[dict] = field(default_factory=list)
    interrupted: bool = False


def default_labeler() -> str:
    """$USER, or the login name, or `anonymous`."""
    with contextlib.suppress(Exception):
        return os.environ.get("USER") or getpass.getuser()
    return "anonymous"


def run(config: LabelConfig) -> Session | None:
    """Label prompts (or, with --stats, summarise a labels folder). Returns the session (None for --stats)."""
    if config.stats is not None:
        show_stats(Path(config.stats))
        return None
    check_config(config)
    labeler = (config.labeler or default_labeler()).strip()
    if not labeler:
        raise UserError("The labeler name is empty", where="--labeler", fix="Pass --labeler NAME")
    prompts = read_prompts(config)
    open_folder(config)
    folder = Path(config.out)
    store = SampleStore(folder)
    check_samples_match(store, prompts, config)
    judged = {row["index"] for row in live_judgments(artifacts.read_jsonl(folder / RANKINGS), labeler)}
    queue = Queue([i for i in range(len(prompts)) if i not in judged])
    session = Session(labeler)
    if len(queue) == 0:
        info(f"Nothing left to label for {labeler}: all {len(prompts)} prompts of {config.prompts} are judged.")
        summarise(session, folder, len(prompts))
        return session
    ui = pick_ui()
    sampler = None
    try:
        if any(store.get(i) is None for i in queue.upcoming(len(queue))):
            sampler = Sampler(config, prompts, store, queue).start()
        label_loop(ui, queue, store, sampler, session, folder, total=len(prompts))
    except KeyboardInterrupt:
        session.interrupted = True
        console.print()
        info("Stopped (Ctrl-C). Every judgment made is saved; run the same command to go on.")
    finally:
        if sampler is not None:
            sampler.stop()
    summarise(session, folder, len(prompts))
    return session


def label_loop(
    ui, queue: Queue, store: SampleStore, sampler: Sampler | None, session: Session, folder: Path, total: int
) -> None:
    """Show prompts and read commands until every prompt is judged or the labeler quits.

    `total` is the number of prompts; the screen shows the labeler's place among them.
    """
    notice = None  # said under the next screen (an undo clears the screen it was typed on)
    while (index := queue.current()) is not None:
        if sampler is not None:
            sampler.check()
        sample = store.get(index)
        if sample is None:
            doing = "Sampling" if sampler.loaded else "Loading the model and sampling"
            with ui.waiting(f"{doing} the responses to prompt #{index} ..."):
                sample = sampler.wait_for(index)
        screen = Screen(
            sample, position=total - len(queue) + 1, total=total, labeler=session.labeler, judged=len(session.rows)
        )
        ui.show(screen)
        if notice:
            ui.say(notice, "cyan")
            notice = None
        started = time.monotonic()
        while True:
            typed = ui.ask()
            if typed is None:
                return  # end of input: as `q`
            try:
                command = parse_command(typed, len(sample["responses"]))
            except OrderError as exc:
                ui.say(str(exc))
                continue
            if command.action == "quit":
                return
            if command.action == "help":
                ui.help()
            elif command.action in ("more", "view"):
                ui.page(screen, command.response)
                if not ui.plain:
                    ui.show(screen)
            elif command.action == "undo":
                undone = undo_judgment(folder, session.labeler)
                if undone is None:
                    ui.say("Nothing to undo: you have no judgments in this folder yet.")
                    continue
                session.rows = [row for row in session.rows if row.get("id") != undone.get("id")]
                queue.push_front(undone["index"])
                notice = f"Undid your judgment of prompt #{undone['index']} ({undone.get('typed', '')})."
                break
            else:  # rank, skip, flag
                row = judgment_row(sample, session.labeler, command, typed, time.monotonic() - started)
                append_judgment(folder, row)
                session.rows.append(row)
                queue.pop()
                break


def summarise(session: Session, folder: Path, prompts: int) -> None:
    """The summary table at the end of a session."""
    live = live_judgments(artifacts.read_jsonl(folder / RANKINGS))
    mine = [row for row in live if row.get("labeler") == session.labeler]
    seconds = [row["seconds"] for row in session.rows if isinstance(row.get("seconds"), (int, float))]
    kinds = kind_counts(session.rows)
    summary_table(
        "label",
        {
            "labeler": session.labeler,
            "judged this session": f"{len(session.rows)} ({kinds['ranked']} ranked, {kinds['skipped']} skipped, "
            f"{kinds['flagged']} flagged)",
            f"judged by {session.labeler}": f"{len(mine)} of {prompts} prompts",
            "judgments in the folder": f"{len(live)} by {len({row.get('labeler') for row in live})} labeler(s)",
            "time per judgment (median)": f"{statistics.median(seconds):.1f} s" if seconds else "-",
            "rankings": str(folder / RANKINGS),
        },
    )
    if kinds["ranked"] and len(mine) < prompts:
        info(f"Run the same command again to go on from prompt {len(mine) + 1} of {prompts}.")
    if kinds["ranked"]:
        info(
            f"Train a reward model on them: instruct prepare-data -i {folder} --task prefs -o data/labelled "
            "&& instruct rm --data data/labelled --out runs/rm"
        )


# ----------------------------------------------------------------------------------------------- stats
def kind_counts(rows: list[dict]) -> dict[str, int]:
    """How many rows are rankings, skips and flags."""
    counts = {"ranked": 0, "skipped": 0, "flagged": 0}
    for row in rows:
        kind = "flagged" if row.get("flagged") else "skipped" if row.get("skipped") else "ranked"
        counts[kind] += 1
    return counts


def levels(ranking: list[int], ties: list[list[int]] = ()) -> dict[int, int]:
    """Each response's place in a ranking (0 = best); tied responses share a place: {response: place}."""
    group_of = {index: number for number, group in enumerate(ties) for index in group}
    places, place = {}, -1
    for position, index in enumerate(ranking):
        previous = ranking[position - 1] if position else None
        if not (previous is not None and index in group_of and group_of.get(previous) == group_of[index]):
            place += 1
        places[index] = place
    return places


def pair_signs(places: dict[int, int]) -> dict[tuple[int, int], int]:
    """For every pair i < j: +1 when i is ranked better, -1 when j is, 0 when they are tied."""
    return {
        (i, j): (places[j] > places[i]) - (places[j] < places[i]) for i, j in itertools.combinations(sorted(places), 2)
    }


def pairwise_agreement(a: dict[int, int], b: dict[int, int]) -> tuple[int, int]:
    """(agreeing, compared): over the pairs both rankings order strictly, how many they order the same way."""
    signs_a, signs_b = pair_signs(a), pair_signs(b)
    compared = [pair for pair in signs_a if signs_a[pair] and signs_b.get(pair)]
    return sum(signs_a[pair] == signs_b[pair] for pair in compared), len(compared)


def kendall_tau(a: dict[int, int], b: dict[int, int]) -> float | None:
    """Kendall's tau-b between two rankings of the same responses (ties allowed); None when undefined."""
    signs_a, signs_b = pair_signs(a), pair_signs(b)
    products = [signs_a[pair] * signs_b[pair] for pair in signs_a]
    concordant, discordant = products.count(1), products.count(-1)
    untied_a = sum(1 for sign in signs_a.values() if sign)
    untied_b = sum(1 for sign in signs_b.values() if sign)
    if not untied_a or not untied_b:
        return None
    return (concordant - discordant) / math.sqrt(untied_a * untied_b)


def agreement(rows: list[dict]) -> list[dict]:
    """Agreement of every two labelers on the prompts both ranked: prompts, pairs compared, pairwise agreement
    (pooled over those pairs) and the mean Kendall tau-b over the prompts."""
    by_labeler: dict[str, dict[int, dict[int, int]]] = defaultdict(dict)
    for row in rows:
        if isinstance(row.get("ranking"), list) and not (row.get("skipped") or row.get("flagged")):
            by_labeler[row["labeler"]][row["index"]] = levels(row["ranking"], row.get("ties") or [])
    result = []
    for first, second in itertools.combinations(sorted(by_labeler), 2):
        shared = sorted(set(by_labeler[first]) & set(by_labeler[second]))
        if not shared:
            continue
        agreed = compared = 0
        taus = []
        for index in shared:
            a, b = by_labeler[first][index], by_labeler[second][index]
            if set(a) != set(b):
                continue  # different K: not comparable
            same, count = pairwise_agreement(a, b)
            agreed, compared = agreed + same, compared + count
            tau = kendall_tau(a, b)
            if tau is not None:
                taus.append(tau)
        result.append(
            {
                "labelers": (first, second),
                "prompts": len(shared),
                "pairs": compared,
                "agreement": agreed / compared if compared else None,
                "kendall_tau": statistics.fmean(taus) if taus else None,
            }
        )
    return result


def show_stats(folder: Path) -> None:
    """Print counts, time per judgment and agreement between labelers for a labels folder."""
    if not (folder / RANKINGS).is_file():
        raise UserError(
            "The folder has no rankings.jsonl", where=str(folder), fix="Pass the --out folder of `instruct label`"
        )
    live = live_judgments(artifacts.read_jsonl(folder / RANKINGS))
    samples = SampleStore(folder).indices()
    per_labeler: dict[str, list[dict]] = defaultdict(list)
    for row in live:
        per_labeler[row["labeler"]].append(row)
    rows = []
    for labeler, judged in sorted(per_labeler.items()):
        kinds = kind_counts(judged)
        seconds = [row["seconds"] for row in judged if isinstance(row.get("seconds"), (int, float))]
        rows.append(
            [
                labeler,
                kinds["ranked"],
                kinds["skipped"],
                kinds["flagged"],
                f"{statistics.median(seconds):.1f}" if seconds else "-",
                f"{statistics.fmean(seconds):.1f}" if seconds else "-",
            ]
        )
    print_table(f"Labelers ({folder})", ["labeler", "ranked", "skipped", "flagged", "median s", "mean s"], rows)
    pairs = agreement(live)
    if pairs:
        print_table(
            "Agreement where prompts overlap",
            ["labelers", "prompts", "pairs compared", "pairwise agreement", "Kendall tau-b"],
            [
                [
                    " / ".join(p["labelers"]),
                    p["prompts"],
                    p["pairs"],
                    fmt_fraction(p["agreement"]),
                    fmt_fraction(p["kendall_tau"], signed=True),
                ]
                for p in pairs
            ],
        )
    ranked_by = defaultdict(set)
    for row in live:
        if not (row.get("skipped") or row.get("flagged")):
            ranked_by[row["index"]].add(row["labeler"])
    totals = kind_counts(live)
    all_seconds = [row["seconds"] for row in live if isinstance(row.get("seconds"), (int, float))]
    summary_table(
        "label --stats",
        {
            "prompts sampled": len(samples),
            "judgments": f"{len(live)} ({totals['ranked']} ranked, {totals['skipped']} skipped, {totals['flagged']} flagged)",
            "labelers": len(per_labeler),
            "prompts ranked by 2+ labelers": sum(1 for who in ranked_by.values() if len(who) > 1),
            "time per judgment (median)": f"{statistics.median(all_seconds):.1f} s" if all_seconds else "-",
            "pairwise agreement (all overlaps)": fmt_fraction(pooled_agreement(pairs)),
        },
    )


def pooled_agreement(pairs: list[dict]) -> float | None:
    """Pairwise agreement pooled over every two labelers' compared pairs."""
    compared = sum(p["pairs"] for p in pairs)
    agreed = sum(p["agreement"] * p["pairs"] for p in pairs if p["agreement"] is not None)
    return agreed / compared if compared else None


def fmt_fraction(value: float | None, signed: bool = False) -> str:
    """0.8333 -> `0.833`, None -> `-`."""
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
