"""How one setting is declared: a config dataclass field with its type, default, docstring and, through
`setting(...)`, its allowed range, its command-line spelling and any check of its own.

That one declaration is the single source of the setting's CLI flag and `--help` line (cli/options.py), its
recipe key and type check (recipes.py) and its range check (`validate` here). Adding a field to a step's
config therefore adds a working flag, recipe key and check with no other edit. May use: errors.

    lora_r: int = setting(16, allowed=POSITIVE)
    \"\"\"LoRA rank.\"\"\"
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Optional

from instruct_cli.core.errors import UserError

SETTING = "instruct.setting"
"""The key of a field's metadata that holds its `Setting`."""


@dataclass(frozen=True)
class Range:
    """The numbers a setting allows: from `low` to `high` (None: unbounded), each end included unless open."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        """True when `value` lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        """The range in words: 'greater than 0', 'between 0 and 1', 'at least 0 and below 0.5'."""
        if self == POSITIVE:
            return "greater than 0"
        if self == FRACTION:
            return "between 0 and 1"
        low = None if self.low is None else f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return " and ".join(part for part in (low, high) if part)

    def suggestion(self) -> str:
        """What to set instead, for the error message."""
        if self == POSITIVE:
            return "a positive number"
        if self == FRACTION:
            return "a fraction such as 0.1"
        return f"a number {self.describe()}"


POSITIVE = Range(low=0, low_open=True)
"""Counts, sizes, rates and temperatures: greater than 0."""
FRACTION = Range(low=0, high=1)
"""Shares and probabilities: between 0 and 1, both included."""


@dataclass(frozen=True)
class Setting:
    """What a field declares beyond its type, default and docstring."""

    allowed: Optional[Range] = None
    """The range a number must lie in (None: any value of its type)."""
    flags: tuple[str, ...] = ()
    """The command-line spelling, e.g. ("--model", "-m"); default: --field-name (--x/--no-x for booleans)."""
    argument: bool = False
    """A positional argument of the command instead of an option."""
    metavar: Optional[str] = None
    """The placeholder `--help` shows for the value."""
    nargs: int = 1
    """Values the flag takes at once (e.g. 2 for --compare A B)."""
    fix: Optional[str] = None
    """The advice of the range error, when the general one ('Set `x` to a positive number') is not enough."""
    check: Optional[Callable[[Any, str], None]] = None
    """A check of its own, called as check(value, source) after the range check; raises UserError."""


def setting(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None, **declared) -> Any:
    """A dataclass field with a default (or a `factory` for lists) and what `Setting` declares."""
    metadata = {SETTING: Setting(**declared)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(field: dataclasses.Field) -> Setting:
    """The `Setting` of a field (an empty one for a field declared without `setting`)."""
    return field.metadata.get(SETTING) or Setting()


def flag_name(field: dataclasses.Field) -> str:
    """The long flag of a field, as a person types it: --model, --input (for `inputs`), --packing."""
    return declared(field).flags[0].split("/")[0] if declared(field).flags else "--" + field.name.replace("_", "-")


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value (the factory's value for a list)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its bases: {field name: doc}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def doc(cls: type, name: str) -> str:
    """The help text of one field."""
    return field_docs(cls)[name]


def validate(config: Any, source: str) -> None:
    """Check every field of a built config against its declared range and check, then the config's own
    `check_combination(source)` for rules that involve several fields (the types already passed)."""
    for field in dataclasses.fields(config):
        spec, value = declared(field), getattr(config, field.name)
        if value is None:
            continue
        if spec.allowed is not None and not spec.allowed.holds(value):
            raise UserError(
                f"`{field.name}` must be {spec.allowed.describe()}, not {value}",
                where=source,
                fix=spec.fix or f"Set `{field.name}` to {spec.allowed.suggestion()}",
            )
        if spec.check is not None:
            spec.check(value, source)
    combination = getattr(config, "check_combination", None)
    if combination is not None:
        combination(source)
