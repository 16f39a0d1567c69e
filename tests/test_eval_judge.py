"""eval with second judges (--judge RUN, repeatable): each judge's mean reward, win-rate and length-controlled
win-rate with their intervals equal a hand computation over samples.jsonl; the main reward model given again as
a judge gives exactly the main figures; the over-optimisation sentence appears exactly when the training reward
model's win is not confirmed by a judge; a bad --judge is a one-paragraph error that writes no report folder."""

import json

import numpy as np
import pytest

from instruct_cli.core import artifacts
from instruct_cli.steps.evaluate import judges
from instruct_cli.steps.evaluate.stats import (
    bootstrap_interval,
    length_controlled_interval,
    length_controlled_win_rate,
)
from tests.cli_helpers import fails, invoke

COMMON = ["--quantization", "none", "--max-new-tokens", 8, "--bootstrap", 200, "--max-prompts", 16]


@pytest.fixture(scope="module")
def judged(tmp_path_factory, tiny_sft_rm):
    """A second reward model (another seed, fewer steps) and one evaluation of the sft run against the bare
    base, by the shared reward model, judged by the second one and by the shared one again."""
    root = tmp_path_factory.mktemp("eval-judge")
    rm2 = root / "rm2"
    invoke(
        "rm",
        "--model",
        tiny_sft_rm["sft"],
        "--data",
        tiny_sft_rm["data-prefs"],
        "--out",
        rm2,
        "--max-steps",
        20,
        "--lr",
        "3e-3",
        "--batch-size",
        8,
        "--seed",
        1,
        "--quantization",
        "none",
        "--no-gradient-checkpointing",
        "--lora-dropout",
        "0",
    )
    out = root / "report"
    sft, rm = str(tiny_sft_rm["sft"]), str(tiny_sft_rm["rm"])
    result = invoke(
        "eval",
        "--models",
        f"{sft},base",
        "--baseline",
        "base",
        "--reward",
        rm,
        "--judge",
        rm2,
        "--judge",
        rm,
        "--data",
        tiny_sft_rm["data-prompts"],
        "--out",
        out,
        *COMMON,
    )
    report = json.loads((out / "report.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {**tiny_sft_rm, "rm2": rm2, "out": out, "output": result.output, "report": report, "samples": samples}


def test_judge_figures_equal_a_hand_computation_from_samples(judged):
    report, samples, sft, rm2 = judged["report"], judged["samples"], str(judged["sft"]), str(judged["rm2"])
    assert [judge["name"] for judge in report["judges"]] == [rm2, str(judged["rm"])]
    assert report["judges"][0]["path"] == str(judged["rm2"].resolve())
    assert report["judges"][0]["normalization"] == artifacts.read_manifest(judged["rm2"])["reward_normalization"]
    by_name = {model["name"]: model for model in report["models"]}
    mine = [row["responses"][sft]["judges"][rm2] for row in samples]
    theirs = [row["responses"]["base"]["judges"][rm2] for row in samples]
    main = [row["responses"][sft]["reward"] for row in samples]
    assert mine != main  # another reward model: other rewards
    figure = by_name[sft]["judges"][rm2]
    assert figure["reward"]["mean"] == pytest.approx(sum(mine) / len(mine))
    assert by_name["base"]["judges"][rm2]["reward"]["mean"] == pytest.approx(sum(theirs) / len(theirs))
    assert by_name["base"]["judges"][rm2]["win_rate"] is None
    # by hand: a win is 1, a tie (within 1e-6) a half, a loss 0; lengths are the answers' tokens
    results = [0.5 if abs(a - b) <= 1e-6 else float(a > b) for a, b in zip(mine, theirs)]
    differences = [row["responses"][sft]["tokens"] - row["responses"]["base"]["tokens"] for row in samples]
    win = figure["win_rate"]
    assert win["against"] == "base"
    assert win["rate"] == pytest.approx(sum(results) / len(results))
    assert (win["wins"], win["ties"], win["losses"]) == (results.count(1.0), results.count(0.5), results.count(0.0))
    assert (win["low"], win["high"]) == pytest.approx(bootstrap_interval(np.array(results), 200, 0))
    control = win["length_controlled"]
    assert control["rate"] == pytest.approx(length_controlled_win_rate(results, differences))
    assert (control["low"], control["high"]) == pytest.approx(length_controlled_interval(results, differences, 200, 0))
    # the manifest, the parents, report.md, the terminal and the page
    manifest = artifacts.require_complete(judged["out"], "report")
    assert manifest["metrics"][f"{sft}/judge/{rm2}/win_rate"] == win["rate"]
    assert manifest["metrics"][f"{sft}/judge/{rm2}/reward"] == figure["reward"]["mean"]
    assert manifest["parents"][f"judge:{rm2}"]["sha256"] == artifacts.sha256_folder(judged["rm2"])
    markdown = (judged["out"] / "report.md").read_text()
    assert "### Judges" in markdown and "| " + " | ".join(judges.TABLE_COLUMNS) + " |" in markdown
    row = judges.table_rows(report)[0]
    assert row[:2] == [sft, rm2] and "| " + " | ".join(row) + " |" in markdown
    assert row[3] == f"{100 * win['rate']:.0f}% ({100 * win['low']:.0f}-{100 * win['high']:.0f}%)"
    assert f"judge {rm2} {mine[0]:+.2f}" in markdown  # the first sample's judge reward
    terminal = " ".join(judged["output"].split())
    assert "judges (other reward models" in terminal and f"judge {rm2}" in terminal
    page = (judged["out"] / "report.html").read_text()
    assert 'id="judges"' in page and f"judge {rm2} {mine[0]:+.2f}" in page


def test_the_main_reward_model_as_judge_gives_the_main_figures(judged):
    report, samples, rm = judged["report"], judged["samples"], str(judged["rm"])
    for row in samples:
        for answer in row["responses"].values():
            assert answer["judges"][rm] == answer["reward"]
    for model in report["models"]:
        figure = model["judges"][rm]
        assert figure["reward"] == model["reward"]
        assert figure["win_rate"] == model["win_rate"]  # rate, interval, counts and the length-controlled rate
    assert not any("over-optimising" in line and f"judge {rm} " in line for line in report["verdict"])


def _model(name, rate, low, high, judged_by=None):
    win = {"rate": rate, "low": low, "high": high}
    return {"name": name, "baseline": False, "win_rate": win, "judges": judged_by or {}}


def test_the_verdict_names_a_win_the_judge_does_not_confirm():
    doubted = {"runs/rm-b": {"win_rate": {"rate": 0.52, "low": 0.4, "high": 0.64}}}
    confirmed = {"runs/rm-b": {"win_rate": {"rate": 0.7, "low": 0.58, "high": 0.8}}}
    below = {"runs/rm-b": {"win_rate": {"rate": 0.3, "low": 0.2, "high": 0.42}}}
    report = {
        "baseline": "runs/sft",
        "reward_model": {"path": "runs/rm"},
        "models": [
            {"name": "runs/sft", "baseline": True, "win_rate": None, "judges": {}},
            _model("runs/ppo", 0.73, 0.6, 0.85, doubted),
            _model("runs/ppo2", 0.73, 0.6, 0.85, confirmed),
            _model("runs/ppo3", 0.73, 0.6, 0.85, below),
            _model("runs/ppo4", 0.55, 0.45, 0.66, below),  # the training RM itself is not sure: nothing to doubt
        ],
    }
    lines = judges.verdict_lines(report)
    assert lines == [
        "runs/ppo beats runs/sft on 73% of prompts by the training reward model, but by the judge runs/rm-b it "
        "wins only 52% (95% CI 40-64%): the policy may be over-optimising the training reward model.",
        "runs/ppo3 beats runs/sft on 73% of prompts by the training reward model, but by the judge runs/rm-b it "
        "wins only 30% (95% CI 20-42%): the policy may be over-optimising the training reward model.",
    ]


def test_a_bad_judge_is_a_one_paragraph_error_and_writes_nothing(tiny_sft_rm, tmp_path):
    sft, rm = str(tiny_sft_rm["sft"]), str(tiny_sft_rm["rm"])
    out = tmp_path / "report"
    common = ["eval", "--models", sft, "--reward", rm, "--data", tiny_sft_rm["data-prompts"], "--out", out]
    message = fails(*common, "--judge", sft, "--quantization", "none")
    assert "--judge needs the output of `instruct rm`" in message
    assert "does not exist" in fails(*common, "--judge", tmp_path / "nowhere", "--quantization", "none")
    assert "listed twice in --judge" in fails(*common, "--judge", rm, "--judge", f"{rm}/", "--quantization", "none")
    assert not out.exists()
