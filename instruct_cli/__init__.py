"""instruct: the InstructGPT recipe (SFT -> reward model -> PPO) as composable command-line steps.

Three layers, each importing only the ones below it (checked by import-linter, see pyproject.toml):

    cli/     the typer commands: build a step's config from flags and recipe, call the step's `run`
    steps/   one module or small package per command; a step never imports another step
    core/    what the steps share: configs and recipes, run folders, models, chat encoding, sampling,
             the training loop, RL maths, heads

The version lives in version.py (re-exported here as `instruct_cli.__version__`).
"""

from instruct_cli.version import __version__

__all__ = ["__version__"]
