"""The training commands: `instruct sft`, `instruct rm` (and `rm score`), `instruct dpo` and `instruct ppo`.

Each builds its step's config from the recipe section and the flags given, then calls the step's `run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from instruct_cli.cli.app import ForceOption, RecipeOption, _opt, app, handles_user_errors
from instruct_cli.core import config as cfg
from instruct_cli.core import recipes

# --------------------------------------------------------------------------------------------------- sft
S = cfg.SFTConfig


@app.command()
@handles_user_errors
def sft(
    model: Annotated[Optional[str], _opt(S, "model", "--model", "-m")] = None,
    data: Annotated[Optional[Path], _opt(S, "data", "--data", "-d")] = None,
    out: Annotated[Optional[Path], _opt(S, "out", "--out", "-o")] = None,
    quantization: Annotated[Optional[str], _opt(S, "quantization")] = None,
    device: Annotated[Optional[str], _opt(S, "device")] = None,
    lora_r: Annotated[Optional[int], _opt(S, "lora_r")] = None,
    lora_alpha: Annotated[Optional[int], _opt(S, "lora_alpha")] = None,
    lora_dropout: Annotated[Optional[float], _opt(S, "lora_dropout")] = None,
    lora_targets: Annotated[Optional[str], _opt(S, "lora_targets")] = None,
    epochs: Annotated[Optional[int], _opt(S, "epochs")] = None,
    max_steps: Annotated[Optional[int], _opt(S, "max_steps")] = None,
    batch_size: Annotated[Optional[int], _opt(S, "batch_size")] = None,
    grad_accum: Annotated[Optional[int], _opt(S, "grad_accum")] = None,
    lr: Annotated[Optional[float], _opt(S, "lr")] = None,
    warmup_ratio: Annotated[Optional[float], _opt(S, "warmup_ratio")] = None,
    weight_decay: Annotated[Optional[float], _opt(S, "weight_decay")] = None,
    max_grad_norm: Annotated[Optional[float], _opt(S, "max_grad_norm")] = None,
    max_length: Annotated[Optional[int], _opt(S, "max_length")] = None,
    packing: Annotated[Optional[bool], _opt(S, "packing", "--packing/--no-packing")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool],
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help=cfg.doc(S, "gradient_checkpointing"),
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[Optional[int], _opt(S, "eval_every")] = None,
    save_every: Annotated[Optional[int], _opt(S, "save_every")] = None,
    keep: Annotated[Optional[str], _opt(S, "keep")] = None,
    precision: Annotated[Optional[str], _opt(S, "precision")] = None,
    seed: Annotated[Optional[int], _opt(S, "seed")] = None,
    report_to: Annotated[Optional[str], _opt(S, "report_to")] = None,
    resume: Annotated[Optional[bool], _opt(S, "resume")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """Supervised fine-tuning: train a LoRA adapter on demonstrations (loss on assistant tokens only).

    [bold]Examples[/bold]

      instruct sft --data data/sft --out runs/sft

      instruct sft --model Qwen/Qwen2.5-0.5B-Instruct --data data/sft --out runs/sft --epochs 2 --lr 1e-4

      instruct sft --recipe recipes/quickstart.yaml --out runs/sft --resume

      instruct sft --data data/sft --out runs/sft --report-to tensorboard   # then: tensorboard --logdir runs
    """
    from instruct_cli.steps import sft as sft_step

    config = recipes.build_config(
        S,
        "sft",
        recipe,
        dict(
            model=model,
            data=data,
            out=out,
            quantization=quantization,
            device=device,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=lora_targets,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            max_length=max_length,
            packing=packing,
            gradient_checkpointing=gradient_checkpointing,
            eval_every=eval_every,
            save_every=save_every,
            keep=keep,
            precision=precision,
            seed=seed,
            report_to=report_to,
            resume=resume,
            force=force,
        ),
    )
    sft_step.run(config)


# ---------------------------------------------------------------------------------------------------- rm
R = cfg.RMConfig
RS = cfg.RMScoreConfig
rm_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    rich_markup_mode="rich",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(rm_app, name="rm")


@rm_app.callback()
@handles_user_errors
def rm(
    ctx: typer.Context,
    model: Annotated[Optional[str], _opt(R, "model", "--model", "-m")] = None,
    data: Annotated[Optional[Path], _opt(R, "data", "--data", "-d")] = None,
    out: Annotated[Optional[Path], _opt(R, "out", "--out", "-o")] = None,
    quantization: Annotated[Optional[str], _opt(R, "quantization")] = None,
    device: Annotated[Optional[str], _opt(R, "device")] = None,
    lora_r: Annotated[Optional[int], _opt(R, "lora_r")] = None,
    lora_alpha: Annotated[Optional[int], _opt(R, "lora_alpha")] = None,
    lora_dropout: Annotated[Optional[float], _opt(R, "lora_dropout")] = None,
    lora_targets: Annotated[Optional[str], _opt(R, "lora_targets")] = None,
    margin: Annotated[Optional[float], _opt(R, "margin")] = None,
    shared_prefix: Annotated[Optional[bool], _opt(R, "shared_prefix", "--shared-prefix/--no-shared-prefix")] = None,
    epochs: Annotated[Optional[int], _opt(R, "epochs")] = None,
    max_steps: Annotated[Optional[int], _opt(R, "max_steps")] = None,
    batch_size: Annotated[Optional[int], _opt(R, "batch_size")] = None,
    grad_accum: Annotated[Optional[int], _opt(R, "grad_accum")] = None,
    lr: Annotated[Optional[float], _opt(R, "lr")] = None,
    warmup_ratio: Annotated[Optional[float], _opt(R, "warmup_ratio")] = None,
    weight_decay: Annotated[Optional[float], _opt(R, "weight_decay")] = None,
    max_grad_norm: Annotated[Optional[float], _opt(R, "max_grad_norm")] = None,
    max_length: Annotated[Optional[int], _opt(R, "max_length")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool],
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help=cfg.doc(R, "gradient_checkpointing"),
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[Optional[int], _opt(R, "eval_every")] = None,
    save_every: Annotated[Optional[int], _opt(R, "save_every")] = None,
    keep: Annotated[Optional[str], _opt(R, "keep")] = None,
    precision: Annotated[Optional[str], _opt(R, "precision")] = None,
    seed: Annotated[Optional[int], _opt(R, "seed")] = None,
    report_to: Annotated[Optional[str], _opt(R, "report_to")] = None,
    resume: Annotated[Optional[bool], _opt(R, "resume")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """Train a reward model (LoRA + scalar head) on preference pairs or K-wise rankings.

    [bold]Examples[/bold]

      instruct rm --model runs/sft --data data/prefs --out runs/rm

      instruct rm --data data/prefs --out runs/rm --margin 0.5 --epochs 2

      instruct rm score --model runs/rm --input answers.jsonl --output scored.jsonl
    """
    if ctx.invoked_subcommand is not None:
        return
    from instruct_cli.steps import rm as rm_step

    config = recipes.build_config(
        R,
        "rm",
        recipe,
        dict(
            model=model,
            data=data,
            out=out,
            quantization=quantization,
            device=device,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=lora_targets,
            margin=margin,
            shared_prefix=shared_prefix,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            max_length=max_length,
            gradient_checkpointing=gradient_checkpointing,
            eval_every=eval_every,
            save_every=save_every,
            keep=keep,
            precision=precision,
            seed=seed,
            report_to=report_to,
            resume=resume,
            force=force,
        ),
    )
    rm_step.run(config)


@rm_app.command("score")
@handles_user_errors
def rm_score(
    model: Annotated[Optional[str], _opt(RS, "model", "--model", "-m")] = None,
    input: Annotated[Optional[Path], _opt(RS, "input", "--input", "-i")] = None,
    output: Annotated[Optional[Path], _opt(RS, "output", "--output", "-o")] = None,
    batch_size: Annotated[Optional[int], _opt(RS, "batch_size")] = None,
    max_length: Annotated[Optional[int], _opt(RS, "max_length")] = None,
    quantization: Annotated[Optional[str], _opt(RS, "quantization")] = None,
    device: Annotated[Optional[str], _opt(RS, "device")] = None,
) -> None:
    """Score rows of prompt + response with a reward model run; adds a normalised `reward` to each row.

    [bold]Examples[/bold]

      instruct rm score --model runs/rm --input answers.jsonl --output scored.jsonl

      instruct generate -m runs/sft -i prompts.jsonl | instruct rm score -m runs/rm -i -
    """
    from instruct_cli.steps import rm as rm_step

    config = recipes.build_config(
        RS,
        "rm-score",
        None,
        dict(
            model=model,
            input=input,
            output=output,
            batch_size=batch_size,
            max_length=max_length,
            quantization=quantization,
            device=device,
        ),
    )
    rm_step.score(config)


# --------------------------------------------------------------------------------------------------- dpo
D = cfg.DPOConfig


@app.command()
@handles_user_errors
def dpo(
    model: Annotated[Optional[str], _opt(D, "model", "--model", "-m")] = None,
    data: Annotated[Optional[Path], _opt(D, "data", "--data", "-d")] = None,
    out: Annotated[Optional[Path], _opt(D, "out", "--out", "-o")] = None,
    beta: Annotated[Optional[float], _opt(D, "beta")] = None,
    loss: Annotated[Optional[str], _opt(D, "loss")] = None,
    label_smoothing: Annotated[Optional[float], _opt(D, "label_smoothing")] = None,
    quantization: Annotated[Optional[str], _opt(D, "quantization")] = None,
    device: Annotated[Optional[str], _opt(D, "device")] = None,
    lora_r: Annotated[Optional[int], _opt(D, "lora_r")] = None,
    lora_alpha: Annotated[Optional[int], _opt(D, "lora_alpha")] = None,
    lora_dropout: Annotated[Optional[float], _opt(D, "lora_dropout")] = None,
    lora_targets: Annotated[Optional[str], _opt(D, "lora_targets")] = None,
    epochs: Annotated[Optional[int], _opt(D, "epochs")] = None,
    max_steps: Annotated[Optional[int], _opt(D, "max_steps")] = None,
    batch_size: Annotated[Optional[int], _opt(D, "batch_size")] = None,
    grad_accum: Annotated[Optional[int], _opt(D, "grad_accum")] = None,
    lr: Annotated[Optional[float], _opt(D, "lr")] = None,
    warmup_ratio: Annotated[Optional[float], _opt(D, "warmup_ratio")] = None,
    weight_decay: Annotated[Optional[float], _opt(D, "weight_decay")] = None,
    max_grad_norm: Annotated[Optional[float], _opt(D, "max_grad_norm")] = None,
    max_length: Annotated[Optional[int], _opt(D, "max_length")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool],
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help=cfg.doc(D, "gradient_checkpointing"),
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[Optional[int], _opt(D, "eval_every")] = None,
    save_every: Annotated[Optional[int], _opt(D, "save_every")] = None,
    keep: Annotated[Optional[str], _opt(D, "keep")] = None,
    precision: Annotated[Optional[str], _opt(D, "precision")] = None,
    seed: Annotated[Optional[int], _opt(D, "seed")] = None,
    report_to: Annotated[Optional[str], _opt(D, "report_to")] = None,
    resume: Annotated[Optional[bool], _opt(D, "resume")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """Direct preference optimisation: train the policy on preference pairs or rankings, with no reward model.

    The reference is the model it starts from (the SFT run's adapter), scored once on the same base.

    [bold]Examples[/bold]

      instruct dpo --model runs/sft --data data/prefs --out runs/dpo

      instruct dpo --model runs/sft --data data/prefs --out runs/ipo --loss ipo --beta 0.5

      instruct dpo --model runs/sft --data data/prefs --out runs/cdpo --label-smoothing 0.1 --epochs 2

      instruct dpo --model runs/sft --data data/prefs --out runs/dpo --resume
    """
    from instruct_cli.steps import dpo as dpo_step

    config = recipes.build_config(
        D,
        "dpo",
        recipe,
        dict(
            model=model,
            data=data,
            out=out,
            beta=beta,
            loss=loss,
            label_smoothing=label_smoothing,
            quantization=quantization,
            device=device,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=lora_targets,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            max_length=max_length,
            gradient_checkpointing=gradient_checkpointing,
            eval_every=eval_every,
            save_every=save_every,
            keep=keep,
            precision=precision,
            seed=seed,
            report_to=report_to,
            resume=resume,
            force=force,
        ),
    )
    dpo_step.run(config)


# --------------------------------------------------------------------------------------------------- ppo
PP = cfg.PPOConfig


@app.command()
@handles_user_errors
def ppo(
    sft: Annotated[Optional[Path], _opt(PP, "sft")] = None,
    reward: Annotated[Optional[Path], _opt(PP, "reward")] = None,
    data: Annotated[Optional[Path], _opt(PP, "data", "--data", "-d")] = None,
    out: Annotated[Optional[Path], _opt(PP, "out", "--out", "-o")] = None,
    quantization: Annotated[Optional[str], _opt(PP, "quantization")] = None,
    device: Annotated[Optional[str], _opt(PP, "device")] = None,
    iterations: Annotated[Optional[int], _opt(PP, "iterations")] = None,
    rollout_batch_size: Annotated[Optional[int], _opt(PP, "rollout_batch_size")] = None,
    minibatch_size: Annotated[Optional[int], _opt(PP, "minibatch_size")] = None,
    ppo_epochs: Annotated[Optional[int], _opt(PP, "ppo_epochs")] = None,
    lr: Annotated[Optional[float], _opt(PP, "lr")] = None,
    max_new_tokens: Annotated[Optional[int], _opt(PP, "max_new_tokens")] = None,
    max_prompt_length: Annotated[Optional[int], _opt(PP, "max_prompt_length")] = None,
    temperature: Annotated[Optional[float], _opt(PP, "temperature")] = None,
    kl_coef: Annotated[Optional[float], _opt(PP, "kl_coef")] = None,
    target_kl: Annotated[Optional[float], _opt(PP, "target_kl")] = None,
    kl_horizon: Annotated[Optional[int], _opt(PP, "kl_horizon")] = None,
    gamma: Annotated[Optional[float], _opt(PP, "gamma")] = None,
    lam: Annotated[Optional[float], _opt(PP, "lam")] = None,
    advantage: Annotated[Optional[str], _opt(PP, "advantage")] = None,
    samples_per_prompt: Annotated[Optional[int], _opt(PP, "samples_per_prompt")] = None,
    kl_penalty: Annotated[Optional[str], _opt(PP, "kl_penalty")] = None,
    reward_fn: Annotated[Optional[str], _opt(PP, "reward_fn")] = None,
    reward_fn_weight: Annotated[Optional[float], _opt(PP, "reward_fn_weight")] = None,
    clip_range: Annotated[Optional[float], _opt(PP, "clip_range")] = None,
    value_clip_range: Annotated[Optional[float], _opt(PP, "value_clip_range")] = None,
    vf_coef: Annotated[Optional[float], _opt(PP, "vf_coef")] = None,
    missing_eos_penalty: Annotated[Optional[float], _opt(PP, "missing_eos_penalty")] = None,
    ptx_coef: Annotated[Optional[float], _opt(PP, "ptx_coef")] = None,
    ptx_data: Annotated[Optional[Path], _opt(PP, "ptx_data")] = None,
    max_grad_norm: Annotated[Optional[float], _opt(PP, "max_grad_norm")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool],
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help=cfg.doc(PP, "gradient_checkpointing"),
            show_default=False,
        ),
    ] = None,
    merged_rollouts: Annotated[
        Optional[bool], _opt(PP, "merged_rollouts", "--merged-rollouts/--no-merged-rollouts")
    ] = None,
    packing: Annotated[Optional[bool], _opt(PP, "packing", "--packing/--no-packing")] = None,
    eval_every: Annotated[Optional[int], _opt(PP, "eval_every")] = None,
    eval_prompts: Annotated[Optional[int], _opt(PP, "eval_prompts")] = None,
    save_every: Annotated[Optional[int], _opt(PP, "save_every")] = None,
    precision: Annotated[Optional[str], _opt(PP, "precision")] = None,
    seed: Annotated[Optional[int], _opt(PP, "seed")] = None,
    report_to: Annotated[Optional[str], _opt(PP, "report_to")] = None,
    resume: Annotated[Optional[bool], _opt(PP, "resume")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """RLHF with PPO: optimise the SFT policy against the reward model, on one shared base model.

    --advantage rloo or grpo trains without a value function (K samples per prompt); --reward-fn uses a Python
    function as the reward, instead of the reward model or added to it.

    [bold]Examples[/bold]

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/ppo

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/ppo --target-kl 6 --iterations 200

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/rloo --advantage rloo

      instruct ppo --sft runs/sft --reward-fn examples/rewards.py:brevity --data data/prompts --out runs/grpo --advantage grpo --kl-penalty loss

      instruct ppo --recipe recipes/quickstart.yaml --resume
    """
    from instruct_cli.steps import ppo as ppo_step

    config = recipes.build_config(
        PP,
        "ppo",
        recipe,
        dict(
            sft=sft,
            reward=reward,
            data=data,
            out=out,
            quantization=quantization,
            device=device,
            iterations=iterations,
            rollout_batch_size=rollout_batch_size,
            minibatch_size=minibatch_size,
            ppo_epochs=ppo_epochs,
            lr=lr,
            max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length,
            temperature=temperature,
            kl_coef=kl_coef,
            target_kl=target_kl,
            kl_horizon=kl_horizon,
            gamma=gamma,
            lam=lam,
            advantage=advantage,
            samples_per_prompt=samples_per_prompt,
            kl_penalty=kl_penalty,
            reward_fn=reward_fn,
            reward_fn_weight=reward_fn_weight,
            clip_range=clip_range,
            value_clip_range=value_clip_range,
            vf_coef=vf_coef,
            missing_eos_penalty=missing_eos_penalty,
            ptx_coef=ptx_coef,
            ptx_data=ptx_data,
            max_grad_norm=max_grad_norm,
            gradient_checkpointing=gradient_checkpointing,
            merged_rollouts=merged_rollouts,
            packing=packing,
            eval_every=eval_every,
            eval_prompts=eval_prompts,
            save_every=save_every,
            precision=precision,
            seed=seed,
            report_to=report_to,
            resume=resume,
            force=force,
        ),
    )
    ppo_step.run(config)
