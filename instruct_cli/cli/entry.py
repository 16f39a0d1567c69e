"""The `instruct` console script's `main`, and the app it runs: every command registered (importing recipe,
train and use registers theirs) and listed by --help in the order of the recipe, then the tools around it."""

import gc

from instruct_cli.cli import recipe, train, use  # noqa: F401 - importing them registers their commands
from instruct_cli.cli.app import app, end_process
from instruct_cli.core.console import quiet_warnings

GC_THRESHOLDS = (50_000, 20, 20)
"""Python's cyclic garbage collector runs every 700 allocations by default; importing torch and transformers
allocates millions of objects that all stay alive, and scanning them again and again took ~0.5 s of the 3 s
before `instruct generate`'s first word (measured). Collections still happen, just less often."""


def main() -> None:
    """Entry point of the `instruct` console script."""
    gc.set_threshold(*GC_THRESHOLDS)
    quiet_warnings()
    try:
        app()
    except SystemExit as stop:
        end_process(stop.code)
        raise


# --help lists the commands in the order of the recipe, then the tools around it
HELP_ORDER = ["prepare-data", "sft", "rm", "ppo", "dpo", "eval", "generate", "chat", "label", "export", "run", "plan"]
app.registered_commands.sort(
    key=lambda command: (
        HELP_ORDER.index(command.name or command.callback.__name__)
        if (command.name or command.callback.__name__) in HELP_ORDER
        else len(HELP_ORDER)
    )
)
