"""The `instruct` command line: thin typer commands that build a step's config and call `<step>.run(config)`.

Each command's flags mirror its config dataclass (config.py), whose field docstrings are the flag help.
A flag left out is None here, so a recipe's value (via --recipe) or the dataclass default applies.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from instruct_cli import __version__
from instruct_cli import config as cfg
from instruct_cli.console import console, error
from instruct_cli.errors import UserError

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

RecipeOption = Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML; this step reads its section. "
                                                      "Flags given on the command line override it.")]
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
            error("Interrupted. Any run folder was left marked as interrupted; rerun the same command with "
                  "--resume to continue it where checkpoints allow, or --force to start over.")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"instruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
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
    from instruct_cli import data

    config = cfg.build_config(P, "prepare-data", recipe, dict(
        inputs=inputs, out=out, format=format, task=task, eval_fraction=eval_fraction, seed=seed, system=system,
        max_tokens=max_tokens, model=model, strict=strict, force=force))
    data.run(config)


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
    from instruct_cli import generate as generate_step

    config = cfg.build_config(G, "generate", recipe, dict(
        prompt=prompt, model=model, input=input, output=output, system=system, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, seed=seed, batch_size=batch_size,
        quantization=quantization, device=device))
    generate_step.run(config)


# ------------------------------------------------------------------------------------- not built yet
def _not_built(name: str, summary: str) -> None:
    @app.command(name, help=f"{summary} [dim](not built yet)[/dim]",
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def command(ctx: typer.Context) -> None:
        error(f"`instruct {name}` is not built yet in this version of instruct.")
        raise typer.Exit(2)


_not_built("sft", "Supervised fine-tuning of a LoRA adapter on demonstrations.")
_not_built("rm", "Train a reward model on preference pairs or rankings.")
_not_built("ppo", "RLHF: optimise the SFT policy against the reward model with PPO.")
_not_built("eval", "Compare models: reward, win-rate, KL and perplexity report with plots.")
_not_built("run", "Run every step of a recipe, skipping the ones that are up to date.")


def main() -> None:
    """Entry point of the `instruct` console script."""
    app()
