"""Reward functions written by the user (`instruct ppo --reward-fn FILE.py:NAME`): loading one and calling it.

The function is called once per rollout batch as `NAME(prompts, responses) -> list of floats`, with the
prompts as message lists (`[{"role": "user", "content": ...}]`) and the responses as decoded strings. A
mistake in the user's file (it does not import, the function raises, returns the wrong number of values or
a value that is not a finite number) is a UserError that shows the user's own traceback, without our
frames, and the sample that caused it.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import traceback
from pathlib import Path
from typing import Callable

from instruct_cli.core.errors import UserError

FLAG = "--reward-fn"


class RewardFunction:
    """A user's reward function, called safely: `scores(prompts, responses)` -> one float per response."""

    def __init__(self, function: Callable, spec: str, file: Path):
        self.function = function
        self.spec = spec
        self.file = file

    def scores(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """The function's rewards for the batch, checked: one finite number per response."""
        try:
            values = self.function(prompts, responses)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code is reported as theirs
            self._raise_for_failing_sample(prompts, responses, exc)
        values = values.tolist() if hasattr(values, "tolist") else values
        if not isinstance(values, (list, tuple)) or len(values) != len(responses):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise UserError(
                f"The reward function {self.spec} returned {got} for {len(responses)} responses",
                where=FLAG,
                fix="Return a list with one float per response, in the order of `responses`",
            )
        checked = []
        for index, value in enumerate(values):
            number = _as_number(value)
            if number is None or not math.isfinite(number):
                raise UserError(
                    f"The reward function {self.spec} returned {value!r} for response {index} "
                    f"({_sample(prompts[index], responses[index])})",
                    where=FLAG,
                    fix="Return a finite float for every response",
                )
            checked.append(number)
        return checked

    def _raise_for_failing_sample(self, prompts, responses, batch_error: Exception):
        """Find the first sample the function fails on alone (the batch's own error if none does), and raise
        a UserError with the user's traceback and that sample."""
        failing, error = None, batch_error
        for prompt, response in zip(prompts, responses):
            try:
                self.function([prompt], [response])
            except Exception as exc:  # noqa: BLE001
                failing, error = (prompt, response), exc
                break
        where = f"{FLAG} {self.spec}" + (f", on the sample {_sample(*failing)}" if failing else "")
        raise UserError(
            f"The reward function {self.spec} raised {type(error).__name__}: {error}\n{user_traceback(error, self.file)}",
            where=where,
            fix=f"Fix the function in {self.file} (try it on that sample), then rerun with --resume",
        ) from None


def load(spec: str) -> RewardFunction:
    """Import FILE.py and return its function NAME, from `spec` = "FILE.py:NAME"."""
    path, separator, name = spec.rpartition(":")
    if not separator or not path or not name.isidentifier():
        raise UserError(
            f"{FLAG} {spec!r} is not FILE.py:FUNCTION",
            where=FLAG,
            fix="Name a Python file and a function in it, e.g. --reward-fn examples/rewards.py:brevity",
        )
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


def user_traceback(error: BaseException, file: Path) -> str:
    """The traceback of `error` from the first frame in the user's file on (our frames left out)."""
    frames = traceback.extract_tb(error.__traceback__)
    resolved = str(file.resolve())
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
