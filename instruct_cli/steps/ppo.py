"""`instruct ppo`: RLHF with PPO on ONE shared base model (InstructGPT step 3).

The four roles of PPO are LoRA adapters on a single (4-bit) base, switched with `set_adapter`, so memory
grows by adapters, not by models:

    policy     trainable, starts as a copy of the SFT adapter
    reference  frozen copy of the SFT adapter: the KL is measured against the SFT model, not the bare base
    value      trainable, starts from the reward model's adapter and head (as in InstructGPT)
    reward     frozen reward-model adapter + head, normalised with the gain/bias stored by `instruct rm`

One iteration, top to bottom (`train_iteration`):
    1. rollout     sample responses for a batch of prompts (left padding, KV cache, temperature T), cut at EOS
    2. score       reward role on prompt + response at the last real token; penalty when there is no EOS
    3. KL          per-token logp_policy - logp_reference (both at temperature T); reward shaping with beta
    4. advantages  GAE with the value role, advantages whitened
    5. update      clipped policy and value losses, several epochs of minibatches, gradient clipping
The maths lives in rl.py; this module moves tensors between the roles.

A trap worth knowing: with (non-reentrant) gradient checkpointing, the forward is recomputed during the
backward with whatever adapter is active THEN. So each role's loss is backpropagated right after its own
forward, before the next `set_adapter`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from instruct_cli.core import artifacts, chat, data_folders, heads, lm, models, rl, sampling, training
from instruct_cli.core.chat import encode_prompt
from instruct_cli.core.config import PPOConfig, to_recipe_dict
from instruct_cli.core.console import console, info, progress, summary_table
from instruct_cli.core.errors import UserError
from instruct_cli.core.sampling import left_pad

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"


# ------------------------------------------------------------------------------------------------ roles
class Roles(nn.Module):
    """The shared base with its four adapters, plus the two scalar heads (value trainable, reward frozen)."""

    def __init__(self, model, value_head: nn.Module, reward_head: nn.Module, reward_gain: float, reward_bias: float):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.reward_head = reward_head.requires_grad_(False)
        self.reward_gain = reward_gain
        self.reward_bias = reward_bias

    def use(self, role: str) -> None:
        """Make `role` the active adapter (frozen roles are activated in inference mode)."""
        self.model.set_adapter(role, inference_mode=role in (REFERENCE, REWARD))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters PPO updates: the policy and value adapters and the value head."""
        adapters = [
            p
            for name, p in self.model.named_parameters()
            if "lora_" in name and (f".{POLICY}." in name or f".{VALUE}." in name)
        ]
        return adapters + list(self.value_head.parameters())


def load_roles(config: PPOConfig, device) -> tuple[Roles, object, models.ModelSource, dict]:
    """Load the base once and attach the four role adapters and the two heads; returns (roles, tokenizer,
    source of the SFT run, manifest of the RM run)."""
    from peft import PeftModel

    sft_source = models.resolve_model(str(config.sft), flag="--sft")
    if sft_source.run_manifest.get("kind") != "sft":
        raise UserError(
            f"{config.sft} is a {sft_source.run_manifest.get('kind')} run, not an sft run",
            where="--sft",
            fix="Pass the folder written by `instruct sft`",
        )
    rm_manifest = artifacts.require_complete(config.reward, "rm", flag="--reward")
    if rm_manifest["base_model"]["fingerprint"] != sft_source.run_manifest["base_model"]["fingerprint"]:
        raise UserError(
            "The reward model and the SFT run were trained on different base models "
            f"({rm_manifest['base_model']['id']} vs {sft_source.reference})",
            where="--reward",
            fix="Train the reward model on the same base (e.g. `instruct rm --model RUNS/sft`)",
        )
    tokenizer = models.load_tokenizer(sft_source)
    base = models.load_base_model(sft_source, config.quantization, device)
    base = training.prepare_for_training(base, config.quantization, config.gradient_checkpointing)
    sft_adapter, rm_adapter = str(sft_source.adapter), str(Path(config.reward) / models.ADAPTER_DIR)
    model = PeftModel.from_pretrained(base, sft_adapter, adapter_name=POLICY, is_trainable=True)
    model.load_adapter(sft_adapter, adapter_name=REFERENCE, is_trainable=False)
    model.load_adapter(rm_adapter, adapter_name=VALUE, is_trainable=True)
    model.load_adapter(rm_adapter, adapter_name=REWARD, is_trainable=False)
    disable_dropout(model)
    norm = rm_manifest.get("reward_normalization") or {"gain": 1.0, "bias": 0.0}
    reward_head = heads.load_head(rm_adapter).to(device)
    value_head = heads.load_head(rm_adapter).to(device)
    # The value head starts as the RM's head in the units of the (normalised) rewards it must predict. Left
    # in raw RM units (a std of 5-10 is common), its first estimates are off by that much at every token,
    # GAE turns the error into advantages, and the policy follows the value head's noise instead of the reward.
    with torch.no_grad():
        value_head.bias.mul_(norm["gain"]).add_(norm["bias"])
        value_head.weight.mul_(norm["gain"])
    return Roles(model, value_head, reward_head, norm["gain"], norm["bias"]), tokenizer, sft_source, rm_manifest


def disable_dropout(model: nn.Module) -> None:
    """PPO runs with dropout off: the log-probs of the update must match those of the rollout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# -------------------------------------------------------------------------------------------- trajectory
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
    advantages: torch.Tensor  # (B, T) whitened GAE advantages
    returns: torch.Tensor  # (B, T) GAE returns (value targets)

    def rows(self, index: torch.Tensor) -> "Trajectory":
        """The minibatch of rollouts `index`."""
        return Trajectory(*(field[index] for field in self))


# -------------------------------------------------------------------------------------- 1. rollout
@torch.no_grad()
def rollout(roles: Roles, tokenizer, prompts: list[list[int]], config: PPOConfig, device):
    """Sample one response per prompt with the policy; returns (query, query_mask, response, mask, ended)."""
    roles.use(POLICY)
    roles.model.eval()
    query, query_mask = left_pad([p[-config.max_prompt_length :] for p in prompts], tokenizer.pad_token_id, device)
    output = roles.model.generate(
        input_ids=query,
        attention_mask=query_mask,
        do_sample=True,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    response = output[:, query.shape[1] :]
    response_mask, ended = rl.truncate_after_eos(response, tokenizer.eos_token_id)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    roles.model.train()
    return query, query_mask, response, response_mask, ended


# ---------------------------------------------------------------------------------------- 2. score
@torch.no_grad()
def score(roles: Roles, query, query_mask, response, response_mask, ended, penalty: float) -> torch.Tensor:
    """Normalised reward of each prompt + response, read at its last real token; minus `penalty` if no EOS."""
    roles.use(REWARD)
    input_ids, attention_mask, _ = sampling.sequences(query, query_mask, response, response_mask)
    raw = heads.sequence_scores(roles.model, roles.reward_head, input_ids, attention_mask).float()
    return roles.reward_gain * raw + roles.reward_bias - penalty * (~ended).float()


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
    """Value estimates at the state before each response token (value role + value head): (B, T)."""
    roles.use(VALUE)
    input_ids, attention_mask, _ = sampling.sequences(query, query_mask, response, response_mask)
    hidden = heads.last_hidden_states(roles.model, input_ids, attention_mask)
    steps = response.shape[1]
    return roles.value_head(hidden[:, -steps - 1 : -1]).squeeze(-1).float()


@torch.no_grad()
def make_trajectory(
    roles: Roles, tokenizer, prompts: list[list[int]], config: PPOConfig, beta: float, device
) -> tuple[Trajectory, dict[str, float]]:
    """Steps 1-4 for one batch of prompts: the trajectory the update learns from, and its statistics."""
    query, query_mask, response, mask, ended = rollout(roles, tokenizer, prompts, config, device)
    scores = score(roles, query, query_mask, response, mask, ended, config.missing_eos_penalty)
    # log-probs, entropy and values in chunks of a minibatch: full-vocabulary logits for the whole rollout
    # batch at once would be the largest tensor of the run (B x T x vocab floats)
    logprobs, ref_logprobs, values, entropies = [], [], [], []
    for rows in torch.arange(len(prompts), device=query.device).split(config.minibatch_size):
        chunk = (query[rows], query_mask[rows], response[rows], mask[rows])
        policy_logits = response_logits(roles, POLICY, *chunk)
        logprobs.append(rl.token_logprobs(policy_logits, response[rows], config.temperature) * mask[rows])
        entropies.append(rl.entropy_from_logits(policy_logits, config.temperature))
        del policy_logits
        ref_logprobs.append(
            rl.token_logprobs(response_logits(roles, REFERENCE, *chunk), response[rows], config.temperature)
            * mask[rows]
        )
        values.append(response_values(roles, *chunk) * mask[rows])
    logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
    entropy = rl.masked_mean(torch.cat(entropies), mask).item()
    rewards, kl = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, beta)
    advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
    advantages = rl.whiten(advantages, mask)
    trajectory = Trajectory(
        query, query_mask, response, mask, ended, logprobs, ref_logprobs, values, scores, kl, advantages, returns
    )
    stats = {
        "objective/score": scores.mean().item(),
        "objective/kl": kl.sum(1).mean().item(),
        "objective/entropy": entropy,
        "val/explained_variance": rl.explained_variance(values, returns, mask),
        "response/length": mask.sum(1).mean().item(),
        "response/eos_rate": ended.float().mean().item(),
    }
    return trajectory, stats


# -------------------------------------------------------------------------------------- 5. update
def update(
    roles: Roles, optimizer, trajectory: Trajectory, config: PPOConfig, accelerator, ptx_batches=None
) -> dict[str, float]:
    """Clipped policy and value losses over `ppo_epochs` passes of shuffled minibatches; returns mean stats."""
    totals: dict[str, float] = {}
    count = 0
    size = trajectory.response.shape[0]
    parameters = roles.trainable_parameters()
    for _ in range(config.ppo_epochs):
        for index in torch.randperm(size).split(config.minibatch_size):
            batch = trajectory.rows(index.to(trajectory.response.device))
            stats = update_minibatch(roles, batch, config, accelerator, next(ptx_batches) if ptx_batches else None)
            average_gradients(accelerator, parameters)
            stats["policy/grad_norm"] = float(accelerator.clip_grad_norm_(parameters, config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + value
            count += 1
    return {name: total / count for name, total in totals.items()}


def update_minibatch(
    roles: Roles, batch: Trajectory, config: PPOConfig, accelerator, ptx_batch=None
) -> dict[str, float]:
    """Backpropagate the policy loss (with its adapter active), then the value loss (with its own)."""
    with accelerator.autocast():
        logits = response_logits(roles, POLICY, batch.query, batch.query_mask, batch.response, batch.response_mask)
        new_logprobs = rl.token_logprobs(logits, batch.response, config.temperature)
        pg_loss, stats = rl.policy_loss(
            new_logprobs, batch.logprobs, batch.advantages, batch.response_mask, config.clip_range
        )
        loss = pg_loss
        if ptx_batch is not None:
            ptx_loss, _ = lm.sft_loss(roles.model, ptx_batch)  # policy adapter still active
            loss = loss + config.ptx_coef * ptx_loss
            stats["loss/ptx"] = ptx_loss.item()
    check_finite(loss, "policy loss")
    accelerator.backward(loss)
    with accelerator.autocast():
        new_values = response_values(roles, batch.query, batch.query_mask, batch.response, batch.response_mask)
        vf_loss, value_stats = rl.value_loss(
            new_values, batch.values, batch.returns, batch.response_mask, config.value_clip_range
        )
    check_finite(vf_loss, "value loss")
    accelerator.backward(config.vf_coef * vf_loss)
    return {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), **stats, **value_stats}


def average_gradients(accelerator, parameters: list[nn.Parameter]) -> None:
    """Data parallelism by hand: average gradients over processes (no-op on one process). DDP's hooks
    do not fit two backward passes through different adapters per step."""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop on NaN/inf with a clear message (the last good checkpoint stays on disk)."""
    if not torch.isfinite(value).all():
        raise NonFinite(what)


class NonFinite(Exception):
    """A loss or reward became NaN or infinite."""


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    roles: Roles, tokenizer, prompts: list[list[dict]], config: PPOConfig, device
) -> tuple[dict[str, float], list[dict]]:
    """Mean normalised reward, KL to the reference, length and EOS rate on held-out prompts, plus samples."""
    scores, kls, lengths, ends, samples = [], [], [], [], []
    for start in range(0, len(prompts), config.rollout_batch_size):
        chunk = prompts[start : start + config.rollout_batch_size]
        encoded = [encode_prompt(tokenizer, messages) for messages in chunk]
        query, query_mask, response, mask, ended = rollout(roles, tokenizer, encoded, config, device)
        batch_scores = score(roles, query, query_mask, response, mask, ended, penalty=0.0)
        policy = rl.token_logprobs(
            response_logits(roles, POLICY, query, query_mask, response, mask), response, config.temperature
        )
        reference = rl.token_logprobs(
            response_logits(roles, REFERENCE, query, query_mask, response, mask), response, config.temperature
        )
        scores += batch_scores.tolist()
        kls += ((policy - reference) * mask).sum(1).tolist()
        lengths += mask.sum(1).tolist()
        ends += ended.float().tolist()
        for messages, ids, row_mask, reward in zip(chunk, response, mask, batch_scores.tolist()):
            text = tokenizer.decode(ids[row_mask.bool()], skip_special_tokens=True).strip()
            samples.append({"prompt": messages, "response": text, "reward": reward})
    metrics = {
        "eval/reward": sum(scores) / len(scores),
        "eval/kl": sum(kls) / len(kls),
        "eval/length": sum(lengths) / len(lengths),
        "eval/eos_rate": sum(ends) / len(ends),
    }
    return metrics, samples


def show_samples(samples: list[dict], iteration: int, how_many: int = 2) -> None:
    """Print a few prompt/response pairs with their reward."""
    for sample in samples[:how_many]:
        prompt = sample["prompt"][-1]["content"]
        console.print(
            f"[dim]iter {iteration}[/dim] [bold]{prompt[:80]}[/bold] -> {sample['response'][:160]!r} "
            f"[dim](reward {sample['reward']:.2f})[/dim]"
        )


# ----------------------------------------------------------------------------------------------- data
def prompt_batches(count: int, batch_size: int, seed: int, iteration: int) -> list[int]:
    """Indices of the prompts of iteration `iteration`: a fresh shuffle per pass over the data."""
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(iteration, per_epoch)
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    chosen = order[position * batch_size : (position + 1) * batch_size]
    return chosen if len(chosen) == batch_size else (order * batch_size)[:batch_size]


# ------------------------------------------------------------------------------------------------- run
def run(config: PPOConfig) -> Path:
    """PPO from an SFT run against an RM run on a data folder's prompts; writes the ppo run folder."""
    for flag, value in (
        ("--sft", config.sft),
        ("--reward", config.reward),
        ("--data", config.data),
        ("--out", config.out),
    ):
        if value is None:
            raise UserError(f"{flag} is required", where=flag, fix="See `instruct ppo --help` for an example")
    if config.minibatch_size > config.rollout_batch_size:
        raise UserError(
            "--minibatch-size cannot exceed --rollout-batch-size",
            where="--minibatch-size",
            fix=f"Use at most {config.rollout_batch_size}",
        )
    train_prompts = data_folders.read_prompts(config.data, "train")
    eval_prompts = (
        data_folders.read_prompts(config.data, "eval")[: config.eval_prompts] or train_prompts[: config.eval_prompts]
    )
    accelerator = training.make_accelerator(config.seed)
    device = accelerator.device if config.device == "auto" else models.pick_device(config.device)
    sft_manifest = artifacts.require_complete(config.sft, "sft", flag="--sft")
    run_folder = open_ppo_run(config, accelerator, sft_manifest)
    with run_folder.recording():
        roles, tokenizer, _, _ = load_roles(config, device)
        encoded = [encode_prompt(tokenizer, messages) for messages in train_prompts]
        optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=config.lr, eps=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / config.iterations))
        controller = rl.KLController(config.kl_coef, config.target_kl, config.kl_horizon)
        trainable = training.Trainable(roles, optimizer, scheduler, accelerator)
        checkpoint = training.Checkpointer(run_folder, trainable, extra=controller)
        start, _ = checkpoint.restore() if run_folder.resuming else (0, math.inf)
        if run_folder.resuming:
            info(f"Resuming from iteration {start} of {config.iterations}")
        ptx = ptx_stream(config, tokenizer, sft_manifest, device) if config.ptx_coef > 0 else None
        info(
            f"ppo: {len(encoded)} prompts, {config.iterations} iterations of {config.rollout_batch_size} rollouts "
            f"on {device} ({config.quantization}; policy/reference/value/reward adapters on one base)"
        )
        metrics = train(
            run_folder,
            roles,
            tokenizer,
            encoded,
            eval_prompts,
            config,
            controller,
            trainable,
            checkpoint,
            start,
            ptx,
            device,
        )
        save_outputs(roles, run_folder.path)
        run_folder.complete(metrics, iterations=config.iterations, final_beta=controller.beta)
    summary_table(
        "ppo",
        {
            "output": str(config.out),
            "iterations": config.iterations,
            **{k: v for k, v in metrics.items() if k.startswith(("eval/", "objective/"))},
        },
    )
    return Path(config.out)


def train(
    run_folder, roles, tokenizer, encoded, eval_prompts, config, controller, trainable, checkpoint, start, ptx, device
) -> dict[str, float]:
    """The iterations: trajectory, update, KL controller, logs, evaluation, checkpoints."""
    metrics: dict[str, float] = {}
    started, rollouts = time.time(), 0
    with progress("ppo", total=config.iterations) as bar:
        bar.set_completed(start)
        iteration = start
        try:
            while iteration < config.iterations:
                checkpoint.mark_step_start()
                batch = [
                    encoded[i] for i in prompt_batches(len(encoded), config.rollout_batch_size, config.seed, iteration)
                ]
                trajectory, stats = make_trajectory(roles, tokenizer, batch, config, controller.beta, device)
                if not torch.isfinite(trajectory.scores).all():
                    raise NonFinite("reward")
                stats.update(update(roles, trainable.optimizer, trajectory, config, trainable.accelerator, ptx))
                stats["objective/beta"] = controller.beta
                controller.update(stats["objective/kl"], config.rollout_batch_size)
                trainable.scheduler.step()
                iteration += 1
                rollouts += len(batch)
                stats["train/samples_per_s"] = rollouts / max(time.time() - started, 1e-6)
                stats["train/lr"] = trainable.scheduler.get_last_lr()[0]
                if iteration % config.eval_every == 0 or iteration == config.iterations:
                    eval_metrics, samples = evaluate(roles, tokenizer, eval_prompts, config, device)
                    stats.update(eval_metrics)
                    append_samples(run_folder.path, iteration, samples)
                    show_samples(samples, iteration)
                metrics = stats
                run_folder.log_metrics(iteration, stats)
                bar.advance(
                    1,
                    score=stats["objective/score"],
                    kl=stats["objective/kl"],
                    beta=controller.beta,
                    clip=stats["policy/clipfrac"],
                    samples_s=stats["train/samples_per_s"],
                    **kl_warning(stats["objective/kl"], config),
                )
                if iteration % config.save_every == 0 and iteration < config.iterations:
                    checkpoint.save(iteration, math.inf)
        except KeyboardInterrupt:
            checkpoint.save_interrupted(math.inf)
            raise
        except NonFinite as exc:
            last = checkpoint.latest()
            raise UserError(
                f"PPO stopped at iteration {iteration + 1}: the {exc} became NaN or infinite",
                where=str(last) if last else "before the first checkpoint",
                fix="Lower --lr or raise --kl-coef; --resume continues from the last good checkpoint",
            ) from None
    return metrics


def kl_warning(kl: float, config: PPOConfig) -> dict[str, str]:
    """A warning field for the progress line when the KL is far above its target (or above 20 nats)."""
    limit = 3 * config.target_kl if config.target_kl else 20.0
    return {"warning": f"KL {kl:.1f} >> target"} if kl > limit else {}


def ptx_stream(config: PPOConfig, tokenizer, sft_manifest: dict, device):
    """An endless stream of SFT batches for PPO-ptx (from --ptx-data, or the SFT run's own data)."""
    folder = config.ptx_data or Path(sft_manifest["parents"]["data"]["path"])
    rows = data_folders.read_split(folder, "sft.train")
    encoded = [chat.encode_conversation(tokenizer, row["messages"], 1024) for row in rows]
    rng = random.Random(config.seed)

    def stream():
        while True:
            chosen = rng.sample(encoded, k=min(config.minibatch_size, len(encoded)))
            yield lm.collate(chosen, tokenizer.pad_token_id, device)

    return stream()


def append_samples(folder: Path, iteration: int, samples: list[dict]) -> None:
    """Append an evaluation's samples to samples.jsonl."""
    with open(folder / "samples.jsonl", "a", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({"iteration": iteration, **sample}, ensure_ascii=False) + "\n")


def save_outputs(roles: Roles, folder: Path) -> None:
    """Write the policy adapter to adapter/ (what generate/export/eval load) and the value adapter and head
    to value/."""
    for role, target in ((POLICY, "adapter"), (VALUE, "value")):
        with artifacts.atomic_folder(folder / target) as tmp:
            roles.model.save_pretrained(tmp / "saved", selected_adapters=[role])
            saved = tmp / "saved" / role  # peft puts named adapters in a subfolder
            for item in saved.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp / "saved")
            if role == VALUE:
                heads.save_head(roles.value_head, tmp)


def open_ppo_run(config: PPOConfig, accelerator, sft_manifest: dict) -> artifacts.RunFolder:
    """Open the ppo run folder (main process), naming its three parents."""
    if accelerator.is_main_process:
        run_folder = artifacts.RunFolder.open(
            config.out,
            "ppo",
            to_recipe_dict(config),
            force=config.force,
            resume=config.resume,
            parents={
                "sft": artifacts.parent_record(config.sft),
                "rm": artifacts.parent_record(config.reward),
                "data": artifacts.parent_record(config.data),
            },
            extra={"base_model": sft_manifest["base_model"], "quantization": config.quantization},
        )
    accelerator.wait_for_everyone()
    return run_folder if accelerator.is_main_process else artifacts.RunFolder.follow(config.out)
