"""Safe folders and clear failures: the run-folder lock, --force only on instruct's own folders, --resume
after the end, SIGTERM as a polite stop, a full disk and running out of GPU memory as one-paragraph errors,
and content fingerprints of base weights."""

import errno
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts, models
from instruct_cli.core.artifacts import RunFolder
from instruct_cli.core.errors import UserError
from scripts import fault_injection as faults

runner = CliRunner()


def sft_args(tiny_sft_rm, out, *extra):
    flags = ["sft", "--model", tiny_sft_rm["model"], "--data", tiny_sft_rm["data-sft"], "--out", out]
    flags += ["--quantization", "none", "--no-gradient-checkpointing", "--max-steps", "6", "--batch-size", "4"]
    return [str(flag) for flag in [*flags, *extra]]


# ------------------------------------------------------------------------------------------ the lock
def hold_lock_in_another_process(folder: Path) -> subprocess.Popen:
    """A second process that opens `folder` as a run and keeps writing it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from instruct_cli.core.artifacts import RunFolder
        run = RunFolder.open({str(folder)!r}, "sft", {{}}, resume=True)  # held while it lives
        print("holding", flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    return process


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock_in_another_process(folder)
    try:
        with pytest.raises(UserError, match=f"being written by another instruct process \\(pid {holder.pid}"):
            RunFolder.open(folder, "sft", {}, resume=True)
        with pytest.raises(UserError, match="being written"):
            RunFolder.open(folder, "sft", {}, force=True)  # not even --force takes a live writer's folder
        with pytest.raises(UserError, match="being written"):
            artifacts.require_complete(folder, "sft")
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock, the manifest still says "running"
        holder.wait()
    assert artifacts.read_manifest(folder)["status"] == "running"
    with pytest.raises(UserError, match="stopped without saying so.*--resume"):
        RunFolder.open(folder, "sft", {})
    run = RunFolder.open(folder, "sft", {}, resume=True)  # taken over
    assert run.resuming
    run.complete()


# ------------------------------------------------------------------------------------------ --force
def test_force_never_deletes_a_folder_instruct_did_not_write(tmp_path, tiny_sft_rm, monkeypatch):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "figures").mkdir()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, sft_args(tiny_sft_rm, ".", "--force"))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "not written by instruct" in text and "--force to" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_force_replaces_instruct_output_and_resume_after_the_end_is_a_no_op(tmp_path, tiny_sft_rm):
    out = tmp_path / "sft"
    assert runner.invoke(app, sft_args(tiny_sft_rm, out)).exit_code == 0
    first = artifacts.sha256_folder(out)
    again = runner.invoke(app, sft_args(tiny_sft_rm, out, "--resume"))  # a retry script adds --resume
    assert again.exit_code == 0, again.output
    assert "already complete: nothing to resume" in " ".join(again.output.split())
    assert artifacts.sha256_folder(out) == first
    forced = runner.invoke(app, sft_args(tiny_sft_rm, out, "--force", "--seed", "1"))
    assert forced.exit_code == 0, forced.output
    assert artifacts.read_manifest(out)["config"]["seed"] == 1


# ------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_exactly(tmp_path, tiny_sft_rm):
    data = {task: tiny_sft_rm[f"data-{task}"] for task in ("sft", "prefs", "prompts")}
    ws = faults.Workspace(tmp_path, tiny_sft_rm["model"], data, tiny_sft_rm["sft"], tiny_sft_rm["rm"])
    straight = faults.straight_runs(ws, ["sft"])["sft"]
    out = tmp_path / "stopped"
    args = [str(a) for a in faults.command_args("sft", ws, out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "instruct_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert artifacts.read_manifest(out)["status"] == "interrupted"
    logged = len(metrics.read_text().splitlines())
    saved = sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    assert saved[-1] == logged < 40, (saved, logged)  # stopped at a boundary, checkpointed there
    resumed = subprocess.run([sys.executable, "-m", "instruct_cli", *args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert faults.compare("sft", straight, out) == []


# ------------------------------------------------------------------------------------------ failures
def test_a_full_disk_is_a_one_paragraph_error_and_leaves_no_temporary_files(tmp_path, tiny_sft_rm, monkeypatch):
    from instruct_cli.core import checkpoints

    real_save = torch.save

    def full_disk(state, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # a half-written file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    out = tmp_path / "sft"
    result = runner.invoke(app, sft_args(tiny_sft_rm, out, "--save-every", "2"))
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "No space left on device" in text and "Free some disk space" in text and "Traceback" not in text
    assert "step-2.pt.tmp" in text  # the path that failed is named
    assert artifacts.read_manifest(out)["status"] == "failed"
    assert list(out.rglob("*.tmp")) == []


def test_out_of_gpu_memory_is_a_one_paragraph_error_with_what_to_change(tmp_path, tiny_sft_rm, monkeypatch):
    from instruct_cli.core import lm

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lm, "sft_loss", out_of_memory)
    result = runner.invoke(app, sft_args(tiny_sft_rm, tmp_path / "sft", "--batch-size", "4"))
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "ran out of memory during `instruct sft` (--batch-size 4" in text and "instruct plan" in text
    assert "Traceback" not in text


# ------------------------------------------------------------------------------------------ fingerprints
def test_new_weights_written_over_old_ones_are_never_taken_for_them(tmp_path, tiny_model_dir):
    """The fingerprint (and so the 4-bit cache key) follows the weights' content, not their size."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = models.resolve_model(str(model)).fingerprint
    first = models.load_base_model(models.resolve_model(str(model)), "nf4", torch.device("cpu"))
    weights = load_file(model / "model.safetensors")
    name = next(key for key in weights if "mlp" in key)
    weights[name] = -weights[name]
    size = (model / "model.safetensors").stat().st_size
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert (model / "model.safetensors").stat().st_size == size  # same size: only the content changed
    source = models.resolve_model(str(model))
    assert source.fingerprint != before
    second = models.load_base_model(source, "nf4", torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(first(input_ids=ids).logits, second(input_ids=ids).logits)
    assert json.loads(json.dumps(source.record()))["fingerprint"] == source.fingerprint
