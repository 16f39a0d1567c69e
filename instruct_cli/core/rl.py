"""The maths of PPO for language models, as small pure functions on tensors (tested against hand values).

Shapes: B = rollouts in the batch, T = response tokens (right-padded). `mask` is 1.0 on real response
tokens (up to and including the EOS) and 0.0 after, so every mean below is over real tokens only.

Data parallel: a process holds its share of the rollouts. The statistics that must describe the whole
batch (whitening, explained variance) take `total`, a function that sums a tensor over all processes
(identity on one process), and the losses take `token_count`, the number of real tokens of the minibatch on
all processes: each process's loss is then its share of the global mean, and summing the gradients over
processes gives exactly the gradient of one process holding every rollout.
References: Ouyang et al. 2022 (InstructGPT); Ziegler et al. 2019 (adaptive KL); Huang et al. 2024,
"The N Implementation Details of RLHF with PPO" (whitening, clipping, EOS handling); Ahmadian et al. 2024
(RLOO); Shao et al. 2024 (GRPO, the k3 KL loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Total = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the processes of a data-parallel run (the identity on one process)."""


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The `Total` of a single process."""
    return tensor


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total: Total = local) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all processes' entries when `total` sums over them)."""
    if dim is None:
        return total((values * mask).sum()) / total(mask.sum()).clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, total: Total = local) -> torch.Tensor:
    """Unbiased variance of `values` where `mask` is 1."""
    mean = masked_mean(values, mask, total=total)
    count = total(mask.sum())
    return total(((values - mean) ** 2 * mask).sum()) / (count - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, total: Total = local) -> torch.Tensor:
    """Normalise to zero mean and unit variance over the masked entries (the mean kept if not shift_mean)."""
    mean, var = masked_mean(values, mask, total=total), masked_var(values, mask, total=total)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under logits divided by the sampling temperature: (B, T, V), (B, T) -> (B, T).

    The temperature must be the rollout's, or the policy's first KL to its own samples is not zero.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token entropy of the sampling distribution: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def shaped_rewards(
    scores: torch.Tensor,
    policy_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL at every response token, plus the sequence score at its last token.

    KL per token is the sample estimate logp_policy - logp_reference. Returns (rewards, kl), both (B, T).
    """
    kl = (policy_logprobs - reference_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of the last real token of each response
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns), both (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t, and A_t = delta_t + gamma * lam * A_{t+1}, where V and A after the
    last real token are 0 (the episode ends at the EOS or at the token limit).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        alive_next = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * alive_next if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * alive_next
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """One reward per response for the critic-free advantages: score - beta * (sum of its per-token KL).
    (B,), (B, T) -> (B,). With the KL as a loss term instead, pass beta = 0."""
    return scores - beta * kl.sum(1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each response's reward minus the mean reward of the
    other K - 1 responses to the same prompt. `rewards` (B,) holds groups of K = `group_size` consecutive
    rows, one group per prompt; returns (B,)."""
    groups = rewards.view(-1, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def group_mean_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO's baseline: each response's reward minus its group's mean reward. Groups as in
    `rloo_advantages`; returns (B,). Dividing by a standard deviation (`by_reward_scale`) is a separate step."""
    groups = rewards.view(-1, group_size)
    return (groups - groups.mean(1, keepdim=True)).reshape(-1)


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The (unbiased) standard deviation of each response's group of K rewards, per response: (B,) -> (B,)."""
    return rewards.view(-1, group_size).std(1, keepdim=True).expand(-1, group_size).reshape(-1)


def batch_std(values: torch.Tensor, total: Total = local) -> torch.Tensor:
    """The (unbiased) standard deviation of every process's `values`: a 0-d tensor."""
    return masked_var(values, torch.ones_like(values), total).sqrt()


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each response's reward minus its group's mean, divided by the group's
    (unbiased) standard deviation + eps. Groups as in `rloo_advantages`; returns (B,)."""
    return group_mean_advantages(rewards, group_size) / (group_std(rewards, group_size) + eps)


def by_reward_scale(advantages: torch.Tensor, rewards: torch.Tensor, group_size: int, scale: str, total: Total = local):
    """GRPO's scaling (TRL's GRPOTrainer, scale_rewards): the advantages divided by the std of each one's group of
    rewards (group) or of every process's rewards (batch), + 1e-4; none: unchanged."""
    if scale == "none":
        return advantages
    spread = group_std(rewards, group_size) if scale == "group" else batch_std(rewards, total)
    return advantages / (spread + 1e-4)


def by_batch_whitening(advantages: torch.Tensor, rewards: torch.Tensor, group_size: int, scale: str, total=local):
    """RLOO's scaling (TRL's RLOOTrainer, normalize_advantages): batch, the advantages whitened over every
    process's batch, (A - mean A) / (std A + 1e-4), std unbiased; none: unchanged."""
    if scale == "none":
        return advantages
    mean = masked_mean(advantages, torch.ones_like(advantages), total=total)
    return (advantages - mean) / (batch_std(advantages, total) + 1e-4)


GROUP_BASELINES = {"rloo": rloo_advantages, "grpo": group_mean_advantages}
"""Each critic-free estimator's reward minus its baseline (methods.ADVANTAGE_ESTIMATORS), before scaling."""
ADVANTAGE_SCALES = {"rloo": by_batch_whitening, "grpo": by_reward_scale}
"""How each critic-free estimator scales its advantages (--scale-rewards; methods.ADVANTAGE_ESTIMATORS lists
the scales each one takes), as TRL's trainer of the same name does."""


def critic_free_advantages(
    estimator: str, rewards: torch.Tensor, group_size: int, scale: str, total: Total = local
) -> tuple[torch.Tensor, float]:
    """(advantages (B,), the share of groups whose rewards all tie): the estimator's baseline subtracted, then
    its scaling (ADVANTAGE_SCALES). A group whose rewards tie gets zero advantage."""
    advantages = GROUP_BASELINES[estimator](rewards, group_size)
    advantages = ADVANTAGE_SCALES[estimator](advantages, rewards, group_size, scale, total)
    stds = group_std(rewards, group_size)[::group_size]  # one per group
    tied = torch.isclose(stds, torch.zeros_like(stds)).float()
    share = (total(tied.sum()) / total(torch.tensor(float(tied.numel()), dtype=tied.dtype))).item()
    return advantages, share


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate k3 = exp(r) - r - 1 with r = logp_ref - logp_policy
    (Schulman 2020; GRPO's KL loss): never negative, unbiased, low variance. (B, T) -> (B, T).

    `mask` zeroes r before the exp: past a response's EOS the log-probs are padding's, and one below about
    -88 would make exp(r) infinite and inf x 0 = NaN."""
    log_ratio = reference_logprobs - logprobs
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    return torch.exp(log_ratio) - log_ratio - 1


def token_share(values: torch.Tensor, mask: torch.Tensor, token_count: torch.Tensor | float | None) -> torch.Tensor:
    """Sum of `values` over real tokens divided by `token_count` (default: this batch's real tokens): the
    masked mean, or a process's share of the mean over every process's tokens."""
    count = mask.sum() if token_count is None else torch.as_tensor(token_count, dtype=values.dtype)
    return (values * mask).sum() / count.clamp(min=1)


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    token_count: torch.Tensor | float | None = None,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate objective (as a loss to minimise), with clip fraction and approximate KL; the
    ratio is clipped to [1 - clip_range, 1 + clip_high] (clip_high: clip_range when None).

    With `token_count` (the minibatch's real tokens on all processes) the loss and both statistics are this
    process's shares: summed over processes they are the minibatch's means."""
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_range if clip_high is None else clip_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = token_share(torch.maximum(unclipped, clipped), mask, token_count)
    stats = {
        "policy/clipfrac": token_share((clipped > unclipped).float(), mask, token_count).item(),
        "policy/approxkl": 0.5 * token_share(log_ratio.detach() ** 2, mask, token_count).item(),
    }
    return loss, stats


# ------------------------------------------------------------------------- critic-free policy losses
@dataclass(frozen=True)
class Counts:
    """What a minibatch's loss is a mean over, counted on every process: each process's loss is then its share,
    and the gradients summed over processes are those of one process holding the whole minibatch."""

    tokens: float
    """Real response tokens."""
    sequences: float
    """Responses."""
    processes: int = 1
    """Parts the minibatch is computed in: processes x micro-batches per process (bnpo's per-part means add
    up to their mean)."""
    max_tokens: int = 1
    """The longest response that can be sampled (dr_grpo divides by it as if every response had that length)."""


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss, -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), with the
    importance ratio r = exp(log_ratio); and where the clip acted: r below its range with A < 0 (low), above
    it with A > 0 (high). Any matching shapes."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = -torch.minimum(ratio * advantages, clipped * advantages)
    return losses, (ratio < 1.0 - clip_low) & (advantages < 0), (ratio > 1.0 + clip_high) & (advantages > 0)


def _per_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, counts: Counts) -> torch.Tensor:
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / counts.sequences


def _per_batch_token_mean(per_token: torch.Tensor, mask: torch.Tensor, counts: Counts) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1) / counts.processes


def _constant_length(per_token: torch.Tensor, mask: torch.Tensor, counts: Counts) -> torch.Tensor:
    return (per_token * mask).sum() / (counts.sequences * counts.max_tokens)


def _global_token_mean(per_token: torch.Tensor, mask: torch.Tensor, counts: Counts) -> torch.Tensor:
    return (per_token * mask).sum() / counts.tokens


LOSS_AGGREGATIONS = {
    "grpo": _per_sequence_mean,
    "bnpo": _per_batch_token_mean,
    "dr_grpo": _constant_length,
    "dapo": _global_token_mean,
}
"""How a token-level policy loss becomes one number, as TRL's GRPO `loss_type`: grpo, the mean over responses
of each response's token mean (the GRPO paper); bnpo, the token mean of each process's batch; dr_grpo, the
token sum over (responses x max_new_tokens) (Liu et al. 2025); dapo, the token mean over the minibatch on
every process (Yu et al. 2025; TRL's default)."""


def token_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    counts: Counts,
    loss_type: str = "dapo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_bias_correction: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss (TRL's `GRPOTrainer._compute_loss`): the clipped objective per token with one advantage per
    response ((B,) `advantages`), plus beta x the per-token `kl` (k3) when given, aggregated by `loss_type`
    (LOSS_AGGREGATIONS). With `kl_bias_correction` (TRL's default, use_bias_correction_kl) each token's KL is
    weighted by its importance ratio, gradient included: the KL of the current policy, estimated from samples
    of the old one. Returns this process's share of the loss and of its statistics."""
    log_ratio = torch.where(mask.bool(), new_logprobs - old_logprobs, torch.zeros_like(new_logprobs))
    per_token, low, high = clipped_surrogate(log_ratio, advantages.unsqueeze(1), clip_low, clip_high)
    if kl is not None and beta:
        per_token = per_token + beta * (kl * torch.exp(log_ratio) if kl_bias_correction else kl)
    loss = LOSS_AGGREGATIONS[loss_type](per_token, mask, counts)
    stats = {
        "policy/clipfrac": token_share((low | high).float(), mask, counts.tokens).item(),
        "policy/clip_ratio/low": token_share(low.float(), mask, counts.tokens).item(),
        "policy/clip_ratio/high": token_share(high.float(), mask, counts.tokens).item(),
        "policy/approxkl": 0.5 * token_share(log_ratio.detach() ** 2, mask, counts.tokens).item(),
    }
    return loss, stats


def sequence_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    counts: Counts,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO's loss (TRL's `RLOOTrainer._compute_loss`): one importance ratio per response, exp of the summed
    per-token log-ratios, clipped, times its advantage; the mean over responses. (B, T), (B,) -> this
    process's share of the loss and of its statistics."""
    log_ratio = torch.where(mask.bool(), new_logprobs - old_logprobs, torch.zeros_like(new_logprobs)).sum(1)
    per_sequence, low, high = clipped_surrogate(log_ratio, advantages, clip_low, clip_high)
    share = 1.0 / counts.sequences
    stats = {
        "policy/clipfrac": ((low | high).float().sum() * share).item(),
        "policy/clip_ratio/low": (low.float().sum() * share).item(),
        "policy/clip_ratio/high": (high.float().sum() * share).item(),
        "policy/approxkl": (0.5 * (log_ratio.detach() ** 2).sum() * share).item(),
    }
    return per_sequence.sum() * share, stats


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    token_count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within clip_range of the old V.
    `token_count` as in `policy_loss`."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_range, clip_range)
    losses = torch.maximum((new_values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * token_share(losses, mask, token_count)
    clipped = ((new_values - returns) ** 2 < (clipped_values - returns) ** 2).float()
    return loss, {"value/clipfrac": token_share(clipped, mask, token_count).item()}


def correlation(x: torch.Tensor, y: torch.Tensor, total: Total = local) -> float:
    """Pearson correlation of two (B,) tensors over every process's rows (0 when either is constant: no
    relation to measure, and a finite number for every logger): e.g. of rollout scores with response lengths,
    the first sign that a policy learns length rather than content."""
    x, y = x.double(), y.double()
    n = total(torch.tensor(float(len(x)), dtype=torch.float64, device=x.device))
    mean_x, mean_y = total(x.sum()) / n, total(y.sum()) / n
    covariance = total(((x - mean_x) * (y - mean_y)).sum())
    spread = (total(((x - mean_x) ** 2).sum()) * total(((y - mean_y) ** 2).sum())).sqrt()
    return float(covariance / spread) if spread > 0 else 0.0


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, total: Total = local) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the return the value function predicts."""
    var_returns = masked_var(returns, mask, total=total)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask, total=total) / var_returns).item()


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019).

    After each iteration: error = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + error / horizon. Ziegler et
    al. count the horizon in samples (beta *= 1 + error * batch / horizon, with batches of 512 and a horizon
    of 10,000: about 1% per batch at most); counted in iterations, beta moves as fast whatever the batch and
    the number of processes: up to 4% per iteration at the default horizon of 5. `current_kl` is the mean
    per-response KL over every process's rollouts, so all processes keep the same beta.
    """

    beta: float
    target: float | None = None
    horizon: int = 5

    def update(self, current_kl: float) -> None:
        """Move beta after an iteration whose mean per-response KL was `current_kl` (no-op when fixed)."""
        if self.target is None or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error / self.horizon

    def state_dict(self) -> dict:
        """What a checkpoint stores."""
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint."""
        self.beta, self.target, self.horizon = state["beta"], state["target"], state["horizon"]


def truncate_after_eos(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (through the first EOS) and whether each response has an EOS.

    tokens: (B, T) generated ids. Returns (mask (B, T) float, ended_with_eos (B,) bool).
    """
    is_eos = tokens == eos_id
    ended = is_eos.any(1)
    first_eos = torch.where(
        ended, is_eos.float().argmax(1), torch.full_like(ended, tokens.shape[1] - 1, dtype=torch.long)
    )
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    mask = (positions <= first_eos.unsqueeze(1)).float()
    return mask, ended
