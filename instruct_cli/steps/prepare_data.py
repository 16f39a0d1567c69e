"""`instruct prepare-data`: raw files in common formats -> a data folder of canonical JSONL splits.

Reading happens in three small stages, each with one owner:

1. `read_source`: a file or folder -> raw rows (dicts), each with where it came from (file, line).
   JSON, JSONL, CSV, Parquet, plain text, a `datasets.save_to_disk` folder, or a `labels/` folder.
2. `detect_format` + `CONVERTERS`: one raw row -> one canonical record, by input format:
   sft `{"messages"}`, prefs `{"prompt", "chosen", "rejected"}` or `{"prompt", "responses", "ranking"}`,
   prompts `{"prompt"}`. A row that cannot be converted raises `Malformed`.
3. `run`: converts every row, turns records into the requested task, drops empty, duplicate, too long,
   malformed and flagged (by a labeler) rows, counted by reason, splits train/eval with a seed, and writes the folder atomically
   with a manifest (sources + sha256, format, counts, drops, token-length statistics).

Every training step reads a data folder through `read_split`, which refuses an incomplete folder and says
how to make the split that is missing.
"""

from __future__ import annotations

import csv
import json
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from instruct_cli.core import artifacts
from instruct_cli.core.config import PrepareDataConfig, to_recipe_dict
from instruct_cli.core.console import info, progress, summary_table, warn
from instruct_cli.core.errors import UserError

FILE_TYPES = ".json, .jsonl, .csv, .parquet, .txt, a `datasets.save_to_disk` folder or a labels folder"


class Malformed(ValueError):
    """A row that cannot be read in the detected format; the message says what is wrong with it."""


# ------------------------------------------------------------------------------------ 1. reading sources
def read_source(path: Path) -> Iterator[tuple[object, str]]:
    """Yield (raw row, where) for every row of one input file or folder."""
    path = Path(path)
    if not path.exists():
        raise UserError("The input does not exist", where=str(path), fix="Check the --input path")
    if path.is_dir():
        yield from read_folder(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(path)
    elif suffix == ".json":
        yield from read_json(path)
    elif suffix == ".csv":
        yield from read_csv(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield row, f"{path}, row {number}"
    elif suffix in (".txt", ".text", ".md"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                yield {"text": line.strip()}, f"{path}, line {number}"
    else:
        raise UserError(f"Unknown input file type {suffix!r}", where=str(path), fix=f"Give {FILE_TYPES}")


def read_jsonl(path: Path) -> Iterator[tuple[object, str]]:
    """Rows of a JSON-lines file; a line that is not JSON is yielded as a `Malformed` marker."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as exc:
                yield Malformed(f"not valid JSON ({exc.msg})"), where


def read_json(path: Path) -> Iterator[tuple[object, str]]:
    """Rows of a JSON file holding a list of rows (or an object with one list of rows, e.g. {"data": [...]})."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        # a .json file that is really JSON lines is common enough to accept
        if exc.msg == "Extra data":
            yield from read_jsonl(path)
            return
        raise UserError(
            f"The file is not valid JSON ({exc.msg}, line {exc.lineno})",
            where=str(path),
            fix="Fix the JSON, or save it as JSON lines (.jsonl)",
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                "A JSON file must hold a list of rows (or an object with exactly one list)",
                where=str(path),
                fix="Write the rows as a JSON list or as JSON lines",
            )
        value = lists[0]
    if not isinstance(value, list):
        raise UserError(
            "A JSON file must hold a list of rows",
            where=str(path),
            fix="Write the rows as a JSON list or as JSON lines",
        )
    for number, row in enumerate(value, start=1):
        yield row, f"{path}, row {number}"


def read_csv(path: Path) -> Iterator[tuple[object, str]]:
    """Rows of a CSV file with a header; cells holding JSON lists or objects (messages) are parsed."""
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            parsed = {}
            for key, cell in row.items():
                if isinstance(cell, str) and cell.strip()[:1] in ("[", "{"):
                    try:
                        cell = json.loads(cell)
                    except json.JSONDecodeError:
                        pass
                parsed[key] = cell
            yield parsed, f"{path}, line {number}"


def read_folder(path: Path) -> Iterator[tuple[object, str]]:
    """Rows of a `datasets.save_to_disk` folder (every split) or of a labels folder's rankings.jsonl."""
    if (path / "rankings.jsonl").is_file():
        yield from read_jsonl(path / "rankings.jsonl")
        return
    if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise UserError(
            "The input folder is neither a `datasets.save_to_disk` folder nor a labels folder",
            where=str(path),
            fix=f"Give {FILE_TYPES}",
        )
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        for number, row in enumerate(dataset, start=1):
            yield row, f"{path}{'/' + split if split else ''}, row {number}"


# ------------------------------------------------------------------------------ 2. formats and records
ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


def text_of(value, field: str) -> str:
    """A string field (multi-part OpenAI content is joined); anything else is Malformed."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(p.get("text", "") for p in value)
    if not isinstance(value, str):
        raise Malformed(f"`{field}` should be text, not {type(value).__name__}")
    return value


def to_messages(value, default_role: str, field: str) -> list[dict]:
    """Text, one message, or a list of messages (OpenAI role/content or ShareGPT from/value) -> messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Malformed(f"`{field}` should be text or a non-empty list of messages")
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise Malformed(f"`{field}` holds a {type(message).__name__} where a message should be")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            raise Malformed(f"a message of `{field}` needs role/content (or from/value)")
        if str(role).lower() not in ROLE_NAMES:
            raise Malformed(f"unknown role {role!r} in `{field}`")
        messages.append({"role": ROLE_NAMES[str(role).lower()], "content": text_of(content, field)})
    return messages


def split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen tail, rejected tail): two full conversations split where they start to differ."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1  # the prompt ends with the user's turn, never mid-answer
    return chosen[:shared], chosen[shared:], rejected[shared:]


def preference(prompt: list[dict] | None, chosen, rejected) -> dict:
    """A prefs record from a prompt (or None: take the shared prefix) and two responses or conversations."""
    chosen = to_messages(chosen, "assistant", "chosen")
    rejected = to_messages(rejected, "assistant", "rejected")
    if prompt is None:
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    else:  # responses that repeat the prompt (full conversations) lose it
        if chosen[: len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen = chosen[len(prompt) :]
        if rejected[: len(prompt)] == prompt and len(rejected) > len(prompt):
            rejected = rejected[len(prompt) :]
    if not prompt:
        raise Malformed("chosen and rejected share no prompt")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def hh_messages(text: str) -> list[dict]:
    """Anthropic HH full text ('\\n\\nHuman: ... \\n\\nAssistant: ...') -> messages."""
    messages = []
    for chunk in text.split("\n\nHuman:")[1:] if "\n\nHuman:" in text else []:
        human, *answers = chunk.split("\n\nAssistant:")
        messages.append({"role": "user", "content": human.strip()})
        messages.extend({"role": "assistant", "content": answer.strip()} for answer in answers)
    if not messages:
        raise Malformed("no '\\n\\nHuman:' turns found")
    return messages


def from_alpaca(row: dict) -> tuple[str, dict]:
    """alpaca: instruction (+ input) -> output, or -> chosen/rejected; an optional `system`."""
    prompt_text = text_of(row["instruction"], "instruction")
    if row.get("input"):
        prompt_text += "\n\n" + text_of(row["input"], "input")
    prompt = ([{"role": "system", "content": text_of(row["system"], "system")}] if row.get("system") else []) + [
        {"role": "user", "content": prompt_text}
    ]
    if "chosen" in row and "rejected" in row:
        return "prefs", preference(prompt, row["chosen"], row["rejected"])
    if row.get("output") is None:
        return "prompts", {"prompt": prompt}
    return "sft", {"messages": prompt + [{"role": "assistant", "content": text_of(row["output"], "output")}]}


def from_sharegpt(row: dict) -> tuple[str, dict]:
    """ShareGPT: `conversations` of from/value; with `chosen`/`rejected` it is a preference on its prompt."""
    messages = to_messages(row["conversations"], "user", "conversations")
    if row.get("system"):
        messages = [{"role": "system", "content": text_of(row["system"], "system")}] + messages
    if "chosen" in row and "rejected" in row:
        return "prefs", preference(messages, row["chosen"], row["rejected"])
    return conversation_record(messages)


def from_messages(row: dict) -> tuple[str, dict]:
    """OpenAI `messages`; a conversation ending with the user is a prompt."""
    return conversation_record(to_messages(row["messages"], "user", "messages"))


def conversation_record(messages: list[dict]) -> tuple[str, dict]:
    """A conversation ending with an assistant turn is a demonstration; ending with a user turn, a prompt."""
    if messages[-1]["role"] == "assistant":
        return "sft", {"messages": messages}
    return "prompts", {"prompt": messages}


def from_prompt_completion(row: dict) -> tuple[str, dict]:
    """`prompt` + `completion` (or `response`), text or messages; `prompt` alone is a prompt."""
    prompt = to_messages(row["prompt"], "user", "prompt")
    completion = row.get("completion", row.get("response"))
    if completion is None:
        return "prompts", {"prompt": prompt}
    return "sft", {"messages": prompt + to_messages(completion, "assistant", "completion")}


def from_preference(row: dict) -> tuple[str, dict]:
    """`prompt`/`chosen`/`rejected` as text or messages; without a prompt, the shared prefix is the prompt."""
    prompt = to_messages(row["prompt"], "user", "prompt") if row.get("prompt") else None
    return "prefs", preference(prompt, row["chosen"], row["rejected"])


def from_hh(row: dict) -> tuple[str, dict]:
    """Anthropic HH: full transcripts in `chosen` and `rejected`; the prompt is their shared beginning."""
    return "prefs", preference(
        None, hh_messages(text_of(row["chosen"], "chosen")), hh_messages(text_of(row["rejected"], "rejected"))
    )


def from_ranked(row: dict) -> tuple[str, dict]:
    """InstructGPT-style K responses and a ranking best first (also `instruct label`'s rankings.jsonl)."""
    prompt = to_messages(row["prompt"], "user", "prompt")
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise Malformed("`responses` should be a list of at least two responses")
    responses = [to_messages(r, "assistant", "responses") for r in responses]
    ranking = row["ranking"]
    if (
        not isinstance(ranking, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
        or sorted(ranking) != list(range(len(responses)))
    ):
        raise Malformed(f"`ranking` {ranking!r} is not a permutation of 0..{len(responses) - 1}")
    record = {"prompt": prompt, "responses": responses, "ranking": ranking}
    ties = row.get("ties") or []
    if ties:  # groups of responses judged equal (instruct label): rm trains no pair inside a group
        if not all(isinstance(g, list) and len(g) >= 2 and all(i in ranking for i in g) for g in ties):
            raise Malformed(f"`ties` {ties!r} should be groups of response indices")
        record["ties"] = ties
    return "prefs", record


def from_text(row: dict) -> tuple[str, dict]:
    """One prompt per line (or a `text` field)."""
    return "prompts", {"prompt": [{"role": "user", "content": text_of(row["text"], "text")}]}


CONVERTERS: dict[str, Callable[[dict], tuple[str, dict]]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt-completion": from_prompt_completion,
    "preference": from_preference,
    "hh": from_hh,
    "ranked": from_ranked,
    "text": from_text,
}
REQUIRED_KEYS = {
    "alpaca": ("instruction",),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt-completion": ("prompt",),
    "preference": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "ranked": ("prompt", "responses", "ranking"),
    "text": ("text",),
}


def detect_format(row) -> str | None:
    """The input format of one raw row from its keys (None when no format fits)."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "instruction" in keys:
        return "alpaca"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"responses", "ranking"} <= keys:
        return "ranked"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys and isinstance(row["chosen"], str) and "\n\nHuman:" in row["chosen"]:
            return "hh"
        return "preference"
    if "prompt" in keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    return None


def convert(row, fmt: str) -> tuple[str, dict]:
    """One raw row -> (record kind, canonical record) in format `fmt`; Malformed when it does not fit."""
    if isinstance(row, Malformed):
        raise row
    if not isinstance(row, dict):
        raise Malformed(f"a row should be an object, not {type(row).__name__}")
    missing = [key for key in REQUIRED_KEYS[fmt] if key not in row]
    if missing:
        raise Malformed(f"missing {', '.join(f'`{k}`' for k in missing)} for the {fmt} format")
    return CONVERTERS[fmt](row)


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
    """Why a canonical row must be dropped ('empty' or 'malformed'), or None when it is fine."""
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


# ------------------------------------------------------------------------------------------- reading back
