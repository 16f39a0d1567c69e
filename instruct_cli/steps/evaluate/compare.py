"""`instruct eval --compare A B`: what differs between two complete reports.

Owns the per-model figures put side by side (each reward function's mean and accuracy too) and the tables of
differing figures, settings and input hashes. Reads report.json only (no model). Uses the core (console,
errors) and `report` to load a report; nothing else of this package.
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Callable, Sequence

from instruct_cli.core.console import info, print_table
from instruct_cli.core.errors import UserError
from instruct_cli.steps.evaluate.report import load_report

COMPARED: list[tuple[str, Callable[[dict], float | None], str]] = [
    ("reward", lambda m: m["reward"]["mean"], "{:+.3f}"),
    ("win-rate", lambda m: m["win_rate"]["rate"] if m["win_rate"] else None, "{:.1%}"),
    ("KL (nats)", lambda m: m["kl"]["mean"] if m["kl"] else None, "{:.3f}"),
    ("perplexity", lambda m: m["perplexity"]["perplexity"] if m["perplexity"] else None, "{:.3f}"),
    ("length", lambda m: m["length"], "{:.1f}"),
    ("EOS rate", lambda m: m["eos_rate"], "{:.1%}"),
    ("distinct-2", lambda m: m["distinct_2"], "{:.3f}"),
]
"""The per-model figures `--compare` puts side by side: (name, how to read it from report.json, format)."""


def function_figures(*models: dict | None) -> list[tuple[str, Callable[[dict], float | None], str]]:
    """The reward functions' figures of these report.json models: each function's mean and accuracy."""
    names = dict.fromkeys(name for model in models if model for name in model.get("reward_functions") or {})

    def figure(model: dict, name: str) -> dict:
        return (model.get("reward_functions") or {}).get(name) or {}

    return [
        row
        for name in names
        for row in (
            (f"{name} mean", lambda m, n=name: figure(m, n).get("mean"), "{:.3f}"),
            (f"{name} accuracy", lambda m, n=name: (figure(m, n).get("accuracy") or {}).get("rate"), "{:.1%}"),
        )
    ]


def compare(folders: Sequence[Path]) -> dict[str, list[list[str]]]:
    """Print what differs between two reports: per model figures (paired by position in --models), the reward
    model's accuracy, the settings, and the inputs' hashes. Returns the printed rows by table."""
    if len(folders) != 2:
        raise UserError(
            f"--compare takes two report folders, not {len(folders)}",
            where="--compare",
            fix="Run `instruct eval --compare reports/a reports/b`",
        )
    a, b = (load_report(folder) for folder in folders)
    metrics = []
    for model_a, model_b in zip_longest(a["models"], b["models"]):
        names = [m["name"] for m in (model_a, model_b) if m]
        label = names[0] if len(set(names)) == 1 else " -> ".join(m["name"] if m else "-" for m in (model_a, model_b))
        for metric, read, form in COMPARED + function_figures(model_a, model_b):
            value_a = read(model_a) if model_a else None
            value_b = read(model_b) if model_b else None
            if value_a is None and value_b is None:
                continue
            change = form.format(value_b - value_a) if value_a is not None and value_b is not None else "-"
            if change[:1].isdigit():
                change = "+" + change
            metrics.append(
                [
                    label,
                    metric,
                    form.format(value_a) if value_a is not None else "-",
                    form.format(value_b) if value_b is not None else "-",
                    change,
                ]
            )
    accuracies = [(report["reward_model"] or {}).get("accuracy") for report in (a, b)]
    if any(value is not None for value in accuracies):
        change = f"{accuracies[1] - accuracies[0]:+.1%}" if None not in accuracies else "-"
        shown = [f"{v:.1%}" if v is not None else "-" for v in accuracies]
        metrics.append(["reward model", "accuracy", *shown, change])
    settings = [
        [key, str(a["settings"].get(key)), str(b["settings"].get(key))]
        for key in sorted(set(a["settings"]) | set(b["settings"]))
        if key != "out" and a["settings"].get(key) != b["settings"].get(key)
    ]
    hashes = [{key: record.get("sha256", "-") for key, record in report["inputs"].items()} for report in (a, b)]
    inputs = [
        [key, hashes[0].get(key, "-")[:12], hashes[1].get(key, "-")[:12]]
        for key in sorted(set(hashes[0]) | set(hashes[1]))
        if hashes[0].get(key) != hashes[1].get(key)
    ]
    first, second = (str(folder) for folder in folders)
    print_table(f"{first} (a) vs {second} (b)", ["model", "metric", "a", "b", "change (b - a)"], metrics)
    if settings:
        print_table("settings that differ", ["setting", "a", "b"], settings)
    if inputs:
        print_table("inputs that differ (sha256)", ["input", "a", "b"], inputs)
    for label, report in (("a", a), ("b", b)):
        for line in report.get("verdict", [])[:1]:
            info(f"{label}: {line}")
    return {"metrics": metrics, "settings": settings, "inputs": inputs}
