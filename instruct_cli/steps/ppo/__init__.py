"""`instruct ppo`: RLHF with PPO on ONE shared base model (InstructGPT step 3).

One iteration, top to bottom (`train`):
    1. rollout     sample responses for a batch of prompts (left padding, KV cache, temperature T), cut at EOS
    2. score       reward role on prompt + response at the last real token; penalty when there is no EOS
    3. KL          per-token logp_policy - logp_reference (both at temperature T); reward shaping with beta
    4. advantages  GAE with the value role, advantages whitened (or, critic-free, RLOO / GRPO over the K
                   responses to each prompt)
    5. update      clipped policy and value losses, several epochs of minibatches, gradient clipping

    roles.py       the four adapters on one base (policy, reference, value, reward) and the two heads
    trajectory.py  steps 1-4: Rollout, Trajectory (shapes documented), make_trajectory
    update_step.py step 5
The maths lives in core/rl.py; this package moves tensors between the roles.

Data parallel (`accelerate launch --num_processes N`): each process samples its own share of the
iteration's prompts with its own random stream (seed + process index); whitening, the logged statistics and
the KL controller use every process's rollouts, the update sums gradients over processes, and only the main
process writes. N processes with --rollout-batch-size B cover the prompts of one process with N x B.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import NamedTuple

import torch

from instruct_cli.core import (
    artifacts,
    chat,
    data_folders,
    distributed,
    lm,
    models,
    reward_functions,
    rl,
    trackers,
    training,
)
from instruct_cli.core.checkpoints import Checkpointer, StopSignals
from instruct_cli.core.config import PPOConfig, to_recipe_dict
from instruct_cli.core.console import console, info, progress, summary_table
from instruct_cli.core.errors import UserError
from instruct_cli.core.reward_functions import RewardFunction
from instruct_cli.steps.ppo.roles import (
    POLICY,
    REFERENCE,
    REWARD,
    VALUE,
    Roles,
    check_runs,
    disable_dropout,
    load_roles,
    save_outputs,
)
from instruct_cli.steps.ppo.trajectory import (
    FunctionReward,
    Rollout,
    Trajectory,
    group_size,
    make_trajectory,
    merged_rollouts_blocker,
    pack_rows,
    packs,
    response_logprobs,
    rollout,
    score,
)
from instruct_cli.steps.ppo.update_step import NonFinite, update, update_minibatch

__all__ = [
    "POLICY",
    "REFERENCE",
    "REWARD",
    "VALUE",
    "Roles",
    "Rollout",
    "Trajectory",
    "disable_dropout",
    "load_roles",
    "make_trajectory",
    "rollout",
    "run",
    "update",
    "update_minibatch",
    "iteration_prompts",
]


# ------------------------------------------------------------------------------------------------- run
def run(config: PPOConfig) -> Path:
    """PPO from an SFT run against an RM run on a data folder's prompts; writes the ppo run folder."""
    check_config(config)
    if training.nothing_to_resume(config, "ppo"):
        return Path(config.out)
    train_prompts = data_folders.read_prompts(config.data, "train")
    eval_prompts = (
        data_folders.read_prompts(config.data, "eval")[: config.eval_prompts] or train_prompts[: config.eval_prompts]
    )
    accelerator = training.make_accelerator(config.seed, config.precision, config.device)
    device = accelerator.device if config.device == "auto" else models.pick_device(config.device)
    runs = check_runs(config)  # before the run folder is opened: a bad input never leaves a folder behind
    user_function = reward_functions.load(config.reward_fn) if config.reward_fn else None
    sft_manifest = runs[0].run_manifest
    run_folder = open_ppo_run(config, accelerator, sft_manifest, user_function)
    with run_folder.recording():
        roles, tokenizer, _, _ = load_roles(config, device, runs)
        function_reward = FunctionReward(user_function, config.reward_fn_weight, tokenizer) if user_function else None
        encoded = [chat.encode_prompt(tokenizer, messages) for messages in train_prompts]
        optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=config.lr, eps=1e-5)
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
            f"{f'; reward function {config.reward_fn}' if config.reward_fn else ''})"
        )
        blocker = merged_rollouts_blocker(roles, config)
        if config.merged_rollouts and blocker:
            info(f"Rollouts sample with the policy adapter unmerged (slower): {blocker}")
        if config.packing and not packs(roles, config):
            info("The log-prob and value passes run padded (slower): the model takes no packed rows")
        prompts = Prompts(train_prompts, encoded, eval_prompts, function_reward)
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


def check_config(config: PPOConfig) -> None:
    """The flags ppo needs, and combinations that cannot work."""
    for flag, value in (("--sft", config.sft), ("--data", config.data)):
        if value is None:
            raise UserError(f"{flag} is required", where=flag, fix="See `instruct ppo --help` for an example")
    if config.reward is None and config.reward_fn is None:
        raise UserError(
            "--reward or --reward-fn is required",
            where="--reward",
            fix="Pass a reward-model run (--reward runs/rm), a reward function (--reward-fn FILE.py:NAME), or both",
        )
    k = group_size(config)
    if config.advantage != "gae" and k < 2:
        raise UserError(
            f"--advantage {config.advantage} compares several responses to the same prompt, and "
            f"--samples-per-prompt is {k}",
            where="--samples-per-prompt",
            fix="Use --samples-per-prompt 2 or more (4 is the default for rloo and grpo)",
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
                trainable.scheduler.step()
                iteration += 1
                rollouts += len(mine) * accelerator.num_processes
                stats["train/samples_per_s"] = rollouts / max(time.time() - started, 1e-6)
                stats["train/lr"] = trainable.scheduler.get_last_lr()[0]
                if iteration % config.eval_every == 0 or iteration == config.iterations:
                    evaluating = time.perf_counter()
                    eval_metrics, samples = evaluate(
                        roles, tokenizer, prompts.eval, config, accelerator, prompts.function_reward
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


# ------------------------------------------------------------------------------------------------ data
def prompt_batches(count: int, batch_size: int, seed: int, iteration: int) -> list[int]:
    """Indices of the prompts of iteration `iteration`: a fresh shuffle per pass over the data."""
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(iteration, per_epoch)
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    chosen = order[position * batch_size : (position + 1) * batch_size]
    return chosen if len(chosen) == batch_size else (order * batch_size)[:batch_size]


def iteration_prompts(count: int, config: PPOConfig, iteration: int, accelerator) -> list[int]:
    """This process's prompts of iteration `iteration`: the global batch of rollout_batch_size / K x processes
    prompts is formed as one process would form it, and process r takes its r-th contiguous share (so the
    trajectory's rows, process 0's first, are the global batch in order)."""
    size, rank = config.rollout_batch_size // group_size(config), accelerator.process_index
    chosen = prompt_batches(count, size * accelerator.num_processes, config.seed, iteration)
    return chosen[rank * size : (rank + 1) * size]


def ptx_batches(config: PPOConfig, tokenizer, sft_manifest: dict, device, accelerator):
    """PPO-ptx batches of SFT demonstrations (from --ptx-data, or the SFT run's own data): iteration ->
    minibatch number -> batch. A pure function of (seed, process, iteration, minibatch), so resuming needs
    no state of its own."""
    folder = config.ptx_data or Path(sft_manifest["parents"]["data"]["path"])
    rows = data_folders.read_split(folder, "sft.train")
    encoded = [chat.encode_conversation(tokenizer, row["messages"], 1024) for row in rows]
    rank = accelerator.process_index

    def for_iteration(iteration: int):
        def batch(number: int) -> dict:
            rng = random.Random(f"ptx-{config.seed}-{rank}-{iteration}-{number}")
            chosen = rng.sample(encoded, k=min(config.minibatch_size, len(encoded)))
            return lm.collate(chosen, tokenizer.pad_token_id, device)

        return batch

    return for_iteration


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    roles: Roles,
    tokenizer,
    prompts: list[list[dict]],
    config: PPOConfig,
    accelerator,
    function_reward: FunctionReward | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Mean normalised reward (missing-EOS penalty included, as `instruct eval` scores), KL to the
    reference, length and EOS rate on held-out prompts, plus the samples. Each process answers its share;
    every process gets the whole result."""
    rows = []
    share = [(index, prompts[index]) for index in distributed.my_share(len(prompts), accelerator)]
    for start in range(0, len(share), config.rollout_batch_size):
        chunk = share[start : start + config.rollout_batch_size]
        encoded = [chat.encode_prompt(tokenizer, messages) for _, messages in chunk]
        batch = rollout(roles, tokenizer, encoded, config, accelerator)
        with accelerator.autocast():
            messages = [m for _, m in chunk]
            scores = score(roles, batch, config.missing_eos_penalty, function_reward, messages, config.packing)
            packed = pack_rows(*batch[:4]) if packs(roles, config) else None
            policy, _ = response_logprobs(roles, POLICY, *batch[:4], config.temperature, packed)
            reference, _ = response_logprobs(roles, REFERENCE, *batch[:4], config.temperature, packed)
        kls = ((policy - reference) * batch.response_mask).sum(1)
        for row, (index, messages) in enumerate(chunk):
            ids = batch.response[row][batch.response_mask[row].bool()]
            rows.append(
                {
                    "index": index,
                    "prompt": messages,
                    "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    "reward": scores[row].item(),
                    "kl": kls[row].item(),
                    "length": int(batch.response_mask[row].sum()),
                    "eos": bool(batch.ended[row]),
                }
            )
    rows = sorted(distributed.gather_lists(accelerator, rows), key=lambda row: row["index"])
    metrics = {
        "eval/reward": sum(r["reward"] for r in rows) / len(rows),
        "eval/kl": sum(r["kl"] for r in rows) / len(rows),
        "eval/length": sum(r["length"] for r in rows) / len(rows),
        "eval/eos_rate": sum(r["eos"] for r in rows) / len(rows),
    }
    samples = [{"prompt": r["prompt"], "response": r["response"], "reward": r["reward"]} for r in rows]
    return metrics, samples


def show_samples(samples: list[dict], iteration: int, how_many: int = 2) -> None:
    """Print a few prompt/response pairs with their reward."""
    for sample in samples[:how_many]:
        prompt = sample["prompt"][-1]["content"]
        console.print(
            f"[dim]iter {iteration}[/dim] [bold]{prompt[:80]}[/bold] -> {sample['response'][:160]!r} "
            f"[dim](reward {sample['reward']:.2f})[/dim]"
        )


# ------------------------------------------------------------------------------------------ run folder
def append_samples(folder: Path, iteration: int, samples: list[dict]) -> None:
    """Append an evaluation's samples to samples.jsonl."""
    with open(folder / "samples.jsonl", "a", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({"iteration": iteration, **sample}, ensure_ascii=False) + "\n")


def open_ppo_run(
    config: PPOConfig, accelerator, sft_manifest: dict, user_function: RewardFunction | None
) -> artifacts.RunFolder:
    """Open the ppo run folder (main process), naming its parents (and the reward function's file, by
    content, so a changed function is visible in the manifest), with the experiment trackers of --report-to."""
    trackers.require_installed(config.report_to)  # before the folder exists: a bad input leaves nothing behind
    function_record = {}
    if user_function is not None:
        function_record = {
            "reward_fn": {"spec": user_function.spec, "sha256": artifacts.sha256_file(user_function.file)}
        }
    if accelerator.is_main_process:
        run_folder = artifacts.RunFolder.open(
            config.out,
            "ppo",
            to_recipe_dict(config),
            force=config.force,
            resume=config.resume,
            parents={
                "sft": artifacts.parent_record(config.sft),
                **({"rm": artifacts.parent_record(config.reward)} if config.reward is not None else {}),
                "data": artifacts.parent_record(config.data),
            },
            extra={"base_model": sft_manifest["base_model"], "quantization": config.quantization, **function_record},
        )
        trackers.attach(run_folder, config.report_to)
    accelerator.wait_for_everyone()
    return run_folder if accelerator.is_main_process else artifacts.RunFolder.follow(config.out)
