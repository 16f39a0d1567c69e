"""--report-to: TensorBoard event files hold exactly what metrics.jsonl holds (sft, rm, dpo, ppo; after a resume and
a --force rerun), the resolved config as hyper-parameters, and the errors for unknown or missing trackers."""

import json
import math
import random
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts, lm, recipes, trackers
from instruct_cli.core import config as cfg
from instruct_cli.steps import pipeline, sft

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

runner = CliRunner()
COMMON = ["--quantization", "none", "--no-gradient-checkpointing", "--batch-size", "2"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    """Data folders (sft, prefs, prompts) of a few rows, and an sft run made with --report-to tensorboard."""
    root = tmp_path_factory.mktemp("trackers")
    words = "red blue green cat dog sun tree water".split()
    rng = random.Random(0)
    rows = {"sft": [], "prefs": [], "prompts": []}
    for _ in range(12):
        prompt = " ".join(rng.choices(words, k=3)) + "?"
        rows["sft"].append({"prompt": prompt, "completion": " ".join(rng.choices(words, k=rng.randint(1, 4)))})
        rows["prefs"].append({"prompt": prompt, "chosen": "red", "rejected": " ".join(rng.choices(words, k=5))})
        rows["prompts"].append({"prompt": prompt})
    folders = {"root": root, "model": tiny_model_dir}
    for task, task_rows in rows.items():
        raw = root / f"{task}.jsonl"
        raw.write_text("".join(json.dumps(row) + "\n" for row in task_rows))
        folders[task] = root / f"data-{task}"
        invoke("prepare-data", "-i", raw, "-o", folders[task], "--task", task, "--model", tiny_model_dir)
    folders["sft-data"], folders["sft"] = folders["sft"], root / "sft"
    invoke(
        "sft",
        "--model",
        tiny_model_dir,
        "--data",
        folders["sft-data"],
        "--out",
        folders["sft"],
        "--max-steps",
        6,
        "--eval-every",
        3,
        "--report-to",
        "tensorboard",
        *COMMON,
    )
    return folders


# ---------------------------------------------------------------------------------------------- reading back
def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard log, as a reader sees it: {tag: [(step, value), ...]}."""
    accumulator = EventAccumulator(str(run_dir / artifacts.TENSORBOARD), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_scalars_equal_metrics(run_dir) -> int:
    """Every metric of every row of metrics.jsonl is in the TensorBoard log at its step, once, with its value
    (float32 in the event file: relative tolerance 1e-6); and nothing else is. Returns the number checked."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in artifacts.read_jsonl(run_dir / artifacts.METRICS):
        for name, value in row.items():
            if name not in ("step", "time"):
                expected.setdefault(name, []).append((row["step"], value))
    logged = tensorboard_scalars(run_dir)
    assert set(logged) == set(expected), set(logged) ^ set(expected)
    for name, points in expected.items():
        assert [step for step, _ in logged[name]] == [step for step, _ in points], name
        for (step, value), (_, seen) in zip(points, logged[name]):
            assert math.isclose(seen, value, rel_tol=1e-6, abs_tol=1e-9), (name, step, value, seen)
    return sum(len(points) for points in expected.values())


def tensorboard_hparams(run_dir) -> list[dict]:
    """The hyper-parameter sessions stored in the run's TensorBoard log (add_hparams writes each to a subfolder)."""
    sessions = []
    for folder in sorted(p for p in (run_dir / artifacts.TENSORBOARD).iterdir() if p.is_dir()):
        if not any(folder.glob("events.out.tfevents.*")):
            continue  # accelerate's hparams.yml copy
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        sessions.append({name: getattr(value, value.WhichOneof("kind")) for name, value in values.items()})
    return sessions


# -------------------------------------------------------------------------------------------------- runs
def test_sft_event_files_equal_metrics_jsonl(work):
    run = work["sft"]
    checked = assert_scalars_equal_metrics(run)
    rows = artifacts.read_jsonl(run / artifacts.METRICS)
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert checked > 6 * 5 and "eval/loss" in tensorboard_scalars(run)  # train metrics each step, eval at 3 and 6

    # the resolved config as hyper-parameters, flattened to scalars
    (session,) = tensorboard_hparams(run)
    config = artifacts.read_manifest(run)["config"]
    assert session["kind"] == "sft"
    assert session["max_steps"] == 6 and session["lr"] == pytest.approx(config["lr"])
    assert session["lora_targets"] == ",".join(config["lora_targets"]) and session["model"] == config["model"]
    assert set(session) == {"kind", *config}
    assert "report_to" not in config  # where metrics go is not part of what the step computes

    # the trackers' logs are not the run's content: its fingerprint does not see them
    copy = work["root"] / "sft-copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / artifacts.TENSORBOARD)
    assert artifacts.sha256_folder(run) == artifacts.sha256_folder(copy)


def test_force_rerun_clears_the_old_events(work, tmp_path):
    out = tmp_path / "sft"
    shutil.copytree(work["sft"], out)
    args = ["sft", "--model", work["model"], "--data", work["sft-data"], "--out", out, *COMMON]
    invoke(*args, "--max-steps", 2, "--report-to", "tensorboard", "--force")
    assert {step for points in tensorboard_scalars(out).values() for step, _ in points} == {1, 2}
    assert_scalars_equal_metrics(out)
    assert len(tensorboard_hparams(out)) == 1


def test_resume_continues_the_same_log_without_the_redone_steps(work, tmp_path, monkeypatch):
    """A crash after step 5 with a checkpoint at step 3: the resumed run redoes steps 4 and 5. metrics.jsonl
    drops the first copies, and so does a TensorBoard reader (the new event file starts with a restart marker)."""

    def config(**overrides):
        values = dict(
            model=str(work["model"]),
            data=work["sft-data"],
            out=tmp_path / "resumed",
            quantization="none",
            gradient_checkpointing=False,
            batch_size=2,
            max_steps=8,
            save_every=3,
            eval_every=4,
            lr=5e-3,
            warmup_ratio=0.0,
            lora_dropout=0.0,
            report_to=["tensorboard"],
        )
        values.update(overrides)
        return recipes.build_config(cfg.SFTConfig, "sft", None, values)

    calls, real_loss = {"n": 0}, lm.sft_loss

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash during step 6")
        return real_loss(model, batch)

    monkeypatch.setattr(lm, "sft_loss", crashing_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.run(config())
    out = tmp_path / "resumed"
    before = tensorboard_scalars(out)
    assert [step for step, _ in before["loss/train"]] == [1, 2, 3, 4, 5]  # flushed at every step, then closed

    monkeypatch.setattr(lm, "sft_loss", real_loss)
    sft.run(config(resume=True))
    assert len(list((out / artifacts.TENSORBOARD).glob("events.out.tfevents.*"))) == 2  # the same log, continued
    assert [step for step, _ in tensorboard_scalars(out)["loss/train"]] == list(range(1, 9))
    assert_scalars_equal_metrics(out)
    assert len(tensorboard_hparams(out)) == 1  # the continued run does not store its hyper-parameters again


@pytest.mark.parametrize("step", ["rm", "dpo"])
def test_rm_and_dpo_event_files_equal_metrics_jsonl(work, tmp_path, step):
    model = work["model"] if step == "rm" else work["sft"]
    invoke(step, "--model", model, "--data", work["prefs"], "--out", tmp_path / step, "--max-steps", 3, *COMMON,
           "--eval-every", 2, "--report-to", "tensorboard")  # fmt: skip
    assert assert_scalars_equal_metrics(tmp_path / step) > 3 * 4
    assert tensorboard_hparams(tmp_path / step)[0]["kind"] == step


def test_ppo_event_files_equal_metrics_jsonl(work, tmp_path):
    invoke("rm", "--model", work["model"], "--data", work["prefs"], "--out", tmp_path / "rm", "--max-steps", 2, *COMMON)
    assert not (tmp_path / "rm" / artifacts.TENSORBOARD).exists()  # no --report-to: no tracker
    invoke(
        "ppo",
        "--sft",
        work["sft"],
        "--reward",
        tmp_path / "rm",
        "--data",
        work["prompts"],
        "--out",
        tmp_path / "ppo",
        "--quantization",
        "none",
        "--no-gradient-checkpointing",
        "--iterations",
        2,
        "--rollout-batch-size",
        4,
        "--minibatch-size",
        2,
        "--ppo-epochs",
        1,
        "--max-new-tokens",
        4,
        "--eval-prompts",
        2,
        "--report-to",
        "tensorboard",
    )
    assert assert_scalars_equal_metrics(tmp_path / "ppo") > 2 * 10
    assert "objective/kl" in tensorboard_scalars(tmp_path / "ppo")


# ------------------------------------------------------------------------------------------- the hook, units
def test_only_the_writing_process_gets_trackers(work):
    """On the other processes of a data-parallel run the run folder is read-only: no tracker is attached, so
    only the main process logs (accelerate's trackers also check it themselves)."""
    follower = artifacts.RunFolder.follow(work["sft"])
    trackers.attach(follower, ["tensorboard"])
    assert follower.trackers is None


def test_hyperparameters_are_flat_scalars():
    flat = trackers.hyperparameters(
        {"lr": 1e-4, "lora_targets": ["q_proj", "v_proj"], "max_steps": None, "resume": False, "data": "d"}, "sft"
    )
    assert flat == {"kind": "sft", "lr": 1e-4, "lora_targets": "q_proj,v_proj", "max_steps": "null",
                    "resume": False, "data": "d"}  # fmt: skip
    assert trackers.scalars({"a": 1, "b": 2.5, "c": "text", "d": True}) == {"a": 1.0, "b": 2.5}
    assert trackers.active(["tensorboard", "none", "tensorboard", "wandb"]) == ["tensorboard", "wandb"]


def test_every_tracker_name_is_one_accelerate_knows():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from instruct_cli.core.tracker_names import TRACKERS

    assert set(TRACKERS) <= set(LOGGER_TYPE_TO_CLASS)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_tracker_is_a_user_error(work, tmp_path):
    args = ["sft", "--model", work["model"], "--data", work["sft-data"], "--out", tmp_path / "x", *COMMON]
    result = runner.invoke(app, [str(a) for a in args] + ["--report-to", "tensorbord"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "Unknown experiment tracker `tensorbord`" in text and "Did you mean `tensorboard`?" in text
    assert "wandb, mlflow" in text
    both = runner.invoke(app, [str(a) for a in args] + ["--report-to", "none,wandb"])
    assert both.exit_code == 2 and "`none` together" in " ".join(both.output.split()), both.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "name, install",
    [("tensorboard", "pip install 'instruct-cli[tensorboard]'"), ("wandb", "pip install 'instruct-cli[wandb]'"),
     ("mlflow", "pip install 'instruct-cli[mlflow]'"), ("comet_ml", "pip install comet_ml")],
)  # fmt: skip
def test_missing_tracker_package_names_the_extra(work, tmp_path, monkeypatch, name, install):
    monkeypatch.setattr(trackers, "is_installed", lambda module: module != name)
    out = tmp_path / "x"
    args = ["sft", "--model", work["model"], "--data", work["sft-data"], "--out", out, *COMMON]
    result = runner.invoke(app, [str(a) for a in args] + ["--report-to", f"tensorboard,{name}"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert f"--report-to {name} needs the `{name}` package" in text and install in text
    assert not out.exists()  # refused before the run folder was opened


# ---------------------------------------------------------------------------------------------- recipes
def test_recipe_model_level_and_step_level_report_to(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "model": {"base": "smollm2-135m", "report_to": "tensorboard"},
                "sft": {"data": "data/sft", "out": "runs/sft"},
                "rm": {"model": "runs/sft", "data": "data/prefs", "out": "runs/rm", "report_to": "none"},
                "ppo": {"sft": "runs/sft", "reward": "runs/rm", "data": "data/prompts", "out": "runs/ppo",
                        "report_to": ["tensorboard", "wandb"]},
            }
        )
    )  # fmt: skip
    tasks = {task.step: task.config for task in recipes.read_tasks(recipe)}
    assert tasks["sft"].report_to == ["tensorboard"]
    assert tasks["rm"].report_to == ["none"] and trackers.active(tasks["rm"].report_to) == []
    assert tasks["ppo"].report_to == ["tensorboard", "wandb"]
    # a run made without trackers is still up to date when the recipe adds some
    recorded = cfg.to_recipe_dict(cfg.SFTConfig(data=tasks["sft"].data, out=tasks["sft"].out))
    assert pipeline.changed_settings(recorded, tasks["sft"]) == []

    recipe.write_text(yaml.safe_dump({"version": 1, "sft": {"out": "runs/sft", "report_to": "tensorbaord"}}))
    with pytest.raises(Exception, match="Did you mean `tensorboard`") as caught:
        recipes.read_tasks(recipe)
    assert str(recipe) in str(caught.value)
