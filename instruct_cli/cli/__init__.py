"""The `instruct` command line: thin typer commands that build a step's config and call `<step>.run(config)`.

Each command's flags mirror its config dataclass (core/config.py), whose field docstrings are the flag help.
A flag left out is None here, so a recipe's value (via --recipe) or the dataclass default applies.

    app.py       the typer app, option helpers, the UserError / Ctrl-C handler
    recipe.py    prepare-data, run, plan
    train.py     sft, rm, rm score, dpo, ppo
    use.py       generate, chat, label, export, eval
"""

import gc

from instruct_cli.cli import recipe, train, use  # noqa: F401 - importing them registers their commands
from instruct_cli.cli.app import app, end_process
from instruct_cli.cli.recipe import recipe_steps
from instruct_cli.core.console import quiet_warnings

__all__ = ["app", "main", "recipe_steps"]


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
