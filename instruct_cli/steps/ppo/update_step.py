"""Step 5 of a PPO iteration: clipped policy and value losses over several epochs of minibatches.

Without a value role (--advantage rloo/grpo) there is no value loss; with --kl-penalty loss the policy loss
gains beta x the mean k3 KL to the reference (GRPO's form) instead of the KL sitting in the reward.

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
            ptx_batch = ptx_batches(len(steps)) if ptx_batches is not None else None
            stats = update_minibatch(roles, trajectory.rows(mine), config, accelerator, token_count, ptx_batch, beta)
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
) -> dict[str, float]:
    """Backpropagate the policy loss (with its adapter active), then the value loss (with its own), if there
    is a value role. `beta` weighs the k3 KL term of --kl-penalty loss. The batch runs padded or packed
    (trajectory.pack_rows, trajectory.packed_group) exactly as the trajectory ran it.

    `token_count` is the minibatch's real tokens on all processes (None: this batch's own): the losses are
    this process's shares of the minibatch's means. A process may hold no rollout of a minibatch; it then
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
            pg_loss, pg_stats = rl.policy_loss(
                new_logprobs, batch.logprobs, batch.advantages, batch.response_mask, config.clip_range, token_count
            )
            loss = pg_loss + (ptx_term(roles, ptx_batch, config, share, stats) if ptx_batch is not None else 0.0)
            if config.kl_penalty == "loss":
                kl_loss = rl.token_share(rl.k3_kl(new_logprobs, batch.ref_logprobs), batch.response_mask, token_count)
                loss = loss + beta * kl_loss
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
