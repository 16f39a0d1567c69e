"""The commands around recipes and data: `instruct prepare-data`, `instruct run` and `instruct plan`.

`run` gets each step's `run` function from `recipe_steps` here, so that no step imports another.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from instruct_cli.cli.app import app, handles_user_errors
from instruct_cli.cli.options import config_command
from instruct_cli.core import config as cfg
from instruct_cli.core.step_table import STEPS


@app.command("prepare-data")
@handles_user_errors
@config_command(cfg.PrepareDataConfig, "prepare-data", per_entry=("inputs", "out"))
def prepare_data(configs: list[cfg.PrepareDataConfig]) -> None:
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

    for config in configs:  # a recipe may list several data sets (sft, prefs, prompts)
        data.run(config)


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
        run={name: step(entry.module) for name, entry in STEPS.items()}, show_report=show_report
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
            help="Print the markdown table (docs/commands/plan.md) of which steps fit on "
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
