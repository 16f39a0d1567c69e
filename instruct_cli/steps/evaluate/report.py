"""The report of `instruct eval` (step 5 of `run`): its figures, words and files.

Owns the report folder's file names; each model's figures in report.json (`model_report`); the metrics the
manifest records; the verdict; the results table and the sentences around it; report.md; samples.jsonl's rows;
and showing a report in the terminal and loading it back. Writes no plot (`plots` does) and no web page
(`html_report` does); `run` puts them together. Uses the core (artifacts, config, console, errors), `stats`,
`entries`, `reward_fns` (the reward functions' figures, table and sentences) and `judges` (the --judge reward
models' figures, table and sentences, and the win-rate figures); not `measure`, `plots`,
`html_report` or `compare`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from instruct_cli.core import artifacts
from instruct_cli.core.config import EvalConfig
from instruct_cli.core.console import display_path, info, print_table, summary_table
from instruct_cli.core.errors import UserError
from instruct_cli.steps.evaluate import judges, reward_fns
from instruct_cli.steps.evaluate.entries import Entry, length_differences
from instruct_cli.steps.evaluate.stats import describe, distinct_n, win_figures

REPORT_JSON, REPORT_MD, SAMPLES = "report.json", "report.md", "samples.jsonl"
REPORT_HTML = "report.html"
"""The report as one self-contained web page (`html_report` writes it)."""
SAMPLES_SHOWN = 3
"""How many prompts `show` prints with every model's answer side by side."""
REWARD_PLOT, WIN_PLOT, CURVES_PLOT = "reward_distribution.png", "win_rate.png", "training_curves.png"
FRONTIER_PLOT = "reward_kl.png"


def model_report(entry: Entry, baseline: Entry, config: EvalConfig) -> dict:
    """Every figure of one model."""
    samples = entry.samples
    win = None
    if entry is not baseline:
        differences = length_differences(entry, baseline)
        win = win_figures(entry.rewards, baseline.rewards, differences, config.bootstrap, config.seed, baseline.name)
    known_ends = [ended for ended in samples.ended if ended is not None]
    return {
        "name": entry.name,
        "kind": entry.kind,
        "path": str(entry.path.resolve()) if entry.path else entry.spec,
        "baseline": entry is baseline,
        "reference": str(entry.reference) if entry.reference is not None else None,
        "reward": describe(entry.rewards),
        "win_rate": win,
        "kl": {"mean": float(np.mean(entry.kl)), "std": float(np.std(entry.kl))} if entry.kl is not None else None,
        "perplexity": entry.perplexity,
        "length": float(np.mean([len(ids) for ids in samples.responses])),
        "eos_rate": float(np.mean(known_ends)) if len(known_ends) == len(samples.ended) else None,
        "distinct_1": distinct_n(samples.texts, 1),
        "distinct_2": distinct_n(samples.texts, 2),
        "reward_functions": reward_fns.model_figures(entry, baseline, config),
        "judges": judges.model_figures(entry, baseline, config),
    }


def headline_metrics(report: dict) -> dict[str, float]:
    """What the manifest records as the report's metrics: per model mean reward, win-rate and interval, KL, and
    each reward function's mean (and accuracy with its interval)."""
    metrics: dict[str, float] = {}
    for model in report["models"]:
        name = model["name"]
        metrics[f"{name}/reward"] = model["reward"]["mean"]
        if model["win_rate"]:
            metrics[f"{name}/win_rate"] = model["win_rate"]["rate"]
            metrics[f"{name}/win_rate_low"] = model["win_rate"]["low"]
            metrics[f"{name}/win_rate_high"] = model["win_rate"]["high"]
        if model["kl"]:
            metrics[f"{name}/kl"] = model["kl"]["mean"]
    accuracy = (report["reward_model"] or {}).get("accuracy")
    if accuracy is not None:
        metrics["reward_model/accuracy"] = accuracy
    return metrics | reward_fns.headline(report) | judges.headline(report)


def percent(value: float) -> str:
    """0.684 -> '68%'."""
    return f"{100 * value:.0f}%"


def win_text(win: dict) -> str:
    """A win-rate and its interval: '68% (95% CI 55-80%)'."""
    return f"{percent(win['rate'])} (95% CI {100 * win['low']:.0f}-{percent(win['high'])})"


CAUTION = "Read these with care"


def verdict(report: dict) -> list[str]:
    """One plain sentence per model against the baseline: who wins, on how many prompts, at what KL; then the
    reward functions' accuracies (or means) against the baseline's."""
    baseline = report["baseline"]
    judge = "the reward model" if report["reward_model"] is not None else "the reward functions"
    lines = []
    for model in report["models"]:
        win = model["win_rate"]
        if win is None:
            continue
        name = model["name"]
        on_prompts = win_text(win).replace(" (", " of prompts (", 1)
        if win["low"] > 0.5:
            sentence = f"{name} beats {baseline} on {on_prompts} by {judge}"
        elif win["high"] < 0.5:
            sentence = f"{name} loses to {baseline} by {judge}: it wins only {on_prompts}"
        else:
            sentence = f"{name} and {baseline} are level by {judge}: {name} wins {on_prompts}, which includes 50%"
        if model["kl"] is not None and model["kind"] != "sft":  # an sft run is its own reference
            sentence += f", at KL {model['kl']['mean']:.2f} nats from its SFT reference"
        base_reward = next(m["reward"]["mean"] for m in report["models"] if m["name"] == baseline)
        sentence += f" (mean reward {model['reward']['mean']:+.2f} vs {base_reward:+.2f})."
        lines.append(sentence)
        lines += length_sentence(name, win)
    if not lines:
        only = report["models"][0]
        lines.append(f"{only['name']} alone: mean reward {only['reward']['mean']:+.2f} (nothing to compare with).")
    lines += judges.verdict_lines(report)
    lines += reward_fns.verdict_lines(report)
    accuracy = (report["reward_model"] or {}).get("accuracy")
    if accuracy is not None and accuracy < 0.6:
        lines.append(
            f"{CAUTION}: the reward model ranks held-out preference pairs correctly only "
            f"{percent(accuracy)} of the time."
        )
    return lines


def length_sentence(name: str, win: dict) -> list[str]:
    """One more sentence when most of a model's lead (or deficit) against the baseline comes from length: the
    raw win-rate's interval excludes 50% and the length-controlled one covers it."""
    control = win.get("length_controlled")
    if not control or math.isnan(control["rate"]):
        return []
    raw_decided = win["low"] > 0.5 or win["high"] < 0.5
    if raw_decided and control["low"] <= 0.5 <= control["high"]:
        return [
            f"Most of that comes from length: at equal length {name} would win {win_text(control)} of prompts "
            "(length-controlled), which includes 50%."
        ]
    return []


TABLE_COLUMNS = [
    "model",
    "reward ± std",
    "win-rate (95% CI)",
    "KL (nats)",
    "perplexity",
    "length",
    "EOS rate",
    "distinct-1/2",
    "LC win-rate (95% CI)",
]


def table_rows(report: dict) -> list[list[str]]:
    """The results table (one row per model) as text cells, for the terminal and report.md."""
    rows = []
    for model in report["models"]:
        win = model["win_rate"]
        rows.append(
            [
                model["name"] + (" (baseline)" if model["baseline"] else ""),
                f"{model['reward']['mean']:+.2f} ± {model['reward']['std']:.2f}",
                win_text(win).replace("95% CI ", "") if win else "-",
                f"{model['kl']['mean']:.2f}" if model["kl"] is not None else "-",
                f"{model['perplexity']['perplexity']:.4g}" if model["perplexity"] else "-",
                f"{model['length']:.1f}",
                percent(model["eos_rate"]) if model["eos_rate"] is not None else "-",
                f"{model['distinct_1']:.2f} / {model['distinct_2']:.2f}",
                win_text(win["length_controlled"]).replace("95% CI ", "")
                if win and win.get("length_controlled")
                else "-",
            ]
        )
    return rows


def fenced(text: str) -> str:
    """`text` as a fenced markdown block that no backticks inside it can close."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text or '(empty)'}\n{fence}"


PLOT_TITLES = {
    REWARD_PLOT: "Reward distributions",
    WIN_PLOT: "Win-rate against the baseline",
    CURVES_PLOT: "Training curves",
    FRONTIER_PLOT: "Reward against KL (the reward-KL frontier)",
}
"""The heading each plot gets in report.md and report.html."""

REWARD_MEANING = (
    "reward is the reward model's score in units of the standard deviation of its training responses (0 = their mean)."
)
FUNCTION_REWARD_MEANING = (
    "reward is the weighted sum of the reward functions' values (a function that does not judge a response "
    "adds nothing), minus the missing-EOS penalty for a response cut without an EOS: what `instruct ppo "
    "--reward-fn` scores a rollout with (there is no reward model)."
)
HOW_TO_READ = (
    f"How to read it: {REWARD_MEANING} Win-rate is the share of prompts on which a model's response "
    "scores higher than the baseline's on the same prompt (ties count half), with a bootstrap 95% "
    "interval over prompts: an interval above 50% means a real win. KL is the mean over a model's "
    "responses of log p_model - log p_SFT summed over the response's tokens (nats): how far it moved "
    "from the SFT model. Perplexity is on the SFT eval split (lower = closer to the demonstrations). "
    "Length is in tokens, EOS included; distinct-n is the share of unique word n-grams."
)


def how_to_read(report: dict) -> str:
    """HOW_TO_READ for this report: what its reward is (the reward model's, or the reward functions'), and how
    to read the reward functions' table when it has one."""
    text = (
        HOW_TO_READ
        if report["reward_model"] is not None
        else HOW_TO_READ.replace(REWARD_MEANING, FUNCTION_REWARD_MEANING)
    )
    text += " " + reward_fns.HOW_TO_READ if report.get("reward_functions") else ""
    return text + (" " + judges.HOW_TO_READ if report.get("judges") else "")


def sampling_sentence(report: dict) -> str:
    """How the answers were sampled: '64 held-out prompts, each answered once by every model (...).'"""
    settings = report["settings"]
    return (
        f"{report['prompts']} held-out prompts, each answered once by every model (temperature "
        f"{settings['temperature']}, top-p {settings['top_p']}, at most {settings['max_new_tokens']} tokens, "
        f"seed {settings['seed']})."
    )


def reward_model_lines(report: dict) -> list[str]:
    """What the report says about the reward model (its accuracy, and what its scores were computed on) and
    the reward functions (their specs and weights)."""
    rm_report = report["reward_model"]
    functions = [f"{f['spec']} (weight {f['weight']:g})" for f in report.get("reward_functions") or []]
    function_line = [f"Reward functions: {', '.join(functions)}."] if functions else []
    if rm_report is None:
        return [
            "No reward model: the reward is the reward functions' weighted sum, minus "
            f"{report['settings'].get('missing_eos_penalty', 0):g} for a response without an EOS.",
            *function_line,
        ]
    if rm_report.get("accuracy") is not None:
        lines = [
            f"Reward model {rm_report['path']}: {percent(rm_report['accuracy'])} accuracy on "
            f"{rm_report['pairs']} held-out preference pairs (mean margin {rm_report['margin']:.2f})."
        ]
    else:
        lines = [f"Reward model {rm_report['path']}: no preference eval split was available to measure its accuracy."]
    if rm_report.get("scored_on"):
        retokenised = [name for name, way in rm_report["scored_on"].items() if way != "sampled ids"]
        lines += [
            "Responses were scored on their sampled token ids, as PPO scores its rollouts"
            + (
                f" (re-tokenised text for {', '.join(retokenised)}: a generations file without ids, or a "
                "tokenizer other than the reward model's)"
                if retokenised
                else ""
            )
            + f"; a response without an EOS loses {rm_report.get('missing_eos_penalty', 0):g}."
        ]
    return lines + function_line + judge_lines(report)


def judge_lines(report: dict) -> list[str]:
    """What the report says of the --judge reward models: which run folders they are (hashes under Inputs)."""
    described = [judge["name"] for judge in report.get("judges") or []]
    if not described:
        return []
    return [f"Judges (other reward models, scored as the main one): {', '.join(described)}."]


def render_markdown(report: dict, samples: list[dict], how_many: int = 3) -> str:
    """report.md: the verdict, the table, how it was measured, a few side-by-side samples, the plots."""
    lines = ["# Evaluation report", ""]
    for line in report["verdict"]:
        lines += [line if line.startswith(CAUTION) else f"**{line}**", ""]
    lines += [
        "## Results",
        "",
        f"{sampling_sentence(report)} Baseline: **{report['baseline']}**.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    function_rows = reward_fns.table_rows(report)
    if function_rows:
        lines += ["", "### Reward functions", "", "| " + " | ".join(reward_fns.TABLE_COLUMNS) + " |"]
        lines += ["|" + "---|" * len(reward_fns.TABLE_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in function_rows]
    judge_rows = judges.table_rows(report)
    if judge_rows:
        lines += ["", "### Judges", "", "| " + " | ".join(judges.TABLE_COLUMNS) + " |"]
        lines += ["|" + "---|" * len(judges.TABLE_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in judge_rows]
    lines += ["", *reward_model_lines(report), "", how_to_read(report), ""]
    if samples:
        lines += ["## Samples", ""]
        for number, row in enumerate(samples[:how_many], start=1):
            prompt = row["prompt"][-1]["content"] if row["prompt"] else ""
            lines += [f"### Prompt {number}", "", fenced(prompt), ""]
            for name, answer in row["responses"].items():
                tokens = f"{answer['tokens']} token" + ("" if answer["tokens"] == 1 else "s")
                judged = "".join(f", {fn} {value_text(v)}" for fn, v in (answer.get("reward_fn") or {}).items())
                judged += "".join(f", judge {j} {v:+.2f}" for j, v in (answer.get("judges") or {}).items())
                lines += [
                    f"**{name}** - reward {answer['reward']:+.2f}, {tokens}{judged}",
                    "",
                    fenced(answer["text"]),
                    "",
                ]
    plots = report["plots"]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            title = PLOT_TITLES.get(plot, plot)
            lines += [f"### {title}", "", f"![{title}]({plot})", ""]
    lines += ["## Inputs", "", "| input | path | sha256 |", "|---|---|---|"]
    lines += [f"| {key} | {record['path']} | `{record['sha256'][:12]}` |" for key, record in report["inputs"].items()]
    return "\n".join(lines) + "\n"


def value_text(value: float | None) -> str:
    """A reward function's value of one response: '1', '0.25', or '-' where it did not judge it."""
    return "-" if value is None else f"{value:.3g}"


def sample_rows(prompts: list[list[dict]], entries: list[Entry], columns: list[dict] | None = None) -> list[dict]:
    """samples.jsonl: each prompt (with its data `columns`, when the reward functions had some) with every model's
    response, reward, length, EOS and KL, each reward function's value (`reward_fn`) and each --judge reward
    model's reward (`judges`), side by side."""
    rows = []
    for index, prompt in enumerate(prompts):
        responses = {}
        for entry in entries:
            samples = entry.samples
            responses[entry.name] = {
                "text": samples.texts[index],
                "reward": entry.rewards[index],
                "tokens": len(samples.responses[index]),
                "eos": samples.ended[index],
                "kl": entry.kl[index] if entry.kl is not None else None,
                "ids": samples.responses[index],
            }
            if entry.function_values is not None:
                responses[entry.name]["reward_fn"] = reward_fns.sample_values(entry, index)
            if entry.judge_rewards is not None:
                responses[entry.name]["judges"] = judges.sample_values(entry, index)
        row = {"index": index, "prompt": prompt, "responses": responses}
        if columns and columns[index]:
            row["columns"] = columns[index]
        rows.append(row)
    return rows


def unfinished_report(folder: Path) -> bool:
    """True when `folder` holds a report that did not finish: there is nothing to resume, so it is redone."""
    manifest = artifacts.read_manifest(folder) if Path(folder).is_dir() else None
    return bool(manifest) and manifest.get("kind") == "report" and manifest.get("status") != artifacts.STATUS_COMPLETE


def show(report: dict, folder: Path) -> None:
    """The results table, a few answers side by side (from the report folder's samples.jsonl) and the verdict."""
    print_table(f"eval: {report['prompts']} prompts, baseline {report['baseline']}", TABLE_COLUMNS, table_rows(report))
    function_rows = reward_fns.table_rows(report)
    if function_rows:
        print_table("reward functions (accuracy: Wilson 95% CI)", reward_fns.TABLE_COLUMNS, function_rows)
    judge_rows = judges.table_rows(report)
    if judge_rows:
        print_table("judges (other reward models; win-rates with 95% CI)", judges.TABLE_COLUMNS, judge_rows)
    samples = artifacts.read_jsonl(Path(folder) / SAMPLES)
    if samples:
        names = list(samples[0]["responses"])
        rows = [
            [row["prompt"][-1]["content"] if row["prompt"] else ""]
            + [f"{row['responses'][name]['text']}\n({answer_facts(row['responses'][name])})" for name in names]
            for row in samples[:SAMPLES_SHOWN]
        ]
        print_table(
            f"{min(SAMPLES_SHOWN, len(samples))} of the {len(samples)} answers side by side (all in {SAMPLES})",
            ["prompt", *names],
            rows,
        )
    for line in report["verdict"]:
        info(line)
    rm_report = report["reward_model"]
    if rm_report is None:
        judge = {"reward": "the reward functions' weighted sum (no reward model)"}
    else:
        accuracy = rm_report.get("accuracy")
        judge = {"reward model accuracy": percent(accuracy) if accuracy is not None else "-"}
    summary_table(
        "eval",
        {
            "report": display_path(Path(folder) / REPORT_MD),
            "web page": display_path(Path(folder) / REPORT_HTML),
            **judge,
            "plots": ", ".join(report["plots"]),
        },
    )


def answer_facts(answer: dict) -> str:
    """An answer's reward and reward-function values under it in the terminal: 'reward +0.30, final_number 1'."""
    judged = "".join(f", {name} {value_text(value)}" for name, value in (answer.get("reward_fn") or {}).items())
    judged += "".join(f", judge {name} {value:+.2f}" for name, value in (answer.get("judges") or {}).items())
    return f"reward {answer['reward']:+.2f}{judged}"


def load_report(folder: Path) -> dict:
    """The report.json of a complete report folder."""
    artifacts.require_complete(Path(folder), "report", flag="--compare")
    path = Path(folder) / REPORT_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"The report cannot be read ({exc})", where=str(path), fix="Run `instruct eval` for it again with --force"
        ) from None
