"""The language-model loss on labelled tokens: what sft trains, what ppo's ptx term adds, what eval's
perplexity measures.

Owns: collating encoded conversations (`collate`), the next-token NLL projected only at labelled positions
(`next_token_nll`, `NextTokenLoss`), the mean loss (`sft_loss`) and its evaluation (`evaluate`). May use:
chat (IGNORE), heads (hidden states), training (Batch, right_pad).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from instruct_cli.core import heads, training
from instruct_cli.core.chat import IGNORE


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> training.Batch:
    """Right-pad encoded rows into input_ids, attention_mask and labels."""
    input_ids = training.right_pad([ids for ids, _ in rows], pad_id)
    labels = training.right_pad([lab for _, lab in rows], IGNORE)
    attention_mask = training.right_pad([[1] * len(ids) for ids, _ in rows], 0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def next_token_nll(
    lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
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
    return (
        not (
            getattr(config, "final_logit_softcapping", None)
            or getattr(config, "logit_scale", None)
            or getattr(config, "logits_scaling", None)
        )
        and lm.get_output_embeddings() is not None
    )


class NextTokenLoss(nn.Module):
    """A causal LM whose forward is `next_token_nll`: what sft trains. Being the module that is called (and
    that DDP wraps) lets data-parallel runs see the forward, which DDP's gradient hooks need; `lm` is the
    peft model inside, what gets saved."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
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
