"""`instruct eval`: judge models on held-out prompts (reward, win-rate, KL, perplexity) and write a report.

    instruct eval --models runs/sft,runs/ppo --reward runs/rm --data data/prompts --out reports/ppo

What each figure means (on the first --max-prompts rows of each eval split):
  reward       the reward model's normalised score of a response (0 = the mean, 1 = one standard deviation
               of the RM's training responses), as `instruct rm score` and PPO compute it; no EOS penalty
  win-rate     per prompt, a model's reward against the baseline's on the same prompt: 1 for a win, 0.5 for a
               tie (within 1e-6), 0 for a loss; the mean over prompts, with a percentile-bootstrap 95% interval
  KL           per response, the sum over its tokens of log p_model - log p_reference, both with the logits
               divided by the sampling temperature; its mean over a model's own samples estimates
               KL(model || reference) in nats per response. The reference is the SFT run: a ppo run's parent,
               an sft run itself (KL 0), and for `base` or another model the SFT run among --models
  perplexity   exp of the mean NLL of the assistant tokens of the SFT eval split (what `instruct sft` logs)
  RM accuracy  how often the reward model ranks the chosen response first on the preference eval split
  length       response tokens up to and including the EOS; EOS rate: the share that ended before the limit
  distinct-n   distinct word n-grams / all word n-grams over a model's responses (Li et al. 2016)

The work, top to bottom (`run`):
  1. resolve   the models, the baseline, each model's KL reference, the prompts and the data splits
  2. answer    each model in turn (one in memory at a time): sample the prompts with the same settings and
               seed (or read --generations), the log-probs of its own samples, its perplexity; an SFT run
               that is also the KL reference of other models goes after them and measures their KL
  3. KL        each reference not evaluated itself, in turn: the log-probs of the samples measured against it
  4. score     the reward model: every response, and its accuracy on the preference eval split
  5. report    report.json, report.md, samples.jsonl, PNG plots; the report folder is marked complete last
The statistics at the top of this module are pure functions, tested against hand-computed values.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from instruct_cli.core import artifacts, chat, data_folders, lm, models, preferences, rl, sampling, training
from instruct_cli.core.config import EvalConfig, to_recipe_dict
from instruct_cli.core.console import display_path, info, print_table, progress, summary_table, warn
from instruct_cli.core.errors import UserError

BASE = "base"
TIE_TOLERANCE = 1e-6
REPORT_JSON, REPORT_MD, SAMPLES = "report.json", "report.md", "samples.jsonl"
SAMPLES_SHOWN = 3
"""How many prompts `show` prints with every model's answer side by side."""
REWARD_PLOT, WIN_PLOT, CURVES_PLOT = "reward_distribution.png", "win_rate.png", "training_curves.png"


# ------------------------------------------------------------------------------------------- statistics
def outcomes(rewards: Sequence[float], baseline_rewards: Sequence[float], tie: float = TIE_TOLERANCE) -> np.ndarray:
    """Per prompt: 1.0 when the model's reward beats the baseline's, 0.5 for a tie (equal within `tie`), else 0."""
    model, baseline = np.asarray(rewards, dtype=float), np.asarray(baseline_rewards, dtype=float)
    if model.shape != baseline.shape:
        raise ValueError(f"{len(model)} rewards against {len(baseline)} baseline rewards")
    return np.where(np.abs(model - baseline) <= tie, 0.5, (model > baseline).astype(float))


def win_rate(rewards: Sequence[float], baseline_rewards: Sequence[float], tie: float = TIE_TOLERANCE) -> float:
    """The share of prompts on which the model beats the baseline, ties counted as half."""
    return float(outcomes(rewards, baseline_rewards, tie).mean())


def bootstrap_interval(
    values: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values`.

    The values (one per prompt) are resampled with replacement `resamples` times with a seeded numpy
    generator; the interval is the (1 - level)/2 and (1 + level)/2 quantiles of the resampled means.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams, pooled over the texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (text.split() for text in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_kl(logprobs: Sequence[Sequence[float]], reference_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """Per response: the sum over its tokens of log p_model - log p_reference.

    Over responses sampled from the model, the mean of these sums is an unbiased estimate of
    KL(model || reference) per response, in nats (a single sum can be negative).
    """
    kls = []
    for own, reference in zip(logprobs, reference_logprobs, strict=True):
        if len(own) != len(reference):
            raise ValueError(f"a response of {len(own)} tokens has {len(reference)} reference log-probs")
        kls.append(math.fsum(a - b for a, b in zip(own, reference)))
    return kls


def describe(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and quartiles of `values`."""
    array = np.asarray(values, dtype=float)
    lowest, p25, median, p75, highest = np.percentile(array, [0, 25, 50, 75, 100])
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(lowest),
        "p25": float(p25),
        "median": float(median),
        "p75": float(p75),
        "max": float(highest),
        "n": int(len(array)),
    }


# ---------------------------------------------------------------------------------------- what is measured
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


@dataclass
class Entry:
    """One model under evaluation: where it comes from, and what is measured on it as the evaluation goes."""

    name: str
    """How the report names it (the --models value)."""
    spec: str
    """What `models.load_for_inference` loads."""
    kind: str
    """sft, ppo, base or model."""
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


# ------------------------------------------------------------------------------------- models on prompts
@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    max_length: int,
    bar=None,
) -> Samples:
    """Answer each prompt once: left-padded batches in prompt order, sampled at `temperature` (top-k off,
    nucleus `top_p`), each response cut after its first EOS. The caller seeds torch."""
    device = next(model.parameters()).device
    queries = [chat.encode_prompt(tokenizer, messages)[-max_length:] for messages in prompts]
    responses, texts, ended = [], [], []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        input_ids, attention_mask = sampling.left_pad(chunk, tokenizer.pad_token_id, device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        generated = output[:, input_ids.shape[1] :]
        mask, has_eos = rl.truncate_after_eos(generated, tokenizer.eos_token_id)
        for row in range(len(chunk)):
            ids = generated[row, : int(mask[row].sum())].tolist()
            responses.append(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
            ended.append(bool(has_eos[row]))
        if bar is not None:
            bar.advance(len(chunk))
    return Samples(queries, responses, texts, ended)


def samples_from_file(tokenizer, prompts: list[list[dict]], answers: list[dict], max_length: int) -> Samples:
    """Samples for responses read from a file ({"text", "eos", "ids"}): their token ids when the file has them
    (a report's samples.jsonl does), else the text re-encoded with an EOS appended unless `eos` is false."""
    queries = [chat.encode_prompt(tokenizer, messages)[-max_length:] for messages in prompts]
    responses = [
        answer["ids"]
        if answer.get("ids")
        else tokenizer.encode(answer["text"], add_special_tokens=False)
        + ([] if answer.get("eos") is False else [tokenizer.eos_token_id])
        for answer in answers
    ]
    return Samples(queries, responses, [a["text"] for a in answers], [a.get("eos") for a in answers])


@torch.no_grad()
def response_logprobs(
    model,
    queries: list[list[int]],
    responses: list[list[int]],
    *,
    pad_id: int,
    temperature: float,
    batch_size: int,
    bar=None,
) -> list[list[float]]:
    """log p(token | prompt, earlier tokens) of every response token under `model`, with the logits divided by
    the sampling temperature (the distribution the tokens were drawn from). The layout is PPO's: prompts
    left-padded, responses right-padded, positions counted over real tokens."""
    device = next(model.parameters()).device
    logprobs: list[list[float]] = []
    for start in range(0, len(queries), batch_size):
        chunk = responses[start : start + batch_size]
        query, query_mask = sampling.left_pad(queries[start : start + batch_size], pad_id, device)
        width = max(1, max(len(ids) for ids in chunk))
        response = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        response_mask = torch.zeros((len(chunk), width))
        for row, ids in enumerate(chunk):
            response[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[row, : len(ids)] = 1.0
        response, response_mask = response.to(device), response_mask.to(device)
        input_ids, attention_mask, position_ids = sampling.sequences(query, query_mask, response, response_mask)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=width + 1,
            use_cache=False,
        ).logits[:, :-1]
        token_logprobs = rl.token_logprobs(logits, response, temperature)
        logprobs += [token_logprobs[row, : len(ids)].tolist() for row, ids in enumerate(chunk)]
        if bar is not None:
            bar.advance(len(chunk))
    return logprobs


def perplexity(model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int) -> dict:
    """Mean assistant-token NLL and perplexity on SFT conversations, exactly as `instruct sft` evaluates."""
    device = next(model.parameters()).device
    encoded = [chat.encode_conversation(tokenizer, messages, max_length) for messages in conversations]
    batches = training.eval_batches(
        encoded,
        [len(ids) for ids, _ in encoded],
        batch_size,
        partial(lm.collate, pad_id=tokenizer.pad_token_id, device=device),
    )
    metrics = lm.evaluate(model, batches)
    return {"loss": metrics["eval/loss"], "perplexity": metrics["eval/perplexity"], "conversations": len(conversations)}


def reward_model_accuracy(model, tokenizer, rows: list[dict], max_length: int, batch_size: int, where: str) -> dict:
    """The reward model's pair accuracy, loss and mean margin on preference rows (as `instruct rm` evaluates)."""
    device = next(model.head.parameters()).device
    groups, _ = preferences.encode_rows(tokenizer, rows, max_length, where)
    batches = training.eval_batches(
        groups,
        [g.longest for g in groups],
        batch_size,
        partial(preferences.collate, pad_id=tokenizer.pad_token_id, device=device),
    )
    metrics = preferences.evaluate(model, batches)
    return {
        "accuracy": metrics["eval/accuracy"],
        "loss": metrics["eval/loss"],
        "margin": metrics["eval/margin"],
        "pairs": sum(len(group.pairs) for group in groups),
        "prompts": len(groups),
    }


def release_memory() -> None:
    """Give a freed model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ 1. resolve
def check_config(config: EvalConfig) -> None:
    """The flags `instruct eval` needs, with one-paragraph errors."""
    if not config.models:
        raise UserError(
            "No models to evaluate",
            where="--models",
            fix="Pass --models runs/sft,runs/ppo (run folders, `base`, or model references)",
        )
    if config.reward is None:
        raise UserError(
            "No reward model given", where="--reward", fix="Pass --reward runs/rm (a folder made by `instruct rm`)"
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
    names = [str(spec).rstrip("/") for spec in config.models]
    repeated = sorted({a for i, a in enumerate(names) for b in names[i + 1 :] if same_model(a, b)})
    if repeated:
        raise UserError(
            f"{', '.join(repeated)} is listed twice in --models", where="--models", fix="Name each model once"
        )


def resolve_entries(config: EvalConfig) -> tuple[list[Entry], Entry]:
    """The models to evaluate, in order, with the baseline appended when it is not one of them; and the baseline."""
    specs = [str(spec).rstrip("/") or str(spec) for spec in config.models]
    baseline_spec = str(config.baseline).rstrip("/") if config.baseline else specs[0]
    if not any(same_model(baseline_spec, spec) for spec in specs):
        specs.append(baseline_spec)
    runs = {spec: run_entry(spec) for spec in specs if spec != BASE and is_run_folder(spec)}
    sft_run = next((e.path for e in runs.values() if e.kind == "sft"), None) or next(
        (e.reference for e in runs.values() if e.kind == "ppo" and e.reference is not None), None
    )
    entries = [runs.get(spec) or other_entry(spec, sft_run, list(runs.values())) for spec in specs]
    baseline = next(entry for entry in entries if same_model(entry.name, baseline_spec))
    return entries, baseline


def is_run_folder(spec: str) -> bool:
    """True when `spec` is a folder with an instruct manifest."""
    return (Path(spec) / artifacts.MANIFEST).is_file()


def run_entry(spec: str) -> Entry:
    """An sft or ppo run folder; a ppo run's KL reference is its parent SFT run."""
    path = Path(spec)
    manifest = artifacts.require_complete(path, ("sft", "ppo"), flag="--models")
    name = display_path(spec)
    if manifest["kind"] == "sft":
        return Entry(name, spec, "sft", path, reference=path)
    return Entry(name, spec, "ppo", path, reference=sft_parent(spec, manifest))


def sft_parent(name: str, manifest: dict) -> Path | None:
    """The SFT run a ppo run started from, if it is still there and complete (otherwise its KL is skipped)."""
    record = (manifest.get("parents") or {}).get("sft")
    parent = Path(record["path"]) if record else None
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
        key = json.dumps(messages, sort_keys=True)
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
    config: EvalConfig, entries: list[Entry], sft_folder: Path | None, prefs_folder: Path | None
) -> dict[str, dict]:
    """The report's parents: every input folder (or file) with its content hash."""
    records = {"reward": artifacts.parent_record(config.reward)}
    for key, folder in (("data", config.data), ("sft_data", sft_folder), ("prefs_data", prefs_folder)):
        if folder is not None:
            records[key] = artifacts.parent_record(folder)
    for entry in entries:
        if entry.path is not None:
            records[f"model:{entry.name}"] = artifacts.parent_record(entry.path)
        if entry.reference is not None and not any(e.path and same_path(e.path, entry.reference) for e in entries):
            records[f"reference:{entry.reference}"] = artifacts.parent_record(entry.reference)
    if config.generations is not None:
        records["generations"] = {
            "path": str(Path(config.generations).resolve()),
            "kind": "generations",
            "sha256": artifacts.sha256_file(config.generations),
        }
    return records


# ------------------------------------------------------------------------------------ 2-4. measuring
def answer_and_measure(
    entry: Entry,
    entries: list[Entry],
    prompts: list[list[dict]],
    answers: list[dict] | None,
    conversations: list[list[dict]],
    config: EvalConfig,
) -> None:
    """Load one model: its samples (generated, seed reset first, or from --generations), the log-probs of its
    own samples (when a KL is to be measured), its perplexity on the SFT eval split, and, when it is the KL
    reference of models already answered, their KL. Then free it."""
    model, tokenizer, source = models.load_for_inference(entry.spec, config.quantization, config.device)
    entry.fingerprint = source.fingerprint
    if answers is None:
        torch.manual_seed(config.seed)
        with progress(f"generate {entry.name}", total=len(prompts)) as bar:
            entry.samples = sample_responses(
                model,
                tokenizer,
                prompts,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                batch_size=config.batch_size,
                max_length=config.max_length,
                bar=bar,
            )
    else:
        entry.samples = samples_from_file(tokenizer, prompts, answers, config.max_length)
    if entry.is_own_reference:
        entry.kl = [0.0] * len(prompts)
    elif entry.reference is not None:
        with progress(f"log-probs {entry.name}", total=len(prompts)) as bar:
            entry.own_logprobs = response_logprobs(
                model,
                entry.samples.queries,
                entry.samples.responses,
                pad_id=tokenizer.pad_token_id,
                temperature=config.temperature,
                batch_size=config.batch_size,
                bar=bar,
            )
    if conversations:
        entry.perplexity = perplexity(model, tokenizer, conversations, config.max_length, config.batch_size)
    if entry.path is not None:
        kl_against(model, tokenizer, source, entry.path, entries, config)
    del model
    release_memory()


def kl_against(
    model, tokenizer, source: models.ModelSource, reference: Path, entries: list[Entry], config: EvalConfig
) -> None:
    """The KL of every entry measured against `reference` (loaded as `model`) whose own log-probs are ready."""
    for entry in entries:
        if entry.kl is not None or entry.own_logprobs is None or not same_path(entry.reference, reference):
            continue
        if entry.fingerprint != source.fingerprint:
            warn(
                f"The KL of {entry.name} is not measured: it has another base model than its reference "
                f"{reference}, so their tokens cannot be compared"
            )
            entry.own_logprobs = None
            continue
        with progress(f"KL {entry.name}", total=len(entry.samples.responses)) as bar:
            reference_logprobs = response_logprobs(
                model,
                entry.samples.queries,
                entry.samples.responses,
                pad_id=tokenizer.pad_token_id,
                temperature=config.temperature,
                batch_size=config.batch_size,
                bar=bar,
            )
        entry.kl = sequence_kl(entry.own_logprobs, reference_logprobs)


def measure_remaining_kl(entries: list[Entry], config: EvalConfig) -> None:
    """Load each KL reference that was not among the models evaluated, once, for the models measured against it."""
    references: list[Path] = []
    for entry in entries:
        if (
            entry.kl is None
            and entry.own_logprobs is not None
            and not any(same_path(entry.reference, r) for r in references)
        ):
            references.append(entry.reference)
    for reference in references:
        model, tokenizer, source = models.load_for_inference(str(reference), config.quantization, config.device)
        kl_against(model, tokenizer, source, reference, entries, config)
        del model
        release_memory()


def answering_order(entries: list[Entry]) -> list[Entry]:
    """The entries with the KL references of other entries last, so that a reference evaluated anyway (the sft
    run next to its ppo run) measures their KL while it is loaded, instead of being loaded twice."""

    def is_reference(entry: Entry) -> bool:
        return entry.path is not None and any(
            other is not entry and other.reference is not None and same_path(other.reference, entry.path)
            for other in entries
        )

    return sorted(entries, key=is_reference)


def score_with_reward_model(
    entries: list[Entry], prompts: list[list[dict]], pref_rows: list[dict], prefs_where: str, config: EvalConfig
) -> dict | None:
    """Normalised reward of every response (into each entry), and the RM's accuracy on preference rows."""
    model, tokenizer, norm = preferences.load_reward_model(config.reward, config.quantization, config.device)
    device = next(model.head.parameters()).device
    total = len(prompts) * len(entries)
    with progress("reward model", total=total) as bar:
        for entry in entries:
            sequences = [
                preferences.encode_response(
                    tokenizer, prompt, [{"role": "assistant", "content": text}], config.max_length
                )
                for prompt, text in zip(prompts, entry.samples.texts)
            ]
            raw = preferences.score_sequences(model, sequences, tokenizer.pad_token_id, device, config.batch_size, bar)
            entry.rewards = [preferences.normalize(value, norm) for value in raw]
    accuracy = None
    if pref_rows:
        accuracy = reward_model_accuracy(model, tokenizer, pref_rows, config.max_length, config.batch_size, prefs_where)
    del model
    release_memory()
    return {"path": str(config.reward), "normalization": norm, **(accuracy or {})}


# ------------------------------------------------------------------------------------------- 5. report
def model_report(entry: Entry, baseline: Entry, config: EvalConfig) -> dict:
    """Every figure of one model."""
    samples = entry.samples
    win = None
    if entry is not baseline:
        results = outcomes(entry.rewards, baseline.rewards)
        low, high = bootstrap_interval(results, config.bootstrap, config.seed)
        win = {
            "against": baseline.name,
            "rate": float(results.mean()),
            "low": low,
            "high": high,
            "wins": int((results == 1.0).sum()),
            "ties": int((results == 0.5).sum()),
            "losses": int((results == 0.0).sum()),
        }
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
    }


def headline_metrics(report: dict) -> dict[str, float]:
    """What the manifest records as the report's metrics: per model mean reward, win-rate and interval, KL."""
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
    if report["reward_model"].get("accuracy") is not None:
        metrics["reward_model/accuracy"] = report["reward_model"]["accuracy"]
    return metrics


def percent(value: float) -> str:
    """0.684 -> '68%'."""
    return f"{100 * value:.0f}%"


def win_text(win: dict) -> str:
    """A win-rate and its interval: '68% (95% CI 55-80%)'."""
    return f"{percent(win['rate'])} (95% CI {100 * win['low']:.0f}-{percent(win['high'])})"


CAUTION = "Read these with care"


def verdict(report: dict) -> list[str]:
    """One plain sentence per model against the baseline: who wins, on how many prompts, at what KL."""
    baseline = report["baseline"]
    lines = []
    for model in report["models"]:
        win = model["win_rate"]
        if win is None:
            continue
        name = model["name"]
        on_prompts = win_text(win).replace(" (", " of prompts (", 1)
        if win["low"] > 0.5:
            sentence = f"{name} beats {baseline} on {on_prompts} by the reward model"
        elif win["high"] < 0.5:
            sentence = f"{name} loses to {baseline} by the reward model: it wins only {on_prompts}"
        else:
            sentence = (
                f"{name} and {baseline} are level by the reward model: {name} wins {on_prompts}, which includes 50%"
            )
        if model["kl"] is not None and model["kind"] != "sft":  # an sft run is its own reference
            sentence += f", at KL {model['kl']['mean']:.2f} nats from its SFT reference"
        base_reward = next(m["reward"]["mean"] for m in report["models"] if m["name"] == baseline)
        sentence += f" (mean reward {model['reward']['mean']:+.2f} vs {base_reward:+.2f})."
        lines.append(sentence)
    if not lines:
        only = report["models"][0]
        lines.append(f"{only['name']} alone: mean reward {only['reward']['mean']:+.2f} (nothing to compare with).")
    accuracy = report["reward_model"].get("accuracy")
    if accuracy is not None and accuracy < 0.6:
        lines.append(
            f"{CAUTION}: the reward model ranks held-out preference pairs correctly only "
            f"{percent(accuracy)} of the time."
        )
    return lines


TABLE_COLUMNS = [
    "model",
    "reward ± std",
    "win-rate (95% CI)",
    "KL (nats)",
    "perplexity",
    "length",
    "EOS rate",
    "distinct-1/2",
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
            ]
        )
    return rows


def fenced(text: str) -> str:
    """`text` as a fenced markdown block that no backticks inside it can close."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text or '(empty)'}\n{fence}"


def render_markdown(report: dict, samples: list[dict], how_many: int = 3) -> str:
    """report.md: the verdict, the table, how it was measured, a few side-by-side samples, the plots."""
    settings = report["settings"]
    lines = ["# Evaluation report", ""]
    for line in report["verdict"]:
        lines += [line if line.startswith(CAUTION) else f"**{line}**", ""]
    lines += [
        "## Results",
        "",
        f"{report['prompts']} held-out prompts, each answered once by every model (temperature "
        f"{settings['temperature']}, top-p {settings['top_p']}, at most {settings['max_new_tokens']} tokens, "
        f"seed {settings['seed']}). Baseline: **{report['baseline']}**.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    rm_report = report["reward_model"]
    lines += [""]
    if rm_report.get("accuracy") is not None:
        lines += [
            f"Reward model {rm_report['path']}: {percent(rm_report['accuracy'])} accuracy on "
            f"{rm_report['pairs']} held-out preference pairs (mean margin {rm_report['margin']:.2f})."
        ]
    else:
        lines += [f"Reward model {rm_report['path']}: no preference eval split was available to measure its accuracy."]
    lines += [
        "",
        "How to read it: reward is the reward model's score in units of the standard deviation of its "
        "training responses (0 = their mean). Win-rate is the share of prompts on which a model's response "
        "scores higher than the baseline's on the same prompt (ties count half), with a bootstrap 95% "
        "interval over prompts: an interval above 50% means a real win. KL is the mean over a model's "
        "responses of log p_model - log p_SFT summed over the response's tokens (nats): how far it moved "
        "from the SFT model. Perplexity is on the SFT eval split (lower = closer to the demonstrations). "
        "Length is in tokens, EOS included; distinct-n is the share of unique word n-grams.",
        "",
    ]
    if samples:
        lines += ["## Samples", ""]
        for number, row in enumerate(samples[:how_many], start=1):
            prompt = row["prompt"][-1]["content"] if row["prompt"] else ""
            lines += [f"### Prompt {number}", "", fenced(prompt), ""]
            for name, answer in row["responses"].items():
                tokens = f"{answer['tokens']} token" + ("" if answer["tokens"] == 1 else "s")
                lines += [f"**{name}** - reward {answer['reward']:+.2f}, {tokens}", "", fenced(answer["text"]), ""]
    plots = report["plots"]
    if plots:
        lines += ["## Plots", ""]
        titles = {
            REWARD_PLOT: "Reward distributions",
            WIN_PLOT: "Win-rate against the baseline",
            CURVES_PLOT: "Training curves",
        }
        for plot in plots:
            lines += [f"### {titles.get(plot, plot)}", "", f"![{titles.get(plot, plot)}]({plot})", ""]
    lines += ["## Inputs", "", "| input | path | sha256 |", "|---|---|---|"]
    lines += [f"| {key} | {record['path']} | `{record['sha256'][:12]}` |" for key, record in report["inputs"].items()]
    return "\n".join(lines) + "\n"


def sample_rows(prompts: list[list[dict]], entries: list[Entry]) -> list[dict]:
    """samples.jsonl: each prompt with every model's response, reward, length, EOS and KL side by side."""
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
        rows.append({"index": index, "prompt": prompt, "responses": responses})
    return rows


# -------------------------------------------------------------------------------------------------- plots
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


def plot_reward_distribution(rewards: dict[str, list[float]], path: Path) -> dict:
    """Overlaid histograms of each model's normalised rewards, with each mean as a dashed line."""
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
    axes.set_xlabel("reward (normalised: 0 = mean, 1 = std of the RM's training responses)")
    axes.set_ylabel("responses")
    axes.legend()
    return save_figure(figure, path)


def plot_win_rates(results: list[dict], baseline: str, path: Path) -> dict:
    """Horizontal bars: each model's win-rate against the baseline with its 95% interval, and the 50% line.

    `results` are the per-model entries of report.json."""
    compared = [m for m in results if m["win_rate"] is not None]
    figure = new_figure(8, 1.2 + 0.6 * len(compared))
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
        axes.text(min(100 * win["high"] + 2, 80), y, win_text(win), va="center")
    axes.set_xlim(0, 100)
    axes.invert_yaxis()
    axes.set_title(f"Win-rate against {baseline}, judged by the reward model (95% CI; dashed: 50% = no difference)")
    axes.set_xlabel("% of prompts won (ties count half)")
    return save_figure(figure, path)


CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [("loss", ["loss/train", "eval/loss"])],
    "rm": [("loss", ["loss/train", "eval/loss"]), ("accuracy", ["train/accuracy", "eval/accuracy"])],
    "ppo": [
        ("score", ["objective/score", "eval/reward"]),
        ("KL (nats)", ["objective/kl", "eval/kl"]),
        ("beta", ["objective/beta"]),
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


def runs_with_curves(entries: list[Entry], reward: Path) -> list[tuple[str, str, Path]]:
    """The runs whose training curves the report shows: SFT runs (those evaluated and the references), the
    reward model, then ppo runs; each once."""
    runs: list[tuple[str, str, Path]] = []
    for entry in entries:
        if entry.reference is not None:
            runs.append((display_path(entry.reference), "sft", entry.reference))
    runs.append((str(reward), "rm", Path(reward)))
    runs += [(entry.name, "ppo", entry.path) for entry in entries if entry.kind == "ppo"]
    named = {str(entry.path.resolve()): entry.name for entry in entries if entry.path is not None}
    unique, seen = [], set()
    for name, kind, folder in runs:
        key = str(Path(folder).resolve())
        if key not in seen:
            seen.add(key)
            unique.append((named.get(key, name), kind, Path(folder)))
    return unique


# ---------------------------------------------------------------------------------------------------- run
def run(config: EvalConfig) -> Path:
    """Evaluate `config.models` on held-out prompts and write the report folder; returns its path."""
    # 1. resolve: models, references, prompts, data splits; all inputs checked before any model loads
    check_config(config)
    models.pick_device(config.device)
    entries, baseline = resolve_entries(config)
    rm_manifest = artifacts.require_complete(config.reward, "rm", flag="--reward")
    if config.generations is not None:
        prompts, given = read_generations(config.generations, entries, config.max_prompts)
    else:
        prompts, given = read_prompts(config), None
    sft_run = next((e.reference for e in entries if e.reference is not None), None)
    sft_folder = pick_data("sft", config.sft_data, "--sft-data", config.data, training_data(sft_run))
    prefs_folder = pick_data("prefs", config.prefs_data, "--prefs-data", config.data, training_data(config.reward))
    conversations = (
        [row["messages"] for row in data_folders.read_split(sft_folder, "sft.eval")][: config.max_prompts]
        if sft_folder
        else []
    )
    pref_rows = data_folders.read_split(prefs_folder, "prefs.eval")[: config.max_prompts] if prefs_folder else []
    if not conversations:
        warn("Perplexity is not measured: no SFT eval split (pass --sft-data DIR)")
    if not pref_rows:
        warn("The reward model's accuracy is not measured: no preference eval split (pass --prefs-data DIR)")
    run_folder = artifacts.RunFolder.open(
        config.out,
        "report",
        to_recipe_dict(config),
        force=config.force or unfinished_report(config.out),
        parents=input_records(config, entries, sft_folder, prefs_folder),
        extra={"base_model": rm_manifest.get("base_model"), "quantization": config.quantization},
    )
    info(
        f"eval: {len(entries)} models on {len(prompts)} prompts (baseline {baseline.name}), reward model "
        f"{config.reward}"
    )
    with run_folder.recording():
        # 2. answer: one model at a time (each KL reference after the models measured against it)
        for entry in answering_order(entries):
            answer_and_measure(entry, entries, prompts, given[entry.name] if given else None, conversations, config)
        # 3. KL: the references that were not among the models, one at a time
        measure_remaining_kl(entries, config)
        # 4. score: the reward model
        reward_model = score_with_reward_model(entries, prompts, pref_rows, f"{prefs_folder}/prefs.eval.jsonl", config)
        # 5. report: every file first, the manifest's complete status last
        report = write_report(
            Path(config.out), entries, baseline, prompts, reward_model, run_folder.manifest["parents"], config
        )
        run_folder.complete(headline_metrics(report), verdict=report["verdict"])
    show(report, Path(config.out))
    return Path(config.out)


def write_report(
    out: Path,
    entries: list[Entry],
    baseline: Entry,
    prompts: list[list[dict]],
    reward_model: dict,
    inputs: dict,
    config: EvalConfig,
) -> dict:
    """Write the plots, samples.jsonl, report.json and report.md into `out`; returns the report."""
    report = {
        "baseline": baseline.name,
        "prompts": len(prompts),
        "settings": to_recipe_dict(config),
        "inputs": inputs,
        "reward_model": reward_model,
        "models": [model_report(entry, baseline, config) for entry in entries],
        "plots": [],
    }
    plot_reward_distribution({entry.name: entry.rewards for entry in entries}, out / REWARD_PLOT)
    report["plots"].append(REWARD_PLOT)
    if any(model["win_rate"] for model in report["models"]):
        plot_win_rates(report["models"], baseline.name, out / WIN_PLOT)
        report["plots"].append(WIN_PLOT)
    if plot_training_curves(runs_with_curves(entries, config.reward), out / CURVES_PLOT) is not None:
        report["plots"].append(CURVES_PLOT)
    report["verdict"] = verdict(report)
    samples = sample_rows(prompts, entries)
    artifacts.write_jsonl(out / SAMPLES, samples)
    artifacts.atomic_write_json(out / REPORT_JSON, report)
    artifacts.atomic_write_text(out / REPORT_MD, render_markdown(report, samples))
    return report


def unfinished_report(folder: Path) -> bool:
    """True when `folder` holds a report that did not finish: there is nothing to resume, so it is redone."""
    manifest = artifacts.read_manifest(folder) if Path(folder).is_dir() else None
    return bool(manifest) and manifest.get("kind") == "report" and manifest.get("status") != artifacts.STATUS_COMPLETE


def show(report: dict, folder: Path) -> None:
    """The results table, a few answers side by side (from the report folder's samples.jsonl) and the verdict."""
    print_table(f"eval: {report['prompts']} prompts, baseline {report['baseline']}", TABLE_COLUMNS, table_rows(report))
    samples = artifacts.read_jsonl(Path(folder) / SAMPLES)
    if samples:
        names = list(samples[0]["responses"])
        rows = [
            [row["prompt"][-1]["content"] if row["prompt"] else ""]
            + [f"{row['responses'][name]['text']}\n(reward {row['responses'][name]['reward']:+.2f})" for name in names]
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
    summary_table(
        "eval",
        {
            "report": display_path(Path(folder) / REPORT_MD),
            "reward model accuracy": percent(rm_report["accuracy"]) if rm_report.get("accuracy") is not None else "-",
            "plots": ", ".join(report["plots"]),
        },
    )


# ------------------------------------------------------------------------------------------------ compare
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
        for metric, read, form in COMPARED:
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
    accuracies = [report["reward_model"].get("accuracy") for report in (a, b)]
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
