"""The `instruct` command line: thin typer commands that build a step's config and call `<step>.run(config)`.

Each command's flags are built from its config dataclass (core/config.py) by options.py: one declaration per
setting gives the flag, its --help line with the default, the recipe key and the range check. A command adds
only its docstring with examples and the call to its step.

    options.py   config_command: a config dataclass -> typer options; the config built from recipe + flags
    app.py       the typer app, the UserError / Ctrl-C handler
    recipe.py    prepare-data, run, plan
    train.py     sft, rm, rm score, dpo, ppo
    use.py       generate, chat, label, export, eval
    entry.py     `main`, the console script (pyproject's `instruct_cli.cli:main`): the garbage collector's
                 thresholds, every command registered, --help's order of the commands
"""

from instruct_cli.cli.app import app
from instruct_cli.cli.entry import main
from instruct_cli.cli.recipe import recipe_steps

__all__ = ["app", "main", "recipe_steps"]
