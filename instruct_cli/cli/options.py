"""A command's flags built from its config dataclass: one declaration per setting (core/settings.py).

`config_command(ConfigClass, "section")` turns `def command(config): ...` into a typer command with one
option per field of the class: the flag's name, short option, type, choices and `--help` line with its
default all come from the field's declaration in core/config.py. A command that reads a recipe also gets
`--recipe`. Typer calls the command with the config built and validated from the recipe's section
overridden by the flags given; a flag left out is None here, so the recipe's value or the field's default
applies. May use: core (recipes, settings).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from rich.markup import escape

from instruct_cli.core import recipes, settings

RECIPE_PARAMETER = inspect.Parameter(
    "recipe",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Optional[Path],
        typer.Option(
            "--recipe", help="Recipe YAML; this step reads its section. Flags given on the command line override it."
        ),
    ],
)
MAIN_FIELDS = ("prompt", "model", "models", "sft", "reward", "inputs", "input", "prompts", "data", "out", "output")
"""The fields `--help` lists first, in this order: a command's inputs, then where it writes."""
OWN_ARGUMENTS = ("config", "configs")
"""The parameters through which a command receives what was built: one config, or one per recipe entry."""


def config_command(cls: type, section: str, *, recipe: bool = True, per_entry: tuple[str, ...] = ()) -> Callable:
    """Give `command` a flag per field of `cls` and call it with the built config.

    `command` takes `config` (one config) or `configs` (one per entry of a recipe section that lists several;
    `per_entry` names the flags that cannot apply to all entries at once). Its other parameters (a
    `typer.Context`, say) stay as they are. A group's callback is not called when a subcommand runs.
    """

    def decorate(command: Callable) -> Callable:
        own = [
            p.replace(
                annotation=p.annotation if isinstance(p.annotation, type) else typing.get_type_hints(command)[p.name]
            )
            for p in inspect.signature(command).parameters.values()
            if p.name not in OWN_ARGUMENTS
        ]
        taken = {p.name for p in own}
        fields = [field for field in ordered_fields(cls) if field.name not in taken]
        hints = typing.get_type_hints(cls)
        parameters = own + [field_parameter(cls, field, hints[field.name]) for field in fields]
        if recipe:
            parameters.append(RECIPE_PARAMETER)
        wants_list = "configs" in inspect.signature(command).parameters

        @functools.wraps(command)
        def run(**given: Any) -> Any:
            passed = {p.name: given.pop(p.name) for p in own}
            if any(getattr(value, "invoked_subcommand", None) for value in passed.values()):
                return None  # the group's callback (a click Context was passed) while a subcommand runs
            recipe_path = given.pop("recipe", None)
            flags = {field.name: flag_value(given[field.name]) for field in fields}
            if wants_list:
                configs = recipes.build_configs(cls, section, recipe_path, flags, per_entry=per_entry)
                return command(**passed, configs=configs)
            return command(**passed, config=recipes.build_config(cls, section, recipe_path, flags))

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` in `--help` order: what the command reads and writes first (MAIN_FIELDS), then the
    others as declared."""
    fields = dataclasses.fields(cls)
    main = sorted((f for f in fields if f.name in MAIN_FIELDS), key=lambda f: MAIN_FIELDS.index(f.name))
    return main + [f for f in fields if f.name not in MAIN_FIELDS]


def field_parameter(cls: type, field: dataclasses.Field, hint: Any) -> inspect.Parameter:
    """The typer parameter of one field: None when not given, so that a recipe or the default applies."""
    spec = settings.declared(field)
    value_type, choices = cli_type(hint, spec.nargs)
    shown = shown_default(field, value_type)
    help_text = settings.doc(cls, field.name) + (escape(f" [default: {shown}]") if shown else "")
    metavar = spec.metavar or ("|".join(map(str, choices)) if choices else list_metavar(hint))
    if spec.argument:
        info = typer.Argument(help=help_text, show_default=False, metavar=metavar or field.name.upper())
    else:
        flags = spec.flags or (bool_flags(field.name) if value_type is bool else ("--" + field.name.replace("_", "-"),))
        info = typer.Option(*flags, help=help_text, show_default=False, metavar=metavar)
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[value_type], info]
    )


def cli_type(hint: Any, nargs: int) -> tuple[Any, tuple]:
    """The type typer parses for a field's annotation, and the choices of a Literal (checked when the config is
    built, with a 'did you mean')."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return cli_type(next(arg for arg in args if arg is not type(None)), nargs)
    if origin is Literal:
        return str, args
    if origin is list:
        (item,) = args
        item = item if item in (str, Path) else str  # numbers as text: "1,0.5" is split, then checked as numbers
        return (tuple[(item,) * nargs] if nargs > 1 else list[item]), ()
    return hint, ()


def list_metavar(hint: Any) -> str | None:
    """How --help spells a comma-separated list: <str,...>, <float,...> (a list of paths is given by repeating
    the flag, and shows typer's own <path>)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return list_metavar(next(arg for arg in args if arg is not type(None)))
    if origin is list and args[0] is not Path:
        return f"<{args[0].__name__},...>"
    return None


def bool_flags(name: str) -> tuple[str]:
    """--name/--no-name: a boolean can be switched either way over a recipe's value."""
    flag = name.replace("_", "-")
    return (f"--{flag}/--no-{flag}",)


def shown_default(field: dataclasses.Field, value_type: Any) -> str:
    """The default as `--help` shows it after the field's docstring ('' for an unset path or an empty list)."""
    default = settings.default_of(field)
    if default is None or default == []:
        return ""
    if value_type is bool:
        return field.name.replace("_", "-") if default else "no-" + field.name.replace("_", "-")
    if isinstance(default, list):
        return ",".join(map(str, default))
    return str(default)


def flag_value(value: Any) -> Any:
    """A flag's value as the config builder takes it: None when not given; a repeated option's values with
    comma-separated items split (`-m a,b -m c` is a, b, c); a fixed number of values as a list."""
    if isinstance(value, tuple):
        return list(value) if value else None
    if isinstance(value, list):
        if not value:
            return None
        items = (
            [part.strip() for item in value for part in str(item).split(",")] if isinstance(value[0], str) else value
        )
        return [item for item in items if item != ""]
    return value
