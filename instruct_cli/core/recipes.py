"""The steps of a recipe, resolved: what `instruct run` executes and `instruct plan` estimates.

Owns: the step names in pipeline order, which config fields are a step's inputs, and `read_tasks`, which
turns a recipe file into validated configs (`Task`). May use: config, errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instruct_cli.core import config as cfg
from instruct_cli.core.errors import UserError

STEP_NAMES = ("prepare-data", "sft", "rm", "ppo", "eval")


RESUMABLE = ("sft", "rm", "ppo")


OTHER_SECTIONS = ("label", "generate")  # sections for commands that `run` does not run (they read them with --recipe)


INPUT_FIELDS = {
    "prepare-data": ("inputs",),
    "sft": ("model", "data"),
    "rm": ("model", "data"),
    "ppo": ("sft", "reward", "data"),
    "eval": ("models", "reward", "data"),
}


@dataclass
class Task:
    """One command the recipe asks for, with its resolved config and what the runner will do with it."""

    step: str
    config: Any
    action: str = "run"
    reason: str = ""
    seconds: float = 0.0
    headline: str = ""

    @property
    def out(self) -> Path:
        """The folder the task writes."""
        return Path(self.config.out)

    @property
    def label(self) -> str:
        """The step name, with the data task for prepare-data (there may be several)."""
        return f"{self.step} ({self.config.task})" if self.step == "prepare-data" else self.step


def read_tasks(recipe_path: Path) -> list[Task]:
    """Every command of the recipe, in pipeline order, with its config resolved and validated."""
    recipe = cfg.read_recipe(recipe_path)
    unknown = [key for key in recipe if key not in (*STEP_NAMES, "model", "version", *OTHER_SECTIONS)]
    if unknown:
        close = cfg.unknown_key_error(unknown[0], [*STEP_NAMES, "model", "version"], str(recipe_path))
        raise UserError(f"Unknown section `{unknown[0]}`", where=str(recipe_path), fix=close.fix)
    tasks = []
    for step in STEP_NAMES:
        if step not in recipe:
            continue
        config_cls = step_config_class(step)
        for entry in range(len(cfg.recipe_entries(Path(recipe_path), step, config_cls))):
            config = cfg.build_config(config_cls, step, Path(recipe_path), {}, entry=entry)
            if getattr(config, "out", None) is None:
                raise UserError(
                    f"The `{step}` section has no `out`",
                    where=f"{recipe_path}: {step}",
                    fix="Every step of a recipe names the folder it writes with `out:`",
                )
            tasks.append(Task(step, config))
    if not tasks:
        raise UserError(
            "The recipe has no step sections",
            where=str(recipe_path),
            fix=f"Add one or more of: {', '.join(STEP_NAMES)}",
        )
    return tasks


def step_config_class(step: str) -> type:
    """The config dataclass of a step (without importing the step's heavy module)."""
    return {
        "prepare-data": cfg.PrepareDataConfig,
        "sft": cfg.SFTConfig,
        "rm": cfg.RMConfig,
        "ppo": cfg.PPOConfig,
        "eval": getattr(cfg, "EvalConfig", None),
    }[step]
