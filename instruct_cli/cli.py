"""The `instruct` command line: thin typer commands that build a step's config and call `<step>.run(config)`.

Each command's flags mirror its config dataclass (config.py), whose field docstrings are the flag help.
A flag left out is None here, so a recipe's value (via --recipe) or the dataclass default applies.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from instruct_cli import __version__
from instruct_cli.core import config as cfg
from instruct_cli.core.console import console, error, quiet_warnings
from instruct_cli.core.errors import UserError

app = typer.Typer(
    name="instruct",
    help="The InstructGPT recipe as composable steps: prepare-data -> sft -> rm -> ppo -> eval, "
    "with LoRA adapters on a 4-bit base model. Every step reads and writes plain folders on disk.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RecipeOption = Annotated[
    Optional[Path],
    typer.Option(
        "--recipe", help="Recipe YAML; this step reads its section. Flags given on the command line override it."
    ),
]
ForceOption = Annotated[Optional[bool], typer.Option("--force", help="Replace an existing output folder.")]


def _opt(cls: type, name: str, *flags: str, **kwargs):
    """A typer option whose help is the config field's docstring."""
    flag = flags or ("--" + name.replace("_", "-"),)
    return typer.Option(*flag, help=cfg.doc(cls, name), show_default=False, **kwargs)


def handles_user_errors(command: Callable) -> Callable:
    """Turn UserError into a one-paragraph message and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            error(exc.paragraph())
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error(
                "Interrupted. Any run folder was left marked as interrupted; rerun the same command with "
                "--resume to continue it where checkpoints allow, or --force to start over."
            )
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"instruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """instruct: SFT, reward model and PPO as composable command-line steps."""


# ------------------------------------------------------------------------------------------ prepare-data
P = cfg.PrepareDataConfig


@app.command("prepare-data")
@handles_user_errors
def prepare_data(
    inputs: Annotated[Optional[list[Path]], _opt(P, "inputs", "--input", "-i")] = None,
    out: Annotated[Optional[Path], _opt(P, "out", "--out", "-o")] = None,
    format: Annotated[Optional[str], _opt(P, "format")] = None,
    task: Annotated[Optional[str], _opt(P, "task")] = None,
    eval_fraction: Annotated[Optional[float], _opt(P, "eval_fraction")] = None,
    seed: Annotated[Optional[int], _opt(P, "seed")] = None,
    system: Annotated[Optional[str], _opt(P, "system")] = None,
    max_tokens: Annotated[Optional[int], _opt(P, "max_tokens")] = None,
    model: Annotated[Optional[str], _opt(P, "model")] = None,
    strict: Annotated[Optional[bool], _opt(P, "strict")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """Turn raw files into a data folder of canonical JSONL splits and a manifest.

    Reads JSON, JSONL, CSV, Parquet, plain text and `datasets.save_to_disk` folders in the alpaca, ShareGPT,
    OpenAI messages, prompt/completion, prompt/chosen/rejected, ranked, Anthropic HH and one-prompt-per-line
    formats (detected automatically).

    [bold]Examples[/bold]

      instruct prepare-data -i alpaca.json -o data/sft

      instruct prepare-data -i hh.jsonl --task prefs --max-tokens 1024 -o data/prefs

      instruct prepare-data -i prompts.txt --task prompts -o data/prompts
    """
    from instruct_cli.steps import prepare_data as data

    flags = dict(
        inputs=inputs,
        out=out,
        format=format,
        task=task,
        eval_fraction=eval_fraction,
        seed=seed,
        system=system,
        max_tokens=max_tokens,
        model=model,
        strict=strict,
        force=force,
    )
    entries = len(cfg.recipe_entries(recipe, "prepare-data", P)) if recipe else 1
    if entries > 1 and (inputs or out):
        raise UserError(
            f"The recipe's prepare-data section lists {entries} data sets; --input and --out cannot "
            "apply to all of them",
            where="--recipe",
            fix="Drop --input/--out, or edit the recipe",
        )
    for entry in range(entries):  # a recipe may list several data sets (sft, prefs, prompts)
        data.run(cfg.build_config(P, "prepare-data", recipe, flags, entry=entry if recipe else None))


# ---------------------------------------------------------------------------------------------- generate
G = cfg.GenerateConfig


@app.command()
@handles_user_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help=cfg.doc(G, "prompt"), show_default=False)] = None,
    model: Annotated[Optional[str], _opt(G, "model", "--model", "-m")] = None,
    input: Annotated[Optional[Path], _opt(G, "input", "--input", "-i")] = None,
    output: Annotated[Optional[Path], _opt(G, "output", "--output", "-o")] = None,
    system: Annotated[Optional[str], _opt(G, "system")] = None,
    max_new_tokens: Annotated[Optional[int], _opt(G, "max_new_tokens")] = None,
    temperature: Annotated[Optional[float], _opt(G, "temperature")] = None,
    top_p: Annotated[Optional[float], _opt(G, "top_p")] = None,
    top_k: Annotated[Optional[int], _opt(G, "top_k")] = None,
    greedy: Annotated[Optional[bool], _opt(G, "greedy")] = None,
    seed: Annotated[Optional[int], _opt(G, "seed")] = None,
    batch_size: Annotated[Optional[int], _opt(G, "batch_size")] = None,
    quantization: Annotated[Optional[str], _opt(G, "quantization")] = None,
    device: Annotated[Optional[str], _opt(G, "device")] = None,
    recipe: RecipeOption = None,
) -> None:
    """Answer a prompt with a base model or any sft/ppo run folder (streamed to stdout).

    [bold]Examples[/bold]

      instruct generate "What is the capital of France?"

      instruct generate --model runs/ppo --greedy "Write a haiku about autumn."

      echo "Tell me a joke" | instruct generate -

      instruct generate --model runs/sft --input prompts.jsonl --output answers.jsonl
    """
    from instruct_cli.steps import generate as generate_step

    config = cfg.build_config(
        G,
        "generate",
        recipe,
        dict(
            prompt=prompt,
            model=model,
            input=input,
            output=output,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            greedy=greedy,
            seed=seed,
            batch_size=batch_size,
            quantization=quantization,
            device=device,
        ),
    )
    generate_step.run(config)


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
    seed: Annotated[Optional[int], _opt(S, "seed")] = None,
    resume: Annotated[Optional[bool], _opt(S, "resume")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """Supervised fine-tuning: train a LoRA adapter on demonstrations (loss on assistant tokens only).

    [bold]Examples[/bold]

      instruct sft --data data/sft --out runs/sft

      instruct sft --model Qwen/Qwen2.5-0.5B-Instruct --data data/sft --out runs/sft --epochs 2 --lr 1e-4

      instruct sft --recipe recipes/quickstart.yaml --out runs/sft --resume
    """
    from instruct_cli.steps import sft as sft_step

    config = cfg.build_config(
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
            gradient_checkpointing=gradient_checkpointing,
            eval_every=eval_every,
            save_every=save_every,
            keep=keep,
            seed=seed,
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
    seed: Annotated[Optional[int], _opt(R, "seed")] = None,
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

    config = cfg.build_config(
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
            seed=seed,
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

    config = cfg.build_config(
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
    eval_every: Annotated[Optional[int], _opt(PP, "eval_every")] = None,
    eval_prompts: Annotated[Optional[int], _opt(PP, "eval_prompts")] = None,
    save_every: Annotated[Optional[int], _opt(PP, "save_every")] = None,
    seed: Annotated[Optional[int], _opt(PP, "seed")] = None,
    resume: Annotated[Optional[bool], _opt(PP, "resume")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """RLHF with PPO: optimise the SFT policy against the reward model, on one shared base model.

    [bold]Examples[/bold]

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/ppo

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/ppo --target-kl 6 --iterations 200

      instruct ppo --recipe recipes/quickstart.yaml --resume
    """
    from instruct_cli.steps import ppo as ppo_step

    config = cfg.build_config(
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
            clip_range=clip_range,
            value_clip_range=value_clip_range,
            vf_coef=vf_coef,
            missing_eos_penalty=missing_eos_penalty,
            ptx_coef=ptx_coef,
            ptx_data=ptx_data,
            max_grad_norm=max_grad_norm,
            gradient_checkpointing=gradient_checkpointing,
            eval_every=eval_every,
            eval_prompts=eval_prompts,
            save_every=save_every,
            seed=seed,
            resume=resume,
            force=force,
        ),
    )
    ppo_step.run(config)


# ------------------------------------------------------------------------------------------------- label
L = cfg.LabelConfig


@app.command()
@handles_user_errors
def label(
    model: Annotated[Optional[str], _opt(L, "model", "--model", "-m")] = None,
    prompts: Annotated[Optional[Path], _opt(L, "prompts", "--prompts", "-p")] = None,
    out: Annotated[Optional[Path], _opt(L, "out", "--out", "-o")] = None,
    k: Annotated[Optional[int], _opt(L, "k", "--k", "-k")] = None,
    labeler: Annotated[Optional[str], _opt(L, "labeler")] = None,
    split: Annotated[Optional[str], _opt(L, "split")] = None,
    max_prompts: Annotated[Optional[int], _opt(L, "max_prompts")] = None,
    max_new_tokens: Annotated[Optional[int], _opt(L, "max_new_tokens")] = None,
    temperature: Annotated[Optional[float], _opt(L, "temperature")] = None,
    top_p: Annotated[Optional[float], _opt(L, "top_p")] = None,
    top_k: Annotated[Optional[int], _opt(L, "top_k")] = None,
    seed: Annotated[Optional[int], _opt(L, "seed")] = None,
    batch_size: Annotated[Optional[int], _opt(L, "batch_size")] = None,
    quantization: Annotated[Optional[str], _opt(L, "quantization")] = None,
    device: Annotated[Optional[str], _opt(L, "device")] = None,
    stats: Annotated[Optional[Path], _opt(L, "stats", metavar="LABELS_DIR")] = None,
    recipe: RecipeOption = None,
) -> None:
    """Rank K sampled responses per prompt in the terminal: human preference data for `instruct rm`.

    Type the order best first ([bold]2 1 4 3[/bold] or [bold]2>1>4>3[/bold], ties [bold]2 1=4 3[/bold]), or
    [bold]s[/bold] skip, [bold]f[/bold] flag, [bold]u[/bold] undo, [bold]v N[/bold] view, [bold]m[/bold] more, [bold]q[/bold] quit.

    Each judgment is saved at once to OUT/rankings.jsonl; the same command resumes at your next unlabelled prompt.

    [bold]Examples[/bold]

      instruct label --model runs/sft --prompts data/prompts --k 4 --out labels/

      instruct label --model runs/sft --prompts data/prompts --out labels/ --labeler alice

      printf '2 1 3 4\\nq\\n' | instruct label --model runs/sft --prompts data/prompts --out labels/

      instruct label --stats labels/

      instruct prepare-data -i labels/ --task prefs -o data/labelled && instruct rm --data data/labelled --out runs/rm
    """
    from instruct_cli.steps import label as label_step

    config = cfg.build_config(
        L,
        "label",
        recipe,
        dict(
            model=model,
            prompts=prompts,
            out=out,
            k=k,
            labeler=labeler,
            split=split,
            max_prompts=max_prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            batch_size=batch_size,
            quantization=quantization,
            device=device,
            stats=stats,
        ),
    )
    session = label_step.run(config)
    if session is not None and session.interrupted:
        raise typer.Exit(130)


# ------------------------------------------------------------------------------------------------ export
@app.command()
@handles_user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="An sft or ppo run folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the merged model.")] = None,
    dtype: Annotated[
        str, typer.Option(help="Weight dtype of the merged model: bfloat16, float16, float32.")
    ] = "bfloat16",
    force: ForceOption = None,
) -> None:
    """Merge a run's LoRA adapter into a 16-bit copy of its base: a plain transformers folder.

    [bold]Examples[/bold]

      instruct export runs/ppo --out models/my-assistant

      instruct export runs/sft --out models/sft-fp32 --dtype float32
    """
    from instruct_cli.steps import export as export_step

    export_step.run(run_dir, out, dtype=dtype, force=bool(force))


# ------------------------------------------------------------------------------------- not built yet
def _not_built(name: str, summary: str) -> None:
    @app.command(
        name,
        help=f"{summary} [dim](not built yet)[/dim]",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def command(ctx: typer.Context) -> None:
        error(f"`instruct {name}` is not built yet in this version of instruct.")
        raise typer.Exit(2)


# ------------------------------------------------------------------------------------------------- eval
E = cfg.EvalConfig


@app.command("eval")
@handles_user_errors
def eval_(
    models: Annotated[Optional[list[str]], _opt(E, "models", "--models", "-m")] = None,
    baseline: Annotated[Optional[str], _opt(E, "baseline")] = None,
    reward: Annotated[Optional[Path], _opt(E, "reward")] = None,
    data: Annotated[Optional[Path], _opt(E, "data", "--data", "-d")] = None,
    sft_data: Annotated[Optional[Path], _opt(E, "sft_data")] = None,
    prefs_data: Annotated[Optional[Path], _opt(E, "prefs_data")] = None,
    generations: Annotated[Optional[Path], _opt(E, "generations")] = None,
    out: Annotated[Optional[Path], _opt(E, "out", "--out", "-o")] = None,
    quantization: Annotated[Optional[str], _opt(E, "quantization")] = None,
    device: Annotated[Optional[str], _opt(E, "device")] = None,
    max_new_tokens: Annotated[Optional[int], _opt(E, "max_new_tokens")] = None,
    temperature: Annotated[Optional[float], _opt(E, "temperature")] = None,
    top_p: Annotated[Optional[float], _opt(E, "top_p")] = None,
    seed: Annotated[Optional[int], _opt(E, "seed")] = None,
    max_prompts: Annotated[Optional[int], _opt(E, "max_prompts")] = None,
    batch_size: Annotated[Optional[int], _opt(E, "batch_size")] = None,
    max_length: Annotated[Optional[int], _opt(E, "max_length")] = None,
    bootstrap: Annotated[Optional[int], _opt(E, "bootstrap")] = None,
    compare: Annotated[Optional[tuple[Path, Path]], _opt(E, "compare", metavar="REPORT_A REPORT_B")] = None,
    force: ForceOption = None,
    recipe: RecipeOption = None,
) -> None:
    """Compare models on held-out prompts: reward, win-rate, KL and perplexity, as a report with plots.

    Writes report.md (verdict, table, samples, plots), report.json, samples.jsonl and PNG plots to --out.

    [bold]Examples[/bold]

      instruct eval --models runs/sft,runs/ppo --reward runs/rm --data data/prompts --out reports/ppo

      instruct eval --models runs/ppo --baseline base --reward runs/rm --data data/sft --out reports/vs-base

      instruct eval --models runs/sft,runs/ppo --reward runs/rm2 --generations reports/ppo/samples.jsonl --out reports/rm2

      instruct eval --compare reports/ppo reports/ppo-beta-0.1
    """
    from instruct_cli.steps import evaluate

    config = cfg.build_config(
        E,
        "eval",
        recipe,
        dict(
            models=",".join(models) if models else None,
            baseline=baseline,
            reward=reward,
            data=data,
            sft_data=sft_data,
            prefs_data=prefs_data,
            generations=generations,
            out=out,
            quantization=quantization,
            device=device,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_prompts=max_prompts,
            batch_size=batch_size,
            max_length=max_length,
            bootstrap=bootstrap,
            compare=list(compare) if compare else None,
            force=force,
        ),
    )
    if config.compare:
        evaluate.compare(config.compare)
    else:
        evaluate.run(config)


# --------------------------------------------------------------------------------------------------- run
@app.command("run")
@handles_user_errors
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML to run.", show_default=False)],
    start: Annotated[
        Optional[str],
        typer.Option("--from", help="Start at this step (earlier ones are left as they are).", show_default=False),
    ] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Run only this step.", show_default=False)] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (each step, its inputs and output, "
            "and whether it would run, resume or be skipped, and why); run nothing.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Rerun the selected steps even when up to date.")] = False,
) -> None:
    """Run every step of a recipe in order, skipping those whose output is complete and up to date.

    A step is skipped when its output folder is complete, was made with the same resolved settings and its
    inputs still hash the same; an interrupted step is resumed from its checkpoints; anything else is run.

    [bold]Examples[/bold]

      instruct run recipes/quickstart.yaml

      instruct run recipes/quickstart.yaml --dry-run

      instruct run recipes/quickstart.yaml --from ppo
    """
    from instruct_cli.steps import pipeline

    pipeline.run(recipe, recipe_steps(), start=start, only=only, dry_run=dry_run, force=force)


def recipe_steps():
    """The steps `instruct run` can call (each imported only when it runs), handed to the runner so that
    no step imports another."""
    from instruct_cli.steps import pipeline

    def step(module: str):
        def run(config):
            return importlib.import_module(f"instruct_cli.steps.{module}").run(config)

        return run

    def show_report(folder: Path) -> None:
        from instruct_cli.steps import evaluate

        evaluate.show(evaluate.load_report(folder), folder)

    return pipeline.StepFunctions(
        run={
            "prepare-data": step("prepare_data"),
            "sft": step("sft"),
            "rm": step("rm"),
            "ppo": step("ppo"),
            "eval": step("evaluate"),
        },
        show_report=show_report,
    )


# -------------------------------------------------------------------------------------------------- plan
@app.command("plan")
@handles_user_errors
def plan_(
    recipe: Annotated[
        Optional[Path],
        typer.Argument(
            help="The recipe YAML to plan (default: the default settings of sft, rm, ppo and eval).", show_default=False
        ),
    ] = None,
    gpu: Annotated[
        Optional[str],
        typer.Option("--gpu", help="A known card, e.g. 'RTX 3060', rtx-4090, 'A100 80GB', T4.", show_default=False),
    ] = None,
    gpu_memory: Annotated[
        Optional[str],
        typer.Option(
            "--gpu-memory",
            help="The card's memory, e.g. 12GB or 11.5GiB (GB = 2^30 bytes, as spec sheets count).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="Plan this model instead of the recipe's: the "
            "built-in name, a hub id (only config.json is fetched), a folder or "
            "a run folder.",
            show_default=False,
        ),
    ] = None,
    model_config: Annotated[
        Optional[Path],
        typer.Option(
            "--model-config",
            help="Plan the model of this config.json (works offline for any model size).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="Plan for cuda (bf16 compute) or cpu (fp32).")] = "cuda",
    table: Annotated[
        bool,
        typer.Option(
            "--table",
            help="Print the README's markdown table of which steps fit on "
            "8/12/16/24 GB for common model sizes, and exit.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the breakdown as JSON on stdout.")] = False,
) -> None:
    """Will it fit? Estimate each step's peak GPU memory from the model's config alone (no weights loaded).

    For every step of the recipe: base weights at its quantisation, LoRA adapters with their gradients and
    AdamW states, activations (with and without gradient checkpointing), logits, the KV cache of PPO
    rollouts and eval sampling; with --gpu or --gpu-memory, a fit verdict per step and the changes that
    would make a step fit.

    [bold]Examples[/bold]

      instruct plan recipes/gpu/llama3.1-8b-16gb.yaml --gpu "RTX 4080"

      instruct plan recipes/quickstart.yaml --gpu-memory 8GB

      instruct plan --model Qwen/Qwen2.5-1.5B-Instruct --gpu rtx-3060

      instruct plan recipes/gpu/qwen2.5-1.5b-8gb.yaml --model-config ~/models/qwen-7b/config.json --gpu-memory 24GB

      instruct plan --table
    """
    from instruct_cli.steps import plan

    plan.run(
        recipe,
        gpu=gpu,
        gpu_memory=gpu_memory,
        model=model,
        model_config=model_config,
        device=device,
        table=table,
        as_json=as_json,
    )


def main() -> None:
    """Entry point of the `instruct` console script."""
    quiet_warnings()
    app()
