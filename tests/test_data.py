"""prepare-data: every input format and file type to canonical rows, drops by reason, splits, errors."""

import csv
import json

import pytest
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts, data_folders

runner = CliRunner()

USER = {"role": "user", "content": "Name a colour."}
ANSWER = {"role": "assistant", "content": "Blue."}


def prepare(tmp_path, model_dir, raw_name, content, *flags, out="data"):
    """Write `content` to a raw file and run the real prepare-data command on it; returns (result, out)."""
    raw = tmp_path / raw_name
    if isinstance(content, list):
        content = "".join(json.dumps(row) + "\n" for row in content)
    raw.write_text(content)
    result = runner.invoke(
        app,
        [
            "prepare-data",
            "-i",
            str(raw),
            "-o",
            str(tmp_path / out),
            "--model",
            str(model_dir),
            "--eval-fraction",
            "0",
            *flags,
        ],
    )
    return result, tmp_path / out


def rows_of(folder, split):
    return data_folders.read_split(folder, split)


@pytest.mark.parametrize(
    "raw, task, expected",
    [
        ({"instruction": "Name a colour.", "input": "", "output": "Blue."}, "sft", {"messages": [USER, ANSWER]}),
        (
            {"instruction": "Name a colour.", "input": "Sky", "output": "Blue."},
            "sft",
            {"messages": [{"role": "user", "content": "Name a colour.\n\nSky"}, ANSWER]},
        ),
        (
            {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
            "sft",
            {"messages": [USER, ANSWER]},
        ),
        ({"messages": [USER, ANSWER]}, "sft", {"messages": [USER, ANSWER]}),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}, ANSWER]},
            "sft",
            {"messages": [USER, ANSWER]},
        ),
        ({"prompt": "Name a colour.", "completion": "Blue."}, "sft", {"messages": [USER, ANSWER]}),
        (
            {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "no"},
            "prefs",
            {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "no"}]},
        ),
        (
            {"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "no"}]},
            "prefs",
            {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "no"}]},
        ),
        (
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: no",
            },
            "prefs",
            {
                "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, USER],
                "chosen": [ANSWER],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Name a colour."}],
                "chosen": {"from": "gpt", "value": "Blue."},
                "rejected": {"from": "gpt", "value": "no"},
            },
            "prefs",
            {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "no"}]},
        ),
        (
            {"prompt": "Name a colour.", "responses": ["a", "Blue.", "c"], "ranking": [1, 0, 2]},
            "prefs",
            {
                "prompt": [USER],
                "responses": [
                    [{"role": "assistant", "content": "a"}],
                    [ANSWER],
                    [{"role": "assistant", "content": "c"}],
                ],
                "ranking": [1, 0, 2],
            },
        ),
        ({"prompt": "Name a colour."}, "prompts", {"prompt": [USER]}),
    ],
)
def test_formats_are_detected_and_converted(tmp_path, tiny_model_dir, raw, task, expected):
    result, out = prepare(tmp_path, tiny_model_dir, "raw.jsonl", [raw])
    assert result.exit_code == 0, result.output
    assert data_folders.data_task(out) == task
    assert rows_of(out, f"{task}.train") == [expected]


def test_file_types_json_csv_parquet_text_and_save_to_disk(tmp_path, tiny_model_dir):
    import datasets

    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(4)]
    expected = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in rows
    ]
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "disk"))
    for name in ("a.json", "a.csv", "a.parquet", "disk"):
        result = runner.invoke(
            app,
            [
                "prepare-data",
                "-i",
                str(tmp_path / name),
                "-o",
                str(tmp_path / f"out-{name}"),
                "--model",
                str(tiny_model_dir),
                "--eval-fraction",
                "0",
            ],
        )
        assert result.exit_code == 0, (name, result.output)
        assert sorted(rows_of(tmp_path / f"out-{name}", "sft.train"), key=json.dumps) == sorted(
            expected, key=json.dumps
        )
    result, out = prepare(tmp_path, tiny_model_dir, "prompts.txt", "First prompt\n\nSecond prompt\n", out="txt")
    assert result.exit_code == 0, result.output
    assert [row["prompt"][0]["content"] for row in rows_of(out, "prompts.train")] == ["First prompt", "Second prompt"]


def test_drops_are_counted_by_reason_and_manifest_records_sources(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": "", "completion": "x"},
        {"prompt": "word " * 200, "completion": "long"},
        {"nonsense": 1},
        {"prompt": "Bye", "completion": "Goodbye"},
    ]
    raw = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n"
    result, out = prepare(tmp_path, tiny_model_dir, "raw.jsonl", raw, "--max-tokens", "100")
    assert result.exit_code == 0, result.output
    manifest = artifacts.require_complete(out, "data")
    assert manifest["dropped"] == {"duplicate": 1, "empty": 1, "too_long": 1, "malformed": 2}
    assert manifest["counts"] == {"train": 2, "eval": 0}
    assert manifest["sources"][0]["sha256"] == artifacts.sha256_file(tmp_path / "raw.jsonl")
    assert manifest["sources"][0]["format"] == "prompt-completion"
    assert manifest["token_lengths"]["max"] <= 100


def test_strict_names_file_and_line(tmp_path, tiny_model_dir):
    raw = json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n{not json\n"
    result, _ = prepare(tmp_path, tiny_model_dir, "raw.jsonl", raw, "--strict")
    assert result.exit_code == 2 and "line 2" in result.output and "Traceback" not in result.output
    assert "not valid JSON" in result.output
    # a file whose first line is not JSON: still named as such (not as a row of an unknown format)
    result, _ = prepare(tmp_path, tiny_model_dir, "first.jsonl", '{"bad json\n', "--strict", out="first")
    assert result.exit_code == 2 and "not valid JSON" in " ".join(result.output.split()), result.output


def test_split_is_seeded_and_system_prompt_added(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(20)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = []
    for name in ("one", "two"):
        result = runner.invoke(
            app,
            [
                "prepare-data",
                "-i",
                str(raw),
                "-o",
                str(tmp_path / name),
                "--model",
                str(tiny_model_dir),
                "--eval-fraction",
                "0.25",
                "--seed",
                "3",
                "--system",
                "Be brief.",
            ],
        )
        assert result.exit_code == 0, result.output
        outs.append(tmp_path / name)
    train, held = rows_of(outs[0], "sft.train"), rows_of(outs[0], "sft.eval")
    assert len(train) == 15 and len(held) == 5
    assert held == rows_of(outs[1], "sft.eval")
    assert all(row["messages"][0] == {"role": "system", "content": "Be brief."} for row in train + held)


def test_preferences_become_sft_or_prompts_on_request(tmp_path, tiny_model_dir):
    rows = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "no"}]
    result, out = prepare(tmp_path, tiny_model_dir, "raw.jsonl", rows, "--task", "sft")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "sft.train") == [{"messages": [USER, ANSWER]}]
    result, out = prepare(tmp_path, tiny_model_dir, "raw.jsonl", rows, "--task", "prompts", out="p")
    assert result.exit_code == 0, result.output
    assert rows_of(out, "prompts.train") == [{"prompt": [USER]}]


def test_errors_are_one_paragraph(tmp_path, tiny_model_dir):
    cases = [
        (["prepare-data", "-o", str(tmp_path / "x")], "--input"),
        (["prepare-data", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")], "does not exist"),
        (["prepare-data", "-i", str(tmp_path / "x.docx"), "-o", str(tmp_path / "x")], "does not exist"),
    ]
    (tmp_path / "odd.docx").write_text("x")
    cases.append(
        (
            [
                "prepare-data",
                "-i",
                str(tmp_path / "odd.docx"),
                "-o",
                str(tmp_path / "x"),
                "--model",
                str(tiny_model_dir),
            ],
            "file type",
        )
    )
    (tmp_path / "junk.jsonl").write_text('{"a": 1}\n')
    cases.append(
        (
            [
                "prepare-data",
                "-i",
                str(tmp_path / "junk.jsonl"),
                "-o",
                str(tmp_path / "x"),
                "--model",
                str(tiny_model_dir),
            ],
            "No row",
        )
    )
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output
    # a prompts folder given where preference pairs are needed names the fix
    result, out = prepare(tmp_path, tiny_model_dir, "raw.jsonl", [{"prompt": "Hi"}])
    assert result.exit_code == 0
    with pytest.raises(Exception, match="--task prefs"):
        data_folders.read_split(out, "prefs.train")
    again, _ = prepare(tmp_path, tiny_model_dir, "raw.jsonl", [{"prompt": "Hi"}])
    assert again.exit_code == 2 and "--force" in again.output


def test_dropping_most_rows_for_length_is_warned_with_the_max_tokens_that_keeps_95(tmp_path, tiny_model_dir):
    """90% of the rows are over --max-tokens: a highlighted warning says so and suggests the length at their
    95th percentile; the manifest keeps the distribution."""
    long = "word " * 60
    rows = [{"prompt": f"q{n}?", "completion": long if n % 10 else "short"} for n in range(40)]
    result, out = prepare(tmp_path, tiny_model_dir, "long.jsonl", rows, "--task", "sft", "--max-tokens", "30")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "36 of 40 rows (90%) are longer than --max-tokens 30 and were dropped" in text
    suggested = int(text.split("would keep 95%")[0].split("--max-tokens")[-1])
    assert suggested > 30
    lengths = json.loads((out / "manifest.json").read_text())["token_lengths"]
    assert {"median", "p90", "p95", "p99", "max"} <= set(lengths)


def test_truncate_keeps_long_rows_with_their_prompts_cut_from_the_left_and_answers_whole(tmp_path, tiny_model_dir):
    """--truncate: rows over --max-tokens keep their answers intact and lose the start of their prompt (older
    turns first, then the text of the last one); a row whose answer cannot fit is dropped and counted."""
    from instruct_cli.core import models
    from instruct_cli.core.chat import template_ids

    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    prompt = " ".join(f"w{n}" for n in range(80))
    rows = [{"prompt": f"{n} {prompt}", "completion": f"answer {n}"} for n in range(9)]
    rows.append({"prompt": "short?", "completion": "far too long " * 40})  # the answer alone is over the limit
    flags = ("--task", "sft", "--max-tokens", "40", "--eval-fraction", "0", "--truncate")
    result, out = prepare(tmp_path, tiny_model_dir, "long.jsonl", rows, *flags)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["truncated"], manifest["dropped"]) == (9, {"answer_too_long": 1})
    kept = [json.loads(line)["messages"] for line in (out / "sft.train.jsonl").read_text().splitlines()]
    assert len(kept) == 9
    for messages in kept:
        assert len(template_ids(tokenizer, messages)) <= 40
        number = int(messages[-1]["content"].split()[-1])
        assert messages[-1]["content"] == f"answer {number}"  # the answer intact
        cut = messages[0]["content"]
        assert f"{number} {prompt}".endswith(cut) and 0 < len(cut) < len(prompt)  # the prompt's end

    # a conversation: the older turns go whole, the last exchange stays (the system message too, where it fits)
    turns = [("system", "Be brief."), ("user", prompt), ("assistant", "first answer")]
    turns += [("user", "And the last question?"), ("assistant", "last answer")]
    chat = [{"messages": [{"role": role, "content": text} for role, text in turns]}]
    for limit, kept_turns in ((60, ["Be brief.", "And the last question?", "last answer"]),
                              (40, ["And the last question?", "last answer"])):  # fmt: skip
        chat_flags = ("--task", "sft", "--max-tokens", str(limit), "--eval-fraction", "0", "--truncate", "--force")
        result, out = prepare(tmp_path, tiny_model_dir, "chat.jsonl", chat, *chat_flags, out="chat")
        assert result.exit_code == 0, result.output
        [row] = [json.loads(line) for line in (out / "sft.train.jsonl").read_text().splitlines()]
        assert [m["content"] for m in row["messages"]] == kept_turns

    # without --max-tokens there is nothing to cut to
    again, _ = prepare(tmp_path, tiny_model_dir, "long.jsonl", rows, "--task", "sft", "--truncate", out="data2")
    assert again.exit_code == 2 and "--max-tokens" in again.output and "Traceback" not in again.output


def test_split_judge_gives_a_disjoint_half_of_the_prompts_to_a_second_folder(tmp_path, tiny_model_dir):
    """--split-judge: a seeded half of the prompts, all rows of a prompt together, goes to a complete second
    prefs folder (for a judge reward model); the two folders hold every row once and share no prompt."""
    rows = [
        {"prompt": f"Question {n}?", "chosen": f"Answer {n}.", "rejected": f"Wrong {n}{k}."}
        for n in range(20)
        for k in range(2)  # two comparisons per prompt, as the example data has
    ]
    judge = tmp_path / "judge"
    result, out = prepare(tmp_path, tiny_model_dir, "prefs.jsonl", rows, "--task", "prefs", "--split-judge", judge)
    assert result.exit_code == 0, result.output
    halves = {}
    for folder in (out, judge):
        manifest = artifacts.require_complete(folder, "data")
        assert manifest["task"] == "prefs" and manifest["judge_split"]["judge"] == str(judge)
        halves[folder] = [r for split in ("train", "eval") for r in data_folders.read_split(folder, f"prefs.{split}")]
    mine, theirs = ({json.dumps(r["prompt"]) for r in halves[f]} for f in (out, judge))
    assert len(mine) == len(theirs) == 10 and not mine & theirs  # half the prompts each, none shared
    assert len(halves[out]) + len(halves[judge]) == 40
    # a complete judge folder is not replaced without --force
    again, _ = prepare(tmp_path, tiny_model_dir, "prefs.jsonl", rows, "--task", "prefs", "--split-judge", judge,
                       out="data3")  # fmt: skip
    assert again.exit_code == 2 and "--split-judge" in again.output and "--force" in again.output
    again, _ = prepare(tmp_path, tiny_model_dir, "sft.jsonl", [{"prompt": "q?", "completion": "a"}], "--task",
                       "sft", "--split-judge", tmp_path / "j2", out="data2")  # fmt: skip
    assert again.exit_code == 2 and "--split-judge" in again.output and "Traceback" not in again.output
