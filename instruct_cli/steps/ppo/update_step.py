"""Step 5 of a PPO iteration: clipped policy and value losses over several epochs of minibatches.

The policy loss is the estimator's (`policy_terms`): PPO's clipped per-token loss (gae), GRPO's with TRL's
loss types and clip-higher (grpo), or RLOO's with one importance ratio per response (rloo). Without a value
role (rloo, grpo) there is no value loss; with --kl-penalty loss the policy loss gains beta x the k3 KL to the
reference instead of the KL sitting in the reward.

Minibatch k is the same set of rollouts whatever the number of processes (trajectory.minibatch_rows: each
epoch's shuffle is drawn over the global batch from a generator seeded by (seed, iteration)). With K samples
per prompt run packed (trajectory.packs_groups) the shuffle moves whole groups of K rows. The trajectory ran
its passes in the first epoch's minibatches, laid out as the update lays them out (padded, or the same packed
rows), so the first minibatch's importance ratio is exactly 1. Each process
computes the part of the minibatch it holds, with losses divided by the minibatch's real tokens on all
processes; gradients and statistics are then summed over processes. N processes with B rollouts each
therefore take exactly the steps of one process with N x B rollouts and N x the minibatch size.

A trap worth knowing: with (non-reentrant) gradient checkpointing, the forward is recomputed during the
backward with whatever adapter is active THEN. So each role's loss is backpropagated right after its own
forward, before the next `set_adapter`.
May use: core (distributed, lm, rl), roles, trajectory.
"""

from __future__ import annotations

from typing import Callable

import torch

from instruct_cli.core import distributed, lm, rl
from instruct_cli.core.config import PPOConfig
from instruct_cli.core.methods import ADVANTAGE_ESTIMATORS
from instruct_cli.steps.ppo import trajectory as trajectory_steps
from instruct_cli.steps.ppo.roles import POLICY, Roles
from instruct_cli.steps.ppo.trajectory import Trajectory

PtxBatches = Callable[[int], dict]
"""Minibatch number -> a batch of SFT demonstrations for PPO-ptx (this process's)."""


class NonFinite(Exception):
    """A loss or reward became NaN or infinite."""


def update(
    roles: Roles,
    optimizer,
    trajectory: Trajectory,
    config: PPOConfig,
    accelerator,
    iteration: int = 0,
    ptx_batches: PtxBatches | None = None,
    beta: float = 0.0,
) -> dict[str, float]:
    """`ppo_epochs` passes of minibatches over the global batch; returns the mean of each statistic, plus the
    first minibatch's clip fraction and approximate KL (before any step: 0 when old and new log-probs agree)."""
    parameters = roles.trainable_parameters()
    total = distributed.summer(accelerator)
    # packed groups: minibatches of whole groups of K rows, shuffled as groups (K = 1: rows, as always)
    group = trajectory_steps.packed_group(roles, config)
    local = trajectory.response.shape[0]
    steps: list[dict[str, float]] = []
    for epoch in trajectory_steps.minibatch_rows(config, iteration, local, accelerator, group):
        for mine in epoch:
            mine = mine.to(trajectory.response.device)
            token_count = total(trajectory.response_mask[mine].sum())
            sequence_count = total(torch.tensor(float(len(mine)), device=trajectory.response.device))
            ptx_batch = ptx_batches(len(steps)) if ptx_batches is not None else None
            parts = trajectory_steps.micro_batches(mine, config, group) or [mine]
            stats = {}
            for number, part in enumerate(parts):  # each part's losses are its share: the gradients add up
                part_stats = update_minibatch(
                    roles,
                    trajectory.rows(part),
                    config,
                    accelerator,
                    token_count,
                    ptx_batch if number == 0 else None,
                    beta,
                    sequence_count,
                    len(parts),
                )
                stats = {name: stats.get(name, 0.0) + value for name, value in part_stats.items()}
            stats = distributed.sum_stats(accelerator, stats)
            distributed.sum_gradients(accelerator, parameters)
            stats["policy/grad_norm"] = float(accelerator.clip_grad_norm_(parameters, config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append(stats)
    means = {name: sum(step[name] for step in steps) / len(steps) for name in steps[0]}
    return {
        **means,
        "policy/first_clipfrac": steps[0]["policy/clipfrac"],
        "policy/first_approxkl": steps[0]["policy/approxkl"],
    }


def update_minibatch(
    roles: Roles,
    batch: Trajectory,
    config: PPOConfig,
    accelerator,
    token_count: torch.Tensor | None = None,
    ptx_batch: dict | None = None,
    beta: float = 0.0,
    sequence_count: torch.Tensor | None = None,
    parts: int = 1,
) -> dict[str, float]:
    """Backpropagate the policy loss (with its adapter active), then the value loss (with its own), if there
    is a value role. `beta` weighs the k3 KL term of --kl-penalty loss. The batch runs padded or packed
    (trajectory.pack_rows, trajectory.packed_group) exactly as the trajectory ran it.

    `token_count` and `sequence_count` are the minibatch's real tokens and rollouts on all processes (None:
    this batch's own): the losses are this process's shares of the minibatch's means. `parts`: how many
    micro-batches this process cuts the minibatch into (bnpo's per-part means are divided by it, as TRL
    divides by its gradient accumulation steps). A process may hold no rollout of a minibatch; it then
    contributes nothing but the PPO-ptx term."""
    stats = {"loss/policy": 0.0, "loss/value": 0.0, "policy/clipfrac": 0.0, "policy/approxkl": 0.0}
    if roles.has_value:
        stats["value/clipfrac"] = 0.0
    else:
        del stats["loss/value"]
    if config.kl_penalty == "loss":
        stats["loss/kl"] = 0.0
    share = 1.0 / accelerator.num_processes  # of the ptx loss, a mean over processes
    if len(batch.response) > 0:
        chunk = (batch.query, batch.query_mask, batch.response, batch.response_mask)
        group = trajectory_steps.packed_group(roles, config)
        packed = trajectory_steps.pack_rows(*chunk, group) if trajectory_steps.packs(roles, config) else None
        with accelerator.autocast():
            new_logprobs, _ = trajectory_steps.response_logprobs(roles, POLICY, *chunk, config.temperature, packed)
            pg_loss, pg_stats, kl_loss = policy_terms(
                new_logprobs, batch, config, accelerator, token_count, sequence_count, beta, parts
            )
            loss = pg_loss + (ptx_term(roles, ptx_batch, config, share, stats) if ptx_batch is not None else 0.0)
            if kl_loss is not None:
                stats["loss/kl"] = kl_loss.item()
        check_finite(loss, "policy loss")
        accelerator.backward(loss)
        stats.update({"loss/policy": pg_loss.item(), **pg_stats})
        if roles.has_value:
            with accelerator.autocast():
                new_values = trajectory_steps.response_values(roles, *chunk, packed)
                vf_loss, vf_stats = rl.value_loss(
                    new_values, batch.values, batch.returns, batch.response_mask, config.value_clip_range, token_count
                )
            check_finite(vf_loss, "value loss")
            accelerator.backward(config.vf_coef * vf_loss)
            stats.update({"loss/value": vf_loss.item(), **vf_stats})
    elif ptx_batch is not None:
        with accelerator.autocast():
            loss = ptx_term(roles, ptx_batch, config, share, stats)
        accelerator.backward(loss)
    return stats


def policy_terms(
    new_logprobs: torch.Tensor,
    batch: Trajectory,
    config: PPOConfig,
    accelerator,
    token_count: torch.Tensor | None,
    sequence_count: torch.Tensor | None,
    beta: float,
    parts: int = 1,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
    """(the policy loss with its KL term, if any; its statistics; the mean k3 KL, when --kl-penalty loss), by
    the estimator's policy loss (methods.ADVANTAGE_ESTIMATORS): ppo's per-token clipped loss with the KL added
    as beta x its token mean; GRPO's, the KL inside each token's loss before --loss-type aggregates them (as
    TRL); RLOO's sequence-level one, the KL added as for ppo."""
    mask = batch.response_mask
    kl = rl.k3_kl(new_logprobs, batch.ref_logprobs, mask) if config.kl_penalty == "loss" and beta else None
    kl_loss = rl.token_share(kl, mask, token_count) if kl is not None else None
    kind = ADVANTAGE_ESTIMATORS[config.advantage].policy_loss
    if kind == "ppo":
        loss, stats = rl.policy_loss(
            new_logprobs, batch.logprobs, batch.advantages, mask, config.clip_range, token_count, config.clip_range_high
        )
        return (loss + beta * kl_loss if kl_loss is not None else loss), stats, kl_loss
    counts = rl.Counts(
        tokens=mask.sum() if token_count is None else token_count,
        sequences=float(len(mask)) if sequence_count is None else sequence_count,
        processes=accelerator.num_processes * parts,
        max_tokens=config.max_new_tokens,
    )
    per_response = (batch.advantages * mask).sum(1) / mask.sum(1).clamp(min=1)  # the same at each token
    clip = (config.clip_range, config.clip_range_high)
    if kind == "token":
        loss, stats = rl.token_policy_loss(
            new_logprobs, batch.logprobs, per_response, mask, counts, config.loss_type, *clip, kl, beta
        )
        return loss, stats, kl_loss
    loss, stats = rl.sequence_policy_loss(new_logprobs, batch.logprobs, per_response, mask, counts, *clip)
    return (loss + beta * kl_loss if kl_loss is not None else loss), stats, kl_loss


def ptx_term(roles: Roles, ptx_batch: dict, config: PPOConfig, share: float, stats: dict) -> torch.Tensor:
    """PPO-ptx: `ptx_coef` x the SFT loss on demonstrations, as this process's share of the mean over
    processes (the policy adapter is active); logs loss/ptx."""
    roles.use(POLICY)
    ptx_loss, _ = lm.sft_loss(roles.model, ptx_batch)
    check_finite(ptx_loss, "ptx loss")
    stats["loss/ptx"] = ptx_loss.item() * share
    return config.ptx_coef * ptx_loss * share


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop on NaN/inf with a clear message (the last good checkpoint stays on disk)."""
    if not torch.isfinite(value).all():
        raise NonFinite(what)
