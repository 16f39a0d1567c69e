"""`instruct rm`: a reward model trained on human preferences (InstructGPT step 2), and `instruct rm score`.

The reward model is the causal-LM base + a LoRA adapter + a scalar head (heads.py), not a
sequence-classification model, so PPO can run it as one more adapter on its one shared base. Started from
an SFT run (`--model runs/sft`) its LoRA begins as the SFT adapter, as InstructGPT initialises its RM from
the SFT model; the head always starts fresh.

Each row is a prompt with K >= 2 responses and a ranking (a preference pair is K = 2). A row is one batch
element: its K responses are each encoded and scored once, and the loss of the row is the mean over its
C(K, 2) pairs of -log sigmoid(r_better - r_worse - margin); the batch loss is the mean over rows. All
responses of a batch go through the model in ONE forward pass. The score is read at the EOS that ends the
response (the chat template's trailing newline is trimmed), which is how PPO scores its rollouts.

After training, every response of the training split is scored with the kept adapter, and a gain and bias
are stored in the manifest (`reward_normalization`) so that gain * r + bias has mean 0 and std 1 there;
every consumer of the reward (rm score, ppo, eval) applies them.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from instruct_cli import artifacts, data, heads, models, training
from instruct_cli.config import RMConfig, RMScoreConfig
from instruct_cli.console import info, progress, summary_table, warn
from instruct_cli.errors import UserError
from instruct_cli.heads import RewardModel, save_adapter  # noqa: F401 - save_adapter is part of this step's API
from instruct_cli.sft import load_trainable_policy, template_ids


# ------------------------------------------------------------------------------------------------- rows
def ranking_pairs(ranking: list[int], ties: list[list[int]] = ()) -> list[tuple[int, int]]:
    """All C(K, 2) (better, worse) pairs of a ranking listed best first: [2, 0, 1] -> (2,0), (2,1), (0,1),
    less the pairs inside a group of `ties` (responses a labeler judged equal teach no preference)."""
    group = {index: number for number, tied in enumerate(ties) for index in tied}
    return [(ranking[i], ranking[j]) for i, j in itertools.combinations(range(len(ranking)), 2)
            if ranking[i] not in group or group[ranking[i]] != group.get(ranking[j])]


def as_messages(value, role: str, where: str, field: str) -> list[dict]:
    """A text or a list of {role, content} messages as a message list (text becomes one `role` message)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                  and isinstance(m.get("content"), str) for m in value)):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(f"`{field}` must be a text or a non-empty list of {{role, content}} messages, not "
                    f"{json.dumps(value)[:80]}", where=where,
                    fix="Clean the file with `instruct prepare-data --task prefs`")


def preference_group(row: dict, where: str) -> tuple[list[dict], list[list[dict]], list[int], list[list[int]]]:
    """(prompt messages, K responses as message lists, ranking best first, tied groups) of a pair or ranked row."""
    if not isinstance(row, dict) or "prompt" not in row:
        raise UserError("A preference row needs a `prompt`", where=where,
                        fix='Rows look like {"prompt", "chosen", "rejected"} or {"prompt", "responses", "ranking"}')
    prompt = as_messages(row["prompt"], "user", where, "prompt")
    if "responses" in row or "ranking" in row:
        responses, ranking = row.get("responses"), row.get("ranking")
        if not isinstance(responses, list) or len(responses) < 2:
            raise UserError("A ranked row needs `responses`: a list of at least two responses", where=where,
                            fix='Write {"prompt": [...], "responses": [[...], [...]], "ranking": [best, ..., worst]}')
        if (not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
                or sorted(ranking) != list(range(len(responses)))):
            raise UserError(f"The ranking {ranking} is not a permutation of the response indices "
                            f"0..{len(responses) - 1}", where=where,
                            fix="List every response index exactly once, best first (equal ones go in `ties`)")
        ties = row.get("ties") or []
        if not (isinstance(ties, list) and all(isinstance(g, list) and all(i in ranking for i in g) for g in ties)):
            raise UserError(f"`ties` {ties!r} should be groups of response indices", where=where,
                            fix='Write ties as [[1, 3]] (responses 1 and 3 judged equal), or leave them out')
        return prompt, [as_messages(r, "assistant", where, "responses") for r in responses], list(ranking), ties
    if "chosen" not in row or "rejected" not in row:
        raise UserError("A preference row needs `chosen` and `rejected` (or `responses` and `ranking`)", where=where,
                        fix="Clean the file with `instruct prepare-data --task prefs`")
    chosen = as_messages(row["chosen"], "assistant", where, "chosen")
    rejected = as_messages(row["rejected"], "assistant", where, "rejected")
    return prompt, [chosen, rejected], [0, 1], []


def encode_response(tokenizer, prompt: list[dict], response: list[dict], max_length: int) -> list[int]:
    """Token ids of prompt + response under the chat template, ending at the EOS that closes the response.

    Template glue after that EOS (ChatML's newline) is trimmed so the score is read at the EOS itself; a
    sequence longer than `max_length` loses tokens from the left (the prompt), never the response's end.
    """
    return untruncated_response(tokenizer, prompt, response)[-max_length:]


def untruncated_response(tokenizer, prompt: list[dict], response: list[dict]) -> list[int]:
    """`encode_response` before the cut to max_length."""
    ids = template_ids(tokenizer, prompt + response)
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[:len(ids) - ids[::-1].index(eos)]
    return ids


@dataclass
class Group:
    """One prompt's encoded responses and its (better, worse) pairs of indices into them."""

    responses: list[list[int]]
    pairs: list[tuple[int, int]]

    @property
    def longest(self) -> int:
        """Its longest response: batches pad every response to the longest of the batch, so groups are
        batched by this (by the sum of lengths, 27% of a benchmark's positions were padding)."""
        return max(len(ids) for ids in self.responses)


def encode_rows(tokenizer, rows: list[dict], max_length: int, where: str) -> tuple[list[Group], int]:
    """Encode preference rows into groups; returns (groups, how many sequences were cut to max_length)."""
    if not tokenizer.chat_template:
        raise UserError("The model's tokenizer has no chat template, so prompts and responses cannot be rendered",
                        where="--model", fix="Use an instruct/chat model, whose tokenizer has a chat template")
    groups, cut = [], 0
    for number, row in enumerate(rows, start=1):
        prompt, responses, ranking, ties = preference_group(row, f"{where}, row {number}")
        full = [untruncated_response(tokenizer, prompt, r) for r in responses]
        cut += sum(len(ids) > max_length for ids in full)
        encoded = [ids[-max_length:] for ids in full]
        pairs = ranking_pairs(ranking, ties)
        if pairs:  # a row whose responses are all tied teaches nothing
            groups.append(Group(encoded, pairs))
    return groups, cut


def collate(groups: list[Group], pad_id: int, device) -> training.Batch:
    """All responses of the groups as one right-padded batch, plus the pairs as global row indices.

    `pair_weight` is 1 / (pairs of the pair's group), so sum(w * loss) / sum(w) is the mean over groups of
    each group's mean pair loss (InstructGPT's per-prompt weighting).
    """
    sequences, better, worse, weight = [], [], [], []
    for group in groups:
        offset = len(sequences)
        sequences.extend(group.responses)
        for b, w in group.pairs:
            better.append(offset + b)
            worse.append(offset + w)
            weight.append(1.0 / len(group.pairs))
    return {
        "input_ids": training.right_pad(sequences, pad_id).to(device),
        "attention_mask": training.right_pad([[1] * len(s) for s in sequences], 0).to(device),
        "better": torch.tensor(better, dtype=torch.long, device=device),
        "worse": torch.tensor(worse, dtype=torch.long, device=device),
        "pair_weight": torch.tensor(weight, dtype=torch.float32, device=device),
    }


# ------------------------------------------------------------------------------------------------ losses
def prompts_in(batch: training.Batch) -> float:
    """How many prompts (groups) the batch holds: what its loss is a mean over (pair weights sum to it)."""
    return float(batch["pair_weight"].sum())


def pairwise_loss(better: torch.Tensor, worse: torch.Tensor, weight: torch.Tensor | None = None,
                  margin: float = 0.0) -> torch.Tensor:
    """Weighted mean of -log sigmoid(r_better - r_worse - margin) over pairs (unweighted mean by default)."""
    losses = -F.logsigmoid(better.float() - worse.float() - margin)
    if weight is None:
        return losses.mean()
    return (weight * losses).sum() / weight.sum()


def pair_scores(model, batch: training.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_better, r_worse) of every pair of the batch, from ONE forward pass over all its responses."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    return scores[batch["better"]], scores[batch["worse"]]


def rm_loss(model, batch: training.Batch, margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of a batch of groups, with the pair accuracy and mean margin as metrics."""
    better, worse = pair_scores(model, batch)
    loss = pairwise_loss(better, worse, batch["pair_weight"], margin)
    with torch.no_grad():
        gap = better - worse
        metrics = {"tokens": float(batch["attention_mask"].sum()), "accuracy": float((gap > 0).float().mean()),
                   "margin": float(gap.mean())}
    return loss, metrics


@torch.no_grad()
def evaluate(model, batches: list[training.Batch], margin: float = 0.0) -> dict[str, float]:
    """Eval loss (mean over prompts of their mean pair loss), pair accuracy and mean r_better - r_worse."""
    model.eval()
    weighted, weights, correct, gaps, pairs = 0.0, 0.0, 0.0, 0.0, 0
    for batch in batches:
        better, worse = pair_scores(model, batch)
        w = batch["pair_weight"]
        weighted += float((w * -F.logsigmoid(better - worse - margin)).sum())
        weights += float(w.sum())
        correct += float((better > worse).sum())
        gaps += float((better - worse).sum())
        pairs += len(better)
    return {"eval/loss": weighted / max(weights, 1e-12), "eval/accuracy": correct / max(pairs, 1),
            "eval/margin": gaps / max(pairs, 1)}


# ------------------------------------------------------------------------------------------ normalisation
@torch.no_grad()
def score_sequences(model: RewardModel, sequences: list[list[int]], pad_id: int, device, batch_size: int,
                    bar=None) -> list[float]:
    """Raw scores of token sequences, batched by similar length (no grad); returned in input order."""
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = [sequences[i] for i in chunk]
        input_ids = training.right_pad(batch, pad_id).to(device)
        attention_mask = training.right_pad([[1] * len(s) for s in batch], 0).to(device)
        for index, value in zip(chunk, model(input_ids=input_ids, attention_mask=attention_mask).float().tolist()):
            scores[index] = value
        if bar is not None:
            bar.advance(len(chunk))
    return scores


def normalization(scores: list[float]) -> dict[str, float]:
    """Gain and bias such that gain * r + bias has mean 0 and std 1 over `scores` (plus their mean and std)."""
    values = torch.tensor(scores, dtype=torch.float64)
    mean = float(values.mean())
    std = float(values.std(unbiased=False)) if len(scores) > 1 else 0.0
    if not math.isfinite(std) or std < 1e-8:
        warn("All training responses get the same reward; normalisation only centres it")
        return {"gain": 1.0, "bias": -mean, "mean": mean, "std": std}
    return {"gain": 1.0 / std, "bias": -mean / std, "mean": mean, "std": std}


def normalize(raw: float, norm: dict) -> float:
    """A raw score in normalised units: gain * r + bias."""
    return norm["gain"] * raw + norm["bias"]


# ------------------------------------------------------------------------------------------------- model
def load_trainable_reward_model(config: RMConfig, source: models.ModelSource, device):
    """The base with a trainable LoRA (the SFT run's adapter when --model is a run folder) and a fresh head."""
    body, tokenizer = load_trainable_policy(config, source, device)  # the same base + LoRA as sft
    head = heads.ScalarHead(heads.hidden_size_of(body), seed=config.seed).to(device)
    return RewardModel(body, head), tokenizer


def load_reward_model(run_dir: Path, quantization: str = "nf4", device: str | torch.device = "auto"):
    """A complete rm run ready to score: (RewardModel in eval mode, tokenizer, reward normalisation dict)."""
    from peft import PeftModel

    manifest = artifacts.require_complete(Path(run_dir), "rm", flag="--model")
    source = models.resolve_model(str(run_dir))
    trained = manifest.get("quantization")
    if trained and trained != quantization:
        warn(f"The reward model was trained on a {trained} base and is loaded on a {quantization} one; scores "
             f"shift slightly (pass --quantization {trained} to match)")
    device = models.pick_device(device) if isinstance(device, str) else device
    tokenizer = models.load_tokenizer(source)
    base = models.load_base_model(source, quantization, device)
    body = PeftModel.from_pretrained(base, str(source.adapter), is_trainable=False)
    head = heads.load_head(source.adapter, device=device)
    model = RewardModel(body, head).eval()
    norm = manifest.get("reward_normalization") or {"gain": 1.0, "bias": 0.0, "mean": 0.0, "std": 1.0}
    return model, tokenizer, norm


# ------------------------------------------------------------------------------------------------- run
def run(config: RMConfig) -> Path:
    """Train a reward model on the data folder's prefs split; write the run folder; return its path."""
    training.require_data_and_out(config)
    train_rows = read_prefs(config.data, "prefs.train")
    eval_rows = read_prefs(config.data, "prefs.eval")
    source = models.resolve_model(config.model)
    accelerator = training.make_accelerator(config.seed)
    device = accelerator.device if config.device == "auto" else models.pick_device(config.device)
    run_folder = training.open_run(config, "rm", accelerator, source)
    with run_folder.recording():
        # 1. model: base + LoRA (from the SFT adapter if given) + a fresh scalar head
        model, tokenizer = load_trainable_reward_model(config, source, device)
        # 2. data: each row a group of K responses (encoded once) and its C(K, 2) pairs
        train_set, cut = encode_rows(tokenizer, train_rows, config.max_length, f"{config.data}/prefs.train.jsonl")
        eval_set, _ = encode_rows(tokenizer, eval_rows, config.max_length, f"{config.data}/prefs.eval.jsonl")
        if cut:
            warn(f"{cut} training responses were cut to --max-length {config.max_length} tokens (from the prompt side)")
        if not train_set:
            raise UserError("The training split has no preference rows", where=f"{config.data}/prefs.train.jsonl",
                            fix="Prepare it with `instruct prepare-data --task prefs`")

        def batches_for_epoch(epoch: int) -> list[training.Batch]:
            mine = training.my_batches(accelerator, [g.longest for g in train_set], config, epoch)
            return [collate([train_set[i] for i in group], tokenizer.pad_token_id, device) for group in mine]

        total_steps = training.total_steps(config, accelerator, len(train_set))
        eval_batches = training.eval_batches(eval_set, [g.longest for g in eval_set], config.batch_size,
                                             partial(collate, pad_id=tokenizer.pad_token_id, device=device))
        trainable = training.make_trainable(model, accelerator, config.lr, config.weight_decay,
                                            config.warmup_ratio, total_steps)
        pairs = sum(len(g.pairs) for g in train_set)
        info(f"rm: {len(train_set)} prompts ({pairs} pairs), {total_steps} steps of "
             f"{config.batch_size * config.grad_accum * accelerator.num_processes} prompts on {device} "
             f"({config.quantization}, LoRA r={config.lora_r}"
             f"{', from ' + str(config.model) if source.adapter is not None else ''})")
        # 3. train: the shared loop (accumulation, schedule, eval, checkpoints, resume)
        result = training.fit(
            run_folder, trainable, batches_for_epoch=batches_for_epoch,
            loss_fn=partial(rm_loss, margin=config.margin),
            evaluate=(lambda m: evaluate(m, eval_batches, config.margin)) if eval_batches else (lambda m: {}),
            save_adapter=heads.save_adapter, total_steps=total_steps, grad_accum=config.grad_accum,
            max_grad_norm=config.max_grad_norm, eval_every=config.eval_every, save_every=config.save_every,
            keep=config.keep if eval_batches else "last", eval_key="eval/loss", description="rm",
            weight_of=prompts_in)
        # 4. normalise: gain and bias over the kept model's rewards of every training response
        norm = None
        if accelerator.is_main_process:
            scorer = accelerator.unwrap_model(trainable.model)
            if result.kept == "best":  # fit leaves the model at the last step; score with what was kept
                heads.load_adapter_weights(scorer, Path(config.out) / models.ADAPTER_DIR)
            sequences = [ids for group in train_set for ids in group.responses]
            with progress("rm: normalising", total=len(sequences)) as bar:
                raw = score_sequences(scorer, sequences, tokenizer.pad_token_id, device, 2 * config.batch_size, bar)
            norm = normalization(raw)
        run_folder.complete(result.metrics, steps=result.steps, kept_adapter=result.kept,
                            reward_normalization=norm)
    if accelerator.is_main_process:
        metrics = result.metrics
        summary_table("rm", {
            "output": str(config.out), "steps": result.steps, "adapter kept": result.kept,
            **{k: metrics[k] for k in ("loss/train", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin")
               if k in metrics},
            "reward mean / std": f"{norm['mean']:.4g} / {norm['std']:.4g}",
            "normalisation": f"{norm['gain']:.4g} * r + {norm['bias']:.4g}"})
    return Path(config.out)


def read_prefs(data_dir: Path, name: str) -> list[dict]:
    """A prefs split of the data folder; a folder without one is a UserError that says how to make it."""
    folder = Path(data_dir)
    if folder.is_dir() and not (folder / f"{name}.jsonl").is_file():
        splits = sorted(p.name.split(".")[0] for p in folder.glob("*.jsonl"))
        raise UserError(f"The data folder has no {name} split" + (f" (it holds {', '.join(sorted(set(splits)))} "
                        "data)" if splits else ""), where=str(folder),
                        fix="Prepare preference data with `instruct prepare-data --task prefs`")
    return data.read_split(folder, name)


# ------------------------------------------------------------------------------------------------ score
def read_scoring_rows(path: Path) -> tuple[list[dict], str]:
    """Rows of `{"prompt", "response"}` from a JSONL file (or stdin for `-`); returns (rows, display name)."""
    if str(path) == "-":
        name, text = "stdin", sys.stdin.read()
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError("The input file does not exist", where=str(path), fix="Check the --input path")
        name, text = str(path), path.read_text(encoding="utf-8")
    rows = []
    for number, row, where in data.json_lines(text.splitlines(), name,
                                              fix='Write each line as {"prompt": ..., "response": ...}'):
        if not isinstance(row, dict) or "prompt" not in row or "response" not in row:
            raise UserError(f"Line {number} needs a `prompt` and a `response`", where=where,
                            fix='Write each line as {"prompt": "...", "response": "..."} (text or message lists)')
        as_messages(row["prompt"], "user", where, "prompt")  # validate now, with the line number
        as_messages(row["response"], "assistant", where, "response")
        rows.append(row)
    if not rows:
        raise UserError("The input has no rows to score", where=name, fix="Add one JSON line per prompt + response")
    return rows, name


def score(config: RMScoreConfig) -> list[dict]:
    """Add a normalised `reward` to each input row; write them to --output or stdout (JSONL); return them."""
    if config.input is None:
        raise UserError("No rows to score", where="--input",
                        fix="Pass --input FILE.jsonl (or --input - to read standard input)")
    rows, name = read_scoring_rows(config.input)
    model, tokenizer, norm = load_reward_model(Path(config.model), config.quantization, config.device)
    device = next(model.head.parameters()).device
    sequences = [encode_response(tokenizer, as_messages(row["prompt"], "user", name, "prompt"),
                                 as_messages(row["response"], "assistant", name, "response"), config.max_length)
                 for row in rows]
    with progress("rm score", total=len(rows)) as bar:
        raw = score_sequences(model, sequences, tokenizer.pad_token_id, device, config.batch_size, bar)
    scored = [{**row, "reward": normalize(value, norm)} for row, value in zip(rows, raw)]
    if config.output is None:
        for row in scored:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        artifacts.write_jsonl(config.output, scored)
        rewards = torch.tensor([row["reward"] for row in scored])
        summary_table("rm score", {"rows": len(scored), "model": str(config.model), "output": str(config.output),
                                   "reward mean": float(rewards.mean()),
                                   "reward min / max": f"{float(rewards.min()):.4g} / {float(rewards.max()):.4g}"})
    return scored
