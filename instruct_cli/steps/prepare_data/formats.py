"""Reading raw inputs and converting each row to a canonical record (stages 1 and 2 of prepare-data).

`read_source` turns a file or folder into raw rows with where each came from; `detect_format` and
`convert` turn one raw row into one canonical record: sft `{"messages"}`, prefs `{"prompt", "chosen",
"rejected"}` or `{"prompt", "responses", "ranking"}`, prompts `{"prompt"}`. A row that cannot be converted
raises `Malformed`. `extra_fields` and `plain_json` keep the fields a format did not read, the columns a
prompts row carries for reward functions. May use: core (errors).
"""

from __future__ import annotations

import csv
import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator

from instruct_cli.core.errors import UserError

FILE_TYPES = ".json, .jsonl, .csv, .parquet, .txt, a `datasets.save_to_disk` folder or a labels folder"


class Malformed(ValueError):
    """A row that cannot be read in the detected format; the message says what is wrong with it."""


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


# ------------------------------------------------------------------------------------------- columns
PROMPT_FIELDS = {
    "alpaca": ("instruction", "input", "system"),
    "sharegpt": ("conversations", "system"),
    "messages": ("messages",),
    "prompt-completion": ("prompt",),
    "preference": ("prompt",),
    "hh": (),
    "ranked": ("prompt",),
    "text": ("text",),
}
"""The fields each format reads to build the prompt conversation."""

PREFERENCE_FIELDS = ("chosen", "rejected", "responses", "ranking", "ties")
"""The fields that hold a preference's responses: never columns (only one prompt of the pair is kept)."""

ALWAYS_READ = ("prompt", "flagged", "skipped")
"""Read by prepare-data whatever the format: `prompt` is the prompts row's own key, the others drop a row."""


def extra_fields(row, fmt: str, kind: str) -> dict:
    """The fields of raw `row` that format `fmt` did not read for the prompt (a prefs row's responses count as
    read), by name, values as read: the columns a prompts row keeps. An SFT row's answer field (alpaca
    `output`, `completion`, `response`) is not a prompt field, so it is kept as a reference answer."""
    if not isinstance(row, dict):
        return {}
    read = {*PROMPT_FIELDS[fmt], *ALWAYS_READ, *(PREFERENCE_FIELDS if kind == "prefs" else ())}
    return {str(key): value for key, value in row.items() if key is not None and key not in read}


def plain_json(value, field: str):
    """`value` as a plain JSON value (numpy / arrow scalars and arrays, tuples, dates, decimals converted; a
    float that is not finite becomes null); Malformed when it has no JSON form (e.g. an image)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): plain_json(item, field) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item, field) for item in value]
    if isinstance(value, Decimal):
        return (
            int(value) if value.is_finite() and value == value.to_integral_value() else plain_json(float(value), field)
        )
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"column `{field}` holds bytes that are not UTF-8 text") from None
    if hasattr(value, "as_py"):  # a pyarrow scalar
        return plain_json(value.as_py(), field)
    if hasattr(value, "tolist"):  # a numpy scalar or array
        return plain_json(value.tolist(), field)
    if hasattr(value, "isoformat"):  # datetime, date, time, pandas Timestamp
        return value.isoformat()
    raise Malformed(f"column `{field}` holds a {type(value).__name__}, which has no JSON form")
