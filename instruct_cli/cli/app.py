"""The typer app and what every command shares: the handler that turns a UserError into a one-paragraph
message (exit 2) and Ctrl-C into exit 130. (Flags built from configs: options.py.) May use: core (console,
errors).
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import signal
import sys
import threading
from typing import Annotated, Callable, Optional

import typer

from instruct_cli import __version__
from instruct_cli.core.console import console, error
from instruct_cli.core.errors import UserError

app = typer.Typer(
    name="instruct",
    help="The InstructGPT recipe as composable steps: prepare-data -> sft -> rm -> ppo -> eval, "
    "with LoRA adapters on a 4-bit base model. Every step reads and writes plain folders on disk.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ForceOption = Annotated[Optional[bool], typer.Option("--force", help="Replace an existing output folder.")]
"""--force of the commands whose flags are not a config's (export)."""


def handles_user_errors(command: Callable) -> Callable:
    """Run a command so that no user-facing failure ends in a traceback: a UserError, a failing disk or
    permission (OSError) and running out of GPU memory become a one-paragraph message and exit code 2;
    Ctrl-C and SIGTERM (a scheduler's polite stop) become exit code 130, with the run folder marked
    interrupted."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        previous = _sigterm_as_interrupt()
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            error(exc.paragraph())
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error(
                "Interrupted. The run folder is marked interrupted; rerun the same command with --resume to "
                "continue from its last checkpoint, or --force to start over."
            )
            raise typer.Exit(130) from None
        except OSError as exc:
            error(os_error(exc, command.__name__).paragraph())
            raise typer.Exit(2) from None
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            error(out_of_memory_error(command.__name__, kwargs).paragraph())
            raise typer.Exit(2) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


_TEARDOWN = {"skip": False}


def skip_teardown() -> None:
    """Let `end_process` end this process without the interpreter's teardown once the command is done: for the
    commands a person runs many times in a row (generate, chat), where tearing down the thousands of modules
    torch and transformers load takes a second after the answer is out."""
    _TEARDOWN["skip"] = True


def end_process(code: object) -> None:
    """End the process with exit `code` at once when the command asked for it (skip_teardown) and no other
    thread is running: the atexit handlers run and the streams are flushed, only the module teardown is
    skipped. Returns without doing anything otherwise (the caller then exits as usual)."""
    if not _TEARDOWN["skip"] or threading.active_count() > 1 or not (code is None or isinstance(code, int)):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head -1`) or stream
            pass
    os._exit(code or 0)


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (training loops turn both into a stop at the next
    step boundary); returns the previous handler, or None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(number, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


ERRNO_FIXES = {
    errno.ENOSPC: "Free some disk space (or write --out to another disk), then rerun with --resume",
    errno.EDQUOT: "Free some of your disk quota, then rerun with --resume",
    errno.EACCES: "Check the permissions of that path, or choose an --out you can write",
    errno.EPERM: "Check the permissions of that path, or choose an --out you can write",
    errno.EROFS: "That file system is read-only: choose an --out on a writable one",
    errno.ENOENT: "Check that the path exists",
    errno.EISDIR: "Give a file there, not a folder",
    errno.ENOTDIR: "A part of that path is a file, not a folder: check the path",
}


def os_error(exc: OSError, command: str) -> UserError:
    """A failing file system as a one-paragraph error: what failed, on which path, what to do."""
    what = exc.strerror or str(exc)
    path = exc.filename or "the file system"
    return UserError(
        f"`instruct {command.rstrip('_')}` could not read or write a file: {what}",
        where=str(path),
        fix=ERRNO_FIXES.get(exc.errno, "Check the path and the disk, then rerun the command"),
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA or other accelerators)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def out_of_memory_error(command: str, flags: dict) -> UserError:
    """Running out of GPU memory as a one-paragraph error that says what to change."""
    name = command.rstrip("_")
    sizes = [f"--{key.replace('_', '-')} {flags[key]}" for key in BATCH_FLAGS if flags.get(key) is not None]
    given = ", ".join(sizes) if sizes else "the batch size of the recipe or the default"
    recipe = f" {flags['recipe']}" if flags.get("recipe") else ""
    return UserError(
        f"The GPU ran out of memory during `instruct {name}` ({given})",
        where=f"instruct {name}",
        fix=f"Run `instruct plan{recipe} --gpu-memory <your card's GB>`: it suggests what fits (a smaller batch with "
        "more --grad-accum, --gradient-checkpointing, --quantization nf4, shorter sequences); a run folder "
        "continues with --resume",
    )


BATCH_FLAGS = ("batch_size", "grad_accum", "rollout_batch_size", "minibatch_size", "max_length", "max_new_tokens")


def _version(value: bool) -> None:
    if value:
        console.print(f"instruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """instruct: SFT, reward model and PPO as composable command-line steps."""
