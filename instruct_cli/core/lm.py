"""The language-model loss on labelled tokens: what sft trains, what ppo's ptx term adds, what eval's
perplexity measures.

Owns: collating encoded conversations (`collate`, padded; `collate_packed`, padding-free: several
conversations per row, each seeing only itself), the next-token NLL projected only at labelled positions
(`next_token_nll`, `NextTokenLoss`, on either batch), the same log-probabilities summed per sequence
(`sequence_logprobs`, `SequenceLogProbs`: what dpo compares; `packed_sequence_logprobs` on shared-prefix packed rows, and
`batch_logprobs` for either batch), the mean loss (`sft_loss`) and its evaluation (`evaluate`). May use:
chat (IGNORE), heads (hidden states), packing (the 4-D mask's rows), training (Batch, right_pad).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from instruct_cli.core import heads, packing, training
from instruct_cli.core.chat import IGNORE


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> training.Batch:
    """Right-pad encoded rows into input_ids, attention_mask and labels."""
    input_ids = training.right_pad([ids for ids, _ in rows], pad_id)
    labels = training.right_pad([lab for _, lab in rows], IGNORE)
    attention_mask = training.right_pad([[1] * len(ids) for ids, _ in rows], 0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def collate_packed(rows: list[tuple[list[int], list[int]]], pad_id: int, device, width: int = 0) -> training.Batch:
    """Padding-free `collate`: the rows packed side by side into as few rows of at most `width` tokens (0: the
    longest row's length, so no packed row is longer than a padded one would be) as first-fit decreasing
    finds (packing.bins), each attending causally to itself only, positions restarting at 0.

    Returns input_ids, position_ids, segments (packing.pack) and labels: each row's own, with its first token
    unlabelled, so that no token is predicted across a row boundary (position 0 is never predicted in a
    padded batch either): the same labelled tokens, losses and gradients as `collate`, to float rounding.
    """
    width = max(width, max(len(ids) for ids, _ in rows))
    groups = [[rows[i] for i in members] for members in packing.bins([len(ids) for ids, _ in rows], width)]
    batch = packing.pack([[ids for ids, _ in group] for group in groups], pad_id, device, shared=False)
    batch.pop("ends")
    labels = [[label for _, row_labels in group for label in [IGNORE, *row_labels[1:]]] for group in groups]
    return {**batch, "labels": training.right_pad(labels, IGNORE).to(device)}


def next_token_nll(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of a causal LM over the labelled tokens, and their count, of
    a padded batch (`attention_mask`) or a packed one (`position_ids` and `segments`, see `collate_packed`).

    The vocabulary projection runs only at labelled positions: the (batch, length, vocab) logits of a full
    forward are the largest tensor of a step (8 x 272 tokens x 49k vocab = 0.4 GB in fp32, several times over
    with softmax and gradients), while only the assistant tokens, often a third of them, are needed.
    """
    logits, targets, labelled = labelled_logits(lm, input_ids, attention_mask, labels, position_ids, segments)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), labelled.sum()


def labelled_logits(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting each labelled token (N, vocab), those tokens (N,), the (B, T - 1) mask of where they
    are), with the vocabulary projection run only there (see `next_token_nll`). Packed rows (`segments`)
    need `plain_output_layer(lm)`."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE
    if segments is not None:
        hidden = heads.packed_hidden_states(lm, input_ids, position_ids, segments).view(*input_ids.shape, -1)
        logits = lm.get_output_embeddings()(hidden[:, :-1][labelled])
    elif plain_output_layer(lm):
        hidden = heads.last_hidden_states(lm, input_ids, attention_mask)[:, :-1]
        logits = lm.get_output_embeddings()(hidden[labelled])
    else:  # a model whose forward does more than lm_head(hidden) (logit scaling or soft-capping)
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][labelled]
    return logits, targets[labelled], labelled


def sequence_logprobs(
    lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, the summed log-probability of its labelled tokens (B,), and how many there are (B,).

    Token log-probs are fp32; their sums are fp64: a sum of a few hundred tokens is in the hundreds, where
    fp32 resolves only ~1e-5, and DPO subtracts such sums from each other."""
    logits, targets, labelled = labelled_logits(lm, input_ids, attention_mask, labels)
    token_logprobs = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = labelled.nonzero()[:, 0]  # boolean indexing is row-major: the row of each labelled token, in order
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=token_logprobs.device)
    return sums.index_add(0, rows, token_logprobs.double()), labelled.sum(-1)


def packed_sequence_logprobs(
    lm,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    segments: torch.Tensor,
    sources: torch.Tensor,
    targets: torch.Tensor,
    owners: torch.Tensor,
    sequences: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` of shared-prefix packed rows (packing.pack): token `targets[i]` is predicted from
    the hidden state at flat position `sources[i]` and belongs to sequence `owners[i]`; returns the sums
    (sequences,) in fp64 and the counts (sequences,). Needs `plain_output_layer(lm)`."""
    hidden = heads.packed_hidden_states(lm, input_ids, position_ids, segments)
    logits = lm.get_output_embeddings()(hidden[sources])
    token_logprobs = -F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(sequences, dtype=torch.float64, device=token_logprobs.device)
    counts = torch.zeros(sequences, dtype=torch.long, device=token_logprobs.device)
    return sums.index_add(0, owners, token_logprobs.double()), counts.index_add(0, owners, torch.ones_like(owners))


PACKED_KEYS = ("position_ids", "segments", "sources", "targets", "owners", "ends")
"""What a packed log-prob batch holds besides input_ids (see packed_sequence_logprobs; `ends` gives the count)."""


def batch_logprobs(model, batch: training.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed label log-probs and counts of a padded (`labels`) or packed batch, through the
    forward of a SequenceLogProbs (possibly DDP-wrapped)."""
    if "segments" in batch:
        return model(batch["input_ids"], **{key: batch[key] for key in PACKED_KEYS})
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"])


def packs(lm) -> bool:
    """True when `lm` computes packed rows exactly: an attention that takes the 4-D mask, and logits that are
    just its output layer on the last hidden states (sft's padding-free batches, dpo's shared prefixes)."""
    return packing.supports(lm) and plain_output_layer(lm)


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

    @property
    def packs(self) -> bool:
        """True when the model takes padding-free packed batches exactly (`collate_packed`)."""
        return packs(self.lm)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        return next_token_nll(self.lm, input_ids, attention_mask, labels, position_ids, segments)


class SequenceLogProbs(nn.Module):
    """A causal LM whose forward is `sequence_logprobs`: what dpo trains (called, and DDP-wrapped, as
    `NextTokenLoss` is); `lm` is the peft model inside, what gets saved."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        sources: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        owners: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`sequence_logprobs` of a padded batch, or `packed_sequence_logprobs` of a packed one (`segments`)."""
        if segments is not None:
            return packed_sequence_logprobs(
                self.lm, input_ids, position_ids, segments, sources, targets, owners, ends.numel()
            )
        return sequence_logprobs(self.lm, input_ids, attention_mask, labels)


def token_nll(model, batch: training.Batch) -> tuple[torch.Tensor, int]:
    """`next_token_nll` of a padded or packed batch, for a NextTokenLoss (possibly DDP-wrapped) or a plain
    causal LM."""
    packed = {"position_ids": batch["position_ids"], "segments": batch["segments"]} if "segments" in batch else {}
    if isinstance(getattr(model, "module", model), NextTokenLoss):
        total, count = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"], **packed)
    else:
        total, count = next_token_nll(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], **packed)
    return total, int(count)


def labelled_tokens(batch: training.Batch) -> int:
    """How many tokens of the batch carry a label (what `sft_loss` is a mean over)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: training.Batch) -> int:
    """How many positions of a padded or packed batch hold a token (not padding)."""
    return int((batch["segments"] >= 0).sum() if "segments" in batch else batch["attention_mask"].sum())


def sft_loss(model, batch: training.Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean NLL over the batch's assistant tokens (the training loss)."""
    total, count = token_nll(model, batch)
    return total / max(count, 1), {"tokens": float(real_tokens(batch))}


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
