"""`instruct plan`'s `run`: the fit table of --table, the JSON of --json, or the printed plan of a recipe (or
of the default settings) with a fit verdict per step when the card's memory is known."""

from __future__ import annotations

import json
from pathlib import Path

from instruct_cli.core.errors import UserError

from .estimate import StepPlan
from .gpus import find_gpu, parse_memory
from .recipe import plan_recipe
from .render import fit_table, show


def run(
    recipe: Path | None = None,
    gpu: str | None = None,
    gpu_memory: str | None = None,
    model: str | None = None,
    model_config: Path | None = None,
    device: str = "cuda",
    table: bool = False,
    as_json: bool = False,
) -> list[StepPlan]:
    """`instruct plan`: print the plan of a recipe (or of the default settings) for a GPU; returns the plans."""
    import sys

    from instruct_cli.core.console import console

    if gpu and gpu_memory:
        raise UserError(
            "--gpu and --gpu-memory both give the card's memory", where="--gpu / --gpu-memory", fix="Pass one of them"
        )
    if device not in ("cuda", "cpu"):
        raise UserError(f"Unknown device {device!r}", where="--device", fix="Plan for cuda (a GPU) or cpu")
    if table:
        if recipe or model or model_config:
            raise UserError(
                "--table plans its own list of models at the default settings",
                where="--table",
                fix="Drop the recipe and --model/--model-config, or drop --table",
            )
        sys.stdout.write(fit_table(device=device))
        return []
    name, memory = find_gpu(gpu) if gpu else (None, parse_memory(gpu_memory) if gpu_memory else None)
    plans = plan_recipe(recipe, model, model_config, memory, device)
    if as_json:
        rows = [
            {
                "step": p.step,
                "model": p.shape.name if p.shape else None,
                **p.breakdown.as_dict(),
                **(
                    {"verdict": p.verdict.label, "usable": p.verdict.usable, "suggestions": p.verdict.suggestions}
                    if p.verdict
                    else {}
                ),
            }
            for p in plans
        ]
        sys.stdout.write(json.dumps({"device": device, "memory": memory, "steps": rows}, indent=2) + "\n")
        return plans
    show(plans, name, memory, device)
    if memory is None:
        console.print("[dim]Add --gpu NAME or --gpu-memory 12GB for a fit verdict per step.[/dim]")
    return plans
