"""Steps 1-4 of a PPO iteration: the trajectory the update learns from.

    1. rollout     sample responses for a batch of prompts (left padding, KV cache, temperature T), cut at EOS
    2. score       reward role on prompt + response at the last real token; penalty when there is no EOS
    3. KL          per-token logp_policy - logp_reference (both at temperature T); reward shaping with beta
    4. advantages  GAE with the value role, advantages whitened

Every forward here runs under the same autocast as the update's (`accelerator.autocast()`): the update's
first importance ratio is then exactly 1 on a bf16 GPU too, not only in fp32. Sampling is exactly
softmax(logits / T) (core/sampling.py sets the model's generation_config aside). In a data-parallel run each
process holds its share of the rollouts; whitening and the logged statistics cover every process's share.
May use: core (heads, rl, sampling, distributed), roles.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from instruct_cli.core import distributed, heads, rl, sampling
from instruct_cli.core.config import PPOConfig
from instruct_cli.steps.ppo.roles import POLICY, REFERENCE, REWARD, VALUE, Roles


class Rollout(NamedTuple):
    """Step 1's output. B = prompts, P = prompt tokens, T = response tokens."""

    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response: torch.Tensor  # (B, T) sampled ids (pad after the EOS)
    response_mask: torch.Tensor  # (B, T) float, 1 through the first EOS
    ended: torch.Tensor  # (B,) bool: the response has an EOS

    def rows(self, index) -> "Rollout":
        """The rollouts `index` (a slice or index tensor)."""
        return Rollout(*(field[index] for field in self))


class Trajectory(NamedTuple):
    """One rollout batch and what PPO derives from it. B = prompts, P = prompt tokens, T = response tokens."""

    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response: torch.Tensor  # (B, T) sampled ids (pad after the EOS)
    response_mask: torch.Tensor  # (B, T) float, 1 through the first EOS
    ended: torch.Tensor  # (B,) bool: the response has an EOS
    logprobs: torch.Tensor  # (B, T) policy log-probs at rollout time (temperature T)
    ref_logprobs: torch.Tensor  # (B, T) reference log-probs (temperature T)
    values: torch.Tensor  # (B, T) value estimates at rollout time
    scores: torch.Tensor  # (B,) normalised reward-model score, EOS penalty applied
    kl: torch.Tensor  # (B, T) per-token KL estimate
    advantages: torch.Tensor  # (B, T) GAE advantages, whitened over every process's rollouts
    returns: torch.Tensor  # (B, T) GAE returns (value targets)

    def rows(self, index: torch.Tensor) -> "Trajectory":
        """The minibatch of rollouts `index`."""
        return Trajectory(*(field[index] for field in self))


# -------------------------------------------------------------------------------------- 1. rollout
@torch.no_grad()
def rollout(roles: Roles, tokenizer, prompts: list[list[int]], config: PPOConfig, accelerator) -> Rollout:
    """Sample one response per prompt with the policy, from exactly softmax(logits / T)."""
    roles.use(POLICY)
    roles.model.eval()
    device = roles.value_head.weight.device
    query, query_mask = sampling.left_pad(
        [p[-config.max_prompt_length :] for p in prompts], tokenizer.pad_token_id, device
    )
    with accelerator.autocast():
        output = sampling.sample(
            roles.model,
            tokenizer,
            query,
            query_mask,
            do_sample=True,
            temperature=config.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=config.max_new_tokens,
            use_cache=True,
        )
    response = output[:, query.shape[1] :]
    response_mask, ended = rl.truncate_after_eos(response, tokenizer.eos_token_id)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    roles.model.train()
    return Rollout(query, query_mask, response, response_mask, ended)


# ---------------------------------------------------------------------------------------- 2. score
@torch.no_grad()
def score(roles: Roles, rollout: Rollout, penalty: float) -> torch.Tensor:
    """Normalised reward of each prompt + response, read at its last real token; minus `penalty` if no EOS."""
    roles.use(REWARD)
    input_ids, attention_mask, _ = sampling.sequences(
        rollout.query, rollout.query_mask, rollout.response, rollout.response_mask
    )
    raw = heads.sequence_scores(roles.model, roles.reward_head, input_ids, attention_mask).float()
    return roles.reward_gain * raw + roles.reward_bias - penalty * (~rollout.ended).float()


# ------------------------------------------------------------------------------- 3. log-probs and KL
def response_logits(roles: Roles, role: str, query, query_mask, response, response_mask) -> torch.Tensor:
    """Logits that predict each response token under `role`: (B, T, V). Only the last T+1 positions are
    projected to the vocabulary."""
    roles.use(role)
    input_ids, attention_mask, position_ids = sampling.sequences(query, query_mask, response, response_mask)
    steps = response.shape[1]
    output = roles.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=steps + 1,
        use_cache=False,
    )
    return output.logits[:, :-1]


# -------------------------------------------------------------------------------------- 4. values
def response_values(roles: Roles, query, query_mask, response, response_mask) -> torch.Tensor:
    """Value estimates at the state before each response token (value role + fp32 value head): (B, T)."""
    roles.use(VALUE)
    input_ids, attention_mask, _ = sampling.sequences(query, query_mask, response, response_mask)
    hidden = heads.last_hidden_states(roles.model, input_ids, attention_mask)
    steps = response.shape[1]
    return roles.value_head(hidden[:, -steps - 1 : -1]).squeeze(-1).float()


@torch.no_grad()
def make_trajectory(
    roles: Roles, rollout: Rollout, config: PPOConfig, beta: float, accelerator
) -> tuple[Trajectory, dict[str, float]]:
    """Steps 2-4 for this process's rollouts: the trajectory the update learns from, and the iteration's
    statistics over every process's rollouts."""
    total = distributed.summer(accelerator)
    query, query_mask, response, mask, ended = rollout
    began = time.perf_counter()
    with accelerator.autocast():
        scores = score(roles, rollout, config.missing_eos_penalty)
        scored = time.perf_counter()
        # log-probs, entropy and values in chunks of a minibatch: full-vocabulary logits for the whole rollout
        # batch at once would be the largest tensor of the run (B x T x vocab floats)
        logprobs, ref_logprobs, values, entropies = [], [], [], []
        for rows in torch.arange(len(query), device=query.device).split(config.minibatch_size):
            chunk = (query[rows], query_mask[rows], response[rows], mask[rows])
            policy_logits = response_logits(roles, POLICY, *chunk)
            logprobs.append(rl.token_logprobs(policy_logits, response[rows], config.temperature) * mask[rows])
            entropies.append(rl.entropy_from_logits(policy_logits, config.temperature))
            del policy_logits
            reference_logits = response_logits(roles, REFERENCE, *chunk)
            ref_logprobs.append(rl.token_logprobs(reference_logits, response[rows], config.temperature) * mask[rows])
            del reference_logits
            values.append(response_values(roles, *chunk) * mask[rows])
    logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
    measured = time.perf_counter()
    rewards, kl = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, beta)
    advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
    advantages = rl.whiten(advantages, mask, total=total)
    trajectory = Trajectory(
        query, query_mask, response, mask, ended, logprobs, ref_logprobs, values, scores, kl, advantages, returns
    )
    rollouts = total(torch.tensor(float(len(query)), device=query.device))
    stats = {
        "objective/score": (total(scores.sum()) / rollouts).item(),
        "objective/kl": (total(kl.sum()) / rollouts).item(),
        "objective/entropy": rl.masked_mean(torch.cat(entropies), mask, total=total).item(),
        "val/explained_variance": rl.explained_variance(values, returns, mask, total=total),
        "response/length": (total(mask.sum()) / rollouts).item(),
        "response/eos_rate": (total(ended.float().sum()) / rollouts).item(),
        "time/score": scored - began,
        "time/logprobs": measured - scored,  # policy, reference and values
    }
    return trajectory, stats
