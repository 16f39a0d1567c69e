"""`instruct ppo`'s `run` and its iterations (`train`). One iteration, top to bottom:
    1. rollout     sample responses for a batch of prompts (left padding, KV cache, temperature T), cut at EOS
    2. score       reward role on prompt + response at the last real token; penalty when there is no EOS
    3. KL          per-token logp_policy - logp_reference (both at temperature T); reward shaping with beta
    4. advantages  GAE with the value role, advantages whitened (or, critic-free, RLOO / GRPO over the K
                   responses to each prompt)
    5. update      clipped policy and value losses, several epochs of minibatches, gradient clipping
(1-4 are trajectory.py's `make_trajectory`, 5 update_step.py's `update`), then the KL controller, the
metrics, the held-out evaluation (evaluation.py) and checkpoints at iteration boundaries.

Start-up is core/training.py's, in the order of every training step: the flags (`check_config`), --resume of
a complete run, the inputs read and checked, then the accelerator, the device and the run folder (`start_run`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from instruct_cli.core import artifacts, chat, data_folders, distributed, reward_functions, rl, training
from instruct_cli.core.checkpoints import Checkpointer, StopSignals
from instruct_cli.core.config import PPOConfig
from instruct_cli.core.console import info, progress, summary_table
from instruct_cli.core.errors import UserError
from instruct_cli.core.methods import ADVANTAGE_ESTIMATORS
from instruct_cli.core.models import ModelSource
from instruct_cli.core.reward_functions import WeightedRewards
from instruct_cli.steps.ppo.batches import iteration_prompts, ptx_batches
from instruct_cli.steps.ppo.evaluation import append_samples, evaluate, show_samples
from instruct_cli.steps.ppo.roles import check_runs, load_roles, save_outputs
from instruct_cli.steps.ppo.trajectory import (
    FunctionReward,
    group_size,
    make_trajectory,
    merged_rollouts_blocker,
    packs,
    rollout,
)
from instruct_cli.steps.ppo.update_step import NonFinite, update


# ------------------------------------------------------------------------------------------------- run
def run(config: PPOConfig) -> Path:
    """PPO from an SFT run against an RM run on a data folder's prompts; writes the ppo run folder."""
    if training.already_done(config, "ppo", check_config):
        return Path(config.out)
    train_prompts = data_folders.read_prompts(config.data, "train")
    train_columns = data_folders.read_prompt_columns(config.data, "train")
    held_out = data_folders.read_prompts(config.data, "eval")
    eval_prompts, eval_columns = (
        (held_out, data_folders.read_prompt_columns(config.data, "eval"))
        if held_out
        else (train_prompts, train_columns)
    )
    eval_prompts, eval_columns = eval_prompts[: config.eval_prompts], eval_columns[: config.eval_prompts]
    runs = check_runs(config)  # before the run folder is opened: a bad input never leaves a folder behind
    user_function = reward_functions.load_all(config.reward_fn, config.reward_fn_weight) if config.reward_fn else None
    sft_manifest = runs[0].run_manifest
    accelerator, device, run_folder = start_run(config, runs[0], user_function)
    with run_folder.recording():
        roles, tokenizer, _, _ = load_roles(config, device, runs)
        function_reward = FunctionReward(user_function, tokenizer) if user_function else None
        encoded = [chat.encode_prompt(tokenizer, messages) for messages in train_prompts]
        optimizer = torch.optim.AdamW(
            roles.trainable_parameters(), lr=config.lr, eps=1e-5, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / config.iterations))
        controller = rl.KLController(config.kl_coef, config.target_kl, config.kl_horizon)
        trainable = training.Trainable(
            roles, training.prepare_optimizer(accelerator, optimizer), scheduler, accelerator
        )
        checkpoint = Checkpointer(run_folder, trainable, extra=controller)
        start, _ = checkpoint.restore() if run_folder.resuming else (0, math.inf)
        if run_folder.resuming:
            run_folder.truncate_log(start, "samples.jsonl", key="iteration")
            info(f"Resuming from iteration {start} of {config.iterations}")
        ptx = ptx_batches(config, tokenizer, sft_manifest, device, accelerator) if config.ptx_coef > 0 else None
        world = accelerator.num_processes
        adapters = "/".join(name for name in roles.model.peft_config)
        k = group_size(config)
        info(
            f"ppo ({config.advantage}): {len(encoded)} prompts, {config.iterations} iterations of "
            f"{config.rollout_batch_size * world} rollouts{f' ({k} per prompt)' if k > 1 else ''}"
            f"{f' on {world} processes' if world > 1 else ''} on {device} ({config.quantization}, "
            f"precision {accelerator.mixed_precision}; {adapters} adapters on one base"
            f"{'; reward functions ' + ', '.join(config.reward_fn) if config.reward_fn else ''})"
        )
        blocker = merged_rollouts_blocker(roles, config)
        if config.merged_rollouts and blocker:
            info(f"Rollouts sample with the policy adapter unmerged (slower): {blocker}")
        if config.packing and not packs(roles, config):
            info("The log-prob and value passes run padded (slower): the model takes no packed rows")
        prompts = Prompts(train_prompts, encoded, eval_prompts, function_reward, train_columns, eval_columns)
        metrics = train(run_folder, roles, tokenizer, prompts, config, controller, trainable, checkpoint, start, ptx)
        if accelerator.is_main_process:
            save_outputs(roles, run_folder.path)
        accelerator.wait_for_everyone()
        run_folder.complete(metrics, iterations=config.iterations, final_beta=controller.beta)
    if accelerator.is_main_process:
        summary_table(
            "ppo",
            {
                "output": str(config.out),
                "iterations": config.iterations,
                **{k: v for k, v in metrics.items() if k.startswith(("eval/", "objective/"))},
            },
        )
    return Path(config.out)


def start_run(config: PPOConfig, sft_source: ModelSource, user_function: WeightedRewards | None) -> training.Start:
    """The accelerator, the device and the ppo run folder (core/training.py's `start`), naming its parents (the
    SFT run, the RM run, the data folder), the base model the SFT run was trained on, and the reward
    functions' files, by content, so a changed function is visible in the manifest."""
    inputs = {
        "sft": config.sft,
        **({"rm": config.reward} if config.reward is not None else {}),
        "data": config.data,
    }
    function_record = {}
    if user_function is not None:
        function_record = {
            "reward_fn": [
                {"spec": f.spec, "weight": w, **({"sha256": artifacts.sha256_file(f.file)} if f.file else {})}
                for f, w in zip(user_function.functions, user_function.weights)
            ]
        }
    extra = {"base_model": sft_source.run_manifest["base_model"], **function_record}
    return training.start(config, "ppo", sft_source, inputs=inputs, extra=extra)


def check_config(config: PPOConfig) -> None:
    """The flags ppo needs, and combinations that cannot work."""
    for flag, value in (("--sft", config.sft), ("--data", config.data)):
        if value is None:
            raise UserError(f"{flag} is required", where=flag, fix="See `instruct ppo --help` for an example")
    if config.reward is None and not config.reward_fn:
        raise UserError(
            "--reward or --reward-fn is required",
            where="--reward",
            fix="Pass a reward-model run (--reward runs/rm), a reward function (--reward-fn FILE.py:NAME), or both",
        )
    k = group_size(config)
    estimator = ADVANTAGE_ESTIMATORS[config.advantage]
    if k < estimator.min_k:
        raise UserError(
            f"--advantage {config.advantage} compares several responses to the same prompt, and "
            f"--samples-per-prompt is {k}",
            where="--samples-per-prompt",
            fix=f"Use --samples-per-prompt {estimator.min_k} or more ({estimator.default_k} is the default for "
            f"{config.advantage})",
        )
    if config.rollout_batch_size % k:
        raise UserError(
            f"--rollout-batch-size {config.rollout_batch_size} is not a multiple of --samples-per-prompt {k}",
            where="--rollout-batch-size",
            fix=f"Use a multiple of {k}, e.g. {max(k, config.rollout_batch_size // k * k)}",
        )
    if config.out is None:
        raise UserError("--out is required", where="--out", fix="Pass --out runs/NAME")
    if config.minibatch_size > config.rollout_batch_size:
        raise UserError(
            "--minibatch-size cannot exceed --rollout-batch-size",
            where="--minibatch-size",
            fix=f"Use at most {config.rollout_batch_size}",
        )
    if config.kl_horizon > 1000:
        raise UserError(
            f"--kl-horizon {config.kl_horizon}: the horizon now counts iterations, not samples",
            where="--kl-horizon",
            fix="Use a few iterations, e.g. 5 (the default): beta then moves up to 4% per iteration",
        )


class Prompts(NamedTuple):
    """The prompts of a run: training prompts as messages and as token ids, held-out prompts for the
    evaluations, and the reward function (if any) that scores responses to them."""

    train: list[list[dict]]
    encoded: list[list[int]]
    eval: list[list[dict]]
    function_reward: FunctionReward | None
    train_columns: list[dict]
    """Each training prompt's data columns (answer, ...), for the reward functions."""
    eval_columns: list[dict]


def train(
    run_folder, roles, tokenizer, prompts: Prompts, config, controller, trainable, checkpoint, start, ptx
) -> dict[str, float]:
    """The iterations: trajectory, update, KL controller, logs, evaluation, checkpoints at boundaries."""
    accelerator = trainable.accelerator
    metrics: dict[str, float] = {}
    started, rollouts = time.time(), 0
    with progress("ppo", total=config.iterations) as bar, StopSignals() as stop:
        bar.set_completed(start)
        iteration = start
        try:
            while iteration < config.iterations:
                began = time.perf_counter()
                # K consecutive rows per prompt: the groups of rloo/grpo
                mine = [
                    i
                    for i in iteration_prompts(len(prompts.encoded), config, iteration, accelerator)
                    for _ in range(group_size(config))
                ]
                batch = rollout(roles, tokenizer, [prompts.encoded[i] for i in mine], config, accelerator)
                rolled = time.perf_counter()
                trajectory, stats = make_trajectory(
                    roles,
                    batch,
                    config,
                    controller.beta,
                    accelerator,
                    prompts.function_reward,
                    [prompts.train[i] for i in mine],
                    iteration,
                    columns=[prompts.train_columns[i] for i in mine],
                )
                if not torch.isfinite(trajectory.scores).all():
                    raise NonFinite("reward")
                updating = time.perf_counter()
                stats.update(
                    update(
                        roles,
                        trainable.optimizer,
                        trajectory,
                        config,
                        accelerator,
                        iteration,
                        ptx and ptx(iteration),
                        beta=controller.beta,
                    )
                )
                stats["time/rollout"] = rolled - began
                stats["time/update"] = time.perf_counter() - updating
                sampled = distributed.summer(accelerator)(batch.response_mask.sum()).item()
                stats["rollout/tokens_per_s"] = sampled / max(stats["time/rollout"], 1e-9)
                stats["objective/beta"] = controller.beta
                controller.update(stats["objective/kl"])
                stats["train/lr"] = trainable.scheduler.get_last_lr()[0]  # the rate this iteration used
                trainable.scheduler.step()
                iteration += 1
                rollouts += len(mine) * accelerator.num_processes
                stats["train/samples_per_s"] = rollouts / max(time.time() - started, 1e-6)
                if iteration % config.eval_every == 0 or iteration == config.iterations:
                    evaluating = time.perf_counter()
                    eval_metrics, samples = evaluate(
                        roles,
                        tokenizer,
                        prompts.eval,
                        config,
                        accelerator,
                        prompts.function_reward,
                        prompts.eval_columns,
                    )
                    stats.update(eval_metrics)
                    stats["time/eval"] = time.perf_counter() - evaluating
                    if accelerator.is_main_process:
                        append_samples(run_folder.path, iteration, samples)
                        show_samples(samples, iteration)
                stats["time/iteration"] = time.perf_counter() - began
                metrics = stats
                run_folder.log_metrics(iteration, stats)
                bar.advance(
                    1,
                    score=stats["objective/score"],
                    kl=stats["objective/kl"],
                    beta=controller.beta,
                    clip=stats["policy/clipfrac"],
                    rollout_s=stats["time/rollout"],
                    update_s=stats["time/update"],
                    samples_s=stats["train/samples_per_s"],
                    **kl_warning(stats["objective/kl"], config),
                )
                checkpoint.end_of_step(iteration, math.inf, total=config.iterations, every=config.save_every, stop=stop)
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
