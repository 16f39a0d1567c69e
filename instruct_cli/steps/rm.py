"""`instruct rm`: a reward model trained on human preferences (InstructGPT step 2), and `instruct rm score`.

The reward model is the causal-LM base + a LoRA adapter + a scalar head (heads.py), not a
sequence-classification model, so PPO can run it as one more adapter on its one shared base. Started from
an SFT run (`--model runs/sft`) its LoRA begins as the SFT adapter, as InstructGPT initialises its RM from
the SFT model; the head always starts fresh.

Each row is a prompt with K >= 2 responses and a ranking (a preference pair is K = 2). A row is one batch
element: its K responses are each encoded and scored once, and the loss of the row is the mean over its
C(K, 2) pairs of -log sigmoid(r_better - r_worse - margin); the batch loss is the mean over rows. All
responses of a batch go through the model in ONE forward pass. The score is read at the EOS that ends the
response (the chat template's trailing newline is trimmed), which is how PPO scores its rollouts. By default
(--shared-prefix) a row is ONE packed sequence, its prompt once and then its K responses, each attending to
the prompt and itself (core/packing.py): the scores, loss and gradients of one sequence per response, with
the prompt computed once instead of K times. Too long a row loses prompt tokens, the same ones for all its
responses.

After training, a seeded sample of the training split's responses (--normalization-samples, whole prompts;
every response when there are fewer) is scored with the kept adapter, and a gain and bias are stored in the
manifest (`reward_normalization`, with the sample's size) so that gain * r + bias has mean 0 and std 1
there; every consumer of the reward (rm score, ppo, eval) applies them.
"""

from __future__ import annotations

import json
import random
import sys
from functools import partial
from pathlib import Path

import torch

from instruct_cli.core import artifacts, data_folders, heads, intervals, models, preferences, training
from instruct_cli.core.config import RMConfig, RMScoreConfig
from instruct_cli.core.console import info, progress, summary_table, warn
from instruct_cli.core.errors import UserError
from instruct_cli.core.heads import RewardModel, save_adapter  # noqa: F401 - save_adapter is part of this step's API

# ------------------------------------------------------------------------------------------------ losses
prompts_in = preferences.prompts_in  # what a batch's loss is a mean over (bench_plan weighs steps by it)


def rm_loss(model, batch: training.Batch, margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of a batch of groups, with the pair accuracy and mean margin as metrics."""
    better, worse = preferences.pair_scores(model, batch)
    loss = preferences.pairwise_loss(better, worse, batch["pair_weight"], margin)
    with torch.no_grad():
        gap = better - worse
        metrics = {
            "tokens": preferences.batch_tokens(batch),
            "accuracy": float((gap > 0).float().mean()),
            "margin": float(gap.mean()),
        }
    return loss, metrics


# ------------------------------------------------------------------------------------------------- model
def load_trainable_reward_model(config: RMConfig, source: models.ModelSource, device, tokenizer=None):
    """The base with a trainable LoRA (the SFT run's adapter when --model is a run folder) and a fresh head."""
    body, tokenizer = training.load_trainable_policy(config, source, device, tokenizer)  # the base + LoRA as sft
    head = heads.ScalarHead(heads.hidden_size_of(body), seed=config.seed).to(device)
    return RewardModel(body, head), tokenizer


# ------------------------------------------------------------------------------------------------- run
def run(config: RMConfig) -> Path:
    """Train a reward model on the data folder's prefs split; write the run folder; return its path."""
    if training.already_done(config, "rm"):
        return Path(config.out)
    train_rows = read_prefs(config.data, "prefs.train")
    eval_rows = read_prefs(config.data, "prefs.eval")
    source = models.resolve_model(config.model)
    # 1. data, before the run folder is opened (a bad input never leaves a folder behind): each row a group of
    # K responses (encoded once) and its C(K, 2) pairs
    tokenizer = models.load_tokenizer(source)
    train_set, cut = preferences.encode_rows(
        tokenizer, train_rows, config.max_length, f"{config.data}/prefs.train.jsonl"
    )
    eval_set, _ = preferences.encode_rows(tokenizer, eval_rows, config.max_length, f"{config.data}/prefs.eval.jsonl")
    if cut:
        warn(f"{cut} training responses were cut to --max-length {config.max_length} tokens (from the prompt side)")
    preferences.require_pairs(train_set, f"{config.data}/prefs.train.jsonl")
    accelerator, device, run_folder = training.start(config, "rm", source)
    with run_folder.recording():
        # 2. model: base + LoRA (from the SFT adapter if given) + a fresh scalar head
        model, _ = load_trainable_reward_model(config, source, device, tokenizer)
        shared = config.shared_prefix and model.packs
        if config.shared_prefix and not shared:
            info("rm: this model's attention takes no custom mask; one sequence per response (--no-shared-prefix)")
        collate = partial(
            preferences.collate_shared if shared else preferences.collate, pad_id=tokenizer.pad_token_id, device=device
        )
        batches_for_epoch, eval_batches, total_steps = preferences.group_batches(
            config, accelerator, train_set, eval_set, shared, collate
        )
        trainable = training.make_trainable(
            model, accelerator, config.lr, config.weight_decay, config.warmup_ratio, total_steps
        )
        pairs = sum(len(g.pairs) for g in train_set)
        info(
            f"rm: {len(train_set)} prompts ({pairs} pairs), {total_steps} steps of "
            f"{config.batch_size * config.grad_accum * accelerator.num_processes} prompts on {device} "
            f"({config.quantization}, LoRA r={config.lora_r}"
            f"{', from ' + str(config.model) if source.adapter is not None else ''})"
        )
        # 3. train: the shared loop (accumulation, schedule, eval, checkpoints, resume)
        result = training.fit(
            run_folder,
            trainable,
            training.Schedule.of(config, total_steps),
            batches_for_epoch=batches_for_epoch,
            loss_fn=partial(rm_loss, margin=config.margin),
            evaluate=(lambda m: preferences.evaluate(m, eval_batches, config.margin)) if eval_batches else None,
            save_adapter=heads.save_adapter,
            description="rm",
            weight_of=prompts_in,
        )
        # 4. normalise: gain and bias over the kept model's rewards of a seeded sample of training responses
        norm = None
        if accelerator.is_main_process:
            scorer = accelerator.unwrap_model(trainable.model)
            if result.kept == "best":  # fit leaves the model at the last step; score with what was kept
                heads.load_adapter_weights(scorer, Path(config.out) / models.ADAPTER_DIR)
            sample = normalization_sample(train_set, config.normalization_samples, config.seed)
            sequences = [ids for group in sample for ids in group.responses]
            prompts = [number for number, group in enumerate(sample) for _ in group.responses]
            with progress("rm: normalising", total=len(sequences)) as bar:
                if shared:  # each prompt once for all its responses
                    raw = preferences.score_grouped(
                        scorer, sequences, prompts, tokenizer.pad_token_id, device, 2 * config.batch_size, bar
                    )
                else:
                    raw = preferences.score_sequences(
                        scorer, sequences, tokenizer.pad_token_id, device, 2 * config.batch_size, bar
                    )
            norm = {**preferences.normalization(raw), "samples": len(raw)}
        intervals.add_accuracy_interval(result.metrics, len(eval_set))  # small eval splits say so
        run_folder.complete(result.metrics, steps=result.steps, kept_adapter=result.kept, reward_normalization=norm)
    if accelerator.is_main_process:
        metrics = result.metrics
        summary_table(
            "rm",
            {
                "output": str(config.out),
                "steps": result.steps,
                "adapter kept": result.kept,
                **{
                    k: intervals.with_interval(metrics, k)
                    for k in ("loss/train", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin")
                    if k in metrics
                },
                "reward mean / std": f"{norm['mean']:.4g} / {norm['std']:.4g}",
                "normalisation": f"{norm['gain']:.4g} * r + {norm['bias']:.4g} ({norm['samples']} responses)",
            },
        )
    return Path(config.out)


def normalization_sample(groups: list, responses: int, seed: int) -> list:
    """Whole prompts, in a seeded random order, until they hold at least `responses` responses (every prompt
    when they hold fewer): the reward normalisation needs a few thousand rewards, not the whole training set."""
    order = list(range(len(groups)))
    random.Random(f"normalization-{seed}").shuffle(order)
    chosen, count = [], 0
    for number in order:
        if count >= responses:
            break
        chosen.append(groups[number])
        count += len(groups[number].responses)
    return chosen


def read_prefs(data_dir: Path, name: str) -> list[dict]:
    """A prefs split of the data folder; a folder without one is a UserError that says how to make it."""
    folder = Path(data_dir)
    if folder.is_dir() and not (folder / f"{name}.jsonl").is_file():
        splits = sorted(p.name.split(".")[0] for p in folder.glob("*.jsonl"))
        raise UserError(
            f"The data folder has no {name} split"
            + (f" (it holds {', '.join(sorted(set(splits)))} data)" if splits else ""),
            where=str(folder),
            fix="Prepare preference data with `instruct prepare-data --task prefs`",
        )
    return data_folders.read_split(folder, name)


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
    for number, row, where in data_folders.json_lines(
        text.splitlines(), name, fix='Write each line as {"prompt": ..., "response": ...}'
    ):
        if not isinstance(row, dict) or "prompt" not in row or "response" not in row:
            raise UserError(
                f"Line {number} needs a `prompt` and a `response`",
                where=where,
                fix='Write each line as {"prompt": "...", "response": "..."} (text or message lists)',
            )
        preferences.as_messages(row["prompt"], "user", where, "prompt")  # validate now, with the line number
        preferences.as_messages(row["response"], "assistant", where, "response")
        rows.append(row)
    if not rows:
        raise UserError("The input has no rows to score", where=name, fix="Add one JSON line per prompt + response")
    return rows, name


def score(config: RMScoreConfig) -> list[dict]:
    """Add a normalised `reward` to each input row; write them to --output or stdout (JSONL); return them."""
    if config.input is None:
        raise UserError(
            "No rows to score", where="--input", fix="Pass --input FILE.jsonl (or --input - to read standard input)"
        )
    rows, name = read_scoring_rows(config.input)
    model, tokenizer, norm = preferences.load_reward_model(Path(config.model), config.quantization, config.device)
    device = next(model.head.parameters()).device
    prompts = [preferences.as_messages(row["prompt"], "user", name, "prompt") for row in rows]
    sequences = [
        preferences.encode_response(
            tokenizer,
            prompt,
            preferences.as_messages(row["response"], "assistant", name, "response"),
            config.max_length,
        )
        for prompt, row in zip(prompts, rows)
    ]
    keys = [json.dumps(prompt, sort_keys=True) for prompt in prompts]  # rows of one prompt share it in one row
    with progress("rm score", total=len(rows)) as bar:
        raw = preferences.score_grouped(model, sequences, keys, tokenizer.pad_token_id, device, config.batch_size, bar)
    scored = [{**row, "reward": preferences.normalize(value, norm)} for row, value in zip(rows, raw)]
    if config.output is None:
        for row in scored:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        artifacts.write_jsonl(config.output, scored)
        rewards = torch.tensor([row["reward"] for row in scored])
        summary_table(
            "rm score",
            {
                "rows": len(scored),
                "model": str(config.model),
                "output": str(config.output),
                "reward mean": float(rewards.mean()),
                "reward min / max": f"{float(rewards.min()):.4g} / {float(rewards.max()):.4g}",
            },
        )
    return scored
