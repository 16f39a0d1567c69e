"""prepare-data's canonical rows: a record as a row of the task asked for, the system message put first, why a
row is dropped, the conversations its token length is measured on, a prompts row's columns; the train/eval
split and the length statistics of the manifest."""

from __future__ import annotations

import json
import math
import random
import statistics

from instruct_cli.core.preferences import ranking_pairs
from instruct_cli.steps.prepare_data.formats import Malformed, plain_json


def as_task(kind: str, record: dict, task: str) -> dict:
    """A record of `kind` as a row of `task` (e.g. preference -> its chosen conversation for sft)."""
    if kind == task:
        return record
    if task == "prompts":
        return {"prompt": record["messages"][:-1] if kind == "sft" else record["prompt"]}
    if task == "sft" and kind == "prefs":
        best = record["chosen"] if "chosen" in record else record["responses"][record["ranking"][0]]
        return {"messages": record["prompt"] + best}
    raise Malformed(f"a {kind} row cannot be used for the {task} task")


def add_system(row: dict, system: str) -> dict:
    """Put `system` first in a row's conversation when it has no system message."""
    key = "messages" if "messages" in row else "prompt"
    if row[key] and row[key][0]["role"] != "system":
        row = {**row, key: [{"role": "system", "content": system}] + row[key]}
    return row


def with_columns(row: dict, extra: dict) -> dict:
    """A prompts row with its input row's extra fields as plain JSON columns beside `prompt` (Malformed when a
    value has no JSON form)."""
    return {**row, **{name: plain_json(value, name) for name, value in extra.items() if name != "prompt"}}


def fill_columns(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """(rows, column names): every prompts row given every column any row has (null where its input row had
    none), names in the order first seen, so reward functions get one value per prompt for each column."""
    names = list(dict.fromkeys(name for row in rows for name in row if name != "prompt"))
    if not names:
        return rows, []
    return [{"prompt": row["prompt"], **{name: row.get(name) for name in names}} for row in rows], names


def check_row(row: dict, task: str) -> str | None:
    """Why a canonical row must be dropped ('empty', 'malformed' or 'all_ties'), or None when it is fine."""
    conversations = (
        [row["messages"]]
        if task == "sft"
        else [row["prompt"]]
        if task == "prompts"
        else [row["prompt"]] + ([row["chosen"], row["rejected"]] if "chosen" in row else row["responses"])
    )
    if any(not conv or any(not m["content"].strip() for m in conv) for conv in conversations):
        return "empty"
    prompt = row["messages"][:-1] if task == "sft" else row["prompt"]
    if not prompt or prompt[-1]["role"] != "user":
        return "malformed"
    if task == "sft" and row["messages"][-1]["role"] != "assistant":
        return "malformed"
    if task == "prefs" and "chosen" in row:
        if any(m["role"] != "assistant" for m in row["chosen"] + row["rejected"]):
            return "malformed"
        if row["chosen"] == row["rejected"]:
            return "malformed"
    if task == "prefs" and "ranking" in row and not ranking_pairs(row["ranking"], row.get("ties") or []):
        return "all_ties"  # every response judged equal: no preference to learn
    return None


def conversations_of(row: dict, task: str) -> list[list[dict]]:
    """The full conversations a row renders to (what its token length is measured on)."""
    if task == "sft":
        return [row["messages"]]
    if task == "prompts":
        return [row["prompt"]]
    responses = [row["chosen"], row["rejected"]] if "chosen" in row else row["responses"]
    return [row["prompt"] + response for response in responses]


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded shuffle; eval gets round(n * fraction) rows, at least 1 when n >= 2."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(rows) * eval_fraction)
    if eval_fraction > 0 and len(rows) >= 2:
        n_eval = min(max(n_eval, 1), len(rows) - 1)
    held = set(order[:n_eval])
    return ([rows[i] for i in range(len(rows)) if i not in held], [rows[i] for i in range(len(rows)) if i in held])


def split_by_prompt(rows: list[dict], seed: int) -> tuple[list[int], list[int]]:
    """Row indices in two halves by prompt (a seeded half of the distinct prompts, every row of a prompt on
    the same side): what --split-judge keeps and what it gives the judge, which then never saw those prompts."""
    prompts = sorted({json.dumps(row["prompt"], sort_keys=True) for row in rows})
    random.Random(seed).shuffle(prompts)
    judged = set(prompts[: len(prompts) // 2])
    keys = [json.dumps(row["prompt"], sort_keys=True) for row in rows]
    return [i for i, key in enumerate(keys) if key not in judged], [i for i, key in enumerate(keys) if key in judged]


def length_stats(lengths: list[int]) -> dict:
    """min / mean / median / p90 / p95 / p99 / max of token lengths."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median(ordered),
        **{f"p{q}": percentile(ordered, q) for q in (90, 95, 99)},
        "max": ordered[-1],
    }


def percentile(ordered: list[int], q: int) -> int:
    """The length that q% of the (sorted) lengths do not exceed."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
