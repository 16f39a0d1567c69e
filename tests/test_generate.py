"""`instruct generate` through the real CLI on the tiny model: streaming, batches, run folders, bad input."""

import json

from typer.testing import CliRunner

from instruct_cli.cli import app
from tests.test_models import make_run_folder

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_single_prompt_streams_an_answer(tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--max-new-tokens", 8, "--greedy", "hello world")
    assert result.exit_code == 0, result.output
    assert len(result.stdout) > 1  # a random model says something (here newlines), and says it on stdout
    again = invoke("generate", "--model", tiny_model_dir, "--max-new-tokens", 8, "--greedy", "hello world")
    assert again.stdout == result.stdout  # greedy is deterministic


def test_prompt_from_stdin(tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--max-new-tokens", 4, "-", input="hello\n")
    assert result.exit_code == 0, result.output


def test_batch_prompts_from_stdin(tiny_model_dir):
    result = invoke(
        "generate",
        "--model",
        tiny_model_dir,
        "--max-new-tokens",
        4,
        "--input",
        "-",
        input='{"prompt": "one"}\n{"prompt": "two"}\n',
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["prompt"][-1]["content"] for row in rows] == ["one", "two"]


def test_batch_file_to_jsonl(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "one"}\n\n{"prompt": [{"role": "user", "content": "two two two"}]}\n{"prompt": "three"}\n'
    )
    out = tmp_path / "answers.jsonl"
    result = invoke(
        "generate",
        "--model",
        tiny_model_dir,
        "--input",
        prompts,
        "--output",
        out,
        "--max-new-tokens",
        5,
        "--batch-size",
        2,
        "--system",
        "Be brief.",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"][-1]["content"] for row in rows] == ["one", "two two two", "three"]
    assert all(row["prompt"][0] == {"role": "system", "content": "Be brief."} for row in rows)
    assert all(isinstance(row["response"], str) for row in rows)


def test_run_folder_uses_its_adapter(tmp_path, tiny_model_dir):
    run = make_run_folder(tmp_path, tiny_model_dir)
    base = invoke(
        "generate",
        "--model",
        tiny_model_dir,
        "--quantization",
        "none",
        "--greedy",
        "--max-new-tokens",
        12,
        "apple banana",
    )
    tuned = invoke(
        "generate", "--model", run, "--quantization", "none", "--greedy", "--max-new-tokens", 12, "apple banana"
    )
    assert tuned.exit_code == 0, tuned.output
    assert tuned.stdout != base.stdout  # the random adapter changes the greedy answer


def test_bad_inputs_are_one_paragraph_errors(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    cases = [
        (["generate", "--model", tiny_model_dir], "Give either a prompt or --input"),
        (["generate", "--model", tiny_model_dir, "--input", bad], "line 2"),
        (["generate", "--model", tiny_model_dir, "--input", tmp_path / "none.jsonl"], "does not exist"),
        (["generate", "--model", tmp_path / "nowhere", "hi"], "does not exist"),
        (["generate", "--model", tiny_model_dir, "--temperature", "-1", "hi"], "temperature"),
    ]
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output


def test_help_and_version():
    result = invoke("--help")
    for command in ("prepare-data", "sft", "rm", "ppo", "generate", "eval", "run"):
        assert command in result.output
    assert "instruct 0.1.0" in invoke("--version").output
    assert "Examples" in invoke("generate", "--help").output
