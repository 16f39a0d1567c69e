"""`instruct prepare-data`: raw files in common formats -> a data folder of canonical JSONL splits.

Reading happens in three small stages, each with one owner:

1. `read_source` (formats.py): a file or folder -> raw rows (dicts), each with where it came from (file, line).
   JSON, JSONL, CSV, Parquet, plain text, a `datasets.save_to_disk` folder, or a `labels/` folder.
2. `detect_format` + `CONVERTERS` (formats.py): one raw row -> one canonical record, by input format:
   sft `{"messages"}`, prefs `{"prompt", "chosen", "rejected"}` or `{"prompt", "responses", "ranking"}`,
   prompts `{"prompt"}`. A row that cannot be converted raises `Malformed`.
3. `run`: converts every row, turns records into the requested task, drops empty, duplicate, too long,
   malformed and flagged (by a labeler) rows, counted by reason, splits train/eval with a seed, and writes the folder atomically
   with a manifest (sources + sha256, format, counts, drops, token-length statistics).

Every training step reads a data folder through core/data_folders.py's `read_split`, which refuses an
incomplete folder and says how to make the split that is missing.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path

from instruct_cli.core import artifacts
from instruct_cli.core.config import PrepareDataConfig, to_recipe_dict
from instruct_cli.core.console import info, progress, summary_table, warn
from instruct_cli.core.errors import UserError
from instruct_cli.core.preferences import ranking_pairs
from instruct_cli.steps.prepare_data.formats import Malformed, convert, detect_format, read_source


# --------------------------------------------------------------------------------- 3. records -> a task
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


def length_stats(lengths: list[int]) -> dict:
    """min / mean / median / p95 / max of token lengths."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


# ------------------------------------------------------------------------------------------------- run
def run(config: PrepareDataConfig) -> Path:
    """Read every input, convert to the task's canonical rows, drop and count bad ones, split, write the folder."""
    from instruct_cli.core import models
    from instruct_cli.core.chat import template_ids

    if not config.inputs:
        raise UserError("No input files", where="--input", fix="Pass one or more files with -i FILE")
    if config.out is None:
        raise UserError("No output folder", where="--out", fix="Pass the data folder to write with --out DIR")
    for path in config.inputs:
        if not Path(path).exists():
            raise UserError("The input does not exist", where=str(path), fix="Check the --input path")
    existing = artifacts.read_manifest(config.out) if Path(config.out).is_dir() else None
    if existing is not None and existing.get("status") == "complete" and not config.force:
        raise UserError(
            f"{config.out} already holds a complete {existing.get('kind')} output",
            where="--out",
            fix="Pass --force to replace it, or choose another --out",
        )

    # 1-2. read and convert every row, remembering its kind (sft / prefs / prompts)
    converted: list[tuple[str, dict, str]] = []
    dropped: Counter = Counter()
    sources = []
    for path in map(Path, config.inputs):
        fmt = None if config.format == "auto" else config.format
        rows_read = 0
        for raw, where in read_source(path):
            rows_read += 1
            if isinstance(raw, dict) and (raw.get("flagged") or raw.get("skipped")):
                dropped["flagged"] += 1  # a labeler marked it unusable (instruct label)
                continue
            try:
                if isinstance(raw, Malformed):  # a line that is not JSON
                    raise raw
                fmt = fmt or detect_format(raw)
                if fmt is None:
                    raise Malformed(
                        "no known format fits its fields"
                        + (f" ({', '.join(sorted(raw))})" if isinstance(raw, dict) else "")
                    )
                kind, record = convert(raw, fmt)
                converted.append((kind, record, where))
            except Malformed as exc:
                if config.strict:
                    raise UserError(
                        f"Malformed row: {exc}",
                        where=where,
                        fix="Fix the row, force another --format, or drop --strict to skip such rows",
                    ) from None
                dropped["malformed"] += 1
        if rows_read == 0:
            raise UserError("The input has no rows", where=str(path), fix="Check that this is the right file")
        sources.append(
            {
                "path": str(path),
                "sha256": artifacts.sha256_file(path) if path.is_file() else artifacts.sha256_folder(path),
                "format": fmt or "unknown",
                "rows": rows_read,
            }
        )
    if not converted:
        raise UserError(
            f"No row of the input could be read ({dropped['malformed']} malformed)",
            where=", ".join(map(str, config.inputs)),
            fix="Check the file's format (see `instruct prepare-data --help`) or force one with --format",
        )

    # 3. one task for the folder: the one asked for, or the kind most rows have
    kinds = Counter(kind for kind, _, _ in converted)
    task = config.task if config.task != "auto" else kinds.most_common(1)[0][0]
    if config.task == "auto" and len(kinds) > 1:
        warn(
            f"The inputs mix {', '.join(f'{n} {k}' for k, n in kinds.items())} rows; writing the {task} task "
            "(pass --task to choose)"
        )
    rows, seen = [], set()
    for kind, record, where in converted:
        try:
            row = as_task(kind, record, task)
            row = add_system(row, config.system) if config.system else row
            reason = check_row(row, task)
        except Malformed as exc:
            if config.strict:
                raise UserError(
                    f"Row cannot be used: {exc}",
                    where=where,
                    fix="Choose the --task these rows are for, or prepare them apart",
                ) from None
            reason = "malformed"
        if reason is None and json.dumps(row, sort_keys=True) in seen:
            reason = "duplicate"
        if reason is not None:
            if config.strict and reason != "duplicate":
                raise UserError(f"Row is {reason}", where=where, fix="Fix the row, or drop --strict to skip it")
            dropped[reason] += 1
            continue
        seen.add(json.dumps(row, sort_keys=True))
        rows.append(row)

    # token lengths under the model's chat template (and --max-tokens)
    source = models.resolve_model(config.model, flag="--model")
    tokenizer = models.load_tokenizer(source)
    if not tokenizer.chat_template:
        raise UserError(
            "The model's tokenizer has no chat template, so token lengths cannot be measured",
            where="--model",
            fix="Use an instruct/chat model, whose tokenizer has a chat template",
        )
    kept, lengths = [], []
    with progress("prepare-data: measuring tokens", total=len(rows)) as bar:
        for row in rows:
            length = max(len(template_ids(tokenizer, conv)) for conv in conversations_of(row, task))
            bar.advance()
            if config.max_tokens is not None and length > config.max_tokens:
                dropped["too_long"] += 1
                continue
            kept.append(row)
            lengths.append(length)
    if not kept:
        raise UserError(
            f"Every row was dropped ({', '.join(f'{n} {r}' for r, n in dropped.items())})",
            where=", ".join(map(str, config.inputs)),
            fix="Check the inputs, --task and --max-tokens",
        )

    # 4. split and write; the manifest is written last, so an interrupted run never looks complete
    train, held_out = split_rows(kept, config.eval_fraction, config.seed)
    folder = artifacts.RunFolder.open(
        config.out,
        "data",
        to_recipe_dict(config),
        force=config.force or existing is not None,
        extra={"task": task, "tokenizer": source.reference},
    )
    with folder.recording():
        files = {}
        for split, split_rows_ in (("train", train), ("eval", held_out)):
            name = f"{task}.{split}.jsonl"
            artifacts.write_jsonl(Path(config.out) / name, split_rows_)
            files[f"{task}.{split}"] = name
        counts = {"train": len(train), "eval": len(held_out)}
        folder.complete(
            sources=sources,
            files=files,
            counts=counts,
            dropped=dict(dropped),
            seed=config.seed,
            token_lengths=length_stats(lengths),
        )
    summary_table(
        "prepare-data",
        {
            "output": str(config.out),
            "task": task,
            "format": ", ".join(sorted({s["format"] for s in sources})),
            "train / eval rows": f"{len(train)} / {len(held_out)}",
            "dropped": ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())) or "none",
            "tokens (mean / max)": f"{length_stats(lengths)['mean']} / {length_stats(lengths)['max']}",
        },
    )
    if len(held_out) == 0 and config.eval_fraction > 0:
        info("Only one row: the eval split is empty")
    return Path(config.out)
