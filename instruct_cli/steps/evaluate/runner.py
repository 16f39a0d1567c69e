"""`instruct eval`'s `run`: the five stages of the package docstring in order (resolve, answer, KL, score,
report), and `write_report`, which writes the report folder's files before the manifest marks it complete."""

from __future__ import annotations

from pathlib import Path

from instruct_cli.core import artifacts, data_folders, models, reward_functions
from instruct_cli.core.config import EvalConfig, to_recipe_dict
from instruct_cli.core.console import info, warn
from instruct_cli.core.reward_functions import WeightedRewards
from instruct_cli.steps.evaluate import measure, reward_fns
from instruct_cli.steps.evaluate.entries import (
    Entry,
    check_config,
    check_judges,
    input_records,
    pick_data,
    read_columns,
    read_generations,
    read_prompts,
    resolve_entries,
    training_data,
)
from instruct_cli.steps.evaluate.html_report import render_html
from instruct_cli.steps.evaluate.plots import (
    plot_reward_distribution,
    plot_reward_kl,
    plot_training_curves,
    plot_win_rates,
    runs_with_curves,
)
from instruct_cli.steps.evaluate.report import (
    CURVES_PLOT,
    FRONTIER_PLOT,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    REWARD_PLOT,
    SAMPLES,
    WIN_PLOT,
    headline_metrics,
    model_report,
    render_markdown,
    sample_rows,
    show,
    unfinished_report,
    verdict,
)


def run(config: EvalConfig) -> Path:
    """Evaluate `config.models` on held-out prompts and write the report folder; returns its path."""
    # 1. resolve: models, references, prompts, data splits; all inputs checked before any model loads
    check_config(config)
    models.pick_device(config.device)
    functions = reward_functions.load_all(config.reward_fn, config.reward_fn_weight) if config.reward_fn else None
    entries, baseline = resolve_entries(config)
    rm_manifest = artifacts.require_complete(config.reward, "rm", flag="--reward") if config.reward else None
    check_judges(config)
    if config.generations is not None:
        prompts, given = read_generations(config.generations, entries, config.max_prompts)
    else:
        prompts, given = read_prompts(config), None
    columns = read_columns(config, prompts) if functions is not None else []
    sft_run = next((e.reference for e in entries if e.reference is not None), None)
    sft_folder = pick_data("sft", config.sft_data, "--sft-data", config.data, training_data(sft_run))
    prefs_folder = (
        pick_data("prefs", config.prefs_data, "--prefs-data", config.data, training_data(config.reward))
        if rm_manifest is not None
        else None
    )
    conversations = (
        [row["messages"] for row in data_folders.read_split(sft_folder, "sft.eval")][: config.max_prompts]
        if sft_folder
        else []
    )
    pref_rows = data_folders.read_split(prefs_folder, "prefs.eval")[: config.max_prompts] if prefs_folder else []
    if not conversations:
        warn("Perplexity is not measured: no SFT eval split (pass --sft-data DIR)")
    if rm_manifest is not None and not pref_rows:
        warn("The reward model's accuracy is not measured: no preference eval split (pass --prefs-data DIR)")
    function_files = {f.spec: f.file for f in functions.functions if f.file is not None} if functions else {}
    run_folder = artifacts.RunFolder.open(
        config.out,
        "report",
        to_recipe_dict(config),
        force=config.force or unfinished_report(config.out),
        parents=input_records(config, entries, sft_folder, prefs_folder, function_files),
        extra={"base_model": base_model(rm_manifest, entries), "quantization": config.quantization},
    )
    judges = ([f"reward model {config.reward}"] if config.reward else []) + (
        [f"reward functions {', '.join(config.reward_fn)}"] if functions else []
    )
    judged_also = f" (judges: {', '.join(str(path) for path in config.judge)})" if config.judge else ""
    info(
        f"eval: {len(entries)} models on {len(prompts)} prompts (baseline {baseline.name}), judged by "
        + " and ".join(judges)
        + judged_also
    )
    with run_folder.recording():
        # 2. answer: one model at a time (each KL reference after the models measured against it)
        for entry in measure.answering_order(entries):
            measure.answer_and_measure(
                entry, entries, prompts, given[entry.name] if given else None, conversations, config
            )
        # 3. KL: the references that were not among the models, one at a time
        measure.measure_remaining_kl(entries, config)
        # 4. score: the reward model, the reward functions, the --judge reward models
        reward_model = None
        if rm_manifest is not None:
            reward_model = measure.score_with_reward_model(
                entries, prompts, pref_rows, f"{prefs_folder}/prefs.eval.jsonl", config
            )
        if functions is not None:
            reward_fns.score_with_functions(entries, prompts, columns, functions, config, rm_manifest is not None)
        judges_report = measure.score_with_judges(entries, prompts, config) if config.judge else []
        # 5. report: every file first, the manifest's complete status last
        report = write_report(
            Path(config.out),
            entries,
            baseline,
            prompts,
            reward_model,
            run_folder.manifest["parents"],
            config,
            functions,
            columns,
            judges_report,
        )
        run_folder.complete(headline_metrics(report), verdict=report["verdict"])
    show(report, Path(config.out))
    return Path(config.out)


def write_report(
    out: Path,
    entries: list[Entry],
    baseline: Entry,
    prompts: list[list[dict]],
    reward_model: dict | None,
    inputs: dict,
    config: EvalConfig,
    functions: WeightedRewards | None = None,
    columns: list[dict] | None = None,
    judges: list[dict] | None = None,
) -> dict:
    """Write the plots, samples.jsonl, report.json, report.md and report.html into `out`; returns the report.
    `reward_model` None: the rewards are the reward `functions`' weighted sums (the report says so); `judges`:
    what `measure.score_with_judges` says of the --judge reward models (their rewards are in the entries)."""
    report = {
        "baseline": baseline.name,
        "prompts": len(prompts),
        "settings": to_recipe_dict(config),
        "inputs": inputs,
        "reward_model": reward_model,
        "reward_source": "reward model" if reward_model is not None else "reward functions",
        "reward_functions": reward_fns.described(functions),
        "judges": judges or [],
        "models": [model_report(entry, baseline, config) for entry in entries],
        "plots": [],
    }
    judge = f"the {report['reward_source']}"
    plot_reward_distribution(
        {entry.name: entry.rewards for entry in entries}, out / REWARD_PLOT, by_functions=reward_model is None
    )
    report["plots"].append(REWARD_PLOT)
    if any(model["win_rate"] for model in report["models"]):
        plot_win_rates(report["models"], baseline.name, out / WIN_PLOT, judge)
        report["plots"].append(WIN_PLOT)
    ppo_runs = [(entry.name, entry.path) for entry in entries if entry.kind == "ppo"]
    if plot_reward_kl(report["models"], ppo_runs, out / FRONTIER_PLOT, judge) is not None:
        report["plots"].append(FRONTIER_PLOT)
    if plot_training_curves(runs_with_curves(entries, config.reward), out / CURVES_PLOT) is not None:
        report["plots"].append(CURVES_PLOT)
    report["verdict"] = verdict(report)
    samples = sample_rows(prompts, entries, columns)
    artifacts.write_jsonl(out / SAMPLES, samples)
    artifacts.atomic_write_json(out / REPORT_JSON, report)
    artifacts.atomic_write_text(out / REPORT_MD, render_markdown(report, samples))
    artifacts.atomic_write_text(out / REPORT_HTML, render_html(report, samples, out))
    return report


def base_model(rm_manifest: dict | None, entries: list[Entry]) -> dict | None:
    """The base model the report records: the reward model's, else that of the first run among the models."""
    if rm_manifest is not None:
        return rm_manifest.get("base_model")
    manifests = (artifacts.read_manifest(entry.path) for entry in entries if entry.path is not None)
    return next((manifest.get("base_model") for manifest in manifests if manifest), None)
