"""Reading a data folder written by `instruct prepare-data`: what every training and eval step reads.

Owns: the folder's task (`data_task`), its splits (`read_split`), the prompts of any task (`read_prompts`)
and their columns (`read_prompt_columns`: a prompts row's other fields, e.g. `answer`), and line-by-line
JSON with errors that name the line (`json_lines`). May use: artifacts, errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from instruct_cli.core import artifacts
from instruct_cli.core.errors import UserError

TASKS = ("sft", "prefs", "prompts")


def data_task(data_dir: Path, flag: str = "--data") -> str:
    """The task of a complete data folder: sft, prefs or prompts."""
    return artifacts.require_complete(Path(data_dir), "data", flag=flag).get("task", "")


def read_prompts(data_dir: Path, split: str, flag: str = "--data") -> list[list[dict]]:
    """The prompts (message lists) of split `split` (train/eval) of a data folder of any task: a prompts folder
    gives its prompts, an sft folder its conversations without the answer, a prefs folder its pairs' prompts."""
    task = data_task(data_dir, flag=flag)
    if task not in TASKS:
        raise UserError(
            f"{data_dir} has no prompts (task {task!r})",
            where=flag,
            fix="Prepare prompts with `instruct prepare-data --task prompts`",
        )
    rows = read_split(data_dir, f"{task}.{split}", flag=flag)
    return [row["messages"][:-1] if task == "sft" else row["prompt"] for row in rows]


def read_prompt_columns(data_dir: Path, split: str, flag: str = "--data") -> list[dict]:
    """The columns of each prompt of `read_prompts(data_dir, split)`, in the same order: a prompts row's fields
    other than `prompt` (e.g. `answer`, listed in the manifest's `columns`); an sft or prefs folder's prompts
    have none (empty dicts)."""
    task = data_task(data_dir, flag=flag)
    if task != "prompts":
        return [{} for _ in read_prompts(data_dir, split, flag=flag)]
    rows = read_split(data_dir, f"prompts.{split}", flag=flag)
    return [{name: value for name, value in row.items() if name != "prompt"} for row in rows]


def read_split(data_dir: Path, name: str, flag: str = "--data") -> list[dict]:
    """The rows of split `name` (e.g. `sft.train`) of a complete data folder.

    A folder prepared for another task is refused with a message that says which --task makes this one.
    """
    folder = Path(data_dir)
    manifest = artifacts.require_complete(folder, "data", flag=flag)
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        wanted = name.split(".")[0]
        raise UserError(
            f"The data folder holds {manifest.get('task')} data, but this step needs {wanted} data ({path.name})",
            where=str(folder),
            fix=f"Prepare the right data with `instruct prepare-data -i FILE --task {wanted} -o DIR`",
        )
    with open(path, encoding="utf-8") as handle:
        return [
            row
            for _, row, _ in json_lines(
                handle, str(path), fix="Prepare the folder again with `instruct prepare-data --force`"
            )
        ]


def json_lines(lines: Iterable[str], name: str, fix: str) -> Iterator[tuple[int, object, str]]:
    """(line number, parsed value, "NAME, line N") for each non-blank JSON line of a file the user gave;
    a line that is not JSON stops with an error naming it and saying `fix`."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"Line {number} is not valid JSON ({exc.msg})", where=where, fix=fix) from None
        yield number, value, where
