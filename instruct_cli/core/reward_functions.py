"""Reward functions (`--reward-fn FILE.py:NAME` or `--reward-fn package.module:NAME`): loading them, calling
them, and adding several up with their weights.

A function is called once per batch in one of two forms, told apart by its signature:
  - TRL's, when it takes **kwargs: `NAME(prompts=..., completions=..., **columns)`, with the prompts as
    message lists, each completion as TRL passes it for chat prompts (`[{"role": "assistant", "content":
    text}]`), and each column of the prompts' data rows (`answer`, `solution`, ...) as a list with one value
    per sample. A TRL reward function runs here unchanged.
  - the two-argument form `NAME(prompts, responses)`, responses as strings.
It returns one value per sample: a number, or None for a sample it does not judge (TRL's convention: the
weighted sum of the functions skips it). A mistake in the user's file (it does not import, the function
raises, returns the wrong number of values or a value that is neither a finite number nor None) is a
UserError that shows the user's own traceback, without our frames, and the sample that caused it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from pathlib import Path
from typing import Callable

from instruct_cli.core import checkers
from instruct_cli.core.errors import UserError

FLAG = "--reward-fn"


class RewardFunction:
    """A reward function, called safely: `scores(prompts, responses, columns)` -> one float (NaN: not judged)
    per response."""

    def __init__(self, function: Callable, spec: str, file: Path | None):
        self.function = function
        self.spec = spec
        self.file = file
        self.name = getattr(function, "__name__", spec.rpartition(":")[2])
        self.trl_style = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())

    def call(self, prompts: list[list[dict]], responses: list[str], columns: list[dict] | None = None):
        """The function's raw return value, in its own form (TRL's or the two-argument one)."""
        if not self.trl_style:
            return self.function(prompts, responses)
        rows = columns or [{} for _ in responses]
        names = dict.fromkeys(key for row in rows for key in row)  # every column, in first-seen order
        by_name = {name: [row.get(name) for row in rows] for name in names}
        completions = [[{"role": "assistant", "content": text}] for text in responses]
        return self.function(prompts=prompts, completions=completions, **by_name)

    def scores(self, prompts: list[list[dict]], responses: list[str], columns: list[dict] | None = None) -> list[float]:
        """The function's rewards for the batch, checked: one finite number per response, or NaN where it
        returned None."""
        try:
            values = self.call(prompts, responses, columns)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code is reported as theirs
            self._raise_for_failing_sample(prompts, responses, columns, exc)
        values = values.tolist() if hasattr(values, "tolist") else values
        if not isinstance(values, (list, tuple)) or len(values) != len(responses):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise UserError(
                f"The reward function {self.spec} returned {got} for {len(responses)} responses",
                where=FLAG,
                fix="Return a list with one float (or None) per response, in the order of the responses",
            )
        checked = []
        for index, value in enumerate(values):
            if value is None:
                checked.append(math.nan)
                continue
            number = _as_number(value)
            if number is None or not math.isfinite(number):
                raise UserError(
                    f"The reward function {self.spec} returned {value!r} for response {index} "
                    f"({_sample(prompts[index], responses[index])})",
                    where=FLAG,
                    fix="Return a finite float for every response (or None for one it does not judge)",
                )
            checked.append(number)
        return checked

    def _raise_for_failing_sample(self, prompts, responses, columns, batch_error: Exception):
        """Find the first sample the function fails on alone (the batch's own error if none does), and raise
        a UserError with the user's traceback and that sample."""
        failing, error = None, batch_error
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                self.call([prompt], [response], [columns[index]] if columns else None)
            except Exception as exc:  # noqa: BLE001
                failing, error = (prompt, response), exc
                break
        where = f"{FLAG} {self.spec}" + (f", on the sample {_sample(*failing)}" if failing else "")
        raise UserError(
            f"The reward function {self.spec} raised {type(error).__name__}: {error}\n{user_traceback(error, self.file)}",
            where=where,
            fix=f"Fix the function in {self.file or self.spec} (try it on that sample), then rerun with --resume",
        ) from None


class WeightedRewards:
    """Several reward functions, each with its weight: a sample's reward is the weighted sum of the functions
    that judged it (None-valued ones skipped, TRL's nansum), and each function's mean and std are reported."""

    def __init__(self, functions: list[RewardFunction], weights: list[float]):
        self.functions = functions
        self.weights = weights

    def scores(
        self, prompts: list[list[dict]], responses: list[str], columns: list[dict] | None = None
    ) -> tuple[list[float], dict[str, float]]:
        """(one reward per response, {reward_fn/NAME/mean, reward_fn/NAME/std} over the samples it judged)."""
        totals = [0.0] * len(responses)
        stats: dict[str, float] = {}
        for function, weight in zip(self.functions, self.weights):
            values = function.scores(prompts, responses, columns)
            judged = [value for value in values if not math.isnan(value)]
            mean = sum(judged) / len(judged) if judged else math.nan
            spread = math.sqrt(sum((v - mean) ** 2 for v in judged) / (len(judged) - 1)) if len(judged) > 1 else 0.0
            stats[f"reward_fn/{function.name}/mean"] = mean
            stats[f"reward_fn/{function.name}/std"] = spread if judged else math.nan
            totals = [total + (0.0 if math.isnan(value) else weight * value) for total, value in zip(totals, values)]
        return totals, stats


def load_all(specs: list[str], weights: list[float], weight_flag: str = "--reward-fn-weight") -> WeightedRewards:
    """Load every function of `specs` with its weight (none given: 1 each; one given: the same for all)."""
    if weights and len(weights) not in (1, len(specs)):
        raise UserError(
            f"{len(specs)} reward functions and {len(weights)} weights",
            where=weight_flag,
            fix=f"Give one weight per --reward-fn, comma-separated and in the same order (e.g. {','.join(['1'] * len(specs))})",
        )
    weights = list(weights) * len(specs) if len(weights) == 1 else list(weights) or [1.0] * len(specs)
    return WeightedRewards([load(spec) for spec in specs], weights)


def load(spec: str) -> RewardFunction:
    """The function of `spec`: "FILE.py:NAME" (a Python file), "package.module:NAME" (an importable module),
    or the name of a ready-made checker (checkers.CHECKERS: final_number, answer_in_tags, math_answer)."""
    if spec in checkers.CHECKERS:
        return _load_checker(spec)
    path, separator, name = spec.rpartition(":")
    if not separator or not path or not name.isidentifier():
        raise UserError(
            f"{FLAG} {spec!r} is not FILE.py:FUNCTION",
            where=FLAG,
            fix="Name a Python file and a function in it, e.g. --reward-fn examples/rewards.py:brevity, or a "
            f"ready-made checker: {', '.join(checkers.CHECKERS)}",
        )
    if not path.endswith(".py") and not Path(path).exists() and all(p.isidentifier() for p in path.split(".")):
        return _load_from_module(path, name, spec)
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file} does not exist", where=FLAG, fix="Check the path of the reward function's file")
    module_spec = importlib.util.spec_from_file_location(f"instruct_reward_fn_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{file} is not a Python file", where=FLAG, fix="Name a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))  # the user's file may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"{file} failed to import: {type(exc).__name__}: {exc}\n{user_traceback(exc, file)}",
            where=FLAG,
            fix=f"Fix the error in {file}",
        ) from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(
            n for n, v in vars(module).items() if callable(v) and getattr(v, "__module__", "") == module.__name__
        )
        raise UserError(
            f"{file} has no function {name!r}",
            where=FLAG,
            fix=f"Functions in it: {', '.join(found) or 'none'}",
        )
    return RewardFunction(function, spec, file)


def _load_checker(name: str) -> RewardFunction:
    """A ready-made checker, once its optional package (if any) is there."""
    if name in checkers.NEEDS:
        module, package, install = checkers.NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"The checker {name} needs the package {package}, which is not installed",
                where=FLAG,
                fix=f"Install it: {install}",
            )
    return RewardFunction(checkers.CHECKERS[name], name, None)


def _load_from_module(module_name: str, name: str, spec: str) -> RewardFunction:
    """A function of an importable module (a library's ready-made reward functions)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"{FLAG} {spec}: the module {module_name} cannot be imported ({exc})",
            where=FLAG,
            fix="Check the module's name, or name a Python file: FILE.py:FUNCTION",
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{module_name} has no function {name!r}", where=FLAG, fix="Check the function's name")
    return RewardFunction(function, spec, None)


def user_traceback(error: BaseException, file: Path | None) -> str:
    """The traceback of `error` from the first frame in the user's file on (our frames left out)."""
    frames = traceback.extract_tb(error.__traceback__)
    resolved = str(file.resolve()) if file is not None else ""
    first = next((i for i, frame in enumerate(frames) if str(Path(frame.filename).resolve()) == resolved), None)
    kept = frames[first:] if first is not None else frames[-1:]
    lines = traceback.format_list(kept) + traceback.format_exception_only(type(error), error)
    return "Traceback (in your reward function):\n" + "".join(lines).rstrip()


def _as_number(value) -> float | None:
    """`value` as a float when it is a real number (bool, int, float, a 0-d tensor or numpy scalar)."""
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, (int, float)) else None


def _sample(prompt: list[dict], response: str) -> str:
    """A short description of one prompt and response for an error message."""
    text = prompt[-1]["content"] if prompt else ""
    return f"prompt {text[:80]!r}, response {response[:80]!r}"
