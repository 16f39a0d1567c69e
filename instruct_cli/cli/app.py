"""The typer app and what every command shares: option helpers and the handler that turns a UserError
into a one-paragraph message (exit 2) and Ctrl-C into exit 130. May use: core (config, console, errors).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from instruct_cli import __version__
from instruct_cli.core import config as cfg
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

RecipeOption = Annotated[
    Optional[Path],
    typer.Option(
        "--recipe", help="Recipe YAML; this step reads its section. Flags given on the command line override it."
    ),
]
ForceOption = Annotated[Optional[bool], typer.Option("--force", help="Replace an existing output folder.")]


def _opt(cls: type, name: str, *flags: str, **kwargs):
    """A typer option whose help is the config field's docstring."""
    flag = flags or ("--" + name.replace("_", "-"),)
    return typer.Option(*flag, help=cfg.doc(cls, name), show_default=False, **kwargs)


def handles_user_errors(command: Callable) -> Callable:
    """Turn UserError into a one-paragraph message and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            error(exc.paragraph())
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error(
                "Interrupted. Any run folder was left marked as interrupted; rerun the same command with "
                "--resume to continue it where checkpoints allow, or --force to start over."
            )
            raise typer.Exit(130) from None

    return wrapper


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
