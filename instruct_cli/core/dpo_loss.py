"""The maths of direct preference optimisation, as pure functions on per-sequence log-probabilities.

Owns: the per-pair losses and implicit rewards of each DPO loss (`pair_losses`, by `LOSS_FUNCTIONS`; what
else each loss needs is in methods.DPO_LOSSES), and their per-prompt weighted summaries (`weighted_mean`,
`reward_stats`). No model, no data: the step (steps/dpo.py) supplies the log-probs.

With x = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)) and eps the label
smoothing, the per-pair losses are TRL 1.x's `DPOTrainer` formulas:

    sigmoid  -log sigmoid(beta x)                                                    (DPO, Rafailov et al.)
    ipo      (x - 1 / (2 beta)) ** 2, x from mean log-probs per token                (IPO, Azar et al. eq. 17)
    robust   ((1 - eps) * -log sigmoid(beta x) + eps * log sigmoid(-beta x)) / (1 - 2 eps)
                                                             (robust DPO, Chowdhury et al.: unbiased under flips)
    hinge    max(0, 1 - beta x)                                                      (SLiC, Zhao et al.)

Log-probs are summed over the response's tokens (its EOS included). IPO compares the MEAN log-prob per token
(its x is the sum's divided by each response's token count), as TRL does: IPO regresses x onto the fixed
target 1 / (2 beta), and a summed log-ratio grows with length. Whatever the loss, the implicit reward of a
response is beta * (log pi - log ref) of the SUMS, so accuracy and margins read the same for every loss (as
TRL reports them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from instruct_cli.core.methods import DPO_LOSSES


class PairTerms(NamedTuple):
    """Per preference pair, shape (P,) each."""

    losses: torch.Tensor
    """The loss of each pair (before weighting)."""
    chosen_rewards: torch.Tensor
    """beta * (log pi - log ref) of the preferred response (detached)."""
    rejected_rewards: torch.Tensor
    """beta * (log pi - log ref) of the other response (detached)."""


def pair_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PairTerms:
    """The loss and the implicit rewards of each pair, from (P,) summed log-probs of the policy and the
    reference, and each response's answer tokens (for a length-normalised loss; None counts 1)."""
    if loss_type not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {tuple(LOSS_FUNCTIONS)}")
    # log-ratios in the inputs' precision (sums of many tokens may come as fp64), the loss in fp32
    chosen_ratio = (policy_chosen_logps - ref_chosen_logps).float()
    rejected_ratio = (policy_rejected_logps - ref_rejected_logps).float()
    if DPO_LOSSES[loss_type].length_normalised:
        x = per_token(chosen_ratio, chosen_tokens) - per_token(rejected_ratio, rejected_tokens)
    else:
        x = chosen_ratio - rejected_ratio
    losses = LOSS_FUNCTIONS[loss_type](x, beta, label_smoothing)
    return PairTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def per_token(ratio: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """A summed log-ratio as a mean per answer token."""
    return ratio if tokens is None else ratio / tokens.clamp(min=1).to(ratio.dtype)


def sigmoid_losses(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta x) (label smoothing does not apply: TRL 1.x's sigmoid ignores it; see robust)."""
    return -F.logsigmoid(beta * x)


def ipo_losses(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO: (x - 1 / (2 beta))^2, x from mean log-probs per token."""
    return (x - 1.0 / (2.0 * beta)) ** 2


def robust_losses(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO: the sigmoid loss corrected for a share `label_smoothing` of flipped preferences."""
    clean = -(1.0 - label_smoothing) * F.logsigmoid(beta * x)
    flipped = -label_smoothing * F.logsigmoid(-beta * x)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


def hinge_losses(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC's hinge: max(0, 1 - beta x)."""
    return torch.relu(1.0 - beta * x)


LOSS_FUNCTIONS = {"sigmoid": sigmoid_losses, "ipo": ipo_losses, "robust": robust_losses, "hinge": hinge_losses}
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
