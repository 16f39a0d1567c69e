"""Critic-free RL (--advantage rloo / grpo), the KL as a loss term, and reward functions (--reward-fn).

The same tiny pipeline as test_ppo.py: a reward model that prefers short answers, so a policy that learns
answers shorter. The maths is tested on hand values in test_rl.py; here the wiring: no value role is
loaded, the K responses to a prompt form a group, learning happens, and a user's broken function gets a
clear error.
"""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts, reward_functions
from instruct_cli.core import config as cfg
from instruct_cli.core.errors import UserError
from instruct_cli.steps import ppo
from tests.test_ppo import ppo_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "rewards.py"
runner = CliRunner()


@pytest.fixture(scope="module")
def pipeline(tiny_sft_rm):
    """The shared tiny sft and rm runs (conftest), with the prompts folder under a short name."""
    return {**tiny_sft_rm, "prompts": tiny_sft_rm["data-prompts"]}


LEARNING = dict(iterations=20, rollout_batch_size=16, minibatch_size=8, max_new_tokens=24, kl_coef=0.02, eval_prompts=4)
"""test_ppo's learning-test settings, over test_ppo's ppo_config defaults."""


def config_for(pipeline, out, **overrides):
    return ppo_config(pipeline, out, **{**LEARNING, **overrides})


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_baseline(pipeline, tmp_path_factory):
    """The SFT policy's eval metrics on 16 held-out prompts: a run whose one iteration cannot move it (lr 1e-12)."""
    out = ppo.run(
        config_for(
            pipeline, tmp_path_factory.mktemp("baseline") / "b", lr=1e-12, iterations=1, eval_every=1, eval_prompts=16
        )
    )
    return metrics_of(out)[-1]


def assert_learned_shorter_answers(rows: list[dict], baseline: dict) -> None:
    """The held-out reward rose and the answers got shorter, against the SFT policy on the same prompts."""
    final = rows[-1]
    assert final["eval/reward"] > baseline["eval/reward"] + 0.3, (final, baseline)
    assert final["eval/length"] < baseline["eval/length"] / 2, (final, baseline)


# ------------------------------------------------------------------------------------------- roles
@pytest.mark.parametrize(
    "advantage, use_rm, expected",
    [
        ("gae", True, {"policy", "reference", "value", "reward"}),
        ("rloo", True, {"policy", "reference", "reward"}),
        ("grpo", False, {"policy", "reference"}),
        ("gae", False, {"policy", "reference", "value"}),
    ],
)
def test_only_the_roles_a_mode_needs_are_loaded(pipeline, tmp_path, advantage, use_rm, expected):
    config = config_for(
        pipeline,
        tmp_path / "x",
        advantage=advantage,
        reward=pipeline["rm"] if use_rm else None,
        reward_fn=None if use_rm else f"{EXAMPLES}:brevity",
    )
    roles, _, _, _ = ppo.load_roles(config, torch.device("cpu"))
    assert set(roles.model.peft_config) == expected
    assert roles.has_value == ("value" in expected) and roles.has_reward_model == use_rm
    names = {name for name, _ in roles.named_parameters()}
    assert any(".value." in n for n in names) == ("value" in expected)
    assert any(n.startswith("value_head") for n in names) == ("value" in expected)
    if advantage == "gae" and not use_rm:  # the value function starts from the SFT model and predicts 0
        assert torch.count_nonzero(roles.value_head.weight) == 0


# ----------------------------------------------------------------------------------- the whole step
@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_learns_to_please_the_reward_model(pipeline, tmp_path, advantage, sft_baseline):
    out = ppo.run(
        config_for(
            pipeline, tmp_path / advantage, advantage=advantage, samples_per_prompt=4, eval_every=20, eval_prompts=16
        )
    )
    rows = metrics_of(out)
    assert_learned_shorter_answers(rows, sft_baseline)
    assert rows[0]["objective/kl"] == 0.0
    assert "loss/value" not in rows[-1] and "val/explained_variance" not in rows[-1]
    assert not (out / "value").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert artifacts.read_manifest(out)["config"]["advantage"] == advantage


def test_groups_are_k_consecutive_rows_of_one_prompt(pipeline, tmp_path, monkeypatch):
    seen = []
    real = ppo.make_trajectory

    def spy(roles, batch, config, beta, accelerator, function_reward=None, prompts=None, iteration=0, columns=None):
        seen.append(batch.query)
        return real(roles, batch, config, beta, accelerator, function_reward, prompts, iteration)

    monkeypatch.setattr(ppo.loop, "make_trajectory", spy)
    ppo.run(config_for(pipeline, tmp_path / "g", advantage="rloo", samples_per_prompt=4, iterations=1))
    query = seen[0]
    assert query.shape[0] == 16
    groups = query.view(4, 4, -1)
    assert all(torch.equal(group[0], group[i]) for group in groups for i in range(4))
    assert not torch.equal(groups[0][0], groups[1][0])


def test_kl_as_a_loss_term(pipeline, tmp_path):
    out = ppo.run(config_for(pipeline, tmp_path / "k", advantage="grpo", kl_penalty="loss", kl_coef=0.1, iterations=3))
    rows = metrics_of(out)
    assert all("loss/kl" in row for row in rows)
    assert rows[0]["loss/kl"] >= 0.0 and rows[-1]["loss/kl"] > 0.0  # k3 is never negative; moves off 0


# --------------------------------------------------------------------------------- reward functions
def test_reward_function_alone_drives_learning(pipeline, tmp_path):
    out = ppo.run(config_for(pipeline, tmp_path / "fn", reward=None, reward_fn=f"{EXAMPLES}:brevity", advantage="grpo"))
    rows = metrics_of(out)
    lengths = [row["response/length"] for row in rows]
    # brevity pays: the answers end up much shorter (by 40% at least: the exact path differs between CPUs,
    # e.g. 9.25 -> 4.7 tokens on an Intel Xeon, under half on an AMD EPYC)
    assert sum(lengths[-5:]) / 5 < 0.6 * lengths[0], lengths
    manifest = artifacts.read_manifest(out)
    assert "rm" not in manifest["parents"]
    assert manifest["reward_fn"][0]["sha256"] == artifacts.sha256_file(EXAMPLES)
    answer = runner.invoke(
        app, ["generate", "--model", str(out), "--quantization", "none", "--max-new-tokens", "4", "hi?"]
    )
    assert answer.exit_code == 0, answer.output


def test_reward_function_is_added_to_the_reward_model(pipeline, tmp_path, monkeypatch):
    """The score is the RM's normalised score + weight x the function; checked on one rollout batch."""
    seen = {}
    real = ppo.make_trajectory

    def spy(roles, batch, config, beta, accelerator, function_reward=None, prompts=None, iteration=0, columns=None):
        trajectory, stats = real(roles, batch, config, beta, accelerator, function_reward, prompts, iteration, columns)
        penalty = config.missing_eos_penalty
        seen["with"] = trajectory.scores
        seen["rm"] = ppo.score(roles, batch, penalty)
        seen["fn"] = function_reward(prompts, batch)
        return trajectory, stats

    monkeypatch.setattr(ppo.loop, "make_trajectory", spy)
    ppo.run(
        config_for(pipeline, tmp_path / "both", reward_fn=f"{EXAMPLES}:brevity", reward_fn_weight=0.5, iterations=1)
    )
    torch.testing.assert_close(seen["with"], seen["rm"] + seen["fn"])
    assert seen["fn"].abs().sum() > 0


def broken_function_file(tmp_path: Path) -> Path:
    file = tmp_path / "broken.py"
    file.write_text(
        "def picky(prompts, responses):\n"
        "    return [1.0 / (len(r) - len(r)) if 'cat' in r else 0.0 for r in responses]\n"
        "def wrong_count(prompts, responses):\n"
        "    return [0.0]\n"
        "def not_a_number(prompts, responses):\n"
        "    return ['high' for _ in responses]\n"
        "def crashes(prompts, responses):\n"
        "    raise RuntimeError('broken on purpose')\n"
    )
    return file


def test_reward_function_errors_name_the_function_and_the_sample(tmp_path):
    file = broken_function_file(tmp_path)
    prompts = [[{"role": "user", "content": "first?"}], [{"role": "user", "content": "second?"}]]
    with pytest.raises(UserError) as caught:
        reward_functions.load(f"{file}:picky").scores(prompts, ["dog", "a cat"])
    message = caught.value.paragraph()
    assert "ZeroDivisionError" in message and "broken.py" in message and "line 2" in message
    assert "second?" in message and "a cat" in message  # the sample that fails
    assert "instruct_cli" not in message  # the user's traceback, not ours
    with pytest.raises(UserError, match="returned 1 values for 2 responses"):
        reward_functions.load(f"{file}:wrong_count").scores(prompts, ["a", "b"])
    with pytest.raises(UserError, match="'high' for response 0"):
        reward_functions.load(f"{file}:not_a_number").scores(prompts, ["a", "b"])
    with pytest.raises(UserError, match="has no function 'missing'.*picky"):
        reward_functions.load(f"{file}:missing")
    with pytest.raises(UserError, match="is not FILE.py:FUNCTION"):
        reward_functions.load(str(file))
    with pytest.raises(UserError, match="does not exist"):
        reward_functions.load(f"{tmp_path}/nope.py:f")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(UserError, match="failed to import: SyntaxError"):
        reward_functions.load(f"{tmp_path}/syntax.py:f")


def test_cli_errors(pipeline, tmp_path):
    base = ["ppo", "--quantization", "none", "--sft", str(pipeline["sft"]), "--data", str(pipeline["prompts"])]
    file = broken_function_file(tmp_path)
    cases = [
        (base + ["--out", str(tmp_path / "a")], "--reward or --reward-fn is required"),
        (
            base
            + [
                "--out",
                str(tmp_path / "b"),
                "--reward",
                str(pipeline["rm"]),
                "--advantage",
                "rloo",
                "--samples-per-prompt",
                "1",
            ],
            "--samples-per-prompt",
        ),
        (
            base
            + [
                "--out",
                str(tmp_path / "c"),
                "--reward",
                str(pipeline["rm"]),
                "--advantage",
                "grpo",
                "--rollout-batch-size",
                "6",
            ],
            "not a multiple of --samples-per-prompt 4",
        ),
        (
            base
            + [
                "--out",
                str(tmp_path / "d"),
                "--reward-fn",
                f"{file}:crashes",
                "--advantage",
                "grpo",
                "--iterations",
                "1",
                "--rollout-batch-size",
                "4",
                "--minibatch-size",
                "4",
                "--max-new-tokens",
                "8",
                "--no-gradient-checkpointing",
            ],
            "broken on purpose",
        ),
        (base + ["--out", str(tmp_path / "e"), "--reward", str(pipeline["rm"]), "--advantage", "ppo"], "advantage"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "Traceback (most recent call last)" not in result.output, result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_examples_rewards_by_hand():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("example_rewards", EXAMPLES)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.brevity([], ["one", "one two three", ""]) == [1.0, 0.5, 1.0]
    assert module.concise([], ["Rome.", "Great question! Rome. I hope this helps! Let me know...", ""]) == [
        0.0,
        -3.0,
        -1.0,
    ]


def test_plan_models_the_critic_free_modes():
    """`instruct plan`: without a value role there is one adapter, one head and their gradients and optimizer
    states fewer; a reward function alone drops the reward adapter and head too."""
    from instruct_cli.steps import plan

    shape = plan.read_model_shape("Qwen/Qwen2.5-0.5B-Instruct")
    lora = plan.lora_for(shape, cfg.SFTConfig())
    per_adapter, head = plan.lora_parameters(shape, lora), shape.hidden + 1
    gae = plan.estimate_ppo(shape, cfg.PPOConfig(reward="rm"), lora, lora)
    rloo = plan.estimate_ppo(shape, cfg.PPOConfig(reward="rm", advantage="rloo"), lora, lora)
    function_only = plan.estimate_ppo(shape, cfg.PPOConfig(reward_fn="f.py:f", advantage="grpo"), lora, lora)
    assert gae.adapters - rloo.adapters == 4 * (per_adapter + head)
    assert gae.optimizer - rloo.optimizer == 8 * (per_adapter + head)
    assert rloo.adapters - function_only.adapters == 4 * (per_adapter + head)
    assert function_only.optimizer == 8 * per_adapter
    assert any("no value adapter" in note for note in rloo.notes)
    assert rloo.total < gae.total


def test_grpo_groups_whose_rewards_tie_get_no_signal_and_are_logged(pipeline, tmp_path):
    """A reward function that scores every answer the same (and no penalty for a missing EOS): every group
    ties, so every advantage is 0 (beta 0, TRL's GRPO default), the policy loss is 0 and frac_reward_zero_std
    says why."""
    rewards = tmp_path / "flat.py"
    rewards.write_text("def flat(prompts, responses):\n    return [1.0] * len(responses)\n")
    out = ppo.run(
        config_for(
            pipeline,
            tmp_path / "t",
            reward=None,
            reward_fn=f"{rewards}:flat",
            advantage="grpo",
            iterations=2,
            kl_coef=None,
            missing_eos_penalty=0.0,
        )
    )
    rows = metrics_of(out)
    assert all(row["objective/frac_reward_zero_std"] == 1.0 for row in rows)
    assert all(row["loss/policy"] == 0.0 for row in rows)
    assert {
        "policy/clip_ratio/low",
        "policy/clip_ratio/high",
        "response/clipped_rate",
        "objective/score_length_corr",
    } <= set(rows[0])
