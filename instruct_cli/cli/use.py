"""The commands that use trained models: `instruct generate`, `chat`, `label`, `export` and `eval`.

Each command's flags come from its step's config dataclass (cli/options.py); the command adds its docstring
and examples, then calls the step's `run` with the built config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from instruct_cli.cli.app import ForceOption, app, handles_user_errors, skip_teardown
from instruct_cli.cli.options import config_command
from instruct_cli.core import config as cfg


@app.command()
@handles_user_errors
@config_command(cfg.GenerateConfig, "generate")
def generate(config: cfg.GenerateConfig) -> None:
    """Answer a prompt with a base model or any sft/ppo run folder (streamed to stdout).

    [bold]Examples[/bold]

      instruct generate "What is the capital of France?"

      instruct generate --model runs/ppo --greedy "Write a haiku about autumn."

      echo "Tell me a joke" | instruct generate -

      instruct generate --model runs/sft --input prompts.jsonl --output answers.jsonl

      instruct generate --engine llama.cpp "What is 2+2?"     (needs llama-cpp-python)
    """
    from instruct_cli.steps import generate as generate_step

    skip_teardown()
    generate_step.run(config)


@app.command()
@handles_user_errors
@config_command(cfg.ChatConfig, "chat")
def chat(config: cfg.ChatConfig) -> None:
    """Chat with a base model or any sft/ppo run in the terminal: every answer sees the whole conversation.

    Commands: [bold]/reset[/bold], [bold]/system TEXT[/bold], [bold]/save FILE.jsonl[/bold], [bold]/help[/bold], [bold]/exit[/bold] (or Ctrl-D); Ctrl-C stops an answer.

    /save appends the conversation as one {"messages": [...]} line, which `instruct prepare-data` reads as SFT data.

    When stdin is not a terminal, each input line is one message and only the answers go to stdout.

    [bold]Examples[/bold]

      instruct chat

      instruct chat --model runs/ppo --system "You are a concise assistant."

      instruct chat --model runs/sft --greedy --max-new-tokens 128

      instruct chat --engine llama.cpp     (needs llama-cpp-python)

      printf 'My name is Ada.\\nWhat is my name?\\n/save chats.jsonl\\n' | instruct chat --model runs/sft
    """
    from instruct_cli.steps import chat as chat_step

    skip_teardown()
    chat_step.run(config)


@app.command()
@handles_user_errors
@config_command(cfg.LabelConfig, "label")
def label(config: cfg.LabelConfig) -> None:
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

    session = label_step.run(config)
    if session is not None and session.interrupted:
        raise typer.Exit(130)


@app.command()
@handles_user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="An sft, ppo or dpo run folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the merged model.")] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format", help="transformers: a plain transformers folder; gguf: one .gguf file + an Ollama Modelfile."
        ),
    ] = "transformers",
    gguf_type: Annotated[
        Optional[str],
        typer.Option("--gguf-type", help="GGUF tensor type: f16 (default), bf16, q8_0 or f32.", show_default=False),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            help="Weight dtype of a transformers export (bfloat16 default, float16, float32); for --format gguf "
            "the dtype the adapter is merged in (float32 default; bfloat16 halves the memory of big models).",
            show_default=False,
        ),
    ] = None,
    force: ForceOption = None,
) -> None:
    """Merge a run's LoRA adapter into its base: a plain transformers folder, or a GGUF file for llama.cpp/Ollama.

    [bold]Examples[/bold]

      instruct export runs/ppo --out models/my-assistant

      instruct export runs/sft --out models/sft-fp32 --dtype float32

      instruct export runs/ppo --format gguf --out models/my-assistant-gguf

      instruct export runs/ppo --format gguf --gguf-type q8_0 --out models/my-assistant-q8
    """
    from instruct_cli.steps import export as export_step

    export_step.run(run_dir, out, dtype=dtype, force=bool(force), format=format, gguf_type=gguf_type)


@app.command("eval")
@handles_user_errors
@config_command(cfg.EvalConfig, "eval")
def eval_(config: cfg.EvalConfig) -> None:
    """Compare models on held-out prompts: reward, win-rate, KL and perplexity, as a report with plots; with
    --reward-fn, each reward function's mean and accuracy (95% interval) too, next to or instead of --reward.

    Writes report.md (verdict, table, samples, plots), report.json, samples.jsonl and PNG plots to --out.

    [bold]Examples[/bold]

      instruct eval --models runs/sft,runs/ppo --reward runs/rm --data data/prompts --out reports/ppo

      instruct eval --models runs/ppo --baseline base --reward runs/rm --data data/sft --out reports/vs-base

      instruct eval --models runs/sft,runs/ppo --reward runs/rm2 --generations reports/ppo/samples.jsonl --out reports/rm2

      instruct eval --models runs/sft,runs/grpo --reward-fn final_number --data data/math --out reports/math

      instruct eval --compare reports/ppo reports/ppo-beta-0.1
    """
    from instruct_cli.steps import evaluate

    if config.compare:
        evaluate.compare(config.compare)
    else:
        evaluate.run(config)
