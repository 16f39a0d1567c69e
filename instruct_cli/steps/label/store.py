"""The labels folder on disk: the judgment log, the samples, undo, the lock and the manifest.

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

Uses `commands` (a judgment row is made from a Command) and instruct_cli.core (artifacts, config, errors).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from instruct_cli.core import artifacts
from instruct_cli.core.config import LabelConfig
from instruct_cli.core.errors import UserError
from instruct_cli.steps.label.commands import Command

RANKINGS = "rankings.jsonl"
SAMPLES = "samples.jsonl"
UNDONE = "undone.jsonl"
LOCK = ".lock"
KIND = "labels"


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
