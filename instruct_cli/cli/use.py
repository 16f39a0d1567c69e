"""The commands that use trained models: `instruct generate`, `chat`, `label`, `export` and `eval`.

Each builds its step's config from the recipe section and the flags given, then calls the step's `run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from instruct_cli.cli.app import ForceOption, RecipeOption, _opt, app, handles_user_errors, skip_teardown
from instruct_cli.core import config as cfg
from instruct_cli.core import recipes

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
    engine: Annotated[Optional[str], _opt(G, "engine")] = None,
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

      instruct generate --engine llama.cpp "What is 2+2?"     (needs llama-cpp-python)
    """
    from instruct_cli.steps import generate as generate_step

    skip_teardown()
    config = recipes.build_config(
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
            engine=engine,
            quantization=quantization,
            device=device,
        ),
    )
    generate_step.run(config)


# -------------------------------------------------------------------------------------------------- chat
C = cfg.ChatConfig


@app.command()
@handles_user_errors
def chat(
    model: Annotated[Optional[str], _opt(C, "model", "--model", "-m")] = None,
    system: Annotated[Optional[str], _opt(C, "system")] = None,
    max_new_tokens: Annotated[Optional[int], _opt(C, "max_new_tokens")] = None,
    temperature: Annotated[Optional[float], _opt(C, "temperature")] = None,
    top_p: Annotated[Optional[float], _opt(C, "top_p")] = None,
    top_k: Annotated[Optional[int], _opt(C, "top_k")] = None,
    greedy: Annotated[Optional[bool], _opt(C, "greedy")] = None,
    seed: Annotated[Optional[int], _opt(C, "seed")] = None,
    max_context: Annotated[Optional[int], _opt(C, "max_context")] = None,
    engine: Annotated[Optional[str], _opt(C, "engine")] = None,
    quantization: Annotated[Optional[str], _opt(C, "quantization")] = None,
    device: Annotated[Optional[str], _opt(C, "device")] = None,
    recipe: RecipeOption = None,
) -> None:
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
    config = recipes.build_config(
        C,
        "chat",
        recipe,
        dict(
            model=model,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            greedy=greedy,
            seed=seed,
            max_context=max_context,
            engine=engine,
            quantization=quantization,
            device=device,
        ),
    )
    chat_step.run(config)


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

    config = recipes.build_config(
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
    missing_eos_penalty: Annotated[Optional[float], _opt(E, "missing_eos_penalty")] = None,
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

    config = recipes.build_config(
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
            missing_eos_penalty=missing_eos_penalty,
            bootstrap=bootstrap,
            compare=list(compare) if compare else None,
            force=force,
        ),
    )
    if config.compare:
        evaluate.compare(config.compare)
    else:
        evaluate.run(config)
