"""ppo: the four roles on one base, frozen roles untouched, gradients through 4-bit, learning, resume, errors.

The pipeline under test: a tiny model fine-tuned on answers of 1-8 words, a reward model that prefers
short answers, and PPO that should learn to answer shorter (a preference a tiny model can act on: when
to emit EOS).
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts, chat, heads, models, recipes, rl, training
from instruct_cli.core import config as cfg
from instruct_cli.steps import ppo

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pipeline(tiny_sft_rm):
    """The shared tiny sft and rm runs (conftest), with the prompts folder under a short name."""
    return {**tiny_sft_rm, "prompts": tiny_sft_rm["data-prompts"]}


def ppo_config(pipeline, out, **overrides):
    values = dict(
        sft=pipeline["sft"],
        reward=pipeline["rm"],
        data=pipeline["prompts"],
        out=out,
        quantization="none",
        gradient_checkpointing=False,
        iterations=4,
        rollout_batch_size=8,
        minibatch_size=4,
        ppo_epochs=2,
        max_new_tokens=16,
        eval_every=100,
        save_every=100,
        eval_prompts=4,
        lr=1e-3,
        seed=0,
    )
    values.update(overrides)
    return recipes.build_config(cfg.PPOConfig, "ppo", None, values)


def lora_state(model, role):
    return {name: p.detach().clone() for name, p in model.named_parameters() if f".{role}." in name}


# ------------------------------------------------------------------------------------------ the roles
def test_roles_start_from_sft_and_rm(pipeline, tmp_path):
    from peft import PeftModel

    config = ppo_config(pipeline, tmp_path / "unused")
    roles, tokenizer, source, _ = ppo.load_roles(config, "cpu")
    roles.eval()
    ids = torch.tensor([tokenizer.encode("red cat sun? blue tree")])
    mask = torch.ones_like(ids)

    def logits(role):
        roles.use(role)
        with torch.no_grad():
            return roles.model(input_ids=ids, attention_mask=mask).logits

    # the reference is base + SFT adapter (not the bare base), and the policy starts equal to it
    base = models.load_base_model(source, "none", "cpu")
    with torch.no_grad():
        bare = base(input_ids=ids).logits.clone()
        sft_model = PeftModel.from_pretrained(base, str(source.adapter)).eval()
        expected = sft_model(input_ids=ids).logits
    torch.testing.assert_close(logits(ppo.REFERENCE), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(ppo.REFERENCE), bare, atol=1e-3)
    assert torch.equal(logits(ppo.POLICY), logits(ppo.REFERENCE))
    # the value role starts as the reward model: same adapter weights, and a head that predicts the reward in
    # the units PPO receives it (the RM's normalisation folded in), here checked at a sequence's last token
    value, reward = lora_state(roles.model, ppo.VALUE), lora_state(roles.model, ppo.REWARD)
    assert value and all(torch.equal(value[n], reward[n.replace(".value.", ".reward.")]) for n in value)
    assert roles.reward_gain != 1.0 and roles.reward_bias != 0.0  # a real normalisation to fold in
    roles.use(ppo.REWARD)
    with torch.no_grad():
        hidden = heads.last_hidden_states(roles.model, ids, mask)[:, -1]
        normalised_reward = roles.reward_gain * roles.reward_head(hidden) + roles.reward_bias
        torch.testing.assert_close(roles.value_head(hidden), normalised_reward, rtol=1e-5, atol=1e-5)

    # the first rollout's KL to the reference is exactly zero (same adapter, same temperature)
    encoded = [chat.encode_prompt(tokenizer, [{"role": "user", "content": "red cat sun?"}])] * 4
    accelerator = training.make_accelerator(0)
    batch = ppo.rollout(roles, tokenizer, encoded, config, accelerator)
    trajectory, stats = ppo.make_trajectory(roles, batch, config, beta=0.05, accelerator=accelerator)
    assert torch.equal(trajectory.logprobs, trajectory.ref_logprobs)
    assert stats["objective/kl"] == 0.0
    assert trajectory.response.shape == trajectory.response_mask.shape == trajectory.values.shape
    # masked after EOS: nothing counts past the first EOS
    for row, mask_row in zip(trajectory.response, trajectory.response_mask):
        if (row == tokenizer.eos_token_id).any():
            first = int((row == tokenizer.eos_token_id).nonzero()[0])
            assert mask_row[: first + 1].eq(1).all() and mask_row[first + 1 :].eq(0).all()


def test_update_on_4bit_base_trains_only_policy_and_value(pipeline, tmp_path):
    config = ppo_config(pipeline, tmp_path / "unused", quantization="nf4", gradient_checkpointing=True)
    roles, tokenizer, _, _ = ppo.load_roles(config, "cpu")
    before = {role: lora_state(roles.model, role) for role in (ppo.POLICY, ppo.REFERENCE, ppo.VALUE, ppo.REWARD)}
    reward_head = roles.reward_head.weight.detach().clone()
    base_weights = {n: p.detach().clone() for n, p in roles.model.named_parameters() if "lora_" not in n}
    accelerator = training.make_accelerator(0)
    words = "red blue green dog sun tree water stone".split()
    encoded = [chat.encode_prompt(tokenizer, [{"role": "user", "content": f"{w} cat?"}]) for w in words]
    batch = ppo.rollout(roles, tokenizer, encoded, config, accelerator)
    trajectory, _ = ppo.make_trajectory(roles, batch, config, beta=0.05, accelerator=accelerator)

    # one minibatch: the ratio starts at 1, and gradients reach every policy and value LoRA layer
    stats = ppo.update_minibatch(roles, trajectory.rows(torch.arange(4)), config, accelerator)
    assert stats["policy/clipfrac"] == 0.0 and stats["policy/approxkl"] < 1e-6
    for name, param in roles.model.named_parameters():
        if "lora_" not in name:
            continue
        if f".{ppo.POLICY}." in name or f".{ppo.VALUE}." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=1e-3)
    optimizer.zero_grad()
    ppo.update(roles, optimizer, trajectory, config, accelerator)

    after = {role: lora_state(roles.model, role) for role in before}
    for role in (ppo.REFERENCE, ppo.REWARD):
        assert all(torch.equal(before[role][n], after[role][n]) for n in before[role]), role
    for role in (ppo.POLICY, ppo.VALUE):
        assert any(not torch.equal(before[role][n], after[role][n]) for n in before[role]), role
    assert torch.equal(roles.reward_head.weight, reward_head)
    assert all(torch.equal(p, base_weights[n]) for n, p in roles.model.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------- the whole step
def test_ppo_learns_to_please_the_reward_model(pipeline, tmp_path):
    out = tmp_path / "ppo"
    invoke(
        "ppo",
        "--sft",
        pipeline["sft"],
        "--reward",
        pipeline["rm"],
        "--data",
        pipeline["prompts"],
        "--out",
        out,
        "--quantization",
        "none",
        "--no-gradient-checkpointing",
        "--iterations",
        20,
        "--rollout-batch-size",
        16,
        "--minibatch-size",
        8,
        "--ppo-epochs",
        2,
        "--max-new-tokens",
        24,
        "--lr",
        "1e-3",
        "--kl-coef",
        "0.02",
        "--eval-every",
        10,
        "--eval-prompts",
        8,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [row["objective/score"] for row in rows]
    # iteration 1 is scored before any update: the policy is then the SFT model
    assert sum(scores[-5:]) / 5 > scores[0] + 0.5, scores
    lengths = [row["response/length"] for row in rows]
    assert sum(lengths[-5:]) / 5 < lengths[0] / 2, lengths  # the RM prefers short answers: PPO shortens them
    assert rows[0]["objective/kl"] == 0.0
    for name in (
        "objective/kl",
        "objective/entropy",
        "loss/policy",
        "loss/value",
        "policy/clipfrac",
        "policy/approxkl",
        "val/explained_variance",
        "response/length",
        "response/eos_rate",
        "objective/beta",
        "policy/first_approxkl",
        "time/rollout",
        "time/score",
        "time/logprobs",
        "time/update",
        "time/iteration",
        "rollout/tokens_per_s",
    ):
        assert name in rows[-1], name
    assert "time/eval" in rows[9] and rows[9]["time/eval"] > 0
    assert "eval/reward" in rows[9] and "eval/reward" in rows[19]
    manifest = artifacts.require_complete(out, "ppo")
    assert set(manifest["parents"]) == {"sft", "rm", "data"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["iteration"] for s in samples} == {10, 20} and all("reward" in s for s in samples)
    assert (out / "value" / "score_head.safetensors").is_file()
    answer = invoke("generate", "--model", out, "--quantization", "none", "--max-new-tokens", 8, "red cat sun?")
    assert answer.stdout.strip() != "" or answer.exit_code == 0


def test_resume_after_interrupt_equals_uninterrupted(pipeline, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    settings = dict(iterations=5, save_every=2, target_kl=1.0)  # adaptive beta: its state is resumed too
    straight = ppo.run(ppo_config(pipeline, tmp_path / "straight", **settings))

    calls = {"n": 0}
    real_update = ppo.update

    def interrupting_update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # during iteration 4: a checkpoint exists for 2, Ctrl-C saves 3
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(ppo.loop, "update", interrupting_update)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(ppo_config(pipeline, tmp_path / "resumed", **settings))
    assert artifacts.read_manifest(tmp_path / "resumed")["status"] == "interrupted"
    monkeypatch.setattr(ppo.loop, "update", real_update)
    resumed = ppo.run(ppo_config(pipeline, tmp_path / "resumed", resume=True, **settings))

    for folder in ("adapter", "value"):
        a = load_file(straight / folder / "adapter_model.safetensors")
        b = load_file(resumed / folder / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert artifacts.read_manifest(straight)["final_beta"] == pytest.approx(
        artifacts.read_manifest(resumed)["final_beta"]
    )


def test_cli_errors(pipeline, tmp_path):
    base = ["ppo", "--quantization", "none", "--out", str(tmp_path / "x")]
    cases = [
        (base + ["--reward", str(pipeline["rm"]), "--data", str(pipeline["prompts"])], "--sft"),
        (
            base + ["--sft", str(pipeline["rm"]), "--reward", str(pipeline["rm"]), "--data", str(pipeline["prompts"])],
            "sft",
        ),
        (
            base
            + ["--sft", str(pipeline["sft"]), "--reward", str(pipeline["sft"]), "--data", str(pipeline["prompts"])],
            "--reward",
        ),
        (
            base
            + [
                "--sft",
                str(pipeline["sft"]),
                "--reward",
                str(pipeline["rm"]),
                "--data",
                str(pipeline["prompts"]),
                "--minibatch-size",
                "32",
                "--rollout-batch-size",
                "8",
            ],
            "--minibatch-size",
        ),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output


def test_kl_shaping_puts_score_at_last_response_token():
    """The wiring of steps 2-4 on hand-made tensors (the maths itself is tested in test_rl.py)."""
    scores = torch.tensor([1.0])
    logprobs, ref = torch.tensor([[-1.0, -2.0, -3.0, 0.0]]), torch.tensor([[-1.5, -2.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = rl.shaped_rewards(scores, logprobs, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 1.0, 0.0]]))
