"""The variation points of the training methods, as tables: advantage estimators (ppo's --advantage) and
DPO losses (dpo's --loss).

Each row says what the rest of the code needs to know about a method — whether it needs a value function,
a group of samples per prompt, a reference model — so that no other module re-derives it from the method's
name. The maths lives in core/rl.py and core/dpo_loss.py, each with its own table of functions keyed by the
same names. This module imports no torch: the config (and so `--help`) reads its choices from here.
May use: nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdvantageEstimator:
    """How ppo turns rewards into advantages."""

    name: str
    needs_critic: bool
    """Trains a value function (the value adapter and head); without one they are not loaded at all."""
    needs_group: bool
    """Compares several responses to the same prompt (K consecutive rollouts per prompt)."""
    default_k: int
    """Responses per prompt when --samples-per-prompt is not given."""
    min_k: int
    """Fewest responses per prompt it can work with."""

    def group_size(self, samples_per_prompt: int | None) -> int:
        """K, the responses sampled per prompt: the one given, else this estimator's default."""
        return samples_per_prompt or self.default_k


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    estimator.name: estimator
    for estimator in (
        AdvantageEstimator("gae", needs_critic=True, needs_group=False, default_k=1, min_k=1),
        AdvantageEstimator("rloo", needs_critic=False, needs_group=True, default_k=4, min_k=2),
        AdvantageEstimator("grpo", needs_critic=False, needs_group=True, default_k=4, min_k=2),
    )
}


@dataclass(frozen=True)
class DPOLoss:
    """How dpo turns the policy's and the reference's log-ratios into a loss."""

    name: str
    title: str
    """The name and the method it is, as messages spell it: sigmoid (DPO)."""
    needs_reference: bool
    """Compares with the frozen starting model (all of today's losses do; SimPO-like ones would not)."""
    length_normalised: bool
    """Compares the mean log-prob per response token instead of the sum."""
    takes_label_smoothing: bool
    """--label-smoothing changes it."""


DPO_LOSSES: dict[str, DPOLoss] = {
    loss.name: loss
    for loss in (
        DPOLoss("sigmoid", "sigmoid (DPO)", needs_reference=True, length_normalised=False, takes_label_smoothing=True),
        DPOLoss("ipo", "ipo (IPO)", needs_reference=True, length_normalised=True, takes_label_smoothing=False),
    )
}
