"""The contract between steps: run folders, data folders, manifests, atomic writes and the metrics log.

Every step writes one folder. Its `manifest.json` says what the folder is (`kind`), whether it is finished
(`status`), what produced it (resolved config, parents with their hashes, base model, package versions) and
how it went (final metrics, timings). A folder is valid input to another step only when its status is
`complete`; that status is written last, atomically, so an interrupted step never looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import yaml

from instruct_cli.core.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
TRACKER_LOGS = (TENSORBOARD, "wandb")
"""What experiment trackers (trackers.py) write inside a run folder: like metrics.jsonl, a log of how the run went."""

STATUS_RUNNING = "running"
STATUS_INTERRUPTED = "interrupted"
STATUS_FAILED = "failed"
STATUS_COMPLETE = "complete"


# ----------------------------------------------------------------------------------------- atomic writes
def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs should be readable like any other
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows) -> int:
    """Write rows as JSON lines, atomically; returns how many were written."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file this tool wrote (missing file: none). A line that cannot be read,
    e.g. cut short by a crash while appending, is left out."""
    rows = []
    if not Path(path).is_file():
        return rows
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- hashes
def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_folder(folder: Path, skip: tuple[str, ...] = (CHECKPOINTS, METRICS, *TRACKER_LOGS)) -> str:
    """A content hash of a folder: every file's relative path and bytes, in sorted order.

    Checkpoints, the metrics log and the trackers' logs are skipped: they describe how the folder was made, not
    what it holds.
    The manifest is hashed without its volatile fields (timings), so the hash changes only with content.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] in skip or relative.name.startswith("."):
            continue
        digest.update(str(relative).encode())
        if relative == Path(MANIFEST):
            manifest = json.loads(path.read_text())
            for volatile in ("timings", "created", "finished", "command"):
                manifest.pop(volatile, None)
            digest.update(json.dumps(manifest, sort_keys=True, default=str).encode())
        else:
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- manifests
def read_manifest(folder: Path) -> dict | None:
    """The manifest of a run or data folder, or None when the folder has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(
            f"The manifest is not valid JSON ({exc.msg} at line {exc.lineno})",
            where=str(path),
            fix="Rerun the step that made this folder with --force",
        ) from None


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers, for the manifest."""
    versions = {"python": platform.python_version()}
    for name in ("instruct-cli", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


COMMAND_OF_KIND = {"data": "prepare-data", "report": "eval"}
"""The command that writes a folder of each kind, where it is not the kind's own name (sft, rm, ppo)."""


def require_complete(folder: Path, kinds: tuple[str, ...] | str, flag: str = "input") -> dict:
    """Return the manifest of `folder` if it is a complete folder of one of `kinds`; otherwise a UserError.

    The error says how to finish the folder: resume the interrupted command, or run the step that makes it.
    """
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    folder = Path(folder)
    wanted = " or ".join(kinds)
    maker = COMMAND_OF_KIND.get(kinds[0], kinds[0])
    if not folder.exists():
        raise UserError(
            f"The {wanted} folder given as {flag} does not exist",
            where=str(folder),
            fix=f"Check the path, or create it with `instruct {maker}`",
        )
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(
            f"{folder} is not an instruct {wanted} folder (it has no {MANIFEST})",
            where=flag,
            fix=f"Pass a folder written by `instruct {maker}`",
        )
    if manifest.get("kind") not in kinds:
        found = manifest.get("kind")
        raise UserError(
            f"{folder} is the output of `instruct {COMMAND_OF_KIND.get(found, found)}`, but {flag} "
            f"needs the output of `instruct {either(COMMAND_OF_KIND.get(k, k) for k in kinds)}`",
            where=str(folder / MANIFEST),
            fix=f"Pass a folder written by `instruct {maker}`",
        )
    status = manifest.get("status")
    if status != STATUS_COMPLETE:
        if status == STATUS_RUNNING and lock_holder(folder) is not None:
            raise busy_error(folder)
        command = manifest.get("command") or f"instruct {maker} ..."
        resume = command if "--resume" in command else f"{command} --resume"
        raise UserError(
            f"{folder} is not complete (status: {describe_status(folder, manifest)}); a step that did not finish "
            "cannot be used as input",
            where=str(folder / MANIFEST),
            fix=f"Finish it with `{resume}`, or start it again with --force",
        )
    return manifest


def either(names) -> str:
    """The names as a list in words: `a`, `a or b`, `a, b or c`."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def parent_record(folder: Path) -> dict:
    """How a run names one of its inputs: the folder's path, kind and content hash."""
    manifest = read_manifest(folder) or {}
    return {"path": str(Path(folder).resolve()), "kind": manifest.get("kind"), "sha256": sha256_folder(folder)}


# ---------------------------------------------------------------------------------------------- locks
LOCK = ".instruct.lock"
LOCK_OWNER = ".instruct.lock.json"


class FolderLock:
    """An OS file lock held while a process writes a folder: a second writer is refused with the holder's pid
    and command. The OS releases it when the holder dies (even by SIGKILL), so a lock left by a process that
    is gone is simply taken over."""

    def __init__(self, folder: Path):
        from filelock import FileLock

        self.folder = Path(folder)
        self._lock = FileLock(str(self.folder / LOCK), timeout=0)

    def acquire(self) -> None:
        """Take the lock now, or raise a UserError naming the process that holds it."""
        from filelock import Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise busy_error(self.folder) from None
        atomic_write_json(
            self.folder / LOCK_OWNER,
            {"pid": os.getpid(), "host": platform.node(), "command": _command(), "since": _now()},
        )

    def release(self) -> None:
        """Let go of the lock (the owner file stays: it is only read while the lock is held)."""
        if self._lock.is_locked:
            self._lock.release(force=True)


def lock_holder(folder: Path) -> dict | None:
    """Who is writing `folder` right now ({pid, host, command, since}), or None when nobody is."""
    folder = Path(folder)
    if not (folder / LOCK).exists():
        return None
    from filelock import FileLock, Timeout

    probe = FileLock(str(folder / LOCK), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        try:
            return json.loads((folder / LOCK_OWNER).read_text())
        except (OSError, json.JSONDecodeError):
            return {"pid": "?", "command": "?"}
    except OSError:  # a read-only folder: nobody can be writing it
        return None
    probe.release(force=True)
    return None


def busy_error(folder: Path) -> UserError:
    """The error for a folder another live process is writing."""
    holder = lock_holder(folder) or {}
    return UserError(
        f"{folder} is being written by another instruct process (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', 'this machine')}, since {holder.get('since', '?')}: `{holder.get('command', '?')}`)",
        where=str(folder),
        fix="Wait for that process to finish or stop it; a lock whose process is gone is taken over automatically",
    )


def describe_status(folder: Path, manifest: dict) -> str:
    """The status of a folder for messages: a `running` folder that no process holds was killed hard."""
    status = manifest.get("status")
    if status == STATUS_RUNNING and lock_holder(folder) is None:
        return KILLED
    return str(status)


KILLED = "interrupted: its process stopped without saying so (killed, crashed or out of memory)"


# ------------------------------------------------------------------------------------------ run folders
class RunFolder:
    """One step's output folder: its manifest, recipe.yaml, metrics log and checkpoints.

    Use `RunFolder.open(...)` at the start of a step; it refuses to overwrite a complete output without
    `force`, and refuses to start over an interrupted one unless `resume` or `force` says what to do.
    `with run.recording():` marks the folder interrupted or failed if the step stops early, and
    `run.complete(metrics)` writes the final manifest last.
    """

    def __init__(self, path: Path, manifest: dict, writer: bool = True):
        self.path = Path(path)
        self.manifest = manifest
        self.writer = writer  # False on the non-main processes of a data-parallel run: they write nothing
        self._started = time.time()
        self.lock: FolderLock | None = None
        self.trackers = None  # trackers.RunTrackers when --report-to names any: each metrics row goes to them too

    @property
    def checkpoints(self) -> Path:
        """Where checkpoints for --resume live."""
        return self.path / CHECKPOINTS

    @property
    def resuming(self) -> bool:
        """True when this run continues an interrupted one."""
        return bool(self.manifest.get("resumed"))

    @classmethod
    def open(
        cls,
        path: Path,
        kind: str,
        config: dict,
        *,
        force: bool = False,
        resume: bool = False,
        parents: dict | None = None,
        extra: dict | None = None,
        writer: bool = True,
    ) -> "RunFolder":
        """Start (or resume) writing a `kind` output at `path`, with the resolved `config`."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(
                f"The output path {path} is a file, not a folder", where="--out", fix="Choose another --out"
            )
        if path.exists() and read_manifest(path) is None and not _own_files_only(path):
            raise UserError(
                f"{path} is not empty and was not written by instruct (it has no {MANIFEST}), so instruct will not "
                "write into it or delete it, with --force or without",
                where="--out",
                fix="Choose a new or empty folder for --out",
            )
        lock = FolderLock(path) if writer else None
        if lock is not None:
            lock.acquire()  # before looking at the status: nobody else may be writing from here on
        existing = read_manifest(path) if path.exists() else None
        try:
            _check_replaceable(path, existing, kind, force=force, resume=resume)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if force and existing is not None and writer:
            _clear_folder(path)
        elif writer and path.exists():
            sweep_temporaries(path)
        resumed = existing is not None and resume and not force
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": kind,
            "status": STATUS_RUNNING,
            "command": _command(),
            "created": (existing or {}).get("created") if resumed else _now(),
            "resumed": resumed,
            "config": config,
            "parents": parents or {},
            "packages": package_versions(),
            **(extra or {}),
        }
        reset_cuda_peak()
        run = cls(path, manifest, writer=writer)
        run.lock = lock
        if writer:
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path / RECIPE, yaml.safe_dump({kind: config}, sort_keys=False))
            run.write_manifest()
        return run

    @classmethod
    def follow(cls, path: Path) -> "RunFolder":
        """The run folder as another process of a data-parallel run sees it: read-only, after the main opened it."""
        manifest = read_manifest(path)
        if manifest is None:  # pragma: no cover - the main process writes it before the others get here
            raise UserError(f"{path} has no manifest", where="--out")
        return cls(path, manifest, writer=False)

    def write_manifest(self) -> None:
        """Write the manifest as it stands (atomically)."""
        if self.writer:
            atomic_write_json(self.path / MANIFEST, self.manifest)

    def update(self, **fields) -> None:
        """Add fields to the manifest and write it."""
        self.manifest.update(fields)
        self.write_manifest()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once, so a crash loses nothing logged), and send the
        same metrics to the run's experiment trackers, if any."""
        if not self.writer:
            return
        row = {"step": step, "time": round(time.time() - self._started, 3), **metrics}
        with open(self.path / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def truncate_log(self, step: int, name: str = METRICS, key: str = "step") -> None:
        """Keep only the rows of the JSONL log `name` whose `key` is <= `step` (a resumed run redoes the later
        steps, and would log them twice)."""
        path = self.path / name
        if not self.writer or not path.is_file():
            return
        # read_jsonl leaves out a line torn by a hard kill; the rest is rewritten without the redone steps
        write_jsonl(path, [row for row in read_jsonl(path) if row.get(key, math.inf) <= step])

    @contextlib.contextmanager
    def recording(self) -> Iterator["RunFolder"]:
        """Mark the run interrupted (Ctrl-C) or failed (any error) if the block does not finish."""
        try:
            yield self
        except KeyboardInterrupt:
            self.update(status=STATUS_INTERRUPTED, finished=_now())
            raise
        except BaseException as exc:
            with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the run
                self.update(status=STATUS_FAILED, finished=_now(), error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if self.trackers is not None:
                self.trackers.finish()  # flushes and closes them, whether the run finished or not
            if self.lock is not None:
                self.lock.release()

    def complete(self, metrics: dict | None = None, **fields) -> None:
        """Record the final metrics and mark the folder complete: the last write of every step."""
        timings = dict(self.manifest.get("timings") or {})
        timings["seconds"] = round(time.time() - self._started + timings.get("seconds", 0.0), 2)
        self.manifest.update(fields)
        peak = cuda_peak_gib()
        if peak is not None:
            self.manifest["peak_memory_gib"] = peak
        self.manifest.update(metrics=metrics or {}, timings=timings, finished=_now(), status=STATUS_COMPLETE)
        self.manifest.pop("error", None)
        self.write_manifest()
        if self.lock is not None:
            self.lock.release()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cuda_peak_gib() -> float | None:
    """The peak GPU memory allocated by torch since the step's folder was opened (None without CUDA)."""
    torch = sys.modules.get("torch")  # never imported here just for this
    if torch is None or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def reset_cuda_peak() -> None:
    """Start counting the peak afresh (several steps may run in one process under `instruct run`)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _command() -> str | None:
    """The command line of this process, as the user would type it."""
    return shlex.join(["instruct", *sys.argv[1:]]) if sys.argv else None


def _check_replaceable(path: Path, existing: dict | None, kind: str, *, force: bool, resume: bool) -> None:
    """Refuse to start over or continue an existing output unless the flags say so (the lock is held)."""
    if existing is None or force:
        return
    status = existing.get("status")
    if status == STATUS_COMPLETE:
        raise UserError(
            f"{path} already holds a complete {existing.get('kind')} output",
            where="--out",
            fix="Pass --force to replace it, or choose another --out",
        )
    # this process holds the lock now: a folder still marked running lost its writer without a word
    shown = KILLED if status == STATUS_RUNNING else status
    if not resume:
        raise UserError(
            f"{path} holds an unfinished {existing.get('kind')} run (status: {shown})",
            where="--out",
            fix="Pass --resume to continue it, or --force to start over",
        )
    if existing.get("kind") != kind:
        raise UserError(
            f"{path} holds a {existing.get('kind')} run, not {kind}", where="--out", fix="Choose another --out"
        )


def _own_files_only(path: Path) -> bool:
    """True when a folder without a manifest holds nothing but what instruct leaves before writing one (its
    lock files, temporaries of a killed atomic write): such a folder counts as empty."""
    return all(
        item.name in (LOCK, LOCK_OWNER) or (item.name.startswith(".") and item.name.endswith((".tmp", ".old")))
        for item in path.iterdir()
    )


def _clear_folder(path: Path) -> None:
    """Delete what an instruct folder holds, keeping the lock files (the lock is held by this process)."""
    for item in path.iterdir():
        if item.name in (LOCK, LOCK_OWNER):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def sweep_temporaries(path: Path) -> None:
    """Remove what a hard-killed writer may have left: temporary files and folders of atomic writes
    (`.NAME.*.tmp`, `.NAME.old`) and unfinished checkpoints (`*.pt.tmp`)."""
    for pattern in (".*.tmp", ".*.old", f"{CHECKPOINTS}/*.pt.tmp", f"{CHECKPOINTS}/.*.tmp", f"{CHECKPOINTS}/.*.old"):
        for item in path.glob(pattern):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
