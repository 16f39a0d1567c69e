"""A campaign of bad inputs across every command: each ends with exit code 2 and one paragraph that names the
input, never a traceback; nothing is half-written and no existing output is touched."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts

runner = CliRunner()


@pytest.fixture(scope="module")
def ws(tiny_sft_rm, tmp_path_factory):
    """Inputs good and bad, made once: the shared tiny runs, and files and folders that are wrong."""
    root = tmp_path_factory.mktemp("bad-inputs")
    w = {key: Path(value) for key, value in tiny_sft_rm.items()}
    w["root"] = root
    w["missing"] = root / "missing.jsonl"
    (root / "not-json.jsonl").write_text('{"instruction": "hi", "output": "yo"\n{oops\n')
    w["not_json"] = root / "not-json.jsonl"
    (root / "empty.jsonl").write_text("")
    w["empty"] = root / "empty.jsonl"
    (root / "a-folder").mkdir()
    w["folder"] = root / "a-folder"
    (root / "wrong-types.jsonl").write_text(json.dumps({"instruction": 5, "output": ["x"]}) + "\n")
    w["wrong_types"] = root / "wrong-types.jsonl"
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    w["foreign"] = root / "foreign"
    (root / "a-file.txt").write_text("x")
    w["file"] = root / "a-file.txt"
    (root / "prompts-no-field.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    w["prompt_rows_bad"] = root / "prompts-no-field.jsonl"
    (root / "score-bad.jsonl").write_text('{"prompt": "hi", "response": 3}\n')
    w["score_bad"] = root / "score-bad.jsonl"
    (root / "good-prompts.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    w["good_prompts"] = root / "good-prompts.jsonl"
    ties = {"prompt": "Which?", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "ties": [[0, 1, 2]]}
    (root / "ties.jsonl").write_text("".join(json.dumps({**ties, "prompt": f"Which {i}?"}) + "\n" for i in range(4)))
    w["ties_raw"] = root / "ties.jsonl"
    # a model without a chat template
    w["no_template"] = root / "no-template"
    shutil.copytree(tiny_sft_rm["model"], w["no_template"])
    config = json.loads((w["no_template"] / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (w["no_template"] / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in w["no_template"].glob("chat_template.*"):
        extra.unlink()
    # an interrupted data folder, and an rm run that claims another base model
    w["interrupted"] = root / "interrupted-data"
    shutil.copytree(tiny_sft_rm["data-sft"], w["interrupted"])
    manifest = artifacts.read_manifest(w["interrupted"])
    artifacts.atomic_write_json(w["interrupted"] / "manifest.json", {**manifest, "status": "interrupted"})
    w["other_rm"] = root / "other-rm"
    shutil.copytree(tiny_sft_rm["rm"], w["other_rm"])
    manifest = artifacts.read_manifest(w["other_rm"])
    manifest["base_model"] = {"id": "another-model", "fingerprint": "0" * 64}
    artifacts.atomic_write_json(w["other_rm"] / "manifest.json", manifest)
    # recipes
    good = {"version": 1, "model": {"base": str(tiny_sft_rm["model"]), "quantization": "none"}}
    sft_section = {"data": str(tiny_sft_rm["data-sft"]), "out": str(root / "recipe-sft"), "max_steps": 1}
    recipes = {
        "unknown_section": {**good, "sfft": sft_section},
        "unknown_key": {**good, "sft": {**sft_section, "max_stpes": 3}},
        "wrong_type": {**good, "sft": {**sft_section, "epochs": "many"}},
        "no_out": {**good, "sft": {key: v for key, v in sft_section.items() if key != "out"}},
        "two_entries": {**good, "sft": [sft_section, {**sft_section, "out": str(root / "recipe-sft-2")}]},
        "cycle": {**good, "sft": {**sft_section, "model": str(root / "recipe-sft")}},
        "version": {**good, "version": 7, "sft": sft_section},
        "good": {**good, "sft": sft_section},
    }
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        w[f"recipe_{name}"] = root / f"{name}.yaml"
    (root / "list.yaml").write_text("- just\n- a list\n")
    w["recipe_list"] = root / "list.yaml"
    (root / "broken.yaml").write_text("sft: {data: [unclosed\n")
    w["recipe_broken"] = root / "broken.yaml"
    return w


def out(w, name):
    return w["root"] / "outputs" / name


# id, command (a function of the workspace), words the message must contain
CASES = [
    # prepare-data
    ("prep-missing-input", lambda w: ["prepare-data", "-i", w["missing"], "-o", out(w, "p1")], "does not exist"),
    (
        "prep-bad-json",
        lambda w: ["prepare-data", "-i", w["not_json"], "-o", out(w, "p2"), "--strict"],
        "not valid JSON",
    ),
    ("prep-empty-file", lambda w: ["prepare-data", "-i", w["empty"], "-o", out(w, "p3")], "has no rows"),
    ("prep-folder-as-file", lambda w: ["prepare-data", "-i", w["folder"], "-o", out(w, "p4")], "a-folder"),
    ("prep-wrong-types", lambda w: ["prepare-data", "-i", w["wrong_types"], "-o", out(w, "p5"), "--strict"], "line 1"),
    ("prep-no-out", lambda w: ["prepare-data", "-i", w["not_json"]], "--out"),
    (
        "prep-bad-fraction",
        lambda w: ["prepare-data", "-i", w["wrong_types"], "-o", out(w, "p6"), "--eval-fraction", "1.5"],
        "between 0 and 1",
    ),
    (
        "prep-no-template",
        lambda w: ["prepare-data", "-i", w["ties_raw"], "-o", out(w, "p7"), "--model", w["no_template"]],
        "chat template",
    ),
    (
        "prep-out-is-foreign",
        lambda w: ["prepare-data", "-i", w["good_prompts"], "-o", w["foreign"], "--force", "--model", w["model"]],
        "not written by instruct",
    ),
    (
        "prep-all-ties",
        lambda w: ["prepare-data", "-i", w["ties_raw"], "-o", out(w, "p8"), "--task", "prefs", "--model", w["model"]],
        "ties",
    ),
    # sft
    (
        "sft-missing-data",
        lambda w: ["sft", "--model", w["model"], "--data", w["missing"], "--out", out(w, "s1")],
        "does not exist",
    ),
    (
        "sft-plain-folder",
        lambda w: ["sft", "--model", w["model"], "--data", w["folder"], "--out", out(w, "s2")],
        "no manifest.json",
    ),
    (
        "sft-wrong-task",
        lambda w: ["sft", "--model", w["model"], "--data", w["data-prefs"], "--out", out(w, "s3")],
        "needs sft data",
    ),
    (
        "sft-interrupted-data",
        lambda w: ["sft", "--model", w["model"], "--data", w["interrupted"], "--out", out(w, "s4")],
        "not complete",
    ),
    (
        "sft-missing-model",
        lambda w: ["sft", "--model", w["root"] / "nope", "--data", w["data-sft"], "--out", out(w, "s5")],
        "nope",
    ),
    ("sft-zero-lr", lambda w: ["sft", "--data", w["data-sft"], "--out", out(w, "s6"), "--lr", "0"], "greater than 0"),
    (
        "sft-negative-batch",
        lambda w: ["sft", "--data", w["data-sft"], "--out", out(w, "s7"), "--batch-size", "-1"],
        "greater than 0",
    ),
    ("sft-zero-rank", lambda w: ["sft", "--data", w["data-sft"], "--out", out(w, "s8"), "--lora-r", "0"], "lora_r"),
    (
        "sft-fp16-on-cpu",
        lambda w: ["sft", "--model", w["model"], "--data", w["data-sft"], "--out", out(w, "s9"), "--precision", "fp16"],
        "needs a GPU",
    ),
    (
        "sft-out-is-file",
        lambda w: ["sft", "--model", w["model"], "--data", w["data-sft"], "--out", w["file"]],
        "is a file",
    ),
    (
        "sft-out-is-foreign",
        lambda w: ["sft", "--model", w["model"], "--data", w["data-sft"], "--out", w["foreign"]],
        "not written by instruct",
    ),
    (
        "sft-out-complete",
        lambda w: ["sft", "--model", w["model"], "--data", w["data-sft"], "--out", w["sft"]],
        "already holds a complete",
    ),
    (
        "sft-no-template",
        lambda w: ["sft", "--model", w["no_template"], "--data", w["data-sft"], "--out", out(w, "s10")],
        "chat template",
    ),
    ("sft-missing-recipe", lambda w: ["sft", "--recipe", w["root"] / "none.yaml"], "does not exist"),
    ("sft-recipe-unknown-key", lambda w: ["sft", "--recipe", w["recipe_unknown_key"]], "max_stpes"),
    ("sft-recipe-wrong-type", lambda w: ["sft", "--recipe", w["recipe_wrong_type"]], "whole number"),
    ("sft-recipe-two-entries", lambda w: ["sft", "--recipe", w["recipe_two_entries"]], "2 entries"),
    ("sft-recipe-version", lambda w: ["sft", "--recipe", w["recipe_version"]], "version"),
    ("sft-recipe-not-mapping", lambda w: ["sft", "--recipe", w["recipe_list"]], "list.yaml"),
    ("sft-recipe-broken-yaml", lambda w: ["sft", "--recipe", w["recipe_broken"]], "broken.yaml"),
    # run
    ("run-unknown-section", lambda w: ["run", w["recipe_unknown_section"]], "sfft"),
    ("run-no-out", lambda w: ["run", w["recipe_no_out"]], "has no `out`"),
    ("run-cycle", lambda w: ["run", w["recipe_cycle"]], "cycle"),
    ("run-from-unknown", lambda w: ["run", w["recipe_good"], "--from", "ppo"], "no such step"),
    ("run-only-unknown", lambda w: ["run", w["recipe_good"], "--only", "dpo"], "no such step"),
    # rm
    (
        "rm-wrong-task",
        lambda w: ["rm", "--model", w["sft"], "--data", w["data-sft"], "--out", out(w, "r1")],
        "no prefs.train split",
    ),
    (
        "rm-zero-steps",
        lambda w: ["rm", "--model", w["sft"], "--data", w["data-prefs"], "--out", out(w, "r2"), "--max-steps", "0"],
        "greater than 0",
    ),
    (
        "rm-score-missing-input",
        lambda w: ["rm", "score", "--model", w["rm"], "--input", w["missing"]],
        "does not exist",
    ),
    ("rm-score-bad-rows", lambda w: ["rm", "score", "--model", w["rm"], "--input", w["score_bad"]], "response"),
    ("rm-score-not-an-rm", lambda w: ["rm", "score", "--model", w["sft"], "--input", w["good_prompts"]], "instruct rm"),
    # ppo
    (
        "ppo-sft-is-rm",
        lambda w: ["ppo", "--sft", w["rm"], "--reward", w["rm"], "--data", w["data-prompts"], "--out", out(w, "o1")],
        "sft",
    ),
    (
        "ppo-reward-is-sft",
        lambda w: ["ppo", "--sft", w["sft"], "--reward", w["sft"], "--data", w["data-prompts"], "--out", out(w, "o2")],
        "instruct rm",
    ),
    (
        "ppo-other-base",
        lambda w: [
            "ppo",
            "--sft",
            w["sft"],
            "--reward",
            w["other_rm"],
            "--data",
            w["data-prompts"],
            "--out",
            out(w, "o3"),
        ],
        "different base",
    ),
    (
        "ppo-minibatch-too-big",
        lambda w: [
            "ppo",
            "--sft",
            w["sft"],
            "--reward",
            w["rm"],
            "--data",
            w["data-prompts"],
            "--out",
            out(w, "o4"),
            "--minibatch-size",
            "64",
        ],
        "cannot exceed",
    ),
    (
        "ppo-old-horizon",
        lambda w: [
            "ppo",
            "--sft",
            w["sft"],
            "--reward",
            w["rm"],
            "--data",
            w["data-prompts"],
            "--out",
            out(w, "o5"),
            "--kl-horizon",
            "10000",
        ],
        "iterations",
    ),
    ("ppo-no-data", lambda w: ["ppo", "--sft", w["sft"], "--reward", w["rm"], "--out", out(w, "o6")], "--data"),
    # generate, eval, export, label, plan
    ("generate-nothing", lambda w: ["generate", "--model", w["sft"]], "prompt"),
    ("generate-missing-input", lambda w: ["generate", "--model", w["sft"], "--input", w["missing"]], "does not exist"),
    (
        "generate-rows-without-prompt",
        lambda w: ["generate", "--model", w["sft"], "--input", w["prompt_rows_bad"]],
        "prompt",
    ),
    (
        "generate-zero-temperature",
        lambda w: ["generate", "--model", w["sft"], "--temperature", "0", "hi"],
        "greater than 0",
    ),
    (
        "eval-no-reward",
        lambda w: ["eval", "--models", w["sft"], "--data", w["data-prompts"], "--out", out(w, "e1")],
        "--reward",
    ),
    (
        "eval-missing-model",
        lambda w: [
            "eval",
            "--models",
            w["root"] / "nope",
            "--reward",
            w["rm"],
            "--data",
            w["data-prompts"],
            "--out",
            out(w, "e2"),
        ],
        "nope",
    ),
    ("eval-compare-one", lambda w: ["eval", "--compare", w["sft"]], "--compare"),
    ("export-a-data-folder", lambda w: ["export", w["data-sft"], "--out", out(w, "x1")], "data"),
    ("export-missing", lambda w: ["export", w["root"] / "nope", "--out", out(w, "x2")], "nope"),
    (
        "label-missing-prompts",
        lambda w: ["label", "--model", w["sft"], "--prompts", w["missing"], "--out", out(w, "l1")],
        "does not exist",
    ),
    (
        "label-one-response",
        lambda w: ["label", "--model", w["sft"], "--prompts", w["data-prompts"], "--out", out(w, "l2"), "--k", "1"],
        "--k",
    ),
    ("plan-unknown-gpu", lambda w: ["plan", "--gpu", "Potato 9000"], "Potato"),
    ("plan-bad-memory", lambda w: ["plan", "--gpu-memory", "lots"], "lots"),
]


def test_the_campaign_has_at_least_forty_cases():
    assert len(CASES) >= 40 and len({case_id for case_id, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,command,expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_paragraph_and_touches_nothing(ws, case_id, command, expected):
    guarded = [ws[key] for key in ("sft", "rm", "data-sft", "data-prefs", "data-prompts", "foreign")]
    before = [artifacts.sha256_folder(folder) for folder in guarded]
    outputs = ws["root"] / "outputs"
    args = [str(arg) for arg in command(ws)]
    try:
        result = runner.invoke(app, args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
        assert "Traceback" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "error:" in text or "Error" in text, text
        assert expected.lower() in text.lower(), text
        assert [artifacts.sha256_folder(folder) for folder in guarded] == before  # nothing existing touched
        assert (ws["foreign"] / "notes.txt").read_text() == "mine"
        written = sorted(outputs.rglob("*")) if outputs.exists() else []
        assert written == [], written  # nothing half-written
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
