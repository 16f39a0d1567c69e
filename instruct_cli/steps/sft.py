"""`instruct sft`: supervised fine-tuning of a LoRA adapter on demonstrations (InstructGPT step 1).

The loss is the next-token cross-entropy on assistant tokens only — every assistant turn, each with its
EOS, so the model learns to stop — while system and user tokens are masked out. Rows are batched by
similar length, padded, or with --packing packed side by side without padding (each row attending only to
itself; core/lm.py's `collate_packed`), with the same loss. The encoding is core/chat.py's, the loss
core/lm.py's and the loop itself (accumulation, schedule, eval, checkpoints, resume) core/training.py's `fit`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from instruct_cli.core import chat, data_folders, lm, models, training
from instruct_cli.core.config import SFTConfig
from instruct_cli.core.console import info, summary_table, warn
from instruct_cli.core.errors import UserError


# ------------------------------------------------------------------------------------------------- model
def save_adapter(model, folder: Path) -> None:
    """Save the LoRA adapter (peft's save_pretrained format) of a peft model or of an lm.NextTokenLoss around one."""
    (model.lm if isinstance(model, lm.NextTokenLoss) else model).save_pretrained(folder)


# ------------------------------------------------------------------------------------------------- run
def run(config: SFTConfig) -> Path:
    """Fine-tune `config.model` on the data folder's sft split; write the run folder; return its path."""
    if training.already_done(config, "sft"):
        return Path(config.out)
    train_rows = data_folders.read_split(config.data, "sft.train")
    eval_rows = data_folders.read_split(config.data, "sft.eval")
    source = models.resolve_model(config.model)
    # the rows are encoded before the run folder is opened: a bad input never leaves a folder behind
    tokenizer = models.load_tokenizer(source)
    encode = partial(chat.encode_conversation, tokenizer, max_length=config.max_length)
    train_set = [encode(row["messages"]) for row in train_rows]
    eval_set = [encode(row["messages"]) for row in eval_rows]
    truncated = sum(len(ids) >= config.max_length for ids, _ in train_set)
    if truncated:
        warn(f"{truncated} training rows were cut to --max-length {config.max_length} tokens (their end)")
    # a row cut before its answer would train on an empty mask: left out, and counted
    train_set, eval_set = (
        [(ids, labels) for ids, labels in rows if any(label != chat.IGNORE for label in labels)]
        for rows in (train_set, eval_set)
    )
    if len(train_set) < len(train_rows):
        warn(
            f"{len(train_rows) - len(train_set)} training rows have no answer token within --max-length "
            f"{config.max_length} and are left out; raise --max-length, or cut their prompts with "
            "`instruct prepare-data --truncate`"
        )
    if not train_set:
        raise UserError(
            "No assistant tokens to learn from in the training split",
            where=str(config.data),
            fix="Check that the conversations end with assistant messages",
        )
    accelerator, device, run_folder = training.start(config, "sft", source)
    with run_folder.recording():
        model, _ = training.load_trainable_policy(config, source, device, tokenizer)
        loss_model = lm.NextTokenLoss(model)
        packed = config.packing and loss_model.packs
        if config.packing and not packed:
            info("sft: this model's attention takes no custom mask; padded batches (--no-packing)")
        # the same rows per batch either way (training.my_batches): packing changes only their layout
        collate = partial(lm.collate_packed if packed else lm.collate, pad_id=tokenizer.pad_token_id, device=device)

        def batches_for_epoch(epoch: int) -> list[training.Batch]:
            mine = training.my_batches(accelerator, [len(ids) for ids, _ in train_set], config, epoch)
            return [collate([train_set[i] for i in group]) for group in mine]

        total_steps = training.total_steps(config, accelerator, len(train_set))
        eval_batches = training.eval_batches(eval_set, [len(ids) for ids, _ in eval_set], config.batch_size, collate)
        trainable = training.make_trainable(
            loss_model, accelerator, config.lr, config.weight_decay, config.warmup_ratio, total_steps
        )
        info(
            f"sft: {len(train_set)} conversations, {total_steps} steps of "
            f"{config.batch_size * config.grad_accum * accelerator.num_processes} rows on {device} "
            f"({config.quantization}, LoRA r={config.lora_r}{', packed' if packed else ''})"
        )
        result = training.fit(
            run_folder,
            trainable,
            training.Schedule.of(config, total_steps),
            batches_for_epoch=batches_for_epoch,
            loss_fn=lm.sft_loss,
            evaluate=(lambda m: lm.evaluate(m, eval_batches)) if eval_batches else None,
            save_adapter=save_adapter,
            description="sft",
            weight_of=lm.labelled_tokens,
        )
        run_folder.complete(result.metrics, steps=result.steps, kept_adapter=result.kept)
    if accelerator.is_main_process:
        summary_table(
            "sft",
            {
                "output": str(config.out),
                "steps": result.steps,
                "adapter kept": result.kept,
                **{k: v for k, v in result.metrics.items() if k.startswith(("loss/", "eval/"))},
            },
        )
    return Path(config.out)
