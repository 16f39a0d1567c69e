"""Planning a recipe: the steps it runs (`recipe_tasks`, or the default settings of sft, rm, ppo and eval:
`DEFAULT_STEPS`), the base model and adapters each step runs with, and `plan_recipe`, which estimates
every step and, for a card, judges it and suggests changes.

Uses the core (config, recipes), `shapes`, `estimate` and `suggestions`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from instruct_cli.core import config as cfg
from instruct_cli.core.step_table import RUN_KINDS

from .estimate import StepPlan, estimate_step, judge
from .shapes import Lora, ModelShape, lora_for, read_model_shape
from .suggestions import suggest


def _same_path(a: Any, b: Any) -> bool:
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except OSError:  # pragma: no cover - unresolvable paths are simply different
        return False


def _model_of(task: Any, tasks: list[Any], seen: int = 0) -> str:
    """The base model a task runs on: its --model, following run folders that earlier steps of the recipe
    write (`rm: model: runs/sft`), or that exist already (their manifest names the base)."""
    config = task.config
    reference = {
        "sft": lambda: config.model,
        "rm": lambda: config.model,
        "dpo": lambda: config.model,
        "ppo": lambda: config.sft,
        "eval": lambda: config.reward or (config.models[0] if config.models else None),
    }[task.step]()
    if reference is None:
        return cfg.BUILTIN_MODEL
    for other in tasks:
        if other is not task and other.step in RUN_KINDS and _same_path(other.config.out, reference):
            return _model_of(other, tasks, seen + 1) if seen < 8 else cfg.BUILTIN_MODEL
    manifest = Path(str(reference)) / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())["base_model"]["id"]
        except (ValueError, KeyError, TypeError):
            pass
    return str(reference)


def _lora_of(step: str, tasks: list[Any], shape: ModelShape) -> Lora:
    """The adapter a later step inherits from the recipe's sft (or rm) section; peft's defaults otherwise."""
    for task in tasks:
        if task.step == step:
            return lora_for(shape, task.config)
    return lora_for(shape, cfg.SFTConfig())


DEFAULT_STEPS = (("sft", cfg.SFTConfig), ("rm", cfg.RMConfig), ("ppo", cfg.PPOConfig), ("eval", cfg.EvalConfig))


def recipe_tasks(recipe: Path | None, model: str | None = None) -> list[Any]:
    """The steps to plan: a recipe's (resolved as `instruct run` resolves them), or the default settings of
    sft, rm, ppo and eval."""
    from instruct_cli.core import recipes

    if recipe is not None:
        return recipes.read_tasks(Path(recipe))
    tasks = [recipes.Task(step, cls()) for step, cls in DEFAULT_STEPS]
    for task in tasks:
        if model and task.step in ("sft", "rm"):
            task.config = replace(task.config, model=model)
    return tasks


def plan_recipe(
    recipe: Path | None,
    model: str | None = None,
    model_config: Path | None = None,
    memory: int | None = None,
    device: str = "cuda",
) -> list[StepPlan]:
    """Estimate every step of a recipe (or, without one, of the default settings) on the model the recipe
    names, or on `model` / `model_config` when given, with fit verdicts and suggestions for `memory` bytes."""
    tasks = recipe_tasks(recipe, model)
    shapes: dict[str, ModelShape] = {}

    def shape_of(task) -> ModelShape:
        reference = str(model_config) if model_config else (model or _model_of(task, tasks))
        if reference not in shapes:
            shapes[reference] = read_model_shape(None if model_config else reference, model_config)
        return shapes[reference]

    plans = []
    for task in tasks:
        if task.step == "prepare-data":
            plans.append(StepPlan(task.step, task.config, None, breakdown=estimate_step(task.step, task.config, None)))
            continue
        shape = shape_of(task)
        if task.step in ("sft", "rm", "dpo"):
            loras = ()  # their own config says
        elif task.step == "ppo":  # policy/reference from the SFT run, value/reward from the RM run
            loras = (_lora_of("sft", tasks, shape), _lora_of("rm", tasks, shape))
        else:
            loras = (_lora_of("sft", tasks, shape),)
        plan = StepPlan(task.step, task.config, shape, loras)
        plan.breakdown = plan.estimate(device=device)
        if task.step != "eval":
            on = task.config.gradient_checkpointing
            flipped = plan.estimate(replace(task.config, gradient_checkpointing=not on), device).total
            plan.checkpointing = {on: plan.breakdown.total, not on: flipped}
        plans.append(plan)
    if memory is not None:
        for plan in plans:
            plan.verdict = judge(plan.breakdown.total, memory, device)
            if not plan.verdict.fits and plan.shape is not None:
                plan.verdict.suggestions = suggest(plan, memory, device)
    return plans
