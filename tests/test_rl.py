"""PPO maths against hand-computed values."""

import math

import pytest
import torch

from instruct_cli.core import rl


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 1.5
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5]]))


def test_gae_stops_at_the_last_real_token():
    rewards = torch.tensor([[1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 77.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A1 = 2 - 1 (no bootstrap past the end); A0 = 1 + 1 - 0.5 + A1
    torch.testing.assert_close(advantages, torch.tensor([[2.5, 1.0, 0.0]]))


def test_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = rl.whiten(values, mask)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    kept = rl.whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-4, rtol=0)


def test_kl_shaping_score_only_at_last_token():
    scores = torch.tensor([2.0, -1.0])
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    reference = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = rl.shaped_rewards(scores, policy, reference, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.1, 0.0 - 1.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_adaptive_beta():
    controller = rl.KLController(beta=0.1, target=6.0, horizon=5)
    controller.update(current_kl=9.0)  # error 0.5 clipped to 0.2
    assert controller.beta == pytest.approx(0.1 * (1 + 0.2 / 5))
    controller.update(current_kl=5.4)  # error -0.1
    assert controller.beta == pytest.approx(0.1 * (1 + 0.2 / 5) * (1 - 0.1 / 5))
    fixed = rl.KLController(beta=0.05)
    fixed.update(100.0)
    assert fixed.beta == 0.05


def test_adaptive_beta_reaches_its_target_within_the_quickstarts_iterations():
    """A toy policy whose KL falls as beta rises (KL = 0.6 / beta): at the quickstart's 20 iterations and
    beta 0.05 the KL starts at 12 with a target of 6, and beta must get most of the way to 0.1."""
    controller = rl.KLController(beta=0.05, target=6.0)  # the default horizon
    for _ in range(20):
        controller.update(current_kl=0.6 / controller.beta)
    assert 0.6 / controller.beta < 6.0 * 1.15, controller.beta  # within 15% of the target KL
    old = rl.KLController(beta=0.05, target=6.0, horizon=10000)  # the old horizon, in samples of 16
    for _ in range(20):
        old.update(current_kl=0.6 / old.beta)
    assert old.beta < 0.051  # what it did before: practically fixed


def test_token_shares_add_up_to_the_mean_over_all_rollouts():
    """Two processes holding half the rollouts each: their shares of the loss and of the statistics,
    computed with the global token count, sum to what one process holding all of them computes."""
    torch.manual_seed(0)
    new, old, advantages = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]).float()
    whole, whole_stats = rl.policy_loss(new, old, advantages, mask, 0.2)
    count = mask.sum()
    halves = [
        rl.policy_loss(new[rows], old[rows], advantages[rows], mask[rows], 0.2, count)
        for rows in (slice(0, 2), slice(2, 4))
    ]
    assert sum(loss for loss, _ in halves).item() == pytest.approx(whole.item(), abs=1e-6)
    for name, value in whole_stats.items():
        assert sum(stats[name] for _, stats in halves) == pytest.approx(value, abs=1e-6)
    values, returns = torch.randn(4, 5), torch.randn(4, 5)
    whole_v, _ = rl.value_loss(values, old, returns, mask, 0.2)
    split_v = sum(
        rl.value_loss(values[r], old[r], returns[r], mask[r], 0.2, count)[0] for r in (slice(0, 2), slice(2, 4))
    )
    assert split_v.item() == pytest.approx(whole_v.item(), abs=1e-6)


def test_clipped_policy_loss():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = rl.policy_loss(new, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["policy/clipfrac"] == pytest.approx(1.0)
    log_ratio = torch.log(torch.tensor([1.5, 0.5]))
    assert stats["policy/approxkl"] == pytest.approx(0.5 * (log_ratio**2).mean().item())


def test_clipped_value_loss():
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    loss, _ = rl.value_loss(new, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: clipped V = 1.2: max((2-3)^2, (1.2-3)^2) = 3.24; token 1: max(1.21, 1.21) = 1.21
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2)


def test_masking_after_eos():
    tokens = torch.tensor([[5, 6, 2, 7, 8], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3]])
    mask, ended = rl.truncate_after_eos(tokens, eos_id=2)
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]))
    assert ended.tolist() == [True, False, True]
    # nothing after the EOS counts in a masked mean
    values = torch.tensor([[1.0, 1, 1, 50, 50], [1, 1, 1, 1, 1], [1, 50, 50, 50, 50]])
    assert rl.masked_mean(values, mask).item() == pytest.approx(1.0)


def test_logprobs_use_the_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    tokens = torch.tensor([[0]])
    at_1 = rl.token_logprobs(logits, tokens, 1.0).item()
    at_2 = rl.token_logprobs(logits, tokens, 2.0).item()
    assert at_1 == pytest.approx(-math.log(1 + math.exp(-2)))
    assert at_2 == pytest.approx(-math.log(1 + math.exp(-1)))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert rl.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert rl.explained_variance(torch.zeros(1, 4) + 2.5, returns, mask) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------- critic-free (17)
def test_rloo_leaves_each_response_out_of_its_own_baseline():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # K = 2: groups [1, 2] and [3, 6]; each response's baseline is the other one
    torch.testing.assert_close(rl.rloo_advantages(rewards, 2), torch.tensor([-1.0, 1.0, -3.0, 3.0]))
    # K = 4: the baseline of 1 is (2 + 3 + 6) / 3 = 11/3, and so on
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    torch.testing.assert_close(rl.rloo_advantages(rewards, 4), expected)
    assert rl.rloo_advantages(rewards, 4).sum().item() == pytest.approx(0.0, abs=1e-6)


def test_grpo_normalises_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased: mean 3, deviations -2, -1, 0, 3
    expected = torch.tensor([-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rl.grpo_advantages(rewards, 4, eps=0.0)[:4], expected[:4])
    # a group whose responses all scored the same has no signal (eps keeps it finite)
    torch.testing.assert_close(rl.grpo_advantages(rewards, 4)[4:], torch.zeros(4))


def test_k3_kl_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    reference = torch.tensor([[-2.0, -1.0, -3.0]])
    # r = ref - policy: -1 -> e^-1 + 1 - 1; 1 -> e - 1 - 1; 0 -> 0
    expected = torch.tensor([[math.exp(-1), math.e - 2, 0.0]])
    torch.testing.assert_close(rl.k3_kl(logprobs, reference), expected)


def test_sequence_rewards_subtract_the_summed_kl():
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.5, 0.0, -1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rl.sequence_rewards(scores, kl, 0.1), torch.tensor([1.05, -0.2]))
    torch.testing.assert_close(rl.sequence_rewards(scores, kl, 0.0), scores)


# ------------------------------------------------------------------------ TRL parity fixes (issue 27)
def test_k3_kl_is_masked_before_the_exp():
    """Past a response's EOS the log-probs are padding's: one below about -88 made exp(r) infinite and
    inf x 0 = NaN; masked first, the padding contributes exactly 0."""
    logprobs = torch.tensor([[-1.0, -200.0]])
    reference = torch.tensor([[-2.0, -0.1]])
    mask = torch.tensor([[1.0, 0.0]])
    kl = rl.k3_kl(logprobs, reference, mask)
    assert torch.isfinite(kl).all() and kl[0, 1].item() == 0.0
    assert kl[0, 0].item() == pytest.approx(math.exp(-1))
    assert not torch.isfinite(rl.k3_kl(logprobs, reference)[0, 1] * 0.0)  # what the mask prevents


def test_a_group_whose_rewards_tie_gets_zero_advantage_whatever_the_kl():
    """The GRPO bug: a KL in the reward, divided by the group's std when the scores tie, gave unit-scale
    advantages that do not shrink with beta. Scores tie: zero advantage, and the tie is counted."""
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 0.0])
    advantages, tied = rl.critic_free_advantages("grpo", scores, 4, "group")
    torch.testing.assert_close(advantages[:4], torch.zeros(4))
    assert tied == 0.5
    # what the old default did: KL [2, 4, 1, 3] in the reward at beta 0.05 and at 0.01 alike
    for beta in (0.05, 0.01):
        rewards = rl.sequence_rewards(scores[:4], torch.tensor([[2.0], [4.0], [1.0], [3.0]]), beta)
        noise, _ = rl.critic_free_advantages("grpo", rewards, 4, "group")
        torch.testing.assert_close(noise, torch.tensor([0.39, -1.16, 1.16, -0.39]), atol=0.01, rtol=0)


def test_reward_scales():
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0])
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    group_std = torch.tensor([math.sqrt(2)] * 2 + [math.sqrt(8)] * 2)
    batch_std = torch.tensor(rewards.tolist()).std()
    torch.testing.assert_close(rl.critic_free_advantages("grpo", rewards, 2, "none")[0], centred)
    torch.testing.assert_close(rl.critic_free_advantages("grpo", rewards, 2, "group")[0], centred / (group_std + 1e-4))
    torch.testing.assert_close(rl.critic_free_advantages("grpo", rewards, 2, "batch")[0], centred / (batch_std + 1e-4))


def test_grpo_loss_types_by_hand():
    """Two responses of 1 and 3 tokens, ratio 1 (on-policy): the per-token loss is -A."""
    new = old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.0, -2.0])
    counts = rl.Counts(tokens=4.0, sequences=2.0, max_tokens=5)
    expected = {
        "grpo": ((-1.0) + (2.0 * 3 / 3)) / 2,  # per-response token means, then their mean
        "bnpo": (-1.0 + 6.0) / 4,
        "dr_grpo": (-1.0 + 6.0) / (2 * 5),
        "dapo": (-1.0 + 6.0) / 4,
    }
    for loss_type, value in expected.items():
        loss, _ = rl.token_policy_loss(new, old, advantages, mask, counts, loss_type)
        assert loss.item() == pytest.approx(value), loss_type


def test_clip_higher_and_the_sequence_ratio():
    """Token-level: a ratio of 1.25 with A > 0 is clipped at 1.2, but not with clip_high 0.28. RLOO's ratio is
    exp of the summed per-token log-ratios: 50 tokens each up by 0.005 is a ratio of 1.28, clipped at 1.2."""
    mask = torch.ones(1, 50)
    new, old = torch.full((1, 50), 0.005), torch.zeros(1, 50)
    counts = rl.Counts(tokens=50.0, sequences=1.0)
    loss, stats = rl.sequence_policy_loss(new, old, torch.tensor([1.0]), mask, counts)
    assert loss.item() == pytest.approx(-1.2) and stats["policy/clip_ratio/high"] == 1.0
    one = torch.ones(1, 1)
    up = torch.full((1, 1), math.log(1.25))
    loss, stats = rl.token_policy_loss(up, torch.zeros(1, 1), torch.tensor([1.0]), one, rl.Counts(1.0, 1.0))
    assert loss.item() == pytest.approx(-1.2) and stats["policy/clip_ratio/high"] == 1.0
    loss, _ = rl.token_policy_loss(up, torch.zeros(1, 1), torch.tensor([1.0]), one, rl.Counts(1.0, 1.0), clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25)


def test_correlation_by_hand():
    assert rl.correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])) == pytest.approx(
        0.9933992677987828
    )
    assert rl.correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert rl.correlation(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.0
