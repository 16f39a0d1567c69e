"""The maths of direct preference optimisation, as pure functions on per-sequence log-probabilities.

Owns: the sequence log-probability each loss compares (`compared_logps`), the per-pair losses and implicit
rewards of DPO, conservative DPO and IPO (`pair_losses`), and their per-prompt weighted summaries
(`weighted_mean`, `reward_stats`). No model, no data: the step (steps/dpo.py) supplies the log-probs.

With x = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)), the per-pair losses are

    sigmoid  -(1 - eps) * log sigmoid(beta * x) - eps * log sigmoid(-beta * x)    (DPO; eps > 0: cDPO)
    ipo      (x - 1 / (2 * beta)) ** 2                                          (IPO, eq. 17 of Azar et al.)

and the implicit reward of a response is beta * (log pi - log ref). These are TRL's `DPOTrainer` formulas.
DPO compares log-probs summed over the response's tokens (its EOS included). IPO compares the MEAN log-prob
per token, as TRL does: IPO regresses x onto the fixed target 1 / (2 beta), and a summed log-ratio grows
with the response's length, so the same target would ask long pairs for a much smaller per-token change than
short ones; the mean makes the target mean the same for every pair (and keeps TRL's beta values valid here).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from instruct_cli.core.methods import DPO_LOSSES

LOSS_TYPES = tuple(DPO_LOSSES)


class PairTerms(NamedTuple):
    """Per preference pair, shape (P,) each."""

    losses: torch.Tensor
    """The loss of each pair (before weighting)."""
    chosen_rewards: torch.Tensor
    """beta * (log pi - log ref) of the preferred response (detached)."""
    rejected_rewards: torch.Tensor
    """beta * (log pi - log ref) of the other response (detached)."""


def compared_logps(logp_sums: torch.Tensor, token_counts: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The sequence log-prob a loss compares: the sum over response tokens (sigmoid), or its mean per token
    (ipo; see the module docstring)."""
    if DPO_LOSSES[loss_type].length_normalised:
        return logp_sums / token_counts.clamp(min=1).to(logp_sums.dtype)
    return logp_sums


def pair_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PairTerms:
    """The loss and the implicit rewards of each pair, from (P,) log-probs of the policy and the reference."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {LOSS_TYPES}")
    # log-ratios in the inputs' precision (sums of many tokens may come as fp64), the loss in fp32
    chosen_ratio = (policy_chosen_logps - ref_chosen_logps).float()
    rejected_ratio = (policy_rejected_logps - ref_rejected_logps).float()
    x = chosen_ratio - rejected_ratio
    losses = LOSS_FUNCTIONS[loss_type](x, beta, label_smoothing)
    return PairTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def sigmoid_losses(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta x); with label smoothing eps, conservative DPO (see the module docstring)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)


def ipo_losses(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO: (x - 1 / (2 beta))^2."""
    return (x - 1.0 / (2.0 * beta)) ** 2


LOSS_FUNCTIONS = {"sigmoid": sigmoid_losses, "ipo": ipo_losses}
"""Per-pair loss of each DPO loss (methods.DPO_LOSSES says what else each one needs)."""


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w * v) / sum(w); with rm's pair weights (1 / pairs of the prompt) each prompt counts once."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (weights * values).sum() / weights.sum().clamp(min=1e-12)


def reward_stats(terms: PairTerms, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Weighted means of the implicit rewards: reward accuracy (chosen above rejected, strictly), the chosen
    and rejected rewards, and their margin."""
    chosen, rejected = terms.chosen_rewards, terms.rejected_rewards
    return {
        "accuracy": float(weighted_mean((chosen > rejected).float(), weights)),
        "chosen_reward": float(weighted_mean(chosen, weights)),
        "rejected_reward": float(weighted_mean(rejected, weights)),
        "margin": float(weighted_mean(chosen - rejected, weights)),
    }
