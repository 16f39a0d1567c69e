"""The maths of PPO for language models, as small pure functions on tensors (tested against hand values).

Shapes: B = rollouts in the batch, T = response tokens (right-padded). `mask` is 1.0 on real response
tokens (up to and including the EOS) and 0.0 after, so every mean below is over real tokens only.
References: Ouyang et al. 2022 (InstructGPT); Ziegler et al. 2019 (adaptive KL); Huang et al. 2024,
"The N Implementation Details of RLHF with PPO" (whitening, clipping, EOS handling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of `values` where `mask` is 1."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to zero mean and unit variance over the masked entries (the mean kept if not shift_mean)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
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


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate objective (as a loss to minimise), with clip fraction and approximate KL."""
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
        "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask).item(),
    }
    return loss, stats


def value_loss(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within clip_range of the old V."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_range, clip_range)
    losses = torch.maximum((new_values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(losses, mask)
    return loss, {
        "value/clipfrac": masked_mean(
            ((new_values - returns) ** 2 < (clipped_values - returns) ** 2).float(), mask
        ).item()
    }


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the return the value function predicts."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019).

    After each batch: error = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + error * batch_size / horizon.
    """

    beta: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, batch_size: int) -> None:
        """Move beta after a batch whose mean per-sequence KL was `current_kl` (no-op when fixed)."""
        if self.target is None or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * batch_size / self.horizon

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
