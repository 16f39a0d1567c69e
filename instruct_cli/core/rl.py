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


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each response's reward minus its group's mean, divided by the group's
    (unbiased) standard deviation + eps. Groups as in `rloo_advantages`; returns (B,)."""
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)).reshape(-1)


GROUP_ADVANTAGES = {"rloo": rloo_advantages, "grpo": grpo_advantages}
"""The per-response advantages of each critic-free estimator (methods.ADVANTAGE_ESTIMATORS)."""


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate k3 = exp(r) - r - 1 with r = logp_ref - logp_policy
    (Schulman 2020; GRPO's KL loss): never negative, unbiased, low variance. (B, T) -> (B, T)."""
    log_ratio = reference_logprobs - logprobs
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
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate objective (as a loss to minimise), with clip fraction and approximate KL.

    With `token_count` (the minibatch's real tokens on all processes) the loss and both statistics are this
    process's shares: summed over processes they are the minibatch's means."""
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_share(torch.maximum(unclipped, clipped), mask, token_count)
    stats = {
        "policy/clipfrac": token_share((clipped > unclipped).float(), mask, token_count).item(),
        "policy/approxkl": 0.5 * token_share(log_ratio.detach() ** 2, mask, token_count).item(),
    }
    return loss, stats


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
