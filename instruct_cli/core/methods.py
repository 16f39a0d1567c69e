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
    policy_loss: str
    """ppo: the clipped loss per token, a token mean over the minibatch; token: GRPO's, aggregated by
    --loss-type; sequence: RLOO's, one importance ratio per response (TRL's RLOOTrainer)."""
    default_epochs: int
    """Passes over each rollout batch (--ppo-epochs) when not given."""
    default_minibatch: int | None
    """Rollouts per gradient step when --minibatch-size is not given; None: the whole rollout batch (one update
    per batch, on-policy, where clipping never acts: TRL's num_iterations=1)."""
    default_micro_batch: int | None
    """Rollouts per forward pass in the update when --micro-batch-size is not given (their gradients add up to
    the minibatch's step); None: the whole minibatch at once."""
    default_kl_coef: float
    """beta when --kl-coef is not given."""
    kl_penalties: tuple[str, ...]
    """Where the KL may go (--kl-penalty), the first being the default: reward or loss."""
    scales: tuple[str, ...]
    """The --scale-rewards it takes, the first being its default (none: it does not scale its advantages)."""

    def group_size(self, samples_per_prompt: int | None) -> int:
        """K, the responses sampled per prompt: the one given, else this estimator's default."""
        return samples_per_prompt or self.default_k


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    estimator.name: estimator
    for estimator in (
        # InstructGPT's PPO, as "The N Implementation Details of RLHF with PPO" (Huang et al. 2024)
        AdvantageEstimator(
            "gae",
            needs_critic=True,
            needs_group=False,
            default_k=1,
            min_k=1,
            policy_loss="ppo",
            default_epochs=4,
            default_minibatch=4,
            default_micro_batch=None,
            default_kl_coef=0.05,
            kl_penalties=("reward", "loss"),
            scales=(),
        ),
        # TRL 1.x's RLOOTrainer defaults: beta 0.05 in the reward, one update per batch, no scaling
        AdvantageEstimator(
            "rloo",
            needs_critic=False,
            needs_group=True,
            default_k=4,
            min_k=2,
            policy_loss="sequence",
            default_epochs=1,
            default_minibatch=None,
            default_micro_batch=4,
            default_kl_coef=0.05,
            kl_penalties=("reward", "loss"),
            scales=("none", "batch"),
        ),
        # TRL 1.x's GRPOTrainer defaults: beta 0 (KL, when asked for, in the loss), one update per batch,
        # rewards scaled by their group's std. A KL in the reward would be divided by that std too.
        AdvantageEstimator(
            "grpo",
            needs_critic=False,
            needs_group=True,
            default_k=4,
            min_k=2,
            policy_loss="token",
            default_epochs=1,
            default_minibatch=None,
            default_micro_batch=4,
            default_kl_coef=0.0,
            kl_penalties=("loss",),
            scales=("group", "batch", "none"),
        ),
    )
}


GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
"""How GRPO's per-token loss is aggregated (core/rl.py's LOSS_AGGREGATIONS), TRL's default first."""
REWARD_SCALES = ("group", "batch", "none")
"""What a critic-free advantage is divided by: its group's reward std, the batch's, or nothing."""


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
        DPOLoss("sigmoid", "sigmoid (DPO)", needs_reference=True, length_normalised=False, takes_label_smoothing=False),
        DPOLoss("ipo", "ipo (IPO)", needs_reference=True, length_normalised=True, takes_label_smoothing=False),
        DPOLoss("robust", "robust (rDPO)", needs_reference=True, length_normalised=False, takes_label_smoothing=True),
        DPOLoss("hinge", "hinge (SLiC)", needs_reference=True, length_normalised=False, takes_label_smoothing=False),
    )
}
