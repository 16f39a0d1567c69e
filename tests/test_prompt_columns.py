"""prepare-data keeps a prompt row's other fields as columns (for reward functions), from JSONL, CSV, parquet
and `datasets` folders; `read_prompt_columns` gives them aligned with `read_prompts`; other tasks unchanged."""

import csv
import json
import math
from datetime import date
from decimal import Decimal

import pytest

from instruct_cli.cli import app
from instruct_cli.core import artifacts, data_folders
from instruct_cli.steps.prepare_data.formats import Malformed, plain_json
from tests.test_data import USER, prepare, rows_of, runner

PROBLEMS = [
    {"prompt": f"What is {i} + {i + 3}?", "answer": 2 * i + 3, "solution": f"{i} + {i + 3} = {2 * i + 3}"}
    for i in range(10)
]


def user(text):
    return [{"role": "user", "content": text}]


def prepare_file(tmp_path, model_dir, path, *flags):
    """Run prepare-data on an input file or folder already written; returns the data folder."""
    out = tmp_path / f"out-{path.name}"
    result = runner.invoke(app, ["prepare-data", "-i", str(path), "-o", str(out), "--model", str(model_dir), *flags])
    assert result.exit_code == 0, result.output
    return out


def by_prompt(rows):
    return {row["prompt"][0]["content"]: row for row in rows}


def test_jsonl_columns_keep_their_json_types_and_are_listed(tmp_path, tiny_model_dir):
    rows = [
        {**PROBLEMS[0], "tests": {"cases": [[1, 2], [3, 4]], "strict": True}, "weight": 0.5},
        {**PROBLEMS[1], "tags": ["easy"]},  # no tests / weight; a tags column the first row lacks
    ]
    result, out = prepare(tmp_path, tiny_model_dir, "raw.jsonl", rows)
    assert result.exit_code == 0, result.output
    written = by_prompt(rows_of(out, "prompts.train"))
    first, second = written["What is 0 + 3?"], written["What is 1 + 4?"]
    assert first == {
        "prompt": user("What is 0 + 3?"),
        "answer": 3,
        "solution": "0 + 3 = 3",
        "tests": {"cases": [[1, 2], [3, 4]], "strict": True},
        "weight": 0.5,
        "tags": None,
    }
    assert isinstance(first["answer"], int)
    # every row has every column, null where its input row had none
    assert second == {
        "prompt": user("What is 1 + 4?"),
        "answer": 5,
        "solution": "1 + 4 = 5",
        "tests": None,
        "weight": None,
        "tags": ["easy"],
    }
    manifest = artifacts.read_manifest(out)
    assert manifest["columns"] == ["answer", "solution", "tests", "weight", "tags"]
    # the prompts themselves are what they were
    assert data_folders.read_prompts(out, "train") == [row["prompt"] for row in rows_of(out, "prompts.train")]


def test_csv_columns_are_strings_as_read(tmp_path, tiny_model_dir):
    path = tmp_path / "problems.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "answer", "solution"])
        writer.writeheader()
        writer.writerows(PROBLEMS[:4])
    out = prepare_file(tmp_path, tiny_model_dir, path, "--eval-fraction", "0")
    written = by_prompt(rows_of(out, "prompts.train"))
    assert written["What is 2 + 5?"] == {"prompt": user("What is 2 + 5?"), "answer": "7", "solution": "2 + 5 = 7"}
    assert artifacts.read_manifest(out)["columns"] == ["answer", "solution"]


def test_parquet_and_datasets_folder_columns(tmp_path, tiny_model_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**p, "score": p["answer"] / 2, "steps": [p["answer"], 1]} for p in PROBLEMS[:4]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "problems.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "disk"))
    expected = {
        row["prompt"]: {"prompt": user(row["prompt"]), **{k: v for k, v in row.items() if k != "prompt"}}
        for row in rows
    }
    for name in ("problems.parquet", "disk"):
        out = prepare_file(tmp_path, tiny_model_dir, tmp_path / name, "--eval-fraction", "0")
        written = by_prompt(rows_of(out, "prompts.train"))
        assert written == expected, name
        assert all(type(row["answer"]) is int and type(row["score"]) is float for row in written.values())
        assert artifacts.read_manifest(out)["columns"] == ["answer", "solution", "score", "steps"]


def test_read_prompt_columns_align_with_read_prompts(tmp_path, tiny_model_dir):
    result, out = prepare(tmp_path, tiny_model_dir, "raw.jsonl", PROBLEMS, "--eval-fraction", "0.3")
    assert result.exit_code == 0, result.output
    answers = {p["prompt"]: p["answer"] for p in PROBLEMS}
    sizes = []
    for split in ("train", "eval"):
        prompts = data_folders.read_prompts(out, split)
        columns = data_folders.read_prompt_columns(out, split)
        assert len(prompts) == len(columns) > 0
        for prompt, column in zip(prompts, columns):
            assert set(column) == {"answer", "solution"}
            assert column["answer"] == answers[prompt[-1]["content"]]
        sizes.append(len(prompts))
    assert sizes == [7, 3]


def test_sft_and_prefs_rows_are_unchanged_and_their_prompts_have_no_columns(tmp_path, tiny_model_dir):
    sft = [{"prompt": "Name a colour.", "completion": "Blue.", "answer": "blue", "id": 7}]
    result, out = prepare(tmp_path, tiny_model_dir, "sft.jsonl", sft, "--task", "sft")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "sft.train") == [{"messages": [USER, {"role": "assistant", "content": "Blue."}]}]
    assert "columns" not in artifacts.read_manifest(out)
    assert data_folders.read_prompt_columns(out, "train") == [{}]
    assert len(data_folders.read_prompt_columns(out, "train")) == len(data_folders.read_prompts(out, "train"))

    prefs = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "no", "id": 7}]
    result, out = prepare(tmp_path, tiny_model_dir, "prefs.jsonl", prefs, out="prefs")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "prefs.train") == [
        {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
    ]
    assert data_folders.read_prompt_columns(out, "train") == [{}]


def test_which_fields_become_columns_when_other_rows_are_used_as_prompts(tmp_path, tiny_model_dir):
    # a preference used as prompts: its responses are read, only the other fields are columns
    prefs = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "no", "id": 7}]
    result, out = prepare(tmp_path, tiny_model_dir, "prefs.jsonl", prefs, "--task", "prompts", out="a")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "prompts.train") == [{"prompt": [USER], "id": 7}]
    # an SFT row used as prompts keeps its answer field, under its own name, as a reference answer; a field
    # named `prompt` the format did not read never clashes with the prompt
    alpaca = [{"instruction": "Name a colour.", "input": "", "output": "Blue.", "prompt": "x", "level": 1}]
    result, out = prepare(tmp_path, tiny_model_dir, "alpaca.jsonl", alpaca, "--task", "prompts", out="b")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "prompts.train") == [{"prompt": [USER], "output": "Blue.", "level": 1}]
    assert artifacts.read_manifest(out)["columns"] == ["output", "level"]
    # a prompt seen twice is a duplicate whatever its columns: the first row's are kept
    twice = [{"prompt": "Name a colour.", "answer": "blue"}, {"prompt": "Name a colour.", "answer": "red"}]
    result, out = prepare(tmp_path, tiny_model_dir, "twice.jsonl", twice, out="c")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "prompts.train") == [{"prompt": [USER], "answer": "blue"}]
    assert artifacts.read_manifest(out)["dropped"] == {"duplicate": 1}
    # a prompts folder without extra fields is as before
    result, out = prepare(tmp_path, tiny_model_dir, "plain.jsonl", [{"prompt": "Name a colour."}], out="d")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "prompts.train") == [{"prompt": [USER]}]
    assert artifacts.read_manifest(out)["columns"] == []


def test_plain_json_converts_numpy_and_other_values():
    import numpy as np

    assert plain_json(np.int64(3), "a") == 3 and type(plain_json(np.int64(3), "a")) is int
    assert plain_json(np.array([[1, 2], [3, 4]]), "a") == [[1, 2], [3, 4]]
    assert plain_json({"x": (np.float32(0.5), np.bool_(True))}, "a") == {"x": [0.5, True]}
    assert plain_json(float("nan"), "a") is None and plain_json(np.float64(math.inf), "a") is None
    assert plain_json(Decimal("2"), "a") == 2 and plain_json(Decimal("2.5"), "a") == 2.5
    assert plain_json(date(2024, 1, 2), "a") == "2024-01-02"
    assert plain_json(b"text", "a") == "text"
    json.dumps(plain_json({"n": np.arange(3), "s": np.str_("x")}, "a"))
    with pytest.raises(Malformed, match="`image`"):
        plain_json(object(), "image")
