"""Steps 1-4 of a PPO iteration: the trajectory the update learns from.

    1. rollout     sample responses for a batch of prompts (left padding, KV cache, temperature T), cut at EOS
    2. score       reward role on prompt + response at the last real token, plus a user's reward function if
                   given; penalty when there is no EOS
    3. KL          per-token logp_policy - logp_reference (both at temperature T); reward shaping with beta
                   (unless --kl-penalty loss: then the update adds beta x k3 to the policy loss instead)
    4. advantages  gae: GAE with the value role, whitened. rloo / grpo (no value role): one reward per
                   response, compared with the other responses to the same prompt (K consecutive rows)

The reward, log-prob and value passes run without padding (--packing, on by default; core/packing.py):
rollouts side by side in packed rows, each prompt's K responses in one row with the prompt computed once, and
a prefix that rows share (the chat template's system prompt) computed once. The log-prob and value passes run
in the update's first-epoch minibatches (`minibatch_rows`) and under the update's autocast
(`accelerator.autocast()`), so the update's first minibatch recomputes exactly what they computed: its
importance ratio is exactly 1, on a bf16 GPU too. Sampling is exactly softmax(logits / T) (core/sampling.py
sets the model's generation_config aside). In a data-parallel run each process holds its share of the
rollouts; whitening and the logged statistics cover every process's share.
May use: core (heads, lm, lora_merge, packing, rl, sampling, distributed), roles.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import NamedTuple

import torch

from instruct_cli.core import distributed, heads, lm, lora_merge, packing, rl, sampling
from instruct_cli.core.config import PPOConfig
from instruct_cli.core.methods import ADVANTAGE_ESTIMATORS
from instruct_cli.core.reward_functions import WeightedRewards
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
    """The reward functions (--reward-fn) with their weights, and the tokenizer that decodes responses."""

    functions: WeightedRewards
    tokenizer: object

    def __call__(
        self,
        prompts: list[list[dict]],
        rollout: Rollout,
        columns: list[dict] | None = None,
        stats: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """The weighted sum of the functions' rewards for the rollouts of `prompts` (message lists, with their
        data `columns`): (B,). Each function's mean and std go into `stats`, when given."""
        responses = [
            self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
            for ids, mask in zip(rollout.response, rollout.response_mask)
        ]
        rewards, function_stats = self.functions.scores(prompts, responses, columns)
        if stats is not None:
            stats.update(function_stats)
        return torch.tensor(rewards, dtype=torch.float32, device=rollout.response.device)


@torch.no_grad()
def score(
    roles: Roles,
    rollout: Rollout,
    penalty: float,
    function_reward: FunctionReward | None = None,
    prompts: list[list[dict]] | None = None,
    packed: bool = True,
    group: int = 1,
    columns: list[dict] | None = None,
    stats: dict[str, float] | None = None,
) -> torch.Tensor:
    """Score of each prompt + response: the reward model's normalised reward read at the last real token
    (if there is a reward model; `packed` and `group`: see `reward_model_scores`), plus the weighted reward
    functions of `prompts` and their data `columns` (if given; their statistics into `stats`); minus `penalty`
    if there is no EOS."""
    scores = torch.zeros(len(rollout.response), device=rollout.response.device)
    if roles.has_reward_model:
        roles.use(REWARD)
        raw = reward_model_scores(roles, rollout, packed, group)
        scores = scores + roles.reward_gain * raw + roles.reward_bias
    if function_reward is not None:
        scores = scores + function_reward(prompts, rollout, columns, stats)
    return scores - penalty * (~rollout.ended).float()


def reward_model_scores(roles: Roles, rollout: Rollout, packed: bool = True, group: int = 1) -> torch.Tensor:
    """Raw score of the reward role (active) on each prompt + response, (B,) float32. `packed` (and a model
    that takes packed rows): without padding, as `pack_rows` lays the rollouts out (`group` > 1: each run of
    that many consecutive rollouts answers one prompt, computed once); the scores are the padded ones up to
    float rounding."""
    if packed and packing.supports(roles.model):
        layout = pack_rows(*rollout[:4], group)
        return roles.reward_head(packed_states(roles.model, layout)[layout.ends]).squeeze(-1).float()
    input_ids, attention_mask, _ = sampling.sequences(*rollout[:4])
    return heads.sequence_scores(roles.model, roles.reward_head, input_ids, attention_mask).float()


# ------------------------------------------------------------------------------- 3. log-probs and KL
class PackedRows(NamedTuple):
    """A chunk of B rollouts as padding-free packed rows (core/packing.py), which the reward, log-prob and value
    passes run instead of the padded (B, P + T) batch: no padding, and a prefix that several rollouts share
    (one prompt's K responses; the chat template's system prompt) computed once. Each row runs in a forward of
    its own (`packed_states`), so no position is padding. N = the chunk's response tokens; indices are into
    the rows' positions, concatenated."""

    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per row: input_ids, position_ids, segments (1, n)
    sources: torch.Tensor  # (N,) the position whose state predicts each response token
    targets: torch.Tensor  # (N,) where that token is in the chunk's flattened (B * T) responses
    ends: torch.Tensor  # (B,) the position of each rollout's last token (where its score is read)


def packs(roles: Roles, config: PPOConfig) -> bool:
    """Whether the log-prob and value passes run packed rows: --packing, and a model that computes them
    exactly (an attention that takes the 4-D mask, logits that are the output layer's alone)."""
    return config.packing and lm.packs(roles.model)


def packs_groups(roles: Roles, config: PPOConfig) -> bool:
    """Whether each prompt's K responses are one packed row, the prompt computed once: K > 1, minibatches of
    whole groups (the update then shuffles whole groups), and packed passes."""
    k = group_size(config)
    return k > 1 and config.minibatch_size % k == 0 and packs(roles, config)


def packed_group(roles: Roles, config: PPOConfig) -> int:
    """How many consecutive rollouts the log-prob and value passes keep together as one packed row: K when
    `packs_groups`, else 1 (rollouts side by side as `shared_bins` fits them). The trajectory and the update
    both lay out their minibatches by it, so that the first importance ratio is exactly 1."""
    return group_size(config) if packs_groups(roles, config) else 1


def pack_rows(query, query_mask, response, response_mask, group: int = 1) -> PackedRows:
    """The chunk's rollouts as packed rows: each run of `group` (> 1) consecutive rollouts (one prompt's
    responses) one row; otherwise as `packing.shared_bins` fits them into rows no wider than the padded batch
    or packing.ROW_WIDTH. The same rollouts in the same order always give the same rows."""
    lengths = response_mask.sum(1).long().tolist()
    prompts = [[t for t, keep in zip(ids, mask) if keep] for ids, mask in zip(query.tolist(), query_mask.tolist())]
    sequences = [prompt + ids[:n] for prompt, ids, n in zip(prompts, response.tolist(), lengths)]
    if group > 1:
        rows = [list(range(first, min(first + group, len(sequences)))) for first in range(0, len(sequences), group)]
    else:
        rows = packing.shared_bins(sequences, max(query.shape[1] + response.shape[1], packing.ROW_WIDTH))
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=query.device)
    steps, packed_rows, sources, targets, ends, offset = response.shape[1], [], [], [], [0] * len(sequences), 0
    for row in rows:
        ids, positions, segments, columns = packing.row_layout([sequences[i] for i in row])
        packed_rows.append((as_tensor([ids]), as_tensor([positions]), as_tensor([segments])))
        for index, own in zip(row, columns):
            # the state that predicts response token j of a sequence is at its position len(prompt) + j - 1
            first = len(prompts[index]) - 1
            sources += [offset + column for column in own[first : first + lengths[index]]]
            targets += range(index * steps, index * steps + lengths[index])
            ends[index] = offset + own[-1]
        offset += len(ids)
    return PackedRows(packed_rows, as_tensor(sources), as_tensor(targets), as_tensor(ends))


def packed_states(model, packed: PackedRows) -> torch.Tensor:
    """The last hidden states of the active adapter at every position of `packed`'s rows, concatenated:
    (positions, hidden). One forward per row: rows of unequal width padded to one batch would compute the
    padding."""
    return torch.cat([heads.packed_hidden_states(model, *row) for row in packed.rows])


def unpack(per_token: torch.Tensor, packed: PackedRows, response: torch.Tensor) -> torch.Tensor:
    """`per_token` (N,) of a packed chunk in the (B, T) layout of its `response`; zeros past each response's
    end (masked everywhere)."""
    return per_token.new_zeros(response.numel()).index_copy(0, packed.targets, per_token).view(response.shape)


def response_logits(
    roles: Roles, role: str, query, query_mask, response, response_mask, packed: PackedRows | None = None
) -> torch.Tensor:
    """Logits that predict each response token under `role`: padded (B, T, V), of which only the last T+1
    positions are projected to the vocabulary; or, `packed` (the same rollouts, `pack_rows`), (N, V) for the
    response tokens alone, in the order of `packed.targets`."""
    roles.use(role)
    if packed is not None:
        return roles.model.get_output_embeddings()(packed_states(roles.model, packed)[packed.sources])
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


def response_logprobs(
    roles: Roles,
    role: str,
    query,
    query_mask,
    response,
    response_mask,
    temperature: float,
    packed: PackedRows | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each response token under `role` at `temperature`, (B, T), and with `entropy` the
    entropy of the sampling distribution there, (B, T) (else None). Packed, both are computed at the response
    tokens only and are 0 past each response's end; padded, those positions hold whatever (masked everywhere)."""
    logits = response_logits(roles, role, query, query_mask, response, response_mask, packed)
    tokens = response if packed is None else response.flatten()[packed.targets]
    logprobs = rl.token_logprobs(logits, tokens, temperature)
    entropies = rl.entropy_from_logits(logits, temperature) if entropy else None
    if packed is not None:
        logprobs = unpack(logprobs, packed, response)
        entropies = unpack(entropies, packed, response) if entropy else None
    return logprobs, entropies


# -------------------------------------------------------------------------------------- 4. values
def response_values(
    roles: Roles, query, query_mask, response, response_mask, packed: PackedRows | None = None
) -> torch.Tensor:
    """Value estimates at the state before each response token (value role + fp32 value head): (B, T)."""
    roles.use(VALUE)
    if packed is not None:
        values = roles.value_head(packed_states(roles.model, packed)[packed.sources]).squeeze(-1).float()
        return unpack(values, packed, response)
    input_ids, attention_mask, _ = sampling.sequences(query, query_mask, response, response_mask)
    hidden = heads.last_hidden_states(roles.model, input_ids, attention_mask)
    steps = response.shape[1]
    return roles.value_head(hidden[:, -steps - 1 : -1]).squeeze(-1).float()


def minibatch_rows(
    config: PPOConfig, iteration: int, local: int, accelerator, group: int = 1
) -> list[list[torch.Tensor]]:
    """The update's minibatches: per epoch, this process's rows of each minibatch (possibly none).

    Each epoch shuffles the global batch (every process's `local` rollouts, process 0's first; whole groups of
    `group` rows) with a generator seeded by (seed, iteration), identical on every process, so minibatch k is
    the same set of rollouts whatever the number of processes. The trajectory's passes run in the first
    epoch's minibatches: the update's first minibatch then recomputes exactly what the trajectory computed
    (the same packed rows), and its importance ratio is exactly 1."""
    world, rank = accelerator.num_processes, accelerator.process_index
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
    size, offsets = config.minibatch_size * world // group, torch.arange(group)
    epochs = []
    for _ in range(config.ppo_epochs):
        order = torch.randperm(local * world // group, generator=generator)
        chosen = [
            (order[start : start + size, None] * group + offsets).flatten() for start in range(0, len(order), size)
        ]
        epochs.append([rows[rows // local == rank] - rank * local for rows in chosen])
    return epochs


def micro_batches(rows: torch.Tensor, config: PPOConfig, group: int = 1) -> list[torch.Tensor]:
    """A process's rows of one minibatch in forward passes of at most --micro-batch-size rollouts (whole groups
    of `group` rows, at least one group): the trajectory's passes and the update cut a minibatch the same way."""
    size = max(group, config.micro_batch_size // group * group)
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def group_size(config: PPOConfig) -> int:
    """K, the responses sampled per prompt (the config filled in the estimator's default)."""
    return config.samples_per_prompt


@torch.no_grad()
def make_trajectory(
    roles: Roles,
    rollout: Rollout,
    config: PPOConfig,
    beta: float,
    accelerator,
    function_reward: FunctionReward | None = None,
    prompts: list[list[dict]] | None = None,
    iteration: int = 0,
    columns: list[dict] | None = None,
) -> tuple[Trajectory, dict[str, float]]:
    """Steps 2-4 for this process's rollouts (of `prompts`, message lists, and their data `columns`, for the
    reward functions) at `iteration`: the trajectory the update learns from, and the iteration's statistics
    over every process's rollouts."""
    total = distributed.summer(accelerator)
    query, query_mask, response, mask, ended = rollout
    began = time.perf_counter()
    with accelerator.autocast():
        # the rollouts hold whole groups of K (consecutive rows, one prompt each), whatever the minibatches
        k = group_size(config)
        function_stats: dict[str, float] = {}
        scores = score(
            roles,
            rollout,
            config.missing_eos_penalty,
            function_reward,
            prompts,
            config.packing,
            k,
            columns,
            function_stats,
        )
        scored = time.perf_counter()
        # log-probs, entropy and values in the update's first minibatches (see `minibatch_rows`): full-vocabulary
        # logits for the whole rollout batch at once would be the largest tensor of the run (B x T x vocab)
        logprobs, ref_logprobs, values, entropies = (torch.zeros_like(mask) for _ in range(4))
        group = packed_group(roles, config)
        first_epoch = minibatch_rows(config, iteration, len(query), accelerator, group)[0]
        for rows in (part for minibatch in first_epoch for part in micro_batches(minibatch, config, group)):
            rows = rows.to(query.device)
            chunk = (query[rows], query_mask[rows], response[rows], mask[rows])
            packed = pack_rows(*chunk, group) if packs(roles, config) else None
            policy, entropy = response_logprobs(roles, POLICY, *chunk, config.temperature, packed, entropy=True)
            logprobs[rows], entropies[rows] = policy * mask[rows], entropy
            reference, _ = response_logprobs(roles, REFERENCE, *chunk, config.temperature, packed)
            ref_logprobs[rows] = reference * mask[rows]
            if roles.has_value:
                values[rows] = response_values(roles, *chunk, packed) * mask[rows]
    measured = time.perf_counter()
    advantages, returns, kl, advantage_stats = advantages_of(
        scores, logprobs, ref_logprobs, values, mask, config, beta, total
    )
    trajectory = Trajectory(
        query, query_mask, response, mask, ended, logprobs, ref_logprobs, values, scores, kl, advantages, returns
    )
    rollouts = total(torch.tensor(float(len(query)), device=query.device))
    stats = {
        "objective/score": (total(scores.sum()) / rollouts).item(),
        "objective/kl": (total(kl.sum()) / rollouts).item(),
        "objective/entropy": rl.masked_mean(entropies, mask, total=total).item(),
        "response/length": (total(mask.sum()) / rollouts).item(),
        "response/eos_rate": (total(ended.float().sum()) / rollouts).item(),
        "response/clipped_rate": (
            total((~ended & (mask.sum(1) >= config.max_new_tokens)).float().sum()) / rollouts
        ).item(),
        "objective/score_length_corr": rl.correlation(scores, mask.sum(1), total),
        **advantage_stats,
        **function_stats,  # this process's samples (the main process's are logged)
        "time/score": scored - began,
        "time/logprobs": measured - scored,  # policy, reference and values
    }
    if roles.has_value:
        stats["val/explained_variance"] = rl.explained_variance(values, returns, mask, total=total)
    return trajectory, stats


def advantages_of(
    scores, logprobs, ref_logprobs, values, mask, config: PPOConfig, beta: float, total
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Step 4: (advantages, returns, kl), all (B, T), and their statistics. The KL is in the reward unless
    --kl-penalty loss. Critic-free, one advantage per response (the same at each of its tokens), scaled by
    --scale-rewards; the share of groups whose rewards all tie (zero advantage: no signal) is logged."""
    beta_in_reward = beta if config.kl_penalty == "reward" else 0.0
    if ADVANTAGE_ESTIMATORS[config.advantage].needs_critic:
        rewards, kl = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, beta_in_reward)
        advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
        return rl.whiten(advantages, mask, total=total), returns, kl, {}
    kl = (logprobs - ref_logprobs) * mask
    rewards = rl.sequence_rewards(scores, kl, beta_in_reward)
    advantages, tied = rl.critic_free_advantages(
        config.advantage, rewards, group_size(config), config.scale_rewards, total
    )
    advantages = advantages.unsqueeze(1) * mask
    return advantages, torch.zeros_like(advantages), kl, {"objective/frac_reward_zero_std": tied}
