"""Parity of the critic-free RL maths (instruct_cli/core/rl.py) with TRL's own GRPOTrainer and RLOOTrainer.

Each test builds a real TRL trainer on the tiny random chat model, feeds it a FIXED batch (the trainer's
`_generate_single_turn` returns our completion ids, the reward function our scores), lets TRL's
`_generate_and_score_completions` compute the advantages and `_compute_loss` the loss, and backpropagates.
Then the same model, on the same token ids, goes through our side: `rl.token_logprobs` at TRL's temperature,
`rl.critic_free_advantages`, `rl.k3_kl` / `rl.sequence_rewards`, and `rl.token_policy_loss` /
`rl.sequence_policy_loss`. Advantages, loss, every parameter's gradient and the logged statistics must agree.

The policy is perturbed away from its saved weights after the trainer is built, so that it differs from
TRL's reference model (reloaded from the folder) and the KL terms are not zero. Old log-probabilities are the
policy's own, shifted on some tokens so that the importance ratio leaves the clip range on both sides (and,
with clip-higher, lands between 1 + epsilon and 1 + epsilon_high, where only the upper bound decides).

PPO (GAE) has no counterpart here: TRL 1.16 has no PPO trainer, neither in `trl.trainer` nor in
`trl.experimental` (it holds no `ppo` package), and no GAE, whitening or value-loss function anywhere in the
package, so there is nothing of TRL's to compare `rl.gae`, `rl.whiten`, `rl.policy_loss` or `rl.value_loss`
with; they are tested on hand values in test_rl.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from instruct_cli.core import rl  # noqa: E402

GROUP = 4
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "one two three?"]
SCORES = [1.0, 0.0, 0.5, 2.0] + [0.5] * GROUP + [-1.0, 0.25, 0.25, 3.0]
"""One reward per completion, groups of GROUP consecutive rows; the second group's rewards all tie."""
TIED = slice(GROUP, 2 * GROUP)
MAX_TOKENS = 6
LENGTHS = [6, 3, 5, 2, 4, 6, 1, 6, 6, 2, 3, 4]
ENDS_WITH_EOS = [False, True, True, True, True, True, True, False, True, True, True, True]
"""Two completions stop at the token limit (MAX_TOKENS) without an EOS; the others end with one."""
TOKEN_SHIFTS = [0.0, 0.375, -0.375, -0.21875, 0.125, -0.125]
"""Added to the policy's log-probs to make the old ones: ratios exp(-shift) of 1, 0.69 (below 1 - 0.2), 1.45
(above 1 + 0.28), 1.24 (between 1 + 0.2 and 1 + 0.28: clipped only without clip-higher), 0.88 and 1.13.
Dyadic, so that adding them to a log-prob (or a sum of them) rounds nothing."""
EPSILON, EPSILON_HIGH = 0.2, 0.28
ATOL, RTOL = 1e-6, 1e-5
"""Float32 throughout; TRL scores tokens with a fused, chunked LM head, we with full logits and log_softmax."""


def fixed_reward(completions, **kwargs):
    """TRL reward function: the fixed scores, whatever the completions."""
    return list(SCORES)


def completion_ids(eos_id: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, eos in zip(LENGTHS, ENDS_WITH_EOS, strict=True):
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()  # no special token
        if eos:
            ids[-1] = eos_id
        rows.append(ids)
    return rows


def token_shifts(shape: torch.Size) -> torch.Tensor:
    rows, steps = shape
    return torch.tensor([[TOKEN_SHIFTS[(3 * i + t) % len(TOKEN_SHIFTS)] for t in range(steps)] for i in range(rows)])


def build_trainer(trainer_cls, config_cls, model_dir, tmp_path, accumulation: int = 1, **config):
    """A TRL trainer on the tiny model whose generation returns `completion_ids` and whose reward is SCORES,
    set up as inside a training step (train mode, `accumulation` micro-batches per optimizer step)."""
    args = config_cls(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(SCORES) // accumulation,
        gradient_accumulation_steps=accumulation,
        num_generations=GROUP,
        max_completion_length=MAX_TOKENS,
        save_strategy="no",
        **config,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    trainer = trainer_cls(model=str(model_dir), reward_funcs=fixed_reward, args=args, train_dataset=dataset)
    tokenizer = trainer.processing_class
    completions = completion_ids(tokenizer.eos_token_id, len(tokenizer))

    def generate_single_turn(prompt_ids, *args, **kwargs):
        assert len(prompt_ids) == len(completions)
        ids = [list(row) for row in completions]
        return (ids, None) if isinstance(trainer, GRPOTrainer) else ids

    trainer._generate_single_turn = generate_single_turn
    with torch.no_grad():  # move the policy away from the reference model (the saved weights)
        generator = torch.Generator().manual_seed(1)
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    trainer.model.train()  # what Trainer.train does; the model has no dropout
    trainer.current_gradient_accumulation_steps = accumulation  # set by Trainer's loop for each optimizer step
    return trainer


def batch_inputs() -> list[dict]:
    """The generation batch as TRL's sampler yields it: each prompt GROUP times in a row."""
    return [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS for _ in range(GROUP)]


def trl_token_logprobs(trainer, output) -> torch.Tensor:
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, output["completion_ids"].size(1)
        )
    return logps


def our_token_logprobs(model, output, temperature: float) -> torch.Tensor:
    """Our side's per-token log-probs of the completion tokens: a plain forward, full logits, rl.token_logprobs."""
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    steps = output["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -steps - 1 : -1]
    return rl.token_logprobs(logits, output["completion_ids"], temperature)


def reference_logprobs(model_dir, output, temperature: float) -> torch.Tensor:
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return our_token_logprobs(reference, output, temperature)


def backward_gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def assert_same_gradients(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    assert any(g.abs().max() > 1e-4 for g in theirs.values()), "TRL's gradients are all (near) zero"
    for name, gradient in theirs.items():
        torch.testing.assert_close(ours[name], gradient, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def last_metric(trainer, name: str) -> float:
    return trainer._metrics["train"][name][-1]


# ----------------------------------------------------------------------------------------------------- GRPO
def run_grpo(trainer, model_dir, loss_type, scale, beta, temperature=1.0, microbatches=1, bias_correction=True):
    """TRL's and our loss and gradients on the fixed batch; returns what the assertions need."""
    model = trainer.model
    output = trainer._generate_and_score_completions(batch_inputs())
    mask = output["completion_mask"].float()
    shifts = token_shifts(mask.shape) * mask
    output["old_per_token_logps"] = trl_token_logprobs(trainer, output) + shifts  # TRL's policy log-probs, shifted
    with torch.no_grad():
        old = our_token_logprobs(model, output, temperature) + shifts  # ours, shifted alike

    # TRL: one _compute_loss per micro-batch of the generation batch, gradients accumulated (as training_step does)
    size = len(SCORES) // microbatches
    trl_loss, trl_clip = 0.0, {"low": [], "high": []}
    model.zero_grad(set_to_none=True)
    for index in range(microbatches):
        part = {
            key: (value[index * size : (index + 1) * size] if torch.is_tensor(value) and value.dim() else value)
            for key, value in output.items()
        }
        loss = trainer._compute_loss(model, part)
        loss.backward()
        trl_loss += loss.item()
        trl_clip["low"].append(last_metric(trainer, "clip_ratio/low_mean"))
        trl_clip["high"].append(last_metric(trainer, "clip_ratio/high_mean"))
    trl_gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # Ours
    rewards = torch.tensor(SCORES)
    advantages, tie_share = rl.critic_free_advantages("grpo", rewards, GROUP, scale)
    reference = reference_logprobs(model_dir, output, temperature) if beta else None
    counts = rl.Counts(mask.sum().item(), len(SCORES), processes=microbatches, max_tokens=MAX_TOKENS)
    our_loss, stats = 0.0, []
    for index in range(microbatches):
        rows = slice(index * size, (index + 1) * size)
        sub = {key: output[key][rows] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        new = our_token_logprobs(model, sub, temperature)
        kl = rl.k3_kl(new, reference[rows], mask[rows]) if beta else None
        loss, part_stats = rl.token_policy_loss(
            new,
            old[rows],
            advantages[rows],
            mask[rows],
            counts,
            loss_type,
            EPSILON,
            EPSILON_HIGH,
            kl,
            beta,
            bias_correction,
        )
        loss.backward()
        our_loss += loss.item()
        stats.append(part_stats)
    our_gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {
        "output": output,
        "trl_loss": trl_loss,
        "our_loss": our_loss,
        "trl_gradients": trl_gradients,
        "our_gradients": our_gradients,
        "advantages": advantages,
        "tie_share": tie_share,
        "trl_clip": trl_clip,
        "stats": stats,
    }


def grpo_trainer(model_dir, tmp_path, loss_type="dapo", scale="group", beta=0.0, accumulation=1, **config):
    return build_trainer(
        GRPOTrainer,
        GRPOConfig,
        model_dir,
        tmp_path,
        accumulation=accumulation,
        loss_type=loss_type,
        scale_rewards=scale,
        beta=beta,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        **config,
    )


def assert_grpo_parity(result) -> None:
    assert result["our_loss"] == pytest.approx(result["trl_loss"], rel=RTOL, abs=ATOL)
    assert_same_gradients(result["our_gradients"], result["trl_gradients"])


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_matches_trl(tiny_model_dir, tmp_path, loss_type, scale, beta):
    """GRPO, each loss type x reward scaling x (no KL | k3 KL in the loss, with TRL's default importance-ratio
    factor on it), with clip-higher and shifted old log-probs: same advantages (zero for the tied group), same loss,
    same gradient of every parameter, same clip fractions (both bounds acted)."""
    trainer = grpo_trainer(tiny_model_dir, tmp_path, loss_type, scale, beta)
    result = run_grpo(trainer, tiny_model_dir, loss_type, scale, beta)

    torch.testing.assert_close(result["advantages"], result["output"]["advantages"], atol=ATOL, rtol=RTOL)
    assert torch.all(result["advantages"][TIED] == 0) and torch.all(result["output"]["advantages"][TIED] == 0)
    assert_grpo_parity(result)
    stats = result["stats"][0]
    assert stats["policy/clip_ratio/low"] == pytest.approx(result["trl_clip"]["low"][0])
    assert stats["policy/clip_ratio/high"] == pytest.approx(result["trl_clip"]["high"][0])
    assert stats["policy/clip_ratio/low"] > 0 and stats["policy/clip_ratio/high"] > 0  # the clip acted both ways


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_tie_share_is_trl_frac_reward_zero_std(tiny_model_dir, tmp_path, scale):
    """The share of groups whose rewards all tie (critic_free_advantages' second value) is TRL's logged
    `frac_reward_zero_std` with group and no scaling. With batch scaling TRL logs whether the whole batch's
    std is zero instead; ours stays the share of tied groups (what the name says), on purpose."""
    trainer = grpo_trainer(tiny_model_dir, tmp_path, scale=scale)
    trainer._generate_and_score_completions(batch_inputs())
    _, tie_share = rl.critic_free_advantages("grpo", torch.tensor(SCORES), GROUP, scale)
    assert tie_share == pytest.approx(1 / len(PROMPTS))
    trl_share = last_metric(trainer, "frac_reward_zero_std")
    assert trl_share == (pytest.approx(0.0) if scale == "batch" else pytest.approx(tie_share))


def test_grpo_temperature(tiny_model_dir, tmp_path):
    """At a sampling temperature other than 1, rl.token_logprobs scores tokens as TRL does, and loss and
    gradients (dapo, k3 KL) still agree."""
    trainer = grpo_trainer(tiny_model_dir, tmp_path, beta=0.04, temperature=0.7)
    result = run_grpo(trainer, tiny_model_dir, "dapo", "group", 0.04, temperature=0.7)
    output, mask = result["output"], result["output"]["completion_mask"].float()
    with torch.no_grad():
        ours = our_token_logprobs(trainer.model, output, 0.7)
    torch.testing.assert_close(ours * mask, trl_token_logprobs(trainer, output), atol=1e-5, rtol=RTOL)
    torch.testing.assert_close(
        reference_logprobs(tiny_model_dir, output, 0.7) * mask, output["ref_per_token_logps"], atol=1e-5, rtol=RTOL
    )
    assert_grpo_parity(result)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_gradient_accumulation(tiny_model_dir, tmp_path, loss_type):
    """A generation batch split into 2 micro-batches (gradient_accumulation_steps = steps_per_generation = 2):
    TRL divides grpo / bnpo / dr_grpo by the accumulation steps and dapo by `num_items_in_batch`, the real
    tokens of the whole generation batch on every process (times accumulation / steps_per_generation = 1).
    Ours, each micro-batch with the Counts of the whole minibatch: the accumulated gradients agree."""
    trainer = grpo_trainer(tiny_model_dir, tmp_path, loss_type, accumulation=2)
    result = run_grpo(trainer, tiny_model_dir, loss_type, "group", 0.0, microbatches=2)
    assert result["output"]["num_items_in_batch"].item() == sum(LENGTHS)
    assert_grpo_parity(result)


def test_grpo_kl_with_and_without_bias_correction(tiny_model_dir, tmp_path):
    """TRL's default `use_bias_correction_kl=True` multiplies the per-token k3 KL by the (differentiable)
    importance ratio exp(new - old) before adding beta x KL to the loss; ours too by default, and without it
    when TRL's is off."""
    trainer = grpo_trainer(tiny_model_dir, tmp_path / "on", beta=0.04)
    assert trainer.args.use_bias_correction_kl
    assert_grpo_parity(run_grpo(trainer, tiny_model_dir, "dapo", "group", 0.04))
    trainer = grpo_trainer(tiny_model_dir, tmp_path / "off", beta=0.04, use_bias_correction_kl=False)
    assert_grpo_parity(run_grpo(trainer, tiny_model_dir, "dapo", "group", 0.04, bias_correction=False))


# ----------------------------------------------------------------------------------------------------- RLOO
SEQUENCE_SHIFTS = [-0.375, 0.375, 0.125, -0.21875, 0.0, 0.375, -0.375, 0.0, 0.375, -0.125, 0.125, -0.375]
"""Added to each response's summed old log-prob (on its first token), ratios as TOKEN_SHIFTS': the first and
last responses (advantage > 0) above 1 + 0.28, the 2nd and 9th (advantage < 0) below 1 - 0.2, the 4th
(advantage > 0) between 1 + 0.2 and 1 + 0.28."""


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_matches_trl(tiny_model_dir, tmp_path, beta, normalize):
    """RLOO: beta x the summed k1 KL (old - reference log-probs) subtracted from the reward, leave-one-out
    advantages (TRL's normalize_advantages=True taken as our scale "batch", False as "none"), and the
    sequence-level clipped loss with shifted old log-probs: same advantages, tie share, KL, loss, gradients and
    clip fractions (both bounds acted)."""
    trainer = build_trainer(
        RLOOTrainer,
        RLOOConfig,
        tiny_model_dir,
        tmp_path,
        beta=beta,
        normalize_advantages=normalize,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
    )
    model = trainer.model
    output = trainer._generate_and_score_completions(batch_inputs())
    mask = output["completion_mask"].float()
    shifts = torch.tensor(SEQUENCE_SHIFTS)
    output["old_logps"] = output["old_logps"] + shifts  # TRL's summed old log-probs (its policy's), shifted
    trl_loss = trainer._compute_loss(model, output)
    trl_gradients = backward_gradients(model, trl_loss)

    with torch.no_grad():
        policy = our_token_logprobs(model, output, 1.0)  # our old per-token log-probs, as in our KL
    old = policy.clone()
    old[:, 0] += shifts  # shifted alike
    kl = (policy - reference_logprobs(tiny_model_dir, output, 1.0)) * mask if beta else torch.zeros_like(mask)
    rewards = rl.sequence_rewards(torch.tensor(SCORES), kl, beta)
    advantages, tie_share = rl.critic_free_advantages("rloo", rewards, GROUP, "batch" if normalize else "none")
    counts = rl.Counts(tokens=mask.sum().item(), sequences=len(SCORES), max_tokens=MAX_TOKENS)
    new = our_token_logprobs(model, output, 1.0)
    loss, stats = rl.sequence_policy_loss(new, old, advantages, mask, counts, EPSILON, EPSILON_HIGH)
    our_gradients = backward_gradients(model, loss)

    torch.testing.assert_close(advantages, output["advantages"], atol=ATOL, rtol=RTOL)
    if not beta and not normalize:  # the tied group's rewards still tie
        assert torch.all(advantages[TIED] == 0) and torch.all(output["advantages"][TIED] == 0)
    assert tie_share == pytest.approx(last_metric(trainer, "frac_reward_zero_std"))
    if beta:
        assert last_metric(trainer, "kl") == pytest.approx(rl.masked_mean(kl, mask).item(), rel=1e-4)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=RTOL, abs=ATOL)
    assert_same_gradients(our_gradients, trl_gradients)
    assert stats["policy/clip_ratio/low"] == pytest.approx(last_metric(trainer, "clip_ratio/low_mean"))
    assert stats["policy/clip_ratio/high"] == pytest.approx(last_metric(trainer, "clip_ratio/high_mean"))
    assert stats["policy/clip_ratio/low"] > 0 and stats["policy/clip_ratio/high"] > 0
