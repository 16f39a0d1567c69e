"""The run-folder contract: atomic writes, status, refusal of incomplete inputs, --force, metrics."""

import json

import pytest

from instruct_cli.core import artifacts
from instruct_cli.core.artifacts import RunFolder
from instruct_cli.core.errors import UserError


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "x.json"
    artifacts.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_complete_run_lifecycle(tmp_path):
    out = tmp_path / "run"
    run = RunFolder.open(out, "sft", {"lr": 1e-4}, parents={"data": {"path": "d"}})
    assert artifacts.read_manifest(out)["status"] == "running"
    with pytest.raises(UserError, match="is being written by another instruct process"):
        artifacts.require_complete(out, "sft")  # a live writer holds the folder's lock
    run.log_metrics(1, {"loss/train": 2.0})
    run.log_metrics(2, {"loss/train": 1.5})
    run.complete({"loss/eval": 1.2})
    manifest = artifacts.require_complete(out, "sft")
    assert manifest["schema_version"] == artifacts.SCHEMA_VERSION
    assert manifest["metrics"] == {"loss/eval": 1.2}
    assert "torch" in manifest["packages"]
    assert (out / "recipe.yaml").read_text().startswith("sft:")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    with pytest.raises(UserError, match="already holds a complete.*--force"):
        RunFolder.open(out, "sft", {})
    RunFolder.open(out, "sft", {}, force=True)
    assert not (out / "metrics.jsonl").exists()


def test_interrupted_run_is_marked_and_needs_resume_or_force(tmp_path):
    out = tmp_path / "run"
    run = RunFolder.open(out, "rm", {})
    with pytest.raises(KeyboardInterrupt), run.recording():
        raise KeyboardInterrupt
    assert artifacts.read_manifest(out)["status"] == "interrupted"
    with pytest.raises(UserError, match="unfinished.*--resume"):
        RunFolder.open(out, "rm", {})
    resumed = RunFolder.open(out, "rm", {}, resume=True)
    assert resumed.resuming


def test_require_complete_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        artifacts.require_complete(tmp_path / "nope", "sft")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        artifacts.require_complete(tmp_path / "plain", "sft")
    RunFolder.open(tmp_path / "data", "data", {}).complete()
    with pytest.raises(UserError, match="is the output of `instruct prepare-data`"):
        artifacts.require_complete(tmp_path / "data", "sft")


def test_out_must_be_empty_or_ours(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        RunFolder.open(tmp_path / "full", "sft", {})


def test_folder_hash_follows_content_not_timings(tmp_path):
    out = tmp_path / "run"
    RunFolder.open(out, "data", {"seed": 1}).complete()
    (out / "x.jsonl").write_text("{}\n")
    first = artifacts.sha256_folder(out)
    manifest = artifacts.read_manifest(out)
    manifest["timings"] = {"seconds": 99}
    artifacts.atomic_write_json(out / "manifest.json", manifest)
    assert artifacts.sha256_folder(out) == first
    (out / "x.jsonl").write_text('{"a": 1}\n')
    assert artifacts.sha256_folder(out) != first
