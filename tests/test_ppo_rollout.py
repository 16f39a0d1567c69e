"""ppo's rollouts with the policy adapter folded into the base weights (core/lora_merge.py): the same samples
and log-probs as unmerged sampling, a base that is bit-identical afterwards (also after an error or Ctrl-C
mid-sampling), and a quantised base left unmerged."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import chat, lora_merge, models, recipes, rl, training
from instruct_cli.core import config as cfg
from instruct_cli.steps import ppo
from instruct_cli.steps.ppo import trajectory

WORDS = "red blue green dog sun tree water stone".split()


def tiny_roles(model_dir, quantization="none"):
    """Policy and reference adapters on the tiny base; the policy's lora_B random, so that it is NOT the
    identity the LoRA initialisation gives (merged or not would then sample alike trivially)."""
    source = models.resolve_model(str(model_dir))
    tokenizer = models.load_tokenizer(source)
    base = models.load_base_model(source, quantization, "cpu", dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora, adapter_name=ppo.POLICY)
    model.add_adapter(ppo.REFERENCE, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{ppo.POLICY}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return ppo.Roles(model, None, None), tokenizer


def config_of(**overrides):
    values = dict(sft="unused", data="unused", out="unused", quantization="none", max_new_tokens=12)
    return recipes.build_config(cfg.PPOConfig, "ppo", None, {**values, **overrides})


def prompts_of(tokenizer):
    return [chat.encode_prompt(tokenizer, [{"role": "user", "content": f"{w} cat?"}]) for w in WORDS]


def base_weights(roles):
    """name -> (where the weight's values live, a copy of them) of every non-LoRA parameter."""
    return {
        name: (param.data_ptr(), param.detach().clone())
        for name, param in roles.model.named_parameters()
        if "lora_" not in name
    }


def assert_base_untouched(roles, before):
    after = {name: param for name, param in roles.model.named_parameters() if "lora_" not in name}
    assert after.keys() == before.keys()
    for name, (address, values) in before.items():
        assert after[name].data_ptr() == address, name  # the original tensor is back, not a recomputed copy
        assert torch.equal(after[name], values), name
    assert not any(getattr(m, "merged_adapters", []) for m in roles.model.modules())


def policy_logprobs(roles, batch, temperature):
    logits = trajectory.response_logits(roles, ppo.POLICY, *batch[:4])
    return rl.token_logprobs(logits, batch.response, temperature) * batch.response_mask


@pytest.fixture(scope="module")
def roles_and_tokenizer(tiny_model_dir):
    return tiny_roles(tiny_model_dir)


def test_merged_rollouts_sample_what_unmerged_ones_do(roles_and_tokenizer):
    roles, tokenizer = roles_and_tokenizer
    accelerator = training.make_accelerator(0, "no", "cpu")
    encoded = prompts_of(tokenizer)
    before = base_weights(roles)
    batches = {}
    for merged in (False, True):
        config = config_of(merged_rollouts=merged, temperature=0.9)
        torch.manual_seed(0)
        batches[merged] = ppo.rollout(roles, tokenizer, encoded, config, accelerator)
        assert_base_untouched(roles, before)
        if not merged:  # the policy's log-probs before any merged rollout ran
            roles.model.eval()
            with torch.no_grad():
                before_merging = policy_logprobs(roles, batches[False], 0.9)
    plain, folded = batches[False], batches[True]
    assert plain.response_mask.sum() >= 30  # enough sampled tokens for the comparison to mean something
    for field in ("query", "query_mask", "response", "response_mask", "ended"):
        assert torch.equal(getattr(plain, field), getattr(folded, field)), field
    roles.model.eval()
    with torch.no_grad():
        # what the trajectory computes after the rollout (unmerged): identical to before it
        unmerged = policy_logprobs(roles, folded, 0.9)
        assert torch.equal(unmerged, before_merging)
        # and the merged weights themselves give the policy's log-probs to float rounding: the delta is there,
        # once (folded twice, or not at all, these differ by far more)
        with lora_merge.merged_adapter(roles.model, ppo.POLICY) as layers:
            assert layers == sum(1 for n, _ in roles.model.named_modules() if n.endswith("lora_A"))
            merged = policy_logprobs(roles, folded, 0.9)
        reference = rl.token_logprobs(
            trajectory.response_logits(roles, ppo.REFERENCE, *folded[:4]), folded.response, 0.9
        )
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    # the policy adapter is not trivial: it moves the log-probs by 100x the tolerance above, at least
    assert (unmerged - reference * folded.response_mask).abs().max() > 1e-3
    assert_base_untouched(roles, before)
    roles.model.train()


@pytest.mark.parametrize("interruption", [RuntimeError("sampling failed"), KeyboardInterrupt()])
def test_base_weights_are_restored_when_sampling_raises(roles_and_tokenizer, monkeypatch, interruption):
    roles, tokenizer = roles_and_tokenizer
    before = base_weights(roles)
    seen = {}

    def failing_generate(**kwargs):
        # the weights are folded at this point: the raise below happens with the base modified
        seen["changed"] = [n for n, (at, _) in before.items() if roles.model.get_parameter(n).data_ptr() != at]
        raise interruption

    monkeypatch.setattr(roles.model, "generate", failing_generate)
    accelerator = training.make_accelerator(0, "no", "cpu")
    with pytest.raises(type(interruption)):
        ppo.rollout(roles, tokenizer, prompts_of(tokenizer)[:2], config_of(), accelerator)
    assert len(seen["changed"]) >= 7  # every projection of the tiny model's layers was folded
    assert_base_untouched(roles, before)
    roles.model.train()


def test_no_merged_rollouts_leaves_the_weights_alone(roles_and_tokenizer, monkeypatch):
    roles, tokenizer = roles_and_tokenizer
    before = base_weights(roles)

    def checking_generate(**kwargs):
        assert_base_untouched(roles, before)  # unmerged while sampling
        raise RuntimeError("stop here")

    monkeypatch.setattr(roles.model, "generate", checking_generate)
    accelerator = training.make_accelerator(0, "no", "cpu")
    with pytest.raises(RuntimeError, match="stop here"):
        ppo.rollout(roles, tokenizer, prompts_of(tokenizer)[:2], config_of(merged_rollouts=False), accelerator)
    assert trajectory.merged_rollouts_blocker(roles, config_of(merged_rollouts=False)) == "--no-merged-rollouts"
    assert trajectory.merged_rollouts_blocker(roles, config_of()) is None
    roles.model.train()


def test_a_quantised_base_is_not_merged(tiny_model_dir):
    roles, tokenizer = tiny_roles(tiny_model_dir, quantization="nf4")
    assert "quantised" in lora_merge.merge_blocker(roles.model)
    assert "quantised" in trajectory.merged_rollouts_blocker(roles, config_of(quantization="nf4"))
    assert lora_merge.mergeable_layers(roles.model, ppo.POLICY) == []  # no 4-bit layer is ever folded
    before = base_weights(roles)
    accelerator = training.make_accelerator(0, "no", "cpu")
    torch.manual_seed(0)
    batch = ppo.rollout(roles, tokenizer, prompts_of(tokenizer)[:2], config_of(quantization="nf4"), accelerator)
    assert batch.response.shape[0] == 2
    assert_base_untouched(roles, before)


def test_the_flag_and_the_recipe_key():
    assert config_of().merged_rollouts is True
    assert config_of(merged_rollouts=False).merged_rollouts is False
    result = CliRunner().invoke(app, ["ppo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--no-merged-rollouts" in result.output


def test_ppo_on_a_quantised_base_says_why_rollouts_are_unmerged(tiny_sft_rm, tmp_path):
    flags = ["ppo", "--sft", tiny_sft_rm["sft"], "--reward", tiny_sft_rm["rm"], "--data", tiny_sft_rm["data-prompts"]]
    flags += ["--iterations", 1, "--rollout-batch-size", 2, "--minibatch-size", 2, "--ppo-epochs", 1]
    flags += ["--max-new-tokens", 4, "--eval-prompts", 2, "--no-gradient-checkpointing"]
    lines = {}
    for quantization in ("nf4", "none"):
        out = tmp_path / quantization
        result = CliRunner().invoke(
            app, [str(f) for f in [*flags, "--quantization", quantization, "--out", out]], env={"COLUMNS": "300"}
        )
        assert result.exit_code == 0, result.output
        lines[quantization] = [line for line in result.output.splitlines() if "unmerged" in line]
    assert len(lines["nf4"]) == 1 and "the base is quantised" in lines["nf4"][0]
    assert lines["none"] == []
