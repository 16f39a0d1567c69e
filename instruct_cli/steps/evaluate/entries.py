"""What `instruct eval` evaluates, and on what (step 1 of `run`, resolve).

Owns the `Entry` of each model (its run folder, its KL reference, and what is measured on it as the evaluation
goes) and its `Samples`; checking the flags; resolving --models and --baseline into entries; the prompts of the
data folder or of a --generations file, and their data columns (for the reward functions); the data folders
perplexity and RM accuracy are measured on; the --judge runs, checked and named; and the report's input
records. Loads no model. Uses the core (artifacts, chat, data_folders, models, config, console, errors); nothing
else of this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from instruct_cli.core import artifacts, chat, data_folders, models
from instruct_cli.core.config import EvalConfig
from instruct_cli.core.console import display_path, warn
from instruct_cli.core.errors import UserError
from instruct_cli.core.step_table import POLICY_KINDS

BASE = "base"


@dataclass
class Samples:
    """One model's answers to the prompts, in prompt order."""

    queries: list[list[int]]
    """Prompt token ids under the model's chat template, ending with the assistant header."""
    responses: list[list[int]]
    """Response token ids up to and including the first EOS."""
    texts: list[str]
    """The responses as text (special tokens dropped)."""
    ended: list[bool | None]
    """Whether each response ends with an EOS (None: unknown, for --generations rows without `eos`)."""
    retokenised: bool = False
    """True when some responses are text re-encoded (a --generations file without token ids)."""


@dataclass
class Entry:
    """One model under evaluation: where it comes from, and what is measured on it as the evaluation goes."""

    name: str
    """How the report names it (the --models value)."""
    spec: str
    """What `models.load_for_inference` loads."""
    kind: str
    """sft, ppo, dpo, base or model."""
    path: Path | None = None
    """Its run folder, when it is one."""
    reference: Path | None = None
    """The SFT run its KL is measured against (None: not measured)."""
    samples: Samples | None = None
    own_logprobs: list[list[float]] | None = None
    kl: list[float] | None = None
    rewards: list[float] | None = None
    perplexity: dict | None = None
    fingerprint: str | None = None
    function_values: dict[str, list[float]] | None = None
    """Each reward function's value of every response, by the function's name (NaN: not judged)."""
    judge_rewards: dict[str, list[float]] | None = None
    """Each --judge reward model's reward of every response, by the judge's name (`judge_names`)."""

    @property
    def is_own_reference(self) -> bool:
        """An sft run is its own KL reference (KL exactly 0)."""
        return self.path is not None and self.reference is not None and same_path(self.path, self.reference)


def same_path(a: Path | str, b: Path | str) -> bool:
    """True when two paths name the same file or folder."""
    return Path(a).resolve() == Path(b).resolve()


def same_model(a: str, b: str) -> bool:
    """True when two model references name the same model (`runs/sft`, `runs/sft/` and `./runs/sft` do)."""
    a, b = str(a).rstrip("/"), str(b).rstrip("/")
    return a == b or (Path(a).exists() and Path(b).exists() and same_path(a, b))


def check_config(config: EvalConfig) -> None:
    """The flags `instruct eval` needs, with one-paragraph errors."""
    if not config.models:
        raise UserError(
            "No models to evaluate",
            where="--models",
            fix="Pass --models runs/sft,runs/ppo (run folders, `base`, or model references)",
        )
    if config.reward is None and not config.reward_fn:
        raise UserError(
            "No reward model or reward function given",
            where="--reward",
            fix="Pass --reward runs/rm (a folder made by `instruct rm`), --reward-fn FILE.py:NAME (or a checker "
            "such as final_number), or both",
        )
    if config.data is None and config.generations is None:
        raise UserError(
            "No prompts to answer",
            where="--data",
            fix="Pass --data DIR (a data folder with an eval split), or --generations FILE",
        )
    if config.out is None:
        raise UserError("No output folder given", where="--out", fix="Pass --out reports/NAME")
    for name in ("max_prompts", "bootstrap"):
        if getattr(config, name) <= 0:
            raise UserError(
                f"`{name}` must be greater than 0, not {getattr(config, name)}",
                where=f"--{name.replace('_', '-')}",
                fix="Pass a positive number",
            )
    refuse_repeats(config.models, "--models", "model")


def judge_names(config: EvalConfig) -> dict[str, Path]:
    """The --judge runs by the name the report gives them (the path as the user would type it)."""
    return {display_path(path): Path(path) for path in config.judge}


def check_judges(config: EvalConfig) -> None:
    """Every --judge is a complete rm run, named once (one-paragraph errors before anything is written)."""
    for path in config.judge:
        artifacts.require_complete(Path(path), "rm", flag="--judge")
    refuse_repeats(config.judge, "--judge", "judge")


def refuse_repeats(specs: list, flag: str, noun: str) -> None:
    """A one-paragraph error when `flag` names the same model twice (however it is spelled)."""
    names = [str(spec).rstrip("/") for spec in specs]
    repeated = sorted({a for i, a in enumerate(names) for b in names[i + 1 :] if same_model(a, b)})
    if repeated:
        raise UserError(f"{', '.join(repeated)} is listed twice in {flag}", where=flag, fix=f"Name each {noun} once")


def resolve_entries(config: EvalConfig) -> tuple[list[Entry], Entry]:
    """The models to evaluate, in order, with the baseline appended when it is not one of them; and the baseline."""
    specs = [str(spec).rstrip("/") or str(spec) for spec in config.models]
    baseline_spec = str(config.baseline).rstrip("/") if config.baseline else specs[0]
    if not any(same_model(baseline_spec, spec) for spec in specs):
        specs.append(baseline_spec)
    runs = {spec: run_entry(spec) for spec in specs if spec != BASE and is_run_folder(spec)}
    sft_run = next((e.path for e in runs.values() if e.kind == "sft"), None) or next(
        (e.reference for e in runs.values() if e.kind in ("ppo", "dpo") and e.reference is not None), None
    )
    entries = [runs.get(spec) or other_entry(spec, sft_run, list(runs.values())) for spec in specs]
    baseline = next(entry for entry in entries if same_model(entry.name, baseline_spec))
    return entries, baseline


def is_run_folder(spec: str) -> bool:
    """True when `spec` is a folder with an instruct manifest."""
    return (Path(spec) / artifacts.MANIFEST).is_file()


def run_entry(spec: str) -> Entry:
    """An sft, ppo or dpo run folder; a ppo or dpo run's KL reference is the SFT run it started from."""
    path = Path(spec)
    manifest = artifacts.require_complete(path, POLICY_KINDS, flag="--models")
    name = display_path(spec)
    if manifest["kind"] == "sft":
        return Entry(name, spec, "sft", path, reference=path)
    return Entry(name, spec, manifest["kind"], path, reference=sft_parent(spec, manifest))


def sft_parent(name: str, manifest: dict) -> Path | None:
    """The SFT run a ppo run (`--sft`) or a dpo run (`--model`) started from, if it is still there and complete
    (otherwise its KL is skipped)."""
    parents = manifest.get("parents") or {}
    record = parents.get("sft") or (parents.get("model") if manifest.get("kind") == "dpo" else None)
    if record is None:  # a dpo run trained from a bare base: its reference is that base, not an SFT run
        warn(f"The KL of {name} is not measured: it was not trained from an SFT run")
        return None
    parent = Path(record["path"])
    parent_manifest = artifacts.read_manifest(parent) if parent is not None and parent.is_dir() else None
    if parent_manifest is None or parent_manifest.get("status") != artifacts.STATUS_COMPLETE:
        warn(f"The KL of {name} is not measured: its SFT run {parent} is missing or incomplete")
        return None
    if record.get("sha256") and artifacts.sha256_folder(parent) != record["sha256"]:
        warn(
            f"The SFT run {parent} changed after {name} was trained from it; the KL is measured against it as it is now"
        )
    return parent


def other_entry(spec: str, sft_run: Path | None, runs: list[Entry]) -> Entry:
    """`base` (the bare base model of the SFT run) or any other model reference, measured against the SFT run."""
    if spec != BASE:
        models.resolve_model(spec, flag="--models")  # a wrong path fails now, not after other models ran
        return Entry(spec, spec, "model", reference=sft_run)
    source_run = sft_run or (runs[0].path if runs else None)
    if source_run is None:
        raise UserError(
            "`base` means the bare base model of the SFT run, but no sft or ppo run folder is among --models",
            where="--models / --baseline",
            fix="Add an sft or ppo run folder to --models, or name the base model itself (e.g. smollm2-135m)",
        )
    base_id = artifacts.read_manifest(source_run)["base_model"]["id"]
    return Entry(BASE, base_id, BASE, reference=sft_run)


def read_prompts(config: EvalConfig) -> list[list[dict]]:
    """The first --max-prompts prompts of the data folder's eval split."""
    prompts = data_folders.read_prompts(config.data, "eval")
    if not prompts:
        raise UserError(
            "The eval split of the data folder has no prompts",
            where=str(config.data),
            fix="Prepare the data again with --eval-fraction above 0, or pass another --data",
        )
    return prompts[: config.max_prompts]


def read_columns(config: EvalConfig, prompts: list[list[dict]]) -> list[dict]:
    """The data columns (`answer`, ...) of each prompt, for the reward functions: those of the data folder's eval
    split, aligned with `read_prompts`. For --generations, each row's own `columns` (a report's samples.jsonl
    keeps them), else those of the same prompt in --data's eval split, else none."""
    if config.generations is None:
        return data_folders.read_prompt_columns(config.data, "eval")[: len(prompts)]  # read_prompts' rows, in order
    found: dict[str, dict] = {}
    lines = Path(config.generations).read_text(encoding="utf-8").splitlines()
    for _, row, _ in data_folders.json_lines(lines, str(config.generations), fix="Fix the line"):
        if isinstance(row, dict) and isinstance(row.get("columns"), dict):
            found.setdefault(prompt_key(row["prompt"]), row["columns"])
    if config.data is not None:
        data_prompts = data_folders.read_prompts(config.data, "eval")
        for prompt, columns in zip(data_prompts, data_folders.read_prompt_columns(config.data, "eval")):
            found.setdefault(prompt_key(prompt), columns)
    columns = [found.get(prompt_key(prompt), {}) for prompt in prompts]
    if not any(columns):
        warn(
            f"The reward functions get no data columns: the rows of {config.generations} have no `columns`"
            + ("" if config.data is not None else " (pass --data DIR to take them from a prompts folder)")
        )
    return columns


def prompt_key(prompt) -> str:
    """A prompt (text or messages) as a key that equal prompts share."""
    return json.dumps(chat.to_messages(prompt), sort_keys=True)


def pick_data(task: str, explicit: Path | None, flag: str, main: Path | None, fallback: Path | None) -> Path | None:
    """The data folder of `task` for a measurement: the flag, else --data if it holds that task, else the
    training data of the run concerned; None when there is none (the measurement is then skipped)."""
    if explicit is not None:
        found = data_folders.data_task(explicit, flag=flag)
        if found != task:
            raise UserError(
                f"{flag} holds {found} data, but needs {task} data",
                where=str(explicit),
                fix=f"Pass a folder made by `instruct prepare-data --task {task}`",
            )
        return explicit
    if main is not None and data_folders.data_task(main) == task:
        return main
    manifest = artifacts.read_manifest(fallback) if fallback is not None and Path(fallback).is_dir() else None
    if manifest and manifest.get("status") == artifacts.STATUS_COMPLETE and manifest.get("task") == task:
        return Path(fallback)
    return None


def training_data(run: Path | None) -> Path | None:
    """The data folder a run was trained on (from its manifest), if it names one."""
    manifest = artifacts.read_manifest(run) if run is not None and Path(run).is_dir() else None
    record = ((manifest or {}).get("parents") or {}).get("data")
    return Path(record["path"]) if record else None


def read_generations(
    path: Path, entries: list[Entry], max_prompts: int
) -> tuple[list[list[dict]], dict[str, list[dict]]]:
    """Prompts and each model's responses ({"text", "eos", "ids"}) from a JSONL file: rows of `instruct generate
    --output` (`prompt`, `response`, `model`) or of a report's samples.jsonl (`prompt`, `responses` by model).

    Only prompts that every model answered are kept (in file order, at most `max_prompts`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("The generations file does not exist", where=str(path), fix="Check the --generations path")
    order: list[str] = []
    prompts: dict[str, list[dict]] = {}
    answers: dict[str, dict[str, dict]] = {}
    unknown: set[str] = set()
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, row, where in data_folders.json_lines(lines, str(path), fix="Fix the line, or generate the file again"):
        if not isinstance(row, dict) or "prompt" not in row or not ("response" in row or "responses" in row):
            raise UserError(
                f"Line {number} needs a `prompt` and a `response` (with `model`) or `responses`",
                where=where,
                fix='Write rows as {"prompt": ..., "response": ..., "model": ...}',
            )
        if "responses" in row and isinstance(row["responses"], dict):
            items = list(row["responses"].items())
        else:
            items = [(row.get("model"), row.get("response"))]
        messages = chat.to_messages(row["prompt"])
        key = prompt_key(messages)
        if key not in prompts:
            order.append(key)
            prompts[key], answers[key] = messages, {}
        for model, value in items:
            entry = next((e for e in entries if model is not None and same_model(str(model), e.name)), None)
            if entry is None:
                unknown.add(str(model))
                continue
            value = {"text": value} if isinstance(value, str) else (value or {})
            ids = value.get("ids")
            if not isinstance(value.get("text"), str) or not (
                ids is None or (isinstance(ids, list) and all(isinstance(i, int) for i in ids))
            ):
                raise UserError(
                    f"Line {number} has no usable response of {model}",
                    where=where,
                    fix='Give each response as text, or as {"text": ..., "eos": ..., "ids": [token ids]}',
                )
            answers[key][entry.name] = {"text": value["text"], "eos": value.get("eos"), "ids": ids}
    missing = [e.name for e in entries if not any(e.name in got for got in answers.values())]
    if missing:
        seen = f" (it has responses of {', '.join(sorted(unknown))})" if unknown else ""
        raise UserError(
            f"The generations file has no responses of {', '.join(missing)}{seen}",
            where=str(path),
            fix="Generate them with `instruct generate --model MODEL --input PROMPTS --output FILE`, "
            "or name the models exactly as the file's `model` fields do",
        )
    complete = [key for key in order if all(e.name in answers[key] for e in entries)]
    if len(complete) < len(order):
        warn(f"{len(order) - len(complete)} prompts of {path} lack a response from some model and are left out")
    if not complete:
        raise UserError(
            "No prompt of the generations file has a response from every model",
            where=str(path),
            fix="Generate every model's responses for the same prompts",
        )
    complete = complete[:max_prompts]
    return ([prompts[key] for key in complete], {e.name: [answers[key][e.name] for key in complete] for e in entries})


def input_records(
    config: EvalConfig,
    entries: list[Entry],
    sft_folder: Path | None,
    prefs_folder: Path | None,
    function_files: dict[str, Path] | None = None,
) -> dict[str, dict]:
    """The report's parents: every input folder (or file) with its content hash; `function_files`: the file of
    each reward function that has one, by spec."""
    records = {"reward": artifacts.parent_record(config.reward)} if config.reward is not None else {}
    records |= {f"judge:{name}": artifacts.parent_record(path) for name, path in judge_names(config).items()}
    for key, folder in (("data", config.data), ("sft_data", sft_folder), ("prefs_data", prefs_folder)):
        if folder is not None:
            records[key] = artifacts.parent_record(folder)
    for entry in entries:
        if entry.path is not None:
            records[f"model:{entry.name}"] = artifacts.parent_record(entry.path)
        if entry.reference is not None and not any(e.path and same_path(e.path, entry.reference) for e in entries):
            records[f"reference:{entry.reference}"] = artifacts.parent_record(entry.reference)
    files = {"generations": config.generations} if config.generations is not None else {}
    files |= {f"reward_fn:{spec}": file for spec, file in (function_files or {}).items()}
    for key, file in files.items():
        kind = key.split(":")[0]
        records[key] = {"path": str(Path(file).resolve()), "kind": kind, "sha256": artifacts.sha256_file(file)}
    return records


def length_differences(entry: Entry, baseline: Entry) -> list[int]:
    """Per prompt, the model's response length in tokens minus the baseline's."""
    return [len(a) - len(b) for a, b in zip(entry.samples.responses, baseline.samples.responses)]
