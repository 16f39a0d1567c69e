"""`instruct run recipe.yaml`: every step of a recipe in order, skipping what is already up to date.

A recipe has a section per step (`prepare-data`, `sft`, `rm`, `ppo`, `dpo`, `eval`), each mapping 1:1 to that
command's flags (`prepare-data` may list several data sets). For each step the runner decides, from the
step's output folder alone:

    run      no output yet
    skip     the output is complete, was made with the same resolved config, and its inputs still hash
             the same (and none of them is rebuilt by an earlier step of this run)
    resume   the output was interrupted, with the same config: continue from its checkpoints
    rerun    anything else (config changed, an input changed, --force): start the step over

The same rules make `--dry-run` a faithful plan. Steps talk only through their folders, so running them
here is exactly running the commands by hand.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from instruct_cli.core import artifacts, models, recipes
from instruct_cli.core import config as cfg
from instruct_cli.core.console import console, display_path, info, print_table
from instruct_cli.core.errors import UserError
from instruct_cli.core.step_table import STEPS


@dataclass(frozen=True)
class StepFunctions:
    """What the runner calls, passed in by the cli so that this step never imports another one: each
    step's `run(config)` by step name, and how to show a finished eval report (its folder)."""

    run: Mapping[str, Callable[[Any], Path]]
    show_report: Callable[[Path], None]


# ---------------------------------------------------------------------------------------------- planning


def decide(task: recipes.Task, rebuilt: set[Path], force: bool) -> tuple[str, str]:
    """(action, reason) for one task, given the outputs that earlier tasks of this run will rebuild."""
    manifest = artifacts.read_manifest(task.out) if task.out.is_dir() else None
    if manifest is None:
        return "run", "no output yet"
    changed = changed_settings(manifest.get("config") or {}, task.config)
    same_config = not changed
    if manifest.get("status") == artifacts.STATUS_RUNNING and artifacts.lock_holder(task.out) is not None:
        raise artifacts.busy_error(task.out)
    if manifest.get("status") != artifacts.STATUS_COMPLETE:
        if STEPS[task.step].resumable and same_config and not force:
            return "resume", f"the last run stopped ({manifest.get('status')})"
        return "rerun", f"the last run did not finish ({manifest.get('status')})"
    if force:
        return "rerun", "--force"
    if not same_config:
        return "rerun", f"the recipe changed ({', '.join(changed)})"
    stale = stale_input(manifest, rebuilt)
    if stale:
        return "rerun", stale
    return "skip", "up to date"


def changed_settings(recorded: dict, config: Any) -> list[str]:
    """The settings of `config` that differ from those a run recorded. A setting the run did not record (it
    was added to instruct later) counts as its default, so upgrading instruct does not rerun every step."""
    now = cfg.to_recipe_dict(config)
    defaults = cfg.to_recipe_dict(type(config)())
    return sorted(key for key, value in now.items() if recorded.get(key, defaults.get(key)) != value) + sorted(
        key for key in recorded if key not in now
    )


def stale_input(manifest: dict, rebuilt: set[Path]) -> str | None:
    """Why a complete output's inputs are no longer the ones it was made from (None when they are)."""
    for source in manifest.get("sources") or []:  # a data folder's raw files
        path = Path(source["path"])
        current = (
            artifacts.sha256_file(path) if path.is_file() else artifacts.sha256_folder(path) if path.is_dir() else None
        )
        if current != source.get("sha256"):
            return f"{path.name} changed"
    for parent in (manifest.get("parents") or {}).values():
        path = Path(parent["path"])
        if path.resolve() in rebuilt:
            return f"its input {path.name} is rebuilt"
        if not path.is_dir() or artifacts.sha256_folder(path) != parent.get("sha256"):
            return f"its input {path.name} changed"
    return stale_base_model(manifest.get("base_model"))


def stale_base_model(base: dict | None) -> str | None:
    """Why the base model a run was trained on is no longer the same weights (None when it is, or when it is
    a hub model, which is not fetched again just to check)."""
    if not base or not base.get("fingerprint"):
        return None
    reference = str(base.get("id", ""))
    if reference != models.BUILTIN_NAME and not Path(reference).exists():
        return None
    try:
        current = models.resolve_model(reference).fingerprint
    except UserError:
        return f"its base model {reference} can no longer be loaded"
    return None if current == base["fingerprint"] else f"its base model {Path(reference).name} changed"


def plan(tasks: list[recipes.Task], selected: set[str], force: bool) -> list[recipes.Task]:
    """Decide every task's action; tasks of steps not selected are skipped."""
    rebuilt: set[Path] = set()
    for task in tasks:
        if task.step not in selected:
            task.action, task.reason = "skip", "not selected (--from/--only)"
            continue
        task.action, task.reason = decide(task, rebuilt, force)
        if task.action != "skip":
            rebuilt.add(task.out.resolve())
    return tasks


def selected_steps(tasks: list[recipes.Task], start: str | None, only: str | None) -> set[str]:
    """The steps `--from` / `--only` select (all by default)."""
    present = [step for step in recipes.STEP_NAMES if any(t.step == step for t in tasks)]
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in present:
            raise UserError(
                f"{flag} {value}: the recipe has no such step", where=flag, fix=f"Use one of: {', '.join(present)}"
            )
    if only is not None:
        return {only}
    if start is not None:
        return set(present[present.index(start) :])
    return set(present)


# ---------------------------------------------------------------------------------------------- running
def run(
    recipe_path: Path,
    steps: StepFunctions,
    start: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> list[recipes.Task]:
    """Plan the recipe, then (unless `dry_run`) run each task that is not up to date; returns the tasks."""
    tasks = recipes.read_tasks(Path(recipe_path))
    tasks = plan(tasks, selected_steps(tasks, start, only), force)
    if dry_run:
        show_plan(tasks)
        return tasks
    for number, task in enumerate(tasks, start=1):
        console.rule(f"[bold]{number}/{len(tasks)} {task.label}[/bold] — {task.action}: {task.reason}")
        if task.action == "skip":
            task.headline = headline(task)
            continue
        runner = steps.run[task.step]
        config = replace(task.config, force=task.action == "rerun" or task.config.force)
        if task.action == "resume":
            config = replace(config, resume=True)
        started = time.time()
        try:
            runner(config)
        except UserError as exc:
            raise UserError(f"Step {number} ({task.label}) failed: {exc.what}", where=exc.where, fix=exc.fix) from None
        task.seconds = time.time() - started
        task.headline = headline(task)
        gc.collect()  # the step's model is garbage now: free it before the next step loads its own
    show_summary(tasks, steps.show_report)
    return tasks


def headline(task: recipes.Task) -> str:
    """The one number that says how a finished step went, read from its manifest."""
    manifest = artifacts.read_manifest(task.out) or {}
    metrics = manifest.get("metrics") or {}
    if task.step == "prepare-data":
        counts = manifest.get("counts") or {}
        return f"{counts.get('train', '?')} train / {counts.get('eval', '?')} eval rows"
    wanted = STEPS[task.step].headline
    for key in wanted:
        if key in metrics:
            return f"{key} {metrics[key]:.4g}"
    wins = [
        f"{Path(key[: -len('/win_rate')]).name} wins {value:.0%} "
        f"({metrics.get(key + '_low', math.nan):.0%}-{metrics.get(key + '_high', math.nan):.0%})"
        for key, value in metrics.items()
        if key.endswith("/win_rate")
    ]
    return ", ".join(wins[:2])


def show_plan(tasks: list[recipes.Task]) -> None:
    """The --dry-run table: each task, its inputs and output, and what would happen and why."""
    rows = []
    for task in tasks:
        inputs = []
        for key in STEPS[task.step].inputs:
            value = getattr(task.config, key, None)
            inputs += [display_path(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
        rows.append([task.label, "\n".join(inputs), display_path(task.out), task.action, task.reason])
    print_table("plan", ["step", "inputs", "output", "action", "why"], rows)


def show_summary(tasks: list[recipes.Task], show_report: Callable[[Path], None]) -> None:
    """The final table: each task's action, time and headline metric; then the eval report's table."""
    rows = [
        [t.label, t.action, f"{t.seconds:.0f} s" if t.seconds else "-", t.headline, display_path(t.out)] for t in tasks
    ]
    print_table("instruct run", ["step", "action", "time", "headline", "output"], rows)
    reports = [t for t in tasks if t.step == "eval"]
    if reports:
        show_report(reports[-1].out)
    else:
        info("Done.")
