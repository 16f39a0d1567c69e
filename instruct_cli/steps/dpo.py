"""`instruct dpo`: direct preference optimisation of a LoRA policy (Rafailov et al. 2023), with IPO, robust
DPO and SLiC's hinge as options (core/dpo_loss.py). No reward model and no sampling: the policy learns from the preference data
directly, held near a frozen reference.

The policy starts as a trainable copy of `--model`'s adapter (an SFT run, as the DPO paper starts from the
SFT model) or as a fresh LoRA on a bare base. The reference is that starting model, on the same single base,
never a second model: by default a frozen copy of the starting adapter is loaded as a second adapter,
`reference`, and each batch's reference log-probs come from it (eval mode, no grad, the same packed batch) as
training reaches the batch, as TRL does, so the first step starts at once at any dataset size. A fresh LoRA
is zero at the start, so from a bare base the reference is the base itself (adapters disabled). With
--precompute-reference the log-prob of every response of the train and eval splits is computed ONCE, before
the first step, with the initial adapter, and kept in memory; on --resume it is computed again BEFORE the
checkpoint's weights are restored (inside `fit`). Either way a resumed run continues exactly.

The data is rm's: a row is a prompt with K >= 2 responses and a ranking (a pair is K = 2), trained as all
C(K, 2) (better, worse) pairs except those inside a tie, each pair weighted 1 / (pairs of its prompt) so
that every prompt counts once (core/preferences.py). A response's log-prob is summed over its answer tokens
(the assistant header excluded, its EOS included); a row too long loses tokens from the prompt side, the
same ones for all its responses. As in rm, a batch holds each row as ONE packed sequence (its prompt once,
then its responses, each attending to the prompt and itself; core/packing.py) when the model allows it. The
loss maths lives in core/dpo_loss.py; the loop (accumulation, schedule, eval, checkpoints, resume) is
core/training.py's `fit`. Logged per step and on the eval split: loss, reward accuracy, the chosen and
rejected implicit rewards beta * (log pi - log ref) and their margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from instruct_cli.core import (
    data_folders,
    distributed,
    dpo_loss,
    intervals,
    lm,
    models,
    packing,
    preferences,
    training,
)
from instruct_cli.core.chat import IGNORE, template_ids
from instruct_cli.core.config import DPOConfig
from instruct_cli.core.console import info, progress, summary_table, warn
from instruct_cli.core.errors import UserError


# -------------------------------------------------------------------------------------------------- data
@dataclass
class PolicyGroup(preferences.Group):
    """One prompt's encoded responses and (better, worse) pairs, as rm's `Group`, with what DPO adds."""

    answer_tokens: list[int] | None = None
    """How many of each response's last tokens are the answer: what its log-prob is summed over."""
    reference_logps: list[float] | None = None
    """The reference model's summed log-prob of each answer, filled in once before training."""


def encode_rows(tokenizer, rows: list[dict], max_length: int, where: str) -> tuple[list[PolicyGroup], int]:
    """Encode preference rows into groups; returns (groups, how many sequences were cut to max_length).
    A row whose responses are all tied teaches nothing and is left out."""
    if not tokenizer.chat_template:
        raise UserError(
            "The model's tokenizer has no chat template, so prompts and responses cannot be rendered",
            where="--model",
            fix="Use an instruct/chat model, whose tokenizer has a chat template",
        )
    groups, cut = [], 0
    for number, row in enumerate(rows, start=1):
        place = f"{where}, row {number}"
        prompt, responses, ranking, ties = preferences.preference_group(row, place)
        pairs = preferences.ranking_pairs(ranking, ties)
        if not pairs:
            continue
        header = template_ids(tokenizer, prompt, add_generation_prompt=True)
        full = []
        for response in responses:
            ids = preferences.untruncated_response(tokenizer, prompt, response)
            if ids[: len(header)] != header or len(ids) <= len(header):
                raise UserError(
                    "The chat template renders a prompt + response differently from the prompt alone, so the "
                    "response's tokens cannot be located",
                    where=place,
                    fix="Use a model whose chat template renders turns one after another (ChatML, Llama)",
                )
            full.append(ids)
        spans = preferences.cut_spans(full, max_length)  # the prompt cut once for all responses
        encoded = [preferences.apply_cut(ids, span) for ids, span in zip(full, spans)]
        cut += sum(len(ids) < len(whole) for ids, whole in zip(encoded, full))
        answers = [kept_answer_tokens(span, len(whole), len(header)) for span, whole in zip(spans, full)]
        groups.append(PolicyGroup(encoded, pairs, answers))
    return groups, cut


def kept_answer_tokens(span: tuple[int, int, int], length: int, header: int) -> int:
    """How many answer tokens (those after the prompt's `header` tokens) a sequence of `length` keeps under its
    cut `span` (preferences.cut_spans); they are the cut sequence's last tokens."""
    start, stop, tail = span
    return max(0, stop - max(start, header)) + (length - max(tail, header))


def answer_labels(ids: list[int], answer_tokens: int) -> list[int]:
    """The ids on the answer's tokens (the last `answer_tokens`), IGNORE on the prompt's."""
    start = len(ids) - answer_tokens
    return [IGNORE] * start + ids[start:]


def collate(groups: list[PolicyGroup], pad_id: int, device) -> training.Batch:
    """rm's batch of the groups (every response once, pairs as row indices, per-prompt pair weights) plus the
    answer labels and, once they are known, the reference log-probs of every response."""
    batch = preferences.collate(groups, pad_id, device)
    labels = [answer_labels(ids, n) for group in groups for ids, n in zip(group.responses, group.answer_tokens)]
    batch["labels"] = training.right_pad(labels, IGNORE).to(device)
    return with_reference(batch, groups, device)


def collate_shared(groups: list[PolicyGroup], pad_id: int, device) -> training.Batch:
    """rm's packed batch (preferences.collate_shared: each group one row, its prompt once) plus, per answer
    token, the flat position that predicts it (`sources`), the token (`targets`) and its response (`owners`),
    and the reference log-probs once they are known."""
    batch = preferences.collate_shared(groups, pad_id, device)
    columns = packing.flat_columns([group.responses for group in groups])
    responses = [(ids, n) for group in groups for ids, n in zip(group.responses, group.answer_tokens)]
    sources, targets, owners = [], [], []
    for owner, ((ids, answer), where) in enumerate(zip(responses, columns)):
        first = max(len(ids) - answer, 1)  # as the labels: position 0 has no predictor
        sources += where[first - 1 : len(ids) - 1]
        targets += ids[first:]
        owners += [owner] * (len(ids) - first)
    batch.update(
        {
            name: torch.tensor(values, dtype=torch.long, device=device)
            for name, values in (("sources", sources), ("targets", targets), ("owners", owners))
        }
    )
    return with_reference(batch, groups, device)


def with_reference(batch: training.Batch, groups: list[PolicyGroup], device) -> training.Batch:
    """`batch` with the reference log-probs of every response, once they are known (after step 3 of `run`)."""
    if all(group.reference_logps is not None for group in groups):
        batch["reference_logps"] = torch.tensor(
            [value for group in groups for value in group.reference_logps], dtype=torch.float64, device=device
        )
    return batch


# --------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def compute_reference(
    policy, groups: list[PolicyGroup], pad_id: int, device, batch_size: int, accelerator, bar=None
) -> None:
    """Fill every group's `reference_logps` with the summed answer log-probs of `policy` as it is now (its
    initial adapter: the reference), in eval mode and under the training autocast. Each process scores its
    share of the responses, batched by length, and every process receives all of them."""
    items = [(g, r) for g, group in enumerate(groups) for r in range(len(group.responses))]
    mine = sorted(
        (items[i] for i in distributed.my_share(len(items), accelerator)),
        key=lambda item: len(groups[item[0]].responses[item[1]]),
    )
    policy.eval()
    scored = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        responses = [(groups[g].responses[r], groups[g].answer_tokens[r]) for g, r in chunk]
        rows = [(ids, answer_labels(ids, answer)) for ids, answer in responses]
        batch = lm.collate(rows, pad_id, device)
        with accelerator.autocast():
            sums, _ = lm.sequence_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
        scored += [(g, r, value) for (g, r), value in zip(chunk, sums.tolist())]
        if bar is not None:
            bar.advance(len(chunk) * accelerator.num_processes)
    for group in groups:
        group.reference_logps = [0.0] * len(group.responses)
    for g, r, value in distributed.gather_lists(accelerator, scored):
        groups[g].reference_logps[r] = value


REFERENCE = "reference"
"""The adapter name of the frozen starting adapter (per-batch reference)."""


def add_reference_adapter(policy, source: models.ModelSource) -> None:
    """Load the starting adapter a second time, frozen, as `REFERENCE` (nothing from a bare base, whose
    reference is the base itself)."""
    if source.adapter is not None:
        policy.load_adapter(str(source.adapter), adapter_name=REFERENCE, is_trainable=False)


@torch.no_grad()
def batch_reference(model, batch: training.Batch) -> torch.Tensor:
    """The reference's summed answer log-probs of every response of `batch` (float64): the same forward with
    the frozen starting adapter active (or every adapter disabled, from a bare base), in eval mode."""
    module = getattr(model, "module", model)  # DDP-wrapped or not: the SequenceLogProbs
    policy, was_training, trained = module.lm, module.training, module.lm.active_adapter
    module.eval()
    try:
        if REFERENCE in policy.peft_config:
            policy.set_adapter(REFERENCE, inference_mode=True)
            sums, _ = lm.batch_logprobs(module, batch)
        else:
            with policy.disable_adapter():
                sums, _ = lm.batch_logprobs(module, batch)
    finally:
        if REFERENCE in policy.peft_config:
            policy.set_adapter(trained)
        module.train(was_training)
    return sums.double()


# ------------------------------------------------------------------------------------------------ losses
def pair_terms(logp_sums: torch.Tensor, token_counts: torch.Tensor, batch: training.Batch, config: DPOConfig):
    """The per-pair losses and implicit rewards of a batch, from the policy's summed answer log-probs (the
    reference's from the batch when precomputed, else from `batch_reference`, kept in the batch)."""
    reference, b, w = batch["reference_logps"], batch["better"], batch["worse"]
    return dpo_loss.pair_losses(
        logp_sums[b],
        logp_sums[w],
        reference[b],
        reference[w],
        config.beta,
        config.loss,
        config.label_smoothing,
        token_counts[b],
        token_counts[w],
    )


def dpo_batch_loss(model, batch: training.Batch, config: DPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of a batch (the per-prompt weighted mean of its pair losses) and its reward metrics."""
    if "reference_logps" not in batch:
        batch["reference_logps"] = batch_reference(model, batch)
    logp_sums, token_counts = lm.batch_logprobs(model, batch)
    terms = pair_terms(logp_sums, token_counts, batch, config)
    loss = dpo_loss.weighted_mean(terms.losses, batch["pair_weight"])
    metrics = {"tokens": preferences.batch_tokens(batch), **dpo_loss.reward_stats(terms, batch["pair_weight"])}
    return loss, metrics


@torch.no_grad()
def evaluate(model, batches: list[training.Batch], config: DPOConfig, accelerator) -> dict[str, float]:
    """Eval loss, reward accuracy, chosen / rejected rewards and margin, each a mean over prompts."""
    model.eval()
    totals: dict[str, float] = {}
    prompts = 0.0
    for batch in batches:
        with accelerator.autocast():
            if "reference_logps" not in batch:
                batch["reference_logps"] = batch_reference(model, batch)
            logp_sums, token_counts = lm.batch_logprobs(model, batch)
        terms = pair_terms(logp_sums, token_counts, batch, config)
        weight = batch["pair_weight"]
        stats = {"loss": float(dpo_loss.weighted_mean(terms.losses, weight)), **dpo_loss.reward_stats(terms, weight)}
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + value * float(weight.sum())
        prompts += float(weight.sum())
    return {f"eval/{name}": total / max(prompts, 1e-12) for name, total in totals.items()}


def save_adapter(model: lm.SequenceLogProbs, folder: Path) -> None:
    """Save the policy's LoRA adapter (peft's save_pretrained format): a run folder any command loads."""
    model.lm.save_pretrained(folder)


# --------------------------------------------------------------------------------------------------- run
def check_source(source: models.ModelSource, spec) -> None:
    """Refuse a reward model as the policy to start from (its adapter scores text, it does not write it)."""
    if source.run_manifest is not None and source.run_manifest.get("kind") == "rm":
        raise UserError(
            f"{spec} is a reward model; DPO trains a policy, and its reference is the model it starts from",
            where="--model",
            fix="Pass an sft run (`instruct dpo --model runs/sft`) or a base model",
        )


def run(config: DPOConfig) -> Path:
    """Train a DPO policy on the data folder's prefs split; write the run folder; return its path."""
    if training.already_done(config, "dpo"):
        return Path(config.out)
    train_rows = data_folders.read_split(config.data, "prefs.train")
    eval_rows = data_folders.read_split(config.data, "prefs.eval")
    source = models.resolve_model(config.model)
    check_source(source, config.model)
    # 1. data, before the run folder is opened (a bad input never leaves a folder behind)
    tokenizer = models.load_tokenizer(source)
    train_set, cut = encode_rows(tokenizer, train_rows, config.max_length, f"{config.data}/prefs.train.jsonl")
    eval_set, _ = encode_rows(tokenizer, eval_rows, config.max_length, f"{config.data}/prefs.eval.jsonl")
    if cut:
        warn(f"{cut} training responses were cut to --max-length {config.max_length} tokens (from the prompt side)")
    preferences.require_pairs(train_set, f"{config.data}/prefs.train.jsonl")
    accelerator, device, run_folder = training.start(config, "dpo", source)
    with run_folder.recording():
        # 2. the policy: base + a trainable copy of the starting adapter (or a fresh, zero LoRA)
        policy, _ = training.load_trainable_policy(config, source, device, tokenizer)
        if config.disable_dropout:  # as TRL: the log-ratios to the reference are 0 at step 1, the loss log 2
            models.disable_dropout(policy)
        # 3. the reference: the starting adapter frozen beside it, scored per batch; or, precomputed, every
        # response's log-prob under that starting model once (also on --resume, before fit restores the
        # checkpoint's weights)
        if config.precompute_reference:
            responses = sum(len(group.responses) for group in train_set + eval_set)
            with progress("dpo: reference log-probs", total=responses) as bar:
                compute_reference(
                    policy,
                    train_set + eval_set,
                    tokenizer.pad_token_id,
                    device,
                    2 * config.batch_size,
                    accelerator,
                    bar,
                )
        else:
            add_reference_adapter(policy, source)

        shared = lm.packs(policy)  # each prompt once per row (the reference above is scored one by one)
        batch_of = partial(collate_shared if shared else collate, pad_id=tokenizer.pad_token_id, device=device)
        batches_for_epoch, eval_batches, total_steps = preferences.group_batches(
            config, accelerator, train_set, eval_set, shared, batch_of
        )
        trainable = training.make_trainable(
            lm.SequenceLogProbs(policy), accelerator, config.lr, config.weight_decay, config.warmup_ratio, total_steps
        )
        pairs = sum(len(g.pairs) for g in train_set)
        info(
            f"dpo ({config.loss}, beta {config.beta}"
            f"{f', label smoothing {config.label_smoothing}' if config.label_smoothing else ''}): "
            f"{len(train_set)} prompts ({pairs} pairs), {total_steps} steps of "
            f"{config.batch_size * config.grad_accum * accelerator.num_processes} prompts on {device} "
            f"({config.quantization}, reference: {config.model if source.adapter is not None else 'the base model'})"
        )
        # 4. train: the shared loop (accumulation, schedule, eval, checkpoints, resume)
        result = training.fit(
            run_folder,
            trainable,
            training.Schedule.of(config, total_steps),
            batches_for_epoch=batches_for_epoch,
            loss_fn=partial(dpo_batch_loss, config=config),
            evaluate=(lambda m: evaluate(m, eval_batches, config, accelerator)) if eval_batches else None,
            save_adapter=save_adapter,
            description="dpo",
            weight_of=preferences.prompts_in,
        )
        intervals.add_accuracy_interval(result.metrics, len(eval_set))  # small eval splits say so
        run_folder.complete(result.metrics, steps=result.steps, kept_adapter=result.kept)
    if accelerator.is_main_process:
        metrics = result.metrics
        shown = ("loss/train", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin", "eval/chosen_reward")
        summary_table(
            "dpo",
            {
                "output": str(config.out),
                "steps": result.steps,
                "adapter kept": result.kept,
                **{k: intervals.with_interval(metrics, k) for k in (*shown, "eval/rejected_reward") if k in metrics},
            },
        )
    return Path(config.out)
