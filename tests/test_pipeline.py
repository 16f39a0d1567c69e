"""instruct run: every step of a tiny-model recipe end to end, skipping, partial reruns, the plan, recipes,
and examples/pipeline.sh through the real CLI."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from instruct_cli.cli import app, recipe_steps
from instruct_cli.core import artifacts, recipes
from instruct_cli.steps import pipeline

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = REPO / "examples" / "data"


def tiny_recipe(folder: Path, model_dir: Path) -> Path:
    """The quickstart recipe's shape on the tiny model, with few steps (paths relative to the recipe)."""
    recipe = {
        "version": 1,
        "model": {"base": str(model_dir), "quantization": "none", "lora_r": 8, "lora_dropout": 0.0},
        "prepare-data": [
            {"inputs": [str(EXAMPLE_DATA / "demonstrations.jsonl")], "task": "sft", "out": "data/sft"},
            {"inputs": [str(EXAMPLE_DATA / "preferences.jsonl")], "task": "prefs", "out": "data/prefs"},
            {
                "inputs": [str(EXAMPLE_DATA / "prompts.jsonl")],
                "task": "prompts",
                "eval_fraction": 0.25,
                "out": "data/prompts",
            },
        ],
        "sft": {
            "data": "data/sft",
            "out": "runs/sft",
            "max_steps": 4,
            "batch_size": 4,
            "gradient_checkpointing": False,
        },
        "rm": {
            "model": "runs/sft",
            "data": "data/prefs",
            "out": "runs/rm",
            "max_steps": 4,
            "batch_size": 4,
            "gradient_checkpointing": False,
        },
        "ppo": {
            "sft": "runs/sft",
            "reward": "runs/rm",
            "data": "data/prompts",
            "out": "runs/ppo",
            "quantization": "none",
            "iterations": 2,
            "rollout_batch_size": 4,
            "minibatch_size": 2,
            "ppo_epochs": 1,
            "max_new_tokens": 8,
            "gradient_checkpointing": False,
            "eval_prompts": 4,
        },
        "eval": {
            "models": ["runs/sft", "runs/ppo"],
            "reward": "runs/rm",
            "data": "data/prompts",
            "out": "reports/tiny",
            "quantization": "none",
            "max_new_tokens": 8,
            "max_prompts": 8,
        },
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def actions(tasks):
    return [(task.label, task.action) for task in tasks]


def test_every_recipe_in_the_repository_is_valid():
    recipe_files = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipe_files, "no recipes found"
    for recipe in recipe_files:
        tasks = recipes.read_tasks(recipe)
        assert [t.step for t in tasks][-1] == "eval", recipe
        # paths are relative to the recipe file, whatever the working directory
        assert all(Path(t.config.out).is_absolute() for t in tasks), recipe


def test_run_every_step_then_skip_then_rerun_only_what_changed(tmp_path, tiny_model_dir):
    model = tmp_path / "model"  # a copy: its weights are changed in place at the end
    shutil.copytree(tiny_model_dir, model)
    recipe = tiny_recipe(tmp_path, model)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    for out in ("data/sft", "data/prefs", "data/prompts", "runs/sft", "runs/rm", "runs/ppo", "reports/tiny"):
        assert artifacts.read_manifest(tmp_path / out)["status"] == "complete", out
    assert (tmp_path / "reports/tiny/report.md").is_file()

    # again: every step is up to date
    tasks = pipeline.run(recipe, recipe_steps())
    assert all(action == "skip" for _, action in actions(tasks)), actions(tasks)
    headlines = {task.step: task.headline for task in tasks}  # the summary's "headline" column
    assert re.fullmatch(r"ppo wins \d+% \(\d+%-\d+%\)", headlines["eval"]), headlines
    assert headlines["sft"].startswith("eval/loss ") and headlines["rm"].startswith("eval/accuracy "), headlines

    # delete the ppo run: only ppo and eval run again
    shutil.rmtree(tmp_path / "runs/ppo")
    plan = runner.invoke(app, ["run", str(recipe), "--dry-run"])
    assert plan.exit_code == 0 and "no output yet" in plan.output
    assert not (tmp_path / "runs/ppo").exists()  # a dry run runs nothing
    tasks = pipeline.run(recipe, recipe_steps())
    assert [label for label, action in actions(tasks) if action != "skip"] == ["ppo", "eval"]

    # a run made before a setting existed (here: precision) is up to date when the setting is at its default
    manifest = artifacts.read_manifest(tmp_path / "runs/ppo")
    del manifest["config"]["precision"]
    artifacts.atomic_write_json(tmp_path / "runs/ppo/manifest.json", manifest)
    tasks = pipeline.plan(recipes.read_tasks(recipe), {"prepare-data", "sft", "rm", "ppo", "eval"}, force=False)
    assert dict(actions(tasks))["ppo"] == "skip", actions(tasks)

    # a changed setting reruns that step and everything downstream of it
    text = recipe.read_text().replace("max_steps: 4", "max_steps: 5", 1)
    recipe.write_text(text)
    tasks = pipeline.plan(recipes.read_tasks(recipe), {"prepare-data", "sft", "rm", "ppo", "eval"}, force=False)
    assert [label for label, action in actions(tasks) if action != "skip"] == ["sft", "rm", "ppo", "eval"]

    # new base weights written over the old ones (same file size): what was trained on them runs again
    recipe.write_text(recipe.read_text().replace("max_steps: 5", "max_steps: 4", 1))
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    tasks = pipeline.plan(recipes.read_tasks(recipe), {"prepare-data", "sft", "rm", "ppo", "eval"}, force=False)
    assert [label for label, action in actions(tasks) if action != "skip"] == ["sft", "rm", "ppo", "eval"]
    assert "base model" in next(task.reason for task in tasks if task.step == "sft")


def test_recipe_errors_name_the_key(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path, tiny_model_dir)
    text = recipe.read_text().replace("max_steps: 4", "max_stpes: 4", 1)
    recipe.write_text(text)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "max_stpes" in result.output and "max_steps" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    recipe.write_text(text.replace("max_stpes", "max_steps"))
    result = runner.invoke(app, ["run", str(recipe), "--only", "dpo"])
    assert result.exit_code == 2 and "--only" in result.output


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_examples_pipeline_script_runs_on_the_tiny_model(tmp_path, tiny_model_dir):
    env = {
        **os.environ,
        "MODEL": str(tiny_model_dir),
        "OUT": str(tmp_path / "out"),
        "STEPS": "2",
        "ITERATIONS": "1",
        "INSTRUCT": f"{sys.executable} -m instruct_cli",
    }
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "pipeline.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out/reports/pipeline/report.json").is_file()
    report = json.loads((tmp_path / "out/reports/pipeline/report.json").read_text())
    assert report
