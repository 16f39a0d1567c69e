"""Steps 1-4 of a PPO iteration: the trajectory the update learns from.

    1. rollout     sample responses for a batch of prompts (left padding, KV cache, temperature T), cut at EOS
    2. score       reward role on prompt + response at the last real token, plus a user's reward function if
                   given; penalty when there is no EOS
    3. KL          per-token logp_policy - logp_reference (both at temperature T); reward shaping with beta
                   (unless --kl-penalty loss: then the update adds beta x k3 to the policy loss instead)
    4. advantages  gae: GAE with the value role, whitened. rloo / grpo (no value role): one reward per
                   response, compared with the other responses to the same prompt (K consecutive rows)

When K > 1 responses share a prompt, the reward pass scores each prompt's responses as one packed row
(core/packing.py: the prompt once), and so do the policy and reference passes when minibatches hold whole
groups (`packs_groups`; the update then runs them alike). Every forward here runs under the same autocast
as the update's (`accelerator.autocast()`): the update's first importance ratio is then exactly 1 on a bf16
GPU too, not only in fp32. Sampling is exactly softmax(logits / T) (core/sampling.py sets the model's
generation_config aside). In a data-parallel run each process holds its share of the rollouts; whitening and
the logged statistics cover every process's share.
May use: core (heads, lora_merge, packing, rl, sampling, distributed), roles.
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch

from instruct_cli.core import distributed, heads, lora_merge, packing, rl, sampling
from instruct_cli.core.config import PPOConfig
from instruct_cli.core.reward_functions import RewardFunction
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
    values: torch.Tensor  # (B, T) value estimates at rollout time (0 without a value role)
    scores: torch.Tensor  # (B,) normalised reward-model score (+ reward function), EOS penalty applied
    kl: torch.Tensor  # (B, T) per-token KL estimate
    advantages: torch.Tensor  # (B, T) gae: whitened over every process's rollouts; rloo/grpo: per response
    returns: torch.Tensor  # (B, T) GAE returns (value targets; 0 without a value role)

    def rows(self, index: torch.Tensor) -> "Trajectory":
        """The minibatch of rollouts `index`."""
        return Trajectory(*(field[index] for field in self))


# -------------------------------------------------------------------------------------- 1. rollout
@torch.no_grad()
def rollout(roles: Roles, tokenizer, prompts: list[list[int]], config: PPOConfig, accelerator) -> Rollout:
    """Sample one response per prompt with the policy, from exactly softmax(logits / T); with
    --merged-rollouts (and an unquantised base) the policy adapter is folded into the weights meanwhile."""
    roles.use(POLICY)
    roles.model.eval()
    device = roles.device
    query, query_mask = sampling.left_pad(
        [p[-config.max_prompt_length :] for p in prompts], tokenizer.pad_token_id, device
    )
    with sampling_weights(roles, config), accelerator.autocast():
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


def sampling_weights(roles: Roles, config: PPOConfig):
    """The weights rollouts sample with: the active (policy) adapter folded into the base
    (core/lora_merge.py: bit-identical base afterwards), or as they are with --no-merged-rollouts or a base
    that cannot be merged (see `merged_rollouts_blocker`)."""
    if merged_rollouts_blocker(roles, config) is not None:
        return contextlib.nullcontext()
    return lora_merge.merged_adapter(roles.model, roles.model.active_adapter)


def merged_rollouts_blocker(roles: Roles, config: PPOConfig) -> str | None:
    """Why rollouts sample with the adapter unmerged (a few words), or None when they sample merged."""
    if not config.merged_rollouts:
        return "--no-merged-rollouts"
    return roles.merge_blocker


# ---------------------------------------------------------------------------------------- 2. score
class FunctionReward(NamedTuple):
    """A user's reward function (--reward-fn) with its weight, and the tokenizer that decodes responses."""

    function: RewardFunction
    weight: float
    tokenizer: object

    def __call__(self, prompts: list[list[dict]], rollout: Rollout) -> torch.Tensor:
        """weight x the function's rewards for the rollouts of `prompts` (message lists): (B,)."""
        responses = [
            self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
            for ids, mask in zip(rollout.response, rollout.response_mask)
        ]
        rewards = self.function.scores(prompts, responses)
        return self.weight * torch.tensor(rewards, dtype=torch.float32, device=rollout.response.device)


@torch.no_grad()
def score(
    roles: Roles,
    rollout: Rollout,
    penalty: float,
    function_reward: FunctionReward | None = None,
    prompts: list[list[dict]] | None = None,
) -> torch.Tensor:
    """Score of each prompt + response: the reward model's normalised reward read at the last real token
    (if there is a reward model), plus the weighted reward function of `prompts` (if given); minus `penalty`
    if there is no EOS."""
    scores = torch.zeros(len(rollout.response), device=rollout.response.device)
    if roles.has_reward_model:
        roles.use(REWARD)
        raw = reward_model_scores(roles, rollout)
        scores = scores + roles.reward_gain * raw + roles.reward_bias
    if function_reward is not None:
        scores = scores + function_reward(prompts, rollout)
    return scores - penalty * (~rollout.ended).float()


def reward_model_scores(roles: Roles, rollout: Rollout) -> torch.Tensor:
    """Raw score of the reward role (active) on each prompt + response, (B,) float32. When prompts repeat
    (K samples per prompt) and the model takes packed rows, the responses to one prompt are scored as one
    packed row (core/packing.py), the prompt computed once; the scores are the unpacked ones up to float
    rounding."""
    input_ids, attention_mask, _ = sampling.sequences(
        rollout.query, rollout.query_mask, rollout.response, rollout.response_mask
    )
    prompts = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(rollout.query, rollout.query_mask)]
    if len(set(prompts)) == len(prompts) or not packing.supports(roles.model):
        return heads.sequence_scores(roles.model, roles.reward_head, input_ids, attention_mask).float()
    rows_of: dict[tuple, list[int]] = {}
    for row, prompt in enumerate(prompts):
        rows_of.setdefault(prompt, []).append(row)
    groups = list(rows_of.values())
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    # the pad id is never read: padding is masked out of every sequence's attention
    packed = packing.pack([[sequences[row] for row in group] for group in groups], 0, input_ids.device)
    values = heads.packed_sequence_scores(
        roles.model, roles.reward_head, packed["input_ids"], packed["position_ids"], packed["segments"], packed["ends"]
    ).float()
    order = torch.tensor([row for group in groups for row in group], device=values.device)
    return torch.empty_like(values).index_copy_(0, order, values)


# ------------------------------------------------------------------------------- 3. log-probs and KL
def response_logits(
    roles: Roles, role: str, query, query_mask, response, response_mask, group: int = 1
) -> torch.Tensor:
    """Logits that predict each response token under `role`: (B, T, V). Only the last T+1 positions are
    projected to the vocabulary. `group` > 1: the rows are whole groups of `group` consecutive responses to
    one prompt, each group run as one packed row (`packed_response_logits`)."""
    if group > 1:
        return packed_response_logits(roles, role, query, query_mask, response, response_mask, group)
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


def packs_groups(roles: Roles, config: PPOConfig) -> bool:
    """Whether the policy and reference passes run each prompt's K responses as one packed row, the prompt
    computed once: K > 1, minibatches of whole groups, and a model that takes packed rows. The trajectory and
    the update decide alike, so that the update's first importance ratio is exactly 1."""
    k = group_size(config)
    return k > 1 and config.minibatch_size % k == 0 and packing.supports(roles.model)


def packed_response_logits(
    roles: Roles, role: str, query, query_mask, response, response_mask, group: int
) -> torch.Tensor:
    """`response_logits` of whole groups (`group` consecutive rows each, one prompt's responses): each group
    is ONE packed row (core/packing.py: the prompt once, each response attending to it and to itself) in a
    forward of its own, so a group's logits do not depend on which other groups share the batch: the update's
    minibatches (whole groups, in another order) reproduce the trajectory's log-probs exactly. Positions past
    a response's end hold zeros (they are masked everywhere)."""
    roles.use(role)
    body = heads.decoder_body(roles.model)
    implementation, dtype = body.config._attn_implementation, body.get_input_embeddings().weight.dtype
    lengths = response_mask.sum(1).long().tolist()
    pieces, rows, steps = [], [], []
    for first in range(0, len(query), group):
        members = range(first, min(first + group, len(query)))
        prompts = [query[row][query_mask[row].bool()].tolist() for row in members]
        sequences = [p + response[row, : lengths[row]].tolist() for p, row in zip(prompts, members)]
        packed = packing.pack([sequences], 0, query.device)
        # the logits that predict response token j of sequence k sit at its position len(prompt) + j - 1
        wanted = [
            columns[len(prompt) - 1 : len(sequence) - 1]
            for prompt, sequence, columns in zip(prompts, sequences, packing.flat_columns([sequences]))
        ]
        keep = sorted({column for columns in wanted for column in columns})
        where = {column: number for number, column in enumerate(keep)}
        logits = roles.model(
            input_ids=packed["input_ids"],
            attention_mask=packing.attention_mask(packed["segments"], implementation, dtype),
            position_ids=packed["position_ids"],
            logits_to_keep=torch.tensor(keep, device=query.device),
            use_cache=False,
        ).logits[0]
        for row, columns in zip(members, wanted):
            pieces.append(logits[torch.tensor([where[c] for c in columns], dtype=torch.long, device=logits.device)])
            rows.append(row)
            steps.append(len(columns))
    output = pieces[0].new_zeros((len(query), response.shape[1], pieces[0].shape[-1]))
    flat = torch.cat([row * response.shape[1] + torch.arange(n) for row, n in zip(rows, steps)]).to(output.device)
    return output.view(-1, output.shape[-1]).index_copy(0, flat, torch.cat(pieces)).view(output.shape)


# -------------------------------------------------------------------------------------- 4. values
def response_values(roles: Roles, query, query_mask, response, response_mask) -> torch.Tensor:
    """Value estimates at the state before each response token (value role + fp32 value head): (B, T)."""
    roles.use(VALUE)
    input_ids, attention_mask, _ = sampling.sequences(query, query_mask, response, response_mask)
    hidden = heads.last_hidden_states(roles.model, input_ids, attention_mask)
    steps = response.shape[1]
    return roles.value_head(hidden[:, -steps - 1 : -1]).squeeze(-1).float()


def group_size(config: PPOConfig) -> int:
    """K, the responses sampled per prompt: --samples-per-prompt, else 1 for gae and 4 for rloo/grpo."""
    return config.samples_per_prompt or (1 if config.advantage == "gae" else 4)


@torch.no_grad()
def make_trajectory(
    roles: Roles,
    rollout: Rollout,
    config: PPOConfig,
    beta: float,
    accelerator,
    function_reward: FunctionReward | None = None,
    prompts: list[list[dict]] | None = None,
) -> tuple[Trajectory, dict[str, float]]:
    """Steps 2-4 for this process's rollouts (of `prompts`, message lists, for a reward function): the
    trajectory the update learns from, and the iteration's statistics over every process's rollouts."""
    total = distributed.summer(accelerator)
    query, query_mask, response, mask, ended = rollout
    began = time.perf_counter()
    with accelerator.autocast():
        scores = score(roles, rollout, config.missing_eos_penalty, function_reward, prompts)
        scored = time.perf_counter()
        # log-probs, entropy and values in chunks of a minibatch: full-vocabulary logits for the whole rollout
        # batch at once would be the largest tensor of the run (B x T x vocab floats)
        logprobs, ref_logprobs, values, entropies = [], [], [], []
        group = group_size(config) if packs_groups(roles, config) else 1  # chunks are then whole groups
        for rows in torch.arange(len(query), device=query.device).split(config.minibatch_size):
            chunk = (query[rows], query_mask[rows], response[rows], mask[rows])
            policy_logits = response_logits(roles, POLICY, *chunk, group=group)
            logprobs.append(rl.token_logprobs(policy_logits, response[rows], config.temperature) * mask[rows])
            entropies.append(rl.entropy_from_logits(policy_logits, config.temperature))
            del policy_logits
            reference_logits = response_logits(roles, REFERENCE, *chunk, group=group)
            ref_logprobs.append(rl.token_logprobs(reference_logits, response[rows], config.temperature) * mask[rows])
            del reference_logits
            if roles.has_value:
                values.append(response_values(roles, *chunk) * mask[rows])
    logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
    values = torch.cat(values) if roles.has_value else torch.zeros_like(logprobs)
    measured = time.perf_counter()
    advantages, returns, kl = advantages_of(scores, logprobs, ref_logprobs, values, mask, config, beta, total)
    trajectory = Trajectory(
        query, query_mask, response, mask, ended, logprobs, ref_logprobs, values, scores, kl, advantages, returns
    )
    rollouts = total(torch.tensor(float(len(query)), device=query.device))
    stats = {
        "objective/score": (total(scores.sum()) / rollouts).item(),
        "objective/kl": (total(kl.sum()) / rollouts).item(),
        "objective/entropy": rl.masked_mean(torch.cat(entropies), mask, total=total).item(),
        "response/length": (total(mask.sum()) / rollouts).item(),
        "response/eos_rate": (total(ended.float().sum()) / rollouts).item(),
        "time/score": scored - began,
        "time/logprobs": measured - scored,  # policy, reference and values
    }
    if roles.has_value:
        stats["val/explained_variance"] = rl.explained_variance(values, returns, mask, total=total)
    return trajectory, stats


def advantages_of(
    scores, logprobs, ref_logprobs, values, mask, config: PPOConfig, beta: float, total
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4: (advantages, returns, kl), all (B, T). The KL is in the reward unless --kl-penalty loss."""
    beta_in_reward = beta if config.kl_penalty == "reward" else 0.0
    if config.advantage == "gae":
        rewards, kl = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, beta_in_reward)
        advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
        return rl.whiten(advantages, mask, total=total), returns, kl
    kl = (logprobs - ref_logprobs) * mask
    rewards = rl.sequence_rewards(scores, kl, beta_in_reward)
    per_response = {"rloo": rl.rloo_advantages, "grpo": rl.grpo_advantages}[config.advantage]
    advantages = per_response(rewards, group_size(config)).unsqueeze(1) * mask
    return advantages, torch.zeros_like(advantages), kl
