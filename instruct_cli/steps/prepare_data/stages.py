"""prepare-data's `run`, stage by stage: check the flags, read and convert every row (formats.py), turn the
records into one task and drop bad rows (rows.py), measure token lengths under the model's chat template,
then split and write the folder, its manifest last. A prompts row keeps its input row's other fields as columns
(formats.extra_fields), listed in the manifest's `columns`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from instruct_cli.core import artifacts
from instruct_cli.core.config import PrepareDataConfig, to_recipe_dict
from instruct_cli.core.console import info, progress, summary_table, warn
from instruct_cli.core.errors import UserError
from instruct_cli.steps.prepare_data import truncation
from instruct_cli.steps.prepare_data.formats import Malformed, convert, detect_format, extra_fields, read_source
from instruct_cli.steps.prepare_data.rows import (
    add_system,
    as_task,
    check_row,
    conversations_of,
    fill_columns,
    length_stats,
    percentile,
    split_by_prompt,
    split_rows,
    with_columns,
)

Converted = list[tuple[str, dict, str, dict]]
"""Every row read and converted: (its kind, sft / prefs / prompts; the canonical record; where it came from;
the input row's fields its format did not read, the columns it keeps if it becomes a prompt)."""


# ------------------------------------------------------------------------------------------------- run
def run(config: PrepareDataConfig) -> Path:
    """Read every input, convert to the task's canonical rows, drop and count bad ones, split, write the folder."""
    existing = check_config(config)
    dropped: Counter = Counter()
    # 1-2. read and convert every row, remembering its kind (sft / prefs / prompts)
    converted, sources = read_inputs(config, dropped)
    # 3. one task for the folder, its rows checked and deduplicated
    task, rows = task_rows(converted, config, dropped)
    # token lengths under the model's chat template (and --max-tokens)
    kept, lengths, tokenizer_reference, truncated = measure_tokens(rows, task, config, dropped)
    kept, columns = fill_columns(kept) if task == "prompts" else (kept, [])
    if config.split_judge is not None and task != "prefs":
        raise UserError(
            f"--split-judge splits preference data; these rows are {task} rows",
            where=", ".join(map(str, config.inputs)),
            fix="Use it on preference pairs or rankings (--task prefs)",
        )
    # 4. split and write (with --split-judge, half the prompts to the judge's folder); each manifest is written
    # last, so an interrupted run never looks complete
    outputs = [(Path(config.out), kept, lengths, existing)]
    if config.split_judge is not None:
        mine, judges = split_by_prompt(kept, config.seed)
        outputs = [
            (Path(config.out), [kept[i] for i in mine], [lengths[i] for i in mine], existing),
            (Path(config.split_judge), [kept[i] for i in judges], [lengths[i] for i in judges], None),
        ]
    splits = []
    for out, rows_of_folder, lengths_of_folder, there in outputs:
        train, held_out = split_rows(rows_of_folder, config.eval_fraction, config.seed)
        folder = artifacts.RunFolder.open(
            out,
            "data",
            to_recipe_dict(config),
            force=config.force or there is not None or out != Path(config.out),  # the judge's: checked above
            extra={"task": task, "tokenizer": tokenizer_reference},
        )
        with folder.recording():
            files = {}
            for split, split_rows_ in (("train", train), ("eval", held_out)):
                name = f"{task}.{split}.jsonl"
                artifacts.write_jsonl(out / name, split_rows_)
                files[f"{task}.{split}"] = name
            folder.complete(
                sources=sources,
                files=files,
                counts={"train": len(train), "eval": len(held_out)},
                dropped=dict(dropped),
                truncated=truncated,
                seed=config.seed,
                token_lengths=length_stats(lengths_of_folder),
                **({"columns": columns} if task == "prompts" else {}),
                **(
                    {"judge_split": {"main": str(config.out), "judge": str(config.split_judge)}}
                    if len(outputs) > 1
                    else {}
                ),
            )
        splits.append((train, held_out))
    (train, held_out), judge_rows = splits[0], [len(t) + len(h) for t, h in splits[1:]]
    summary_table(
        "prepare-data",
        {
            "output": str(config.out),
            "task": task,
            "format": ", ".join(sorted({s["format"] for s in sources})),
            "train / eval rows": f"{len(train)} / {len(held_out)}",
            **({"judge's half": f"{judge_rows[0]} rows in {config.split_judge}"} if judge_rows else {}),
            "dropped": ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())) or "none",
            **({"prompt cut (--truncate)": f"{truncated} rows"} if config.truncate else {}),
            "tokens (mean / p95 / max)": " / ".join(str(length_stats(lengths)[k]) for k in ("mean", "p95", "max")),
            **({"columns": ", ".join(columns)} if columns else {}),
        },
    )
    if len(held_out) == 0 and config.eval_fraction > 0:
        info("Only one row: the eval split is empty")
    return Path(config.out)


def check_config(config: PrepareDataConfig) -> dict | None:
    """The flags prepare-data needs, the inputs exist, and --out is not a complete output (unless --force);
    returns the manifest already at --out, if any."""
    if not config.inputs:
        raise UserError("No input files", where="--input", fix="Pass one or more files with -i FILE")
    if config.out is None:
        raise UserError("No output folder", where="--out", fix="Pass the data folder to write with --out DIR")
    if config.truncate and config.max_tokens is None:
        raise UserError(
            "--truncate cuts rows to --max-tokens, which is not set",
            where="--truncate",
            fix="Pass --max-tokens N with --truncate (the summary's p95 is a good start)",
        )
    for path in config.inputs:
        if not Path(path).exists():
            raise UserError("The input does not exist", where=str(path), fix="Check the --input path")
    if config.split_judge is not None and Path(config.split_judge).resolve() == Path(config.out).resolve():
        raise UserError(
            "--split-judge names the --out folder", where="--split-judge", fix="Give the judge's half its own folder"
        )
    existing = artifacts.read_manifest(config.out) if Path(config.out).is_dir() else None
    for folder, flag in ((config.out, "--out"), (config.split_judge, "--split-judge")):
        there = artifacts.read_manifest(folder) if folder is not None and Path(folder).is_dir() else None
        if there is not None and there.get("status") == "complete" and not config.force:
            raise UserError(
                f"{folder} already holds a complete {there.get('kind')} output",
                where=flag,
                fix=f"Pass --force to replace it, or choose another {flag}",
            )
    return existing


# ------------------------------------------------------------------------------------------- 1-2. read
def read_inputs(config: PrepareDataConfig, dropped: Counter) -> tuple[Converted, list[dict]]:
    """Every row of every input converted to a canonical record; returns them and the manifest's record of
    each input (path, sha256, format, rows). Flagged and malformed rows are counted in `dropped`."""
    converted: Converted = []
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
                converted.append((kind, record, where, extra_fields(raw, fmt, kind)))
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
    return converted, sources


# ---------------------------------------------------------------------------------------------- 3. task
def task_rows(converted: Converted, config: PrepareDataConfig, dropped: Counter) -> tuple[str, list[dict]]:
    """The folder's task (the one asked for, or the kind most rows have) and its rows: each record as a row
    of the task, with --system, checked and deduplicated (a prompt seen before is a duplicate whatever its
    columns: the first one's are kept); prompts rows get their columns; dropped rows are counted in `dropped`."""
    kinds = Counter(kind for kind, _, _, _ in converted)
    task = config.task if config.task != "auto" else kinds.most_common(1)[0][0]
    if config.task == "auto" and len(kinds) > 1:
        warn(
            f"The inputs mix {', '.join(f'{n} {k}' for k, n in kinds.items())} rows; writing the {task} task "
            "(pass --task to choose)"
        )
    rows, seen = [], set()
    for kind, record, where, extra in converted:
        try:
            row = as_task(kind, record, task)
            row = add_system(row, config.system) if config.system else row
            reason = check_row(row, task)
            key = json.dumps(row, sort_keys=True)
            row = with_columns(row, extra) if task == "prompts" else row
        except Malformed as exc:
            if config.strict:
                raise UserError(
                    f"Row cannot be used: {exc}",
                    where=where,
                    fix="Choose the --task these rows are for, or prepare them apart",
                ) from None
            reason = "malformed"
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is not None:
            if config.strict and reason != "duplicate":
                raise UserError(f"Row is {reason}", where=where, fix="Fix the row, or drop --strict to skip it")
            dropped[reason] += 1
            continue
        seen.add(key)
        rows.append(row)
    return task, rows


# ----------------------------------------------------------------------------------------------- tokens
TOO_LONG_WARNING = 0.05
"""Dropping more than this share of the rows for length is warned about, with the --max-tokens that keeps 95%."""


def warn_if_many_too_long(too_long: int, lengths: list[int], max_tokens: int | None) -> None:
    """A highlighted warning when --max-tokens drops more than 5% of the rows: how many, and what keeps 95%."""
    if not lengths or too_long <= TOO_LONG_WARNING * len(lengths):
        return
    keeps = percentile(sorted(lengths), 95)
    warn(
        f"[bold]{too_long} of {len(lengths)} rows ({too_long / len(lengths):.0%}) are longer than --max-tokens "
        f"{max_tokens} and were dropped[/bold]; --max-tokens {keeps} would keep 95% of them, and --truncate keeps "
        "them with their prompts cut from the left"
    )


def measure_tokens(
    rows: list[dict], task: str, config: PrepareDataConfig, dropped: Counter
) -> tuple[list[dict], list[int], str, int]:
    """The rows within --max-tokens under the model's chat template, their token lengths, the reference of the
    tokenizer that measured them (the manifest's), and how many rows --truncate cut to fit; rows too long are
    counted in `dropped`."""
    from instruct_cli.core import models
    from instruct_cli.core.chat import template_ids

    source = models.resolve_model(config.model, flag="--model")
    tokenizer = models.load_tokenizer(source)
    if not tokenizer.chat_template:
        raise UserError(
            "The model's tokenizer has no chat template, so token lengths cannot be measured",
            where="--model",
            fix="Use an instruct/chat model, whose tokenizer has a chat template",
        )
    kept, lengths, every_length, truncated = [], [], [], 0
    with progress("prepare-data: measuring tokens", total=len(rows)) as bar:
        for row in rows:
            length = max(len(template_ids(tokenizer, conv)) for conv in conversations_of(row, task))
            bar.advance()
            every_length.append(length)
            if config.max_tokens is not None and length > config.max_tokens:
                cut = truncation.cut_prompt(tokenizer, row, task, config.max_tokens) if config.truncate else None
                if cut is None:
                    dropped["answer_too_long" if config.truncate else "too_long"] += 1
                    continue
                row, truncated = cut, truncated + 1
                length = max(len(template_ids(tokenizer, conv)) for conv in conversations_of(row, task))
            kept.append(row)
            lengths.append(length)
    if truncated:
        info(f"prepare-data: {truncated} rows over --max-tokens {config.max_tokens} kept with their prompt cut")
    else:
        warn_if_many_too_long(dropped["too_long"], every_length, config.max_tokens)
    if not kept:
        raise UserError(
            f"Every row was dropped ({', '.join(f'{n} {r}' for r, n in dropped.items())})",
            where=", ".join(map(str, config.inputs)),
            fix="Check the inputs, --task and --max-tokens",
        )
    return kept, lengths, source.reference, truncated
