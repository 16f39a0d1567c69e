"""`instruct sft`: supervised fine-tuning of a LoRA adapter on demonstrations (InstructGPT step 1).

The loss is the next-token cross-entropy on assistant tokens only — every assistant turn, each with its
EOS, so the model learns to stop — while system and user tokens are masked out. Rows are batched by
similar length; the loop itself (accumulation, schedule, eval, checkpoints, resume) is training.fit.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from instruct_cli import data, heads, models, training
from instruct_cli.config import SFTConfig
from instruct_cli.console import info, summary_table, warn
from instruct_cli.errors import UserError

IGNORE = -100  # label value that cross_entropy skips


# ---------------------------------------------------------------------------------------------- encoding
def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template."""
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: labels equal the ids on assistant tokens (their EOS
    included) and IGNORE everywhere else (system, user, role headers, anything after an EOS).

    Each assistant turn is located by rendering the conversation up to it: its tokens start where the
    prompt with the generation header ends, and end at the EOS that closes the turn.
    """
    if not tokenizer.chat_template:
        raise UserError("The model's tokenizer has no chat template, so turns cannot be told apart",
                        where="--model", fix="Use an instruct/chat model, whose tokenizer has a chat template")
    input_ids = template_ids(tokenizer, messages)
    labels = [IGNORE] * len(input_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(template_ids(tokenizer, messages[:turn], add_generation_prompt=True))
        through_turn = template_ids(tokenizer, messages[:turn + 1])
        if input_ids[:len(through_turn)] != through_turn or input_ids[:start] != template_ids(
                tokenizer, messages[:turn], add_generation_prompt=True):
            raise UserError("The chat template renders a conversation differently from its beginning, so "
                            "assistant turns cannot be located", where="--model",
                            fix="Use a model whose chat template renders turns one after another (ChatML, Llama)")
        end = len(through_turn)
        span = input_ids[start:end]
        if tokenizer.eos_token_id in span:  # stop at the turn's EOS; what follows it is template glue
            end = start + len(span) - span[::-1].index(tokenizer.eos_token_id)
        labels[start:end] = input_ids[start:end]
    return input_ids[:max_length], labels[:max_length]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> training.Batch:
    """Right-pad encoded rows into input_ids, attention_mask and labels."""
    input_ids = training.right_pad([ids for ids, _ in rows], pad_id)
    labels = training.right_pad([lab for _, lab in rows], IGNORE)
    attention_mask = training.right_pad([[1] * len(ids) for ids, _ in rows], 0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


# ------------------------------------------------------------------------------------------------ losses
def next_token_nll(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of a causal LM over the labelled tokens, and their count.

    The vocabulary projection runs only at labelled positions: the (batch, length, vocab) logits of a full
    forward are the largest tensor of a step (8 x 272 tokens x 49k vocab = 0.4 GB in fp32, several times over
    with softmax and gradients), while only the assistant tokens, often a third of them, are needed.
    """
    targets = labels[:, 1:]
    labelled = targets != IGNORE
    if plain_output_layer(lm):
        hidden = heads.last_hidden_states(lm, input_ids, attention_mask)[:, :-1]
        logits = lm.get_output_embeddings()(hidden[labelled])
    else:  # a model whose forward does more than lm_head(hidden) (logit scaling or soft-capping)
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][labelled]
    return F.cross_entropy(logits.float(), targets[labelled], reduction="sum"), labelled.sum()


def plain_output_layer(lm) -> bool:
    """True when the model's logits are just its output layer applied to the last hidden states."""
    config = lm.config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)
                or getattr(config, "logits_scaling", None)) and lm.get_output_embeddings() is not None


class NextTokenLoss(nn.Module):
    """A causal LM whose forward is `next_token_nll`: what sft trains. Being the module that is called (and
    that DDP wraps) lets data-parallel runs see the forward, which DDP's gradient hooks need; `lm` is the
    peft model inside, what gets saved."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        return next_token_nll(self.lm, input_ids, attention_mask, labels)


def token_nll(model, batch: training.Batch) -> tuple[torch.Tensor, int]:
    """`next_token_nll` of a batch, for a NextTokenLoss (possibly DDP-wrapped) or a plain causal LM."""
    if isinstance(getattr(model, "module", model), NextTokenLoss):
        total, count = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    else:
        total, count = next_token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return total, int(count)


def labelled_tokens(batch: training.Batch) -> int:
    """How many tokens of the batch carry a label (what `sft_loss` is a mean over)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def sft_loss(model, batch: training.Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean NLL over the batch's assistant tokens (the training loss)."""
    total, count = token_nll(model, batch)
    return total / max(count, 1), {"tokens": float(batch["attention_mask"].sum())}


@torch.no_grad()
def evaluate(model, batches: list[training.Batch]) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the eval split."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        nll, n = token_nll(model, batch)
        total, count = total + nll.item(), count + n
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


# ------------------------------------------------------------------------------------------------- model
def load_trainable_policy(config, source: models.ModelSource, device):
    """The base model (quantised as configured) with a trainable LoRA adapter, and its tokenizer.

    A run folder as --model continues from that run's adapter; otherwise a new adapter is attached.
    """
    from peft import PeftModel, get_peft_model

    tokenizer = models.load_tokenizer(source)
    base = models.load_base_model(source, config.quantization, device)
    base = training.prepare_for_training(base, config.quantization, config.gradient_checkpointing)
    if source.adapter is not None:
        model = PeftModel.from_pretrained(base, str(source.adapter), is_trainable=True)
    else:
        model = get_peft_model(base, models.lora_config(config))
    return model, tokenizer


def save_adapter(model, folder: Path) -> None:
    """Save the LoRA adapter (peft's save_pretrained format) of a peft model or of a NextTokenLoss around one."""
    (model.lm if isinstance(model, NextTokenLoss) else model).save_pretrained(folder)


# ------------------------------------------------------------------------------------------------- run
def run(config: SFTConfig) -> Path:
    """Fine-tune `config.model` on the data folder's sft split; write the run folder; return its path."""
    training.require_data_and_out(config)
    train_rows = data.read_split(config.data, "sft.train")
    eval_rows = data.read_split(config.data, "sft.eval")
    source = models.resolve_model(config.model)
    accelerator = training.make_accelerator(config.seed)
    device = accelerator.device if config.device == "auto" else models.pick_device(config.device)
    run_folder = training.open_run(config, "sft", accelerator, source)
    with run_folder.recording():
        model, tokenizer = load_trainable_policy(config, source, device)
        encode = partial(encode_conversation, tokenizer, max_length=config.max_length)
        train_set = [encode(row["messages"]) for row in train_rows]
        eval_set = [encode(row["messages"]) for row in eval_rows]
        truncated = sum(len(ids) >= config.max_length for ids, _ in train_set)
        if truncated:
            warn(f"{truncated} training rows were cut to --max-length {config.max_length} tokens")
        if not any(label != IGNORE for _, labels in train_set for label in labels):
            raise UserError("No assistant tokens to learn from in the training split", where=str(config.data),
                            fix="Check that the conversations end with assistant messages")

        def batches_for_epoch(epoch: int) -> list[training.Batch]:
            mine = training.my_batches(accelerator, [len(ids) for ids, _ in train_set], config, epoch)
            return [collate([train_set[i] for i in group], tokenizer.pad_token_id, device) for group in mine]

        total_steps = training.total_steps(config, accelerator, len(train_set))
        eval_batches = training.eval_batches(eval_set, [len(ids) for ids, _ in eval_set], config.batch_size,
                                             partial(collate, pad_id=tokenizer.pad_token_id, device=device))
        trainable = training.make_trainable(NextTokenLoss(model), accelerator, config.lr, config.weight_decay,
                                            config.warmup_ratio, total_steps)
        info(f"sft: {len(train_set)} conversations, {total_steps} steps of "
             f"{config.batch_size * config.grad_accum * accelerator.num_processes} rows on {device} "
             f"({config.quantization}, LoRA r={config.lora_r})")
        result = training.fit(
            run_folder, trainable, batches_for_epoch=batches_for_epoch, loss_fn=sft_loss,
            evaluate=(lambda m: evaluate(m, eval_batches)) if eval_batches else (lambda m: {}),
            save_adapter=save_adapter, total_steps=total_steps, grad_accum=config.grad_accum,
            max_grad_norm=config.max_grad_norm, eval_every=config.eval_every, save_every=config.save_every,
            keep=config.keep if eval_batches else "last", eval_key="eval/loss", description="sft",
            weight_of=labelled_tokens)
        run_folder.complete(result.metrics, steps=result.steps, kept_adapter=result.kept)
    if accelerator.is_main_process:
        summary_table("sft", {"output": str(config.out), "steps": result.steps, "adapter kept": result.kept,
                              **{k: v for k, v in result.metrics.items() if k.startswith(("loss/", "eval/"))}})
    return Path(config.out)
