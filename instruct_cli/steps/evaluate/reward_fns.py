"""The reward functions of `instruct eval` (--reward-fn): scoring every model's responses with them (step 4 of
`run`, next to or instead of the reward model), each model's figures per function, and their table, sentences
and metrics.

A function's value of a response is a number, or NaN where it returned None (it does not judge that sample).
Per model and function the report gives the mean over the judged responses and how many were judged; when
every judged value is 0 or 1, the accuracy (the share of 1s) with its Wilson 95% interval; and, for each model
but the baseline, the mean paired difference from the baseline's value over the prompts both were judged on,
with a percentile-bootstrap 95% interval over those prompts. Without a reward model a response's reward (what
win-rates compare) is the functions' weighted sum, a function that did not judge it adding nothing, minus
--missing-eos-penalty for a response without an EOS: what `instruct ppo --reward-fn` scores a rollout.
Uses the core (reward_functions, config), `stats` and `entries`; not `measure`, `report`, `plots`,
`html_report` or `compare`.
"""

from __future__ import annotations

import math

import numpy as np

from instruct_cli.core.config import EvalConfig
from instruct_cli.core.reward_functions import WeightedRewards
from instruct_cli.steps.evaluate.entries import Entry
from instruct_cli.steps.evaluate.stats import bootstrap_interval, wilson_interval

TABLE_COLUMNS = ["model", "function", "mean", "judged", "accuracy (95% CI)", "vs baseline (95% CI)"]
"""The columns of the reward-function table (one row per model and function)."""

HOW_TO_READ = (
    "Reward functions: mean is the mean value over the responses a function judged (it returns None for one it "
    "does not judge), judged says how many of all. Accuracy, for a function whose every value is 0 or 1, is "
    "the share of 1s with a Wilson 95% interval. vs baseline is the mean difference from the baseline's value "
    "on the prompts both were judged on (in percentage points for an accuracy), with a bootstrap 95% interval "
    "over those prompts. Each response's values are in samples.jsonl (`reward_fn`)."
)


def names(functions: WeightedRewards) -> list[str]:
    """How the report names each function: its own name, or its spec where two functions share a name."""
    own = [function.name for function in functions.functions]
    return [f.name if own.count(f.name) == 1 else f.spec for f in functions.functions]


def described(functions: WeightedRewards | None) -> list[dict]:
    """report.json's list of the functions: name, spec and weight of each, in --reward-fn order."""
    if functions is None:
        return []
    return [
        {"name": name, "spec": function.spec, "weight": weight}
        for name, function, weight in zip(names(functions), functions.functions, functions.weights)
    ]


def score_with_functions(
    entries: list[Entry],
    prompts: list[list[dict]],
    columns: list[dict],
    functions: WeightedRewards,
    config: EvalConfig,
    with_reward_model: bool,
) -> None:
    """Each function's value of every response, by name, into `entry.function_values` (NaN: not judged); and,
    without a reward model, each response's reward: the weighted sum minus the missing-EOS penalty."""
    for entry in entries:
        texts = entry.samples.texts
        totals = [0.0] * len(texts)
        entry.function_values = {}
        for name, function, weight in zip(names(functions), functions.functions, functions.weights):
            values = function.scores(prompts, texts, columns)
            entry.function_values[name] = values
            totals = [total + (0.0 if math.isnan(v) else weight * v) for total, v in zip(totals, values)]
        if not with_reward_model:
            entry.rewards = [
                total - (config.missing_eos_penalty if ended is False else 0.0)
                for total, ended in zip(totals, entry.samples.ended)
            ]


def model_figures(entry: Entry, baseline: Entry, config: EvalConfig) -> dict[str, dict]:
    """One model's figures per function: mean, std, judged (of how many), accuracy with its Wilson interval
    (0/1 functions), and the paired difference from the baseline with its bootstrap interval."""
    figures = {}
    for name, values in (entry.function_values or {}).items():
        values = np.asarray(values, dtype=float)
        judged = values[~np.isnan(values)]
        figure = {
            "mean": float(judged.mean()) if judged.size else None,
            "std": float(judged.std()) if judged.size else None,
            "judged": int(judged.size),
            "of": int(values.size),
            "accuracy": None,
            "vs_baseline": None,
        }
        if judged.size and np.isin(judged, (0.0, 1.0)).all():
            correct = int(judged.sum())
            low, high = wilson_interval(correct, int(judged.size))
            figure["accuracy"] = {"rate": correct / judged.size, "low": low, "high": high, "correct": correct}
        if entry is not baseline and baseline.function_values is not None:
            theirs = np.asarray(baseline.function_values[name], dtype=float)
            both = ~np.isnan(values) & ~np.isnan(theirs)
            if both.any():
                differences = values[both] - theirs[both]
                low, high = bootstrap_interval(differences, config.bootstrap, config.seed)
                figure["vs_baseline"] = {
                    "against": baseline.name,
                    "difference": float(differences.mean()),
                    "low": low,
                    "high": high,
                    "prompts": int(both.sum()),
                }
        figures[name] = figure
    return figures


def sample_values(entry: Entry, index: int) -> dict[str, float | None]:
    """samples.jsonl's `reward_fn` of one response: each function's value, None where it did not judge it."""
    return {
        name: None if math.isnan(values[index]) else values[index]
        for name, values in (entry.function_values or {}).items()
    }


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def accuracy_text(accuracy: dict) -> str:
    """An accuracy and its interval: '40% (20-63%)'."""
    return f"{_percent(accuracy['rate'])} ({100 * accuracy['low']:.0f}-{_percent(accuracy['high'])})"


def difference_text(difference: dict, points: bool) -> str:
    """A difference from the baseline and its interval: '+15 pts (+3 to +27)' for accuracies, else
    '+0.12 (-0.05 to +0.30)'."""
    if points:
        low, high = 100 * difference["low"], 100 * difference["high"]
        return f"{100 * difference['difference']:+.0f} pts ({low:+.0f} to {high:+.0f})"
    return f"{difference['difference']:+.3g} ({difference['low']:+.3g} to {difference['high']:+.3g})"


def table_rows(report: dict) -> list[list[str]]:
    """The reward-function table (one row per model and function) as text cells, for the terminal, report.md
    and report.html; empty without reward functions."""
    rows = []
    for function in report.get("reward_functions") or []:
        for model in report["models"]:
            figure = model["reward_functions"][function["name"]]
            accuracy, versus = figure["accuracy"], figure["vs_baseline"]
            rows.append(
                [
                    model["name"] + (" (baseline)" if model["baseline"] else ""),
                    function["name"],
                    f"{figure['mean']:.3g}" if figure["mean"] is not None else "-",
                    f"{figure['judged']}/{figure['of']}",
                    accuracy_text(accuracy) if accuracy else "-",
                    difference_text(versus, accuracy is not None) if versus else "-",
                ]
            )
    return rows


def verdict_lines(report: dict) -> list[str]:
    """One sentence per model (the baseline's figure inside the others') and function: its accuracy (0/1
    functions) or mean, against the baseline's, and the difference with its interval."""
    lines = []
    by_name = {model["name"]: model for model in report["models"]}
    baseline = by_name[report["baseline"]]
    alone = len(report["models"]) == 1
    for function in report.get("reward_functions") or []:
        name = function["name"]
        theirs = baseline["reward_functions"][name]
        for model in report["models"]:
            figure = model["reward_functions"][name]
            if (model is baseline and not alone) or figure["mean"] is None:
                continue
            accuracy, versus = figure["accuracy"], figure["vs_baseline"]
            if accuracy:
                sentence = (
                    f"By {name}, {model['name']} is right on {_percent(accuracy['rate'])} of the "
                    f"{figure['judged']} responses judged (95% CI {100 * accuracy['low']:.0f}-"
                    f"{_percent(accuracy['high'])})"
                )
                if versus and theirs["accuracy"]:
                    sentence += (
                        f", {report['baseline']} on {_percent(theirs['accuracy']['rate'])}: "
                        f"{difference_text(versus, True).replace(' (', ' (95% CI ', 1)}"
                    )
            else:
                sentence = f"By {name}, {model['name']} scores {figure['mean']:.3g} on average"
                if versus and theirs["mean"] is not None:
                    sentence += (
                        f", {report['baseline']} {theirs['mean']:.3g}: "
                        f"{difference_text(versus, False).replace(' (', ' (95% CI ', 1)}"
                    )
            lines.append(sentence + ".")
    return lines


def headline(report: dict) -> dict[str, float]:
    """The manifest's metrics of the functions: per model and function the mean, and the accuracy with its
    interval for 0/1 functions."""
    metrics: dict[str, float] = {}
    for model in report["models"]:
        for name, figure in (model.get("reward_functions") or {}).items():
            key = f"{model['name']}/reward_fn/{name}"
            if figure["mean"] is not None:
                metrics[f"{key}/mean"] = figure["mean"]
            if figure["accuracy"]:
                metrics[f"{key}/accuracy"] = figure["accuracy"]["rate"]
                metrics[f"{key}/accuracy_low"] = figure["accuracy"]["low"]
                metrics[f"{key}/accuracy_high"] = figure["accuracy"]["high"]
    return metrics
