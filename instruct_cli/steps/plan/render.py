"""What `instruct plan` prints: the per-step breakdown table with verdicts and suggestions (`show`), and the
the markdown table (docs/commands/plan.md) of common model sizes against card sizes (`fit_table`, `TABLE_MODELS`, `TABLE_GPUS`).

Uses the core's console (and rich), and `gpus`, `shapes`, `estimate` and `recipe` (the default steps).
"""

from __future__ import annotations

from typing import Iterable

from instruct_cli.core import config as cfg

from .estimate import StepPlan, estimate_step, usable_memory
from .gpus import GiB, gib
from .recipe import DEFAULT_STEPS
from .shapes import lora_for, parameter_counts, read_model_shape

TABLE_MODELS = {
    "0.5B": "Qwen/Qwen2.5-0.5B-Instruct",
    "1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "3B": "Qwen/Qwen2.5-3B-Instruct",
    "8B": "meta-llama/Llama-3.1-8B-Instruct",
    "14B": "Qwen/Qwen2.5-14B-Instruct",
}
TABLE_GPUS = (8, 12, 16, 24)


def step_settings(plan: StepPlan) -> str:
    """The settings the estimate depends on, in a few words."""
    c = plan.config
    ckpt = f"ckpt {'on' if getattr(c, 'gradient_checkpointing', False) else 'off'}"
    if plan.step == "sft":
        return f"{c.quantization}, {c.batch_size} x {c.max_length} tok, r {c.lora_r}, {ckpt}"
    if plan.step in ("rm", "dpo"):
        pairs = "pair" if c.batch_size == 1 else "pairs"
        return f"{c.quantization}, {c.batch_size} {pairs} x {c.max_length} tok, r {c.lora_r}, {ckpt}"
    if plan.step == "ppo":
        return (
            f"{c.quantization}, {c.rollout_batch_size} rollouts x ({c.max_prompt_length}+{c.max_new_tokens}) tok, "
            f"minibatch {c.minibatch_size}, {ckpt}"
        )
    if plan.step == "eval":
        return f"{c.quantization}, {c.batch_size} x ({c.max_length}+{c.max_new_tokens}) tok"
    return ""


def _size(n: int) -> str:
    return gib(n) if n else "-"


def show(
    plans: list[StepPlan], memory_name: str | None = None, memory: int | None = None, device: str = "cuda"
) -> None:
    """Print the model(s), the per-step breakdown table with verdicts, and the suggestions."""
    from rich.table import Table

    from instruct_cli.core.console import console

    for shape in {p.shape.name: p.shape for p in plans if p.shape is not None}.values():
        counts = parameter_counts(shape)
        console.print(
            f"[bold]{shape.name}[/bold]: {counts.total / 1e9:.2f}B parameters, {shape.layers} layers, "
            f"hidden {shape.hidden}, MLP {shape.intermediate}, {shape.heads}/{shape.kv_heads} heads, "
            f"vocab {shape.vocab}{' (tied)' if shape.tied else ''}"
        )
    where = "GPU" if device.startswith("cuda") else "CPU"
    title = f"Estimated peak {where} memory per step"
    if memory is not None:
        title += f" on {memory_name or gib(memory)}: {gib(usable_memory(memory, device))} usable" + (
            " after the CUDA context" if where == "GPU" else ""
        )
    table = Table(title=title, title_justify="left")
    columns = [
        "step",
        "weights",
        "LoRA + optimizer",
        "activations",
        "logits",
        "KV cache",
        "other",
        "peak",
        "peak at",
        "GB with ckpt on / off",
    ] + (["verdict"] if memory is not None else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("step", "peak at", "verdict") else "right")
    data_sets = sum(plan.step == "prepare-data" for plan in plans)
    for plan in plans:
        b = plan.breakdown
        verdict = []
        if plan.verdict is not None:
            colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}[plan.verdict.label]
            verdict = [f"[{colour}]{plan.verdict.label}[/{colour}]"]
        if plan.shape is None:  # prepare-data: once, however many data sets
            if plan is next(p for p in plans if p.step == "prepare-data"):
                label = "prepare-data" + (f"\n[dim]{data_sets} data sets[/dim]" if data_sets > 1 else "")
                table.add_row(label, "-", "-", "-", "-", "-", "-", "~0", "tokenizer only", "", *verdict)
            continue
        toggled = (
            " / ".join(f"{plan.checkpointing[flag] / GiB:.1f}" for flag in (True, False)) if plan.checkpointing else ""
        )
        table.add_row(
            f"{plan.step}\n[dim]{step_settings(plan)}[/dim]",
            gib(b.weights),
            _size(b.adapters + b.gradients + b.optimizer),
            _size(b.activations),
            _size(b.logits),
            _size(b.kv_cache),
            _size(b.workspace),
            f"[bold]{gib(b.total)}[/bold]",
            b.phase,
            toggled,
            *verdict,
        )
    console.print(table)
    for plan in plans:
        if plan.verdict is None or not plan.verdict.suggestions:
            continue
        combined = plan.verdict.suggestions[0].startswith(("together", "does not"))
        console.print(f"[bold]{plan.step}[/bold] " + ("needs:" if combined else "would fit with any one of:"))
        for suggestion in plan.verdict.suggestions:
            console.print(f"  - {suggestion}")
    notes = sorted({note for plan in plans if plan.breakdown for note in plan.breakdown.notes})
    console.print(
        "[dim]Planned at the configured maximum lengths, with padded batches. "
        + "".join(f"{note[0].upper()}{note[1:]}. " for note in notes)
        + (
            "The CUDA caching allocator adds some fragmentation: a step within 10% of the card is marked tight."
            if where == "GPU"
            else ""
        )
        + "[/dim]"
    )


def fit_table(models: dict[str, str] | None = None, gpus: Iterable[int] = TABLE_GPUS, device: str = "cuda") -> str:
    """A markdown table: for common model sizes at the default step settings (nf4), which steps fit on each
    card size, and each step's peak. docs/commands/plan.md's table is this output (`instruct plan --table`)."""
    models = models or TABLE_MODELS
    gpus = list(gpus)
    steps = [step for step, _ in DEFAULT_STEPS]
    lines = [
        "| model | " + " | ".join(f"{g} GB" for g in gpus) + " | peak GB: " + " / ".join(steps) + " |",
        "|---|" + "---|" * len(gpus) + "---|",
    ]
    for label, reference in models.items():
        shape = read_model_shape(reference)
        lora = lora_for(shape, cfg.SFTConfig())
        totals = {
            step: estimate_step(step, cls(), shape, (lora, lora) if step == "ppo" else (lora,), device).total
            for step, cls in DEFAULT_STEPS
        }
        cells = []
        for size in gpus:
            fitting = [step for step in steps if totals[step] <= usable_memory(int(size * GiB), device)]
            cells.append("all" if len(fitting) == len(steps) else ", ".join(fitting) or "none")
        peaks = " / ".join(f"{totals[step] / GiB:.1f}" for step in steps)
        lines.append(f"| {label} ({reference.split('/')[-1]}) | " + " | ".join(cells) + f" | {peaks} |")
    return "\n".join(lines) + "\n"
