"""Recipes and flags into validated configs: what every command's `--recipe` and `instruct run` read.

Owns: reading a recipe file (`read_recipe`: one `model` section shared by every step, one section per
step), building a step's config from its section overridden by the flags given (`build_config`), strict
checking of keys and types with errors that name the file, the key and the nearest valid key
(`make_config`, `coerce`), relative paths resolved against the recipe's folder, and the recipe's steps in
pipeline order as `Task`s (`read_tasks`). May use: config (the dataclasses and their range checks), errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from instruct_cli.core import config as cfg
from instruct_cli.core import settings
from instruct_cli.core.errors import UserError
from instruct_cli.core.step_table import STEPS


def build_config(cls: type, step: str, recipe: Path | None, flags: dict[str, Any], entry: int | None = None):
    """The resolved config of a step: the recipe's section (if any), overridden by the flags that were given.

    `flags` maps field names to values; None means "not given on the command line". `entry` picks one
    entry of a section that is a list (prepare-data may list several data sets).
    """
    values: dict[str, Any] = {}
    source = "command line"
    if recipe is not None:
        entries = recipe_entries(Path(recipe), step, cls)
        if entry is None and len(entries) > 1:
            raise UserError(
                f"The `{step}` section of the recipe lists {len(entries)} entries",
                where=str(recipe),
                fix=f"Run them all with `instruct run {recipe} --only {step}`",
            )
        values.update(entries[entry or 0])
    given = {name: value for name, value in flags.items() if value is not None}
    values.update(given)
    return make_config(cls, values, source=str(recipe) if recipe and not given else source)


def build_configs(
    cls: type, step: str, recipe: Path | None, flags: dict[str, Any], per_entry: tuple[str, ...] = ()
) -> list:
    """One resolved config per entry of the recipe's section (prepare-data may list several data sets), or
    the one config of the flags when there is no recipe. `per_entry` names the flags that differ from entry to
    entry (inputs, out): given with a section of several entries, they could not apply to all of them."""
    if recipe is None:
        return [build_config(cls, step, None, flags)]
    count = len(recipe_entries(Path(recipe), step, cls))
    given = [name for name in per_entry if flags.get(name) is not None]
    if count > 1 and given:
        spelled = " and ".join(settings.flag_name(field) for field in dataclasses.fields(cls) if field.name in given)
        raise UserError(
            f"The recipe's {step} section lists {count} entries; {spelled} cannot apply to all of them",
            where="--recipe",
            fix=f"Drop {spelled}, or edit the recipe",
        )
    return [build_config(cls, step, recipe, flags, entry=entry) for entry in range(count)]


def make_config(cls: type, values: dict[str, Any], source: str):
    """Check `values` against the fields of `cls` (names, types, allowed values) and build the dataclass."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in hints:
            raise unknown_key_error(key, known, source)
        checked[key] = coerce(value, hints[key], key, source)
    config = cls(**checked)
    settings.validate(config, source)
    return config


def unknown_key_error(key: str, known: list[str], source: str) -> UserError:
    """The error for a key that a section does not have, with the nearest valid key."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"Did you mean `{close[0]}`?" if close else f"Valid keys: {', '.join(known)}"
    return UserError(f"Unknown key `{key}`", where=source, fix=hint)


def coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Return `value` as the annotated type, or raise a UserError naming the key and the expected type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, source)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"Did you mean `{close[0]}`?" if close else ""
            raise UserError(
                f"`{key}` must be one of {', '.join(map(str, args))}, not {value!r}",
                where=source,
                fix=hint or f"Use one of {', '.join(map(str, args))}",
            )
        return value
    if origin is list:
        (item_type,) = args
        if isinstance(value, (str, Path)):
            value = [part.strip() for part in str(value).split(",") if part.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number where a list of numbers goes (a recipe's `reward_fn_weight: 0.5`)
        if not isinstance(value, (list, tuple)):
            raise type_error(key, value, "a list", source)
        return [coerce(item, item_type, key, source) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise type_error(key, value, "true or false", source)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise type_error(key, value, "a whole number", source)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise type_error(key, value, "a number", source)
    if annotation is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise type_error(key, value, "a string", source)
    if annotation is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise type_error(key, value, "a path", source)
    return value


def type_error(key: str, value: Any, expected: str, source: str) -> UserError:
    """The error for a value of the wrong type."""
    return UserError(f"`{key}` must be {expected}, not {value!r}", where=source, fix=f"Set `{key}` to {expected}")


def read_recipe(path: Path) -> dict:
    """Read a recipe file and check its top level: a mapping with a supported `version`."""
    path = Path(path)
    if not path.is_file():
        raise UserError("The recipe file does not exist", where=str(path), fix="Check the --recipe path")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise UserError(
            f"The recipe is not valid YAML ({getattr(exc, 'problem', exc)})", where=where, fix="Fix the YAML syntax"
        ) from None
    if not isinstance(recipe, dict):
        raise UserError(
            "A recipe must be a YAML mapping of sections",
            where=str(path),
            fix="Start from one of the files in recipes/",
        )
    version = recipe.get("version", cfg.RECIPE_VERSION)
    if version != cfg.RECIPE_VERSION:
        raise UserError(
            f"Recipe version {version!r} is not supported (this instruct reads version {cfg.RECIPE_VERSION})",
            where=f"{path}: version",
            fix="Upgrade instruct or the recipe",
        )
    return recipe


def declared_outputs(recipe: dict) -> set[str]:
    """The `out` values of every section of a recipe: names that are paths even before they exist."""
    outputs = set()
    for section in recipe.values():
        for entry in section if isinstance(section, list) else [section]:
            if isinstance(entry, dict) and isinstance(entry.get("out"), str):
                outputs.add(entry["out"].rstrip("/"))
    return outputs


def recipe_entries(path: Path, step: str, cls: type) -> list[dict[str, Any]]:
    """The values a recipe gives one step, one dict per entry of its section (a section is a mapping, or
    a list of mappings for several runs of the same step): the `model` section (for fields the step has),
    then the entry's own keys.

    Relative paths are taken relative to the recipe file, so a shared recipe works from any directory.
    """
    recipe = read_recipe(path)
    known = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    model_values: dict[str, Any] = {}
    model_section = recipe.get("model") or {}
    if not isinstance(model_section, dict):
        raise UserError("The `model` section must be a mapping", where=f"{path}: model")
    for key, value in model_section.items():
        name = cfg.MODEL_SECTION_ALIASES.get(key, key).replace("-", "_")
        if name in known:
            model_values[name] = value
    section = recipe.get(step)
    sections = section if isinstance(section, list) else [section or {}]
    base, outputs = path.resolve().parent, declared_outputs(recipe)
    entries = []
    for number, entry in enumerate(sections, start=1):
        where = f"{path}: {step}" + (f" (entry {number})" if isinstance(section, list) else "")
        if not isinstance(entry, dict):
            raise UserError(
                f"The `{step}` section must be a mapping of keys to values",
                where=where,
                fix="Write it as `key: value` lines (a list of such mappings for several entries)",
            )
        values = dict(model_values)
        for key, value in entry.items():
            name = key.replace("-", "_")
            if name not in known:
                raise unknown_key_error(key, sorted(known), where)
            values[name] = value
        entries.append({name: _relative_to(base, value, hints[name], name, outputs) for name, value in values.items()})
    return entries


def load_recipe_section(path: Path, step: str, cls: type) -> dict[str, Any]:
    """The values a recipe gives one step whose section is a single mapping (see `recipe_entries`)."""
    return recipe_entries(path, step, cls)[0]


def _relative_to(base: Path, value: Any, annotation: Any, name: str, outputs: set[str] = frozenset()) -> Any:
    """Resolve a recipe's relative paths against the recipe's folder.

    A model-like value (`model`, `sft`, `reward`, `models`, `baseline`) is a path only when it starts with
    `.`, exists, or is the `out` of a section of the recipe; otherwise it is a hub id or a built-in name.
    """
    if isinstance(value, list):
        return [_relative_to(base, item, annotation, name, outputs) for item in value]
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    if name == "reward_fn":  # FILE.py:NAME: the file relative to the recipe (a checker's name or a module stays)
        file, separator, function = value.rpartition(":")
        if separator and file.endswith(".py") and not Path(file).is_absolute():
            return f"{os.path.normpath(base / file)}:{function}"
        return value
    model_like = name in ("model", "sft", "reward", "models", "baseline")
    if model_like:
        if value.startswith(".") or (base / value).exists() or value.rstrip("/") in outputs:
            return os.path.normpath(base / value)
        return value
    if "Path" in str(annotation) or name == "data" or value.rstrip("/") in outputs:
        return os.path.normpath(base / value)
    return value


STEP_NAMES = tuple(STEPS)
"""The sections `instruct run` runs, in pipeline order (the steps table's rows)."""
OTHER_SECTIONS = ("label", "generate", "chat")  # sections for commands `run` does not run (read with --recipe)


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
    recipe = read_recipe(recipe_path)
    unknown = [key for key in recipe if key not in (*STEP_NAMES, "model", "version", *OTHER_SECTIONS)]
    if unknown:
        close = unknown_key_error(unknown[0], [*STEP_NAMES, "model", "version"], str(recipe_path))
        raise UserError(f"Unknown section `{unknown[0]}`", where=str(recipe_path), fix=close.fix)
    tasks = []
    for step in STEP_NAMES:
        if step not in recipe:
            continue
        config_cls = step_config_class(step)
        for entry in range(len(recipe_entries(Path(recipe_path), step, config_cls))):
            config = build_config(config_cls, step, Path(recipe_path), {}, entry=entry)
            if getattr(config, "out", None) is None:
                raise UserError(
                    f"The `{step}` section has no `out`",
                    where=f"{recipe_path}: {step}",
                    fix="Every step of a recipe names the folder it writes with `out:`",
                )
            tasks.append(Task(step, config))
    check_order(tasks, recipe_path)
    if not tasks:
        raise UserError(
            "The recipe has no step sections",
            where=str(recipe_path),
            fix=f"Add one or more of: {', '.join(STEP_NAMES)}",
        )
    return tasks


def step_config_class(step: str) -> type:
    """The config dataclass of a step (without importing the step's heavy module)."""
    return STEPS[step].config


def check_order(tasks: list[Task], recipe_path: Path) -> None:
    """Refuse a recipe whose steps read their own output or the output of a later step (a cycle: no order
    of the steps could make their inputs first)."""
    for position, task in enumerate(tasks):
        later = {Path(t.config.out).resolve(): t for t in tasks[position:]}
        for key in STEPS[task.step].inputs:
            value = getattr(task.config, key, None)
            for item in value if isinstance(value, list) else [value]:
                if item is None or Path(str(item)).resolve() not in later:
                    continue
                maker = later[Path(str(item)).resolve()]
                raise UserError(
                    f"The recipe's steps form a cycle: `{task.step}` reads {item} ({key}), which "
                    f"`{maker.step}` writes {'itself' if maker is task else 'after it'}",
                    where=f"{recipe_path}: {task.step}.{key}",
                    fix="Each step must read what earlier steps (or you) made: point it at another folder",
                )
