"""The PNG plots of `instruct eval`: reward distributions, win-rates, the reward-KL frontier, and the training
curves of the runs.

Owns drawing the figures (matplotlib's Agg backend, no pyplot state), writing them atomically, and reading back
the series drawn on them (what tests check). Uses the core (artifacts, console), `entries` for which runs have
curves and `report` for how a win-rate is worded; not `measure` or `compare`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from instruct_cli.core import artifacts
from instruct_cli.core.console import display_path
from instruct_cli.steps.evaluate.entries import Entry
from instruct_cli.steps.evaluate.report import win_text


def new_figure(width: float, height: float):
    """A matplotlib figure drawn by the Agg backend (no display needed, no global pyplot state)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_series(figure) -> dict[str, dict[str, list[float]]]:
    """The labelled data drawn on each panel of a figure: {panel title: {label: values}}.

    Lines give their y values, histograms (stairs) their counts, bars their lengths; what tests read back."""
    from matplotlib.container import BarContainer
    from matplotlib.patches import StepPatch

    panels = {}
    for axes in figure.axes:
        series: dict[str, list[float]] = {}
        for line in axes.get_lines():
            if labelled(line):
                series[line.get_label()] = [float(y) for y in line.get_ydata()]
        for patch in axes.patches:
            if isinstance(patch, StepPatch) and labelled(patch):
                series[patch.get_label()] = [float(v) for v in patch.get_data().values]
        for container in axes.containers:
            if isinstance(container, BarContainer) and labelled(container):
                horizontal = getattr(container, "orientation", "vertical") == "horizontal"
                series[container.get_label()] = [
                    float(bar.get_width() if horizontal else bar.get_height()) for bar in container.patches
                ]
        if series:
            panels[axes.get_title()] = series
    return panels


def labelled(artist) -> bool:
    """True for an artist drawn with a label meant for the legend (matplotlib hides those starting with _)."""
    label = artist.get_label()
    return bool(label) and not label.startswith("_")


def save_figure(figure, path: Path) -> dict[str, dict[str, list[float]]]:
    """Write the figure as a PNG (atomically) and return its series."""
    series = figure_series(figure)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return series


def plot_reward_distribution(rewards: dict[str, list[float]], path: Path, by_functions: bool = False) -> dict:
    """Overlaid histograms of each model's rewards (the reward model's normalised ones, or with `by_functions`
    the reward functions' weighted sums), with each mean as a dashed line."""
    figure = new_figure(8, 4.5)
    axes = figure.add_subplot()
    edges = np.histogram_bin_edges(
        np.concatenate([np.asarray(v, dtype=float) for v in rewards.values()]),
        bins=min(30, max(8, max(len(v) for v in rewards.values()) // 3)),
    )
    for index, (name, values) in enumerate(rewards.items()):
        counts, _ = np.histogram(values, bins=edges)
        mean = float(np.mean(values))
        axes.stairs(counts, edges, fill=True, alpha=0.3, color=f"C{index}", label=f"{name} (mean {mean:+.2f})")
        axes.stairs(counts, edges, color=f"C{index}", linewidth=1.5)
        axes.axvline(mean, color=f"C{index}", linestyle="--", linewidth=1.5)
    count = len(next(iter(rewards.values())))
    axes.set_title(f"Reward of each response, {count} prompts (dashed: means)")
    axes.set_xlabel(
        "reward (the reward functions' weighted sum, minus the missing-EOS penalty)"
        if by_functions
        else "reward (normalised: 0 = mean, 1 = std of the RM's training responses)"
    )
    axes.set_ylabel("responses")
    axes.legend()
    return save_figure(figure, path)


def plot_win_rates(results: list[dict], baseline: str, path: Path, judge: str = "the reward model") -> dict:
    """Horizontal bars: each model's win-rate against the baseline with its 95% interval, and the 50% line.

    `results` are the per-model entries of report.json; `judge` what gave the rewards compared."""
    compared = [m for m in results if m["win_rate"] is not None]
    figure = new_figure(8, 1.5 + 0.6 * len(compared))
    axes = figure.add_subplot()
    names = [m["name"] for m in compared]
    rates = np.array([100 * m["win_rate"]["rate"] for m in compared])
    errors = np.array(
        [
            [100 * (m["win_rate"]["rate"] - m["win_rate"]["low"]) for m in compared],
            [100 * (m["win_rate"]["high"] - m["win_rate"]["rate"]) for m in compared],
        ]
    )
    axes.barh(
        names,
        rates,
        xerr=errors,
        capsize=4,
        color=[f"C{i}" for i in range(len(compared))],
        label=f"win-rate vs {baseline}",
    )
    axes.axvline(50, color="grey", linestyle="--", linewidth=1, label="_no difference")
    for y, model in enumerate(compared):
        win = model["win_rate"]
        # at the left end of the bar, on a white box: right of it the error bar and the 50% line run through
        axes.text(1, y, win_text(win), va="center", bbox={"facecolor": "white", "alpha": 0.85, "linewidth": 0})
    axes.set_xlim(0, 100)
    axes.invert_yaxis()
    # two lines: one line of this title is wider than the axes, and the figure would clip it
    axes.set_title(f"Win-rate against {baseline}, judged by {judge}\n95% CI; dashed line: 50% = no difference")
    axes.set_xlabel("% of prompts won (ties count half)")
    return save_figure(figure, path)


def plot_reward_kl(models: list[dict], runs: list[tuple[str, Path]], path: Path, judge: str) -> dict | None:
    """The reward-KL frontier (Gao et al. 2022): each model's mean reward in this eval against its mean KL to
    its reference (a point), and for each ppo run the held-out reward and KL of its in-run evaluations,
    iteration by iteration (a line; those rewards are the training reward model's, on ppo's own held-out
    prompts). Reward that keeps rising while the KL grows is what the policy bought with it; a judge's reward
    that stops rising is over-optimisation. None (nothing written) when no model has a KL to show."""
    points = [m for m in models if m.get("kl") and m.get("reward")]
    paths = []
    for name, folder in runs:
        rows = [row for row in read_metrics(folder) if "eval/kl" in row and "eval/reward" in row]
        if rows:
            paths.append((name, rows))
    if not points and not paths:
        return None
    names = list(dict.fromkeys([m["name"] for m in points] + [name for name, _ in paths]))
    color = {name: f"C{index % 10}" for index, name in enumerate(names)}  # a run's line and point alike
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    for name, rows in paths:
        kls, rewards = [row["eval/kl"] for row in rows], [row["eval/reward"] for row in rows]
        axes.plot(kls, rewards, marker=".", linestyle="-", color=color[name], alpha=0.5, label=f"{name}: in-run evals")
        for row in rows:  # the iteration of each in-run evaluation, so the path can be followed
            axes.annotate(f"it {row['step']}", (row["eval/kl"], row["eval/reward"]), textcoords="offset points",
                          xytext=(4, -10), fontsize=7, color=color[name])  # fmt: skip
    for model in points:
        kl, reward = model["kl"]["mean"], model["reward"]["mean"]
        axes.plot([kl], [reward], marker="D", linestyle="none", color=color[model["name"]],
                  label=f"{model['name']}: this eval")  # fmt: skip
        axes.annotate(model["name"], (kl, reward), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlabel("KL to the reference (nats per response)")
    axes.set_ylabel("mean reward")
    axes.set_title(f"Reward against KL; points: this eval, judged by {judge}\nlines: each ppo run's in-run evals")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)


CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [("loss", ["loss/train", "eval/loss"])],
    "rm": [("loss", ["loss/train", "eval/loss"]), ("accuracy", ["train/accuracy", "eval/accuracy"])],
    "ppo": [
        ("score", ["objective/score", "eval/reward"]),
        ("KL (nats)", ["objective/kl", "eval/kl"]),
        ("beta", ["objective/beta"]),
    ],
    "dpo": [
        ("loss", ["loss/train", "eval/loss"]),
        ("implicit reward", ["eval/chosen_reward", "eval/rejected_reward", "eval/margin"]),
    ],
}
"""The panels of the training curves per kind of run: (panel, metric names read from metrics.jsonl)."""


def read_metrics(folder: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (empty when it has none; unreadable lines are skipped)."""
    return artifacts.read_jsonl(Path(folder) / artifacts.METRICS)


def plot_training_curves(runs: list[tuple[str, str, Path]], path: Path) -> dict | None:
    """One panel per (run, curve): loss for sft and rm runs (and rm accuracy); score, KL and beta for ppo.

    `runs` holds (name, kind, folder). Returns None (and writes nothing) when no run has metrics."""
    panels = []
    for name, kind, folder in runs:
        rows = read_metrics(folder)
        for title, metrics in CURVES.get(kind, []):
            series = {
                metric: ([row["step"] for row in rows if metric in row], [row[metric] for row in rows if metric in row])
                for metric in metrics
            }
            series = {metric: xy for metric, xy in series.items() if xy[0]}
            if series:
                panels.append((f"{name} ({kind}): {title}", "iteration" if kind == "ppo" else "step", series))
    if not panels:
        return None
    columns = min(3, len(panels))
    rows_count = math.ceil(len(panels) / columns)
    figure = new_figure(4.5 * columns, 3.2 * rows_count)
    for index, (title, xlabel, series) in enumerate(panels):
        axes = figure.add_subplot(rows_count, columns, index + 1)
        for metric, (steps, values) in series.items():
            sparse = len(steps) < 0.5 * max(len(s) for s, _ in series.values())
            axes.plot(steps, values, marker="o" if sparse or len(steps) < 3 else None, markersize=4, label=metric)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel(xlabel)
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    return save_figure(figure, path)


def runs_with_curves(entries: list[Entry], reward: Path | None) -> list[tuple[str, str, Path]]:
    """The runs whose training curves the report shows: SFT runs (those evaluated and the references), the
    reward model (if any), then ppo and dpo runs; each once."""
    runs: list[tuple[str, str, Path]] = []
    for entry in entries:
        if entry.reference is not None:
            runs.append((display_path(entry.reference), "sft", entry.reference))
    if reward is not None:
        runs.append((str(reward), "rm", Path(reward)))
    runs += [(entry.name, entry.kind, entry.path) for entry in entries if entry.kind in ("ppo", "dpo")]
    named = {str(entry.path.resolve()): entry.name for entry in entries if entry.path is not None}
    unique, seen = [], set()
    for name, kind, folder in runs:
        key = str(Path(folder).resolve())
        if key not in seen:
            seen.add(key)
            unique.append((named.get(key, name), kind, Path(folder)))
    return unique
