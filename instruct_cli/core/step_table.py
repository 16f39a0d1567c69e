"""The steps a recipe can run, as one table: name, config class, module, what each reads and writes, whether
it makes a policy, and its headline metrics.

Recipes, `instruct run`, plan, eval, export and the CLI read this table instead of spelling step names
themselves, so a new training step is one row here plus its config and its module. May use: config.
"""

from __future__ import annotations

from dataclasses import dataclass

from instruct_cli.core import config as cfg


@dataclass(frozen=True)
class Step:
    """One step of the recipe."""

    name: str
    """The command, the recipe section and the `kind` in the manifest of what it writes."""
    config: type
    """Its config dataclass."""
    module: str
    """The module under instruct_cli.steps whose `run(config)` runs it."""
    inputs: tuple[str, ...]
    """The config fields that name what it reads (checked for cycles, shown by `run --dry-run`)."""
    writes: str
    """What its output folder is: data, run (an adapter) or report."""
    makes_policy: bool = False
    """Its run folder holds a model that answers prompts (generate, chat, eval, export and ppo's --sft take it)."""
    resumable: bool = False
    """An interrupted run continues from its checkpoints (`--resume`)."""
    headline: tuple[str, ...] = ()
    """Metrics of its manifest that sum up how it went, the first one present wins (`instruct run`'s table)."""


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step("prepare-data", cfg.PrepareDataConfig, "prepare_data", inputs=("inputs",), writes="data"),
        Step(
            "sft",
            cfg.SFTConfig,
            "sft",
            inputs=("model", "data"),
            writes="run",
            makes_policy=True,
            resumable=True,
            headline=("eval/loss", "loss/train"),
        ),
        Step(
            "rm",
            cfg.RMConfig,
            "rm",
            inputs=("model", "data"),
            writes="run",
            resumable=True,
            headline=("eval/accuracy", "train/accuracy"),
        ),
        Step(
            "ppo",
            cfg.PPOConfig,
            "ppo",
            inputs=("sft", "reward", "data"),
            writes="run",
            makes_policy=True,
            resumable=True,
            headline=("eval/reward", "objective/score"),
        ),
        Step(
            "dpo",
            cfg.DPOConfig,
            "dpo",
            inputs=("model", "data"),
            writes="run",
            makes_policy=True,
            resumable=True,
            headline=("eval/accuracy", "train/accuracy"),
        ),
        Step("eval", cfg.EvalConfig, "evaluate", inputs=("models", "reward", "data"), writes="report"),
    )
}
"""Every step `instruct run` runs, in pipeline order."""

RUN_KINDS = tuple(name for name, step in STEPS.items() if step.writes == "run")
"""Steps whose output is a run folder with an adapter (any of them loads as a model)."""
POLICY_KINDS = tuple(name for name, step in STEPS.items() if step.makes_policy)
"""Steps whose run folder holds a policy: what generate, eval and export take."""
