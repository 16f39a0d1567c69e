"""The second judges of `instruct eval` (--judge RUN, repeatable): each model's figures by every judge, and their
table, sentences and metrics (`measure.score_with_judges` does the scoring, step 4 of `run`).

A judge is another reward-model run (trained on a held-out half of the preferences, or with another seed). It
scores every response exactly as the main reward model does (the same inputs, its own run's normalisation, the
same --missing-eos-penalty). Per model and judge the report gives the mean judge reward and, for each model but
the baseline, the win-rate against the baseline by that judge (ties within 1e-6 count half) with its bootstrap
95% interval, and the length-controlled win-rate with its interval: the same statistics, seed and length
differences as the main win-rate, so a judge that is the main reward model gives the main figures exactly.
When the main reward's win-rate interval is above 50% but a judge's covers or is below it, the verdict says the
policy may be over-optimising the training reward model. Uses `stats` and `entries`; not `measure`, `report`,
`plots`, `html_report` or `compare`.
"""

from __future__ import annotations

import numpy as np

from instruct_cli.core.config import EvalConfig
from instruct_cli.steps.evaluate.entries import Entry, length_differences
from instruct_cli.steps.evaluate.stats import describe, win_figures

TABLE_COLUMNS = ["model", "judge", "reward ± std", "win-rate (95% CI)", "LC win-rate (95% CI)"]
"""The columns of the judges' table (one row per model and judge)."""

HOW_TO_READ = (
    "Judges: each --judge reward model scores every response as the main reward model does (its own "
    "normalisation, the same missing-EOS penalty); its win-rate and length-controlled win-rate against the "
    "baseline are computed as the main ones. A model that wins by the training reward model but not by a judge "
    "trained apart from it may be exploiting the training reward model rather than learning the preferences. "
    "Each response's judge rewards are in samples.jsonl (`judges`)."
)


def model_figures(entry: Entry, baseline: Entry, config: EvalConfig) -> dict[str, dict]:
    """One model's figures per judge: its reward summary (`describe`) and, but for the baseline, its win-rate
    against the baseline by that judge (`win_figures`)."""
    figures = {}
    for name, rewards in (entry.judge_rewards or {}).items():
        win = None
        if entry is not baseline:
            differences = length_differences(entry, baseline)
            win = win_figures(
                rewards, baseline.judge_rewards[name], differences, config.bootstrap, config.seed, baseline.name
            )
        figures[name] = {"reward": describe(rewards), "win_rate": win}
    return figures


def sample_values(entry: Entry, index: int) -> dict[str, float]:
    """samples.jsonl's `judges` of one response: each judge's reward of it."""
    return {name: rewards[index] for name, rewards in (entry.judge_rewards or {}).items()}


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def win_text(win: dict) -> str:
    """A win-rate and its interval: '68% (55-80%)'."""
    return f"{_percent(win['rate'])} ({100 * win['low']:.0f}-{_percent(win['high'])})"


def table_rows(report: dict) -> list[list[str]]:
    """The judges' table (one row per model and judge) as text cells, for the terminal, report.md and
    report.html; empty without judges."""
    rows = []
    for judge in report.get("judges") or []:
        for model in report["models"]:
            figure = model["judges"][judge["name"]]
            win = figure["win_rate"]
            control = win["length_controlled"] if win else None
            rows.append(
                [
                    model["name"] + (" (baseline)" if model["baseline"] else ""),
                    judge["name"],
                    f"{figure['reward']['mean']:+.2f} ± {figure['reward']['std']:.2f}",
                    win_text(win) if win else "-",
                    win_text(control) if control and not np.isnan(control["rate"]) else "-",
                ]
            )
    return rows


def verdict_lines(report: dict) -> list[str]:
    """One sentence per model and judge where the main reward's win-rate interval is above 50% and the judge's
    covers 50% or is below it: the over-optimisation signal."""
    lines = []
    main = "the training reward model" if report.get("reward_model") is not None else "the reward functions"
    for model in report["models"]:
        win = model["win_rate"]
        if win is None or not win["low"] > 0.5:
            continue
        for name, figure in (model.get("judges") or {}).items():
            theirs = figure["win_rate"]
            if theirs is None or theirs["low"] > 0.5:
                continue
            lines.append(
                f"{model['name']} beats {report['baseline']} on {_percent(win['rate'])} of prompts by {main}, but "
                f"by the judge {name} it wins only {_percent(theirs['rate'])} (95% CI {100 * theirs['low']:.0f}-"
                f"{_percent(theirs['high'])}): the policy may be over-optimising {main}."
            )
    return lines


def headline(report: dict) -> dict[str, float]:
    """The manifest's metrics of the judges: per model and judge the mean reward, and the win-rate with its
    interval."""
    metrics: dict[str, float] = {}
    for model in report["models"]:
        for name, figure in (model.get("judges") or {}).items():
            key = f"{model['name']}/judge/{name}"
            metrics[f"{key}/reward"] = figure["reward"]["mean"]
            if figure["win_rate"]:
                metrics[f"{key}/win_rate"] = figure["win_rate"]["rate"]
                metrics[f"{key}/win_rate_low"] = figure["win_rate"]["low"]
                metrics[f"{key}/win_rate_high"] = figure["win_rate"]["high"]
    return metrics
