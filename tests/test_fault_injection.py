"""kill -9 at seeded moments of real sft, rm, ppo and run commands, then resume: the result is the
uninterrupted run's (adapters within 1e-5, one metrics row per step, complete, no temporary files).
The harness is scripts/fault_injection.py, whose longer run draws the moments at random."""

import pytest

from scripts import fault_injection as faults

TRIALS = [
    ("sft", "load", 1),
    ("sft", "step", 2),
    ("sft", "checkpoint", 3),
    ("rm", "eval", 4),
    ("ppo", "step", 5),
    ("ppo", "final", 6),
    ("run", "step", 7),
]


@pytest.fixture(scope="module")
def workspace(tiny_sft_rm, tmp_path_factory):
    data = {task: tiny_sft_rm[f"data-{task}"] for task in ("sft", "prefs", "prompts")}
    root = tmp_path_factory.mktemp("faults")
    return faults.Workspace(root, tiny_sft_rm["model"], data, tiny_sft_rm["sft"], tiny_sft_rm["rm"])


@pytest.fixture(scope="module")
def straight(workspace):
    return faults.straight_runs(workspace, sorted({command for command, _, _ in TRIALS}))


@pytest.mark.parametrize("command,moment,seed", TRIALS, ids=[f"{c}-{m}" for c, m, _ in TRIALS])
def test_kill_minus_nine_then_resume_is_exact(workspace, straight, command, moment, seed):
    exact, line = faults.trial(command, workspace, straight[command], seed=seed, moment=moment)
    assert exact, line
