"""Preference rows as reward-model batches, and reading a reward model back: what rm trains on and what
ppo, eval and `rm score` score with.

Owns: parsing a pair or ranked row (`preference_group`, `ranking_pairs`), encoding prompt + response so the
score is read at the EOS (`encode_response`), groups and their batches (`Group`, `encode_rows`, `collate`,
and `collate_shared`: each group's prompt once, its responses packed after it, see packing.py), the
pairwise loss and its evaluation (`pairwise_loss`, `pair_scores`, `evaluate`), scoring sequences
(`score_sequences`, `score_grouped`), reward normalisation (`normalization`, `normalize`) and loading a
finished RM run (`load_reward_model`). May use: chat, heads, models, packing, training, artifacts.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from instruct_cli.core import artifacts, heads, models, packing, training
from instruct_cli.core.chat import template_ids
from instruct_cli.core.console import warn
from instruct_cli.core.errors import UserError
from instruct_cli.core.heads import RewardModel


def ranking_pairs(ranking: list[int], ties: list[list[int]] = ()) -> list[tuple[int, int]]:
    """All C(K, 2) (better, worse) pairs of a ranking listed best first: [2, 0, 1] -> (2,0), (2,1), (0,1),
    less the pairs inside a group of `ties` (responses a labeler judged equal teach no preference)."""
    group = {index: number for number, tied in enumerate(ties) for index in tied}
    return [
        (ranking[i], ranking[j])
        for i, j in itertools.combinations(range(len(ranking)), 2)
        if ranking[i] not in group or group[ranking[i]] != group.get(ranking[j])
    ]


def as_messages(value, role: str, where: str, field: str) -> list[dict]:
    """A text or a list of {role, content} messages as a message list (text becomes one `role` message)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(
        f"`{field}` must be a text or a non-empty list of {{role, content}} messages, not {json.dumps(value)[:80]}",
        where=where,
        fix="Clean the file with `instruct prepare-data --task prefs`",
    )


def preference_group(row: dict, where: str) -> tuple[list[dict], list[list[dict]], list[int], list[list[int]]]:
    """(prompt messages, K responses as message lists, ranking best first, tied groups) of a pair or ranked row."""
    if not isinstance(row, dict) or "prompt" not in row:
        raise UserError(
            "A preference row needs a `prompt`",
            where=where,
            fix='Rows look like {"prompt", "chosen", "rejected"} or {"prompt", "responses", "ranking"}',
        )
    prompt = as_messages(row["prompt"], "user", where, "prompt")
    if "responses" in row or "ranking" in row:
        responses, ranking = row.get("responses"), row.get("ranking")
        if not isinstance(responses, list) or len(responses) < 2:
            raise UserError(
                "A ranked row needs `responses`: a list of at least two responses",
                where=where,
                fix='Write {"prompt": [...], "responses": [[...], [...]], "ranking": [best, ..., worst]}',
            )
        if (
            not isinstance(ranking, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
            or sorted(ranking) != list(range(len(responses)))
        ):
            raise UserError(
                f"The ranking {ranking} is not a permutation of the response indices 0..{len(responses) - 1}",
                where=where,
                fix="List every response index exactly once, best first (equal ones go in `ties`)",
            )
        ties = row.get("ties") or []
        if not (isinstance(ties, list) and all(isinstance(g, list) and all(i in ranking for i in g) for g in ties)):
            raise UserError(
                f"`ties` {ties!r} should be groups of response indices",
                where=where,
                fix="Write ties as [[1, 3]] (responses 1 and 3 judged equal), or leave them out",
            )
        return prompt, [as_messages(r, "assistant", where, "responses") for r in responses], list(ranking), ties
    if "chosen" not in row or "rejected" not in row:
        raise UserError(
            "A preference row needs `chosen` and `rejected` (or `responses` and `ranking`)",
            where=where,
            fix="Clean the file with `instruct prepare-data --task prefs`",
        )
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
        ids = ids[: len(ids) - ids[::-1].index(eos)]
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

    @property
    def packed(self) -> int:
        """Positions of its packed row (`collate_shared`): the prompt once plus every response's own tokens."""
        return packing.packed_length(self.responses)


def group_lengths(groups: list[Group], shared_prefix: bool) -> list[int]:
    """What batches of the groups are padded to: packed rows (`collate_shared`) or their longest response."""
    return [group.packed if shared_prefix else group.longest for group in groups]


def group_batches(config, accelerator, train_set: list[Group], eval_set: list[Group], shared_prefix: bool, collate):
    """What `training.fit` needs of preference groups (rm, dpo): (batches_for_epoch, eval_batches, total_steps).
    Training batches are this process's length-grouped share of each epoch; `collate` turns a list of groups
    into a batch, packed (`shared_prefix`) or padded."""
    train_lengths = group_lengths(train_set, shared_prefix)

    def batches_for_epoch(epoch: int) -> list[training.Batch]:
        mine = training.my_batches(accelerator, train_lengths, config, epoch)
        return [collate([train_set[i] for i in group]) for group in mine]

    eval_batches = training.eval_batches(eval_set, group_lengths(eval_set, shared_prefix), config.batch_size, collate)
    return batches_for_epoch, eval_batches, training.total_steps(config, accelerator, len(train_set))


def cut_group(sequences: list[list[int]], max_length: int) -> list[list[int]]:
    """A group's prompt + response sequences cut to `max_length` by `cut_spans`: every response keeps the same
    prompt tokens (so they are judged on the same context and still share them, `collate_shared`)."""
    return [apply_cut(ids, span) for ids, span in zip(sequences, cut_spans(sequences, max_length))]


def apply_cut(ids: list[int], span: tuple[int, int, int]) -> list[int]:
    """What a sequence keeps of itself under its `cut_spans` span (start, stop, tail)."""
    start, stop, tail = span
    return ids[start:stop] + ids[tail:]


def cut_spans(sequences: list[list[int]], max_length: int) -> list[tuple[int, int, int]]:
    """What each of a group's sequences keeps at `max_length`, as (start, stop, tail): `ids[start:stop]` of the
    prompt (the group's shared prefix) and `ids[tail:]` of its response.

    The prompt is cut from the left once for the whole group: it keeps as many of its last tokens as the
    longest response leaves room for, but at least a quarter of `max_length` (or all of it, if shorter). A
    response that does not fit beside that keeps its own last tokens, so its score is still read at its EOS
    and every response keeps the same context. Sequences within `max_length` are kept whole.
    """
    prefix = packing.shared_prefix_length(sequences)
    longest_response = max(len(ids) - prefix for ids in sequences)
    kept_prompt = min(prefix, max(max_length - longest_response, max_length // 4))
    room = max_length - kept_prompt
    return [(prefix - kept_prompt, prefix, max(prefix, len(ids) - room)) for ids in sequences]


def encode_rows(tokenizer, rows: list[dict], max_length: int, where: str) -> tuple[list[Group], int]:
    """Encode preference rows into groups; returns (groups, how many sequences were cut to max_length)."""
    if not tokenizer.chat_template:
        raise UserError(
            "The model's tokenizer has no chat template, so prompts and responses cannot be rendered",
            where="--model",
            fix="Use an instruct/chat model, whose tokenizer has a chat template",
        )
    groups, cut = [], 0
    for number, row in enumerate(rows, start=1):
        prompt, responses, ranking, ties = preference_group(row, f"{where}, row {number}")
        full = [untruncated_response(tokenizer, prompt, r) for r in responses]
        encoded = cut_group(full, max_length)
        cut += sum(len(ids) < len(whole) for ids, whole in zip(encoded, full))
        pairs = ranking_pairs(ranking, ties)
        if pairs:  # a row whose responses are all tied teaches nothing
            groups.append(Group(encoded, pairs))
    return groups, cut


def require_pairs(train_set: list[Group], where: str) -> None:
    """Refuse a training split with no preference pairs (rm and dpo learn from pairs only)."""
    if not train_set:
        raise UserError(
            "The training split has no preference pairs to learn from (no rows, or every ranking is one tie)",
            where=where,
            fix="Prepare it with `instruct prepare-data --task prefs`",
        )


def prompts_in(batch: training.Batch) -> float:
    """How many prompts (groups) a batch holds: what its loss is a mean over (pair weights sum to it)."""
    return float(batch["pair_weight"].sum())


def collate(groups: list[Group], pad_id: int, device) -> training.Batch:
    """All responses of the groups as one right-padded batch, plus the pairs as global row indices.

    `pair_weight` is 1 / (pairs of the pair's group), so sum(w * loss) / sum(w) is the mean over groups of
    each group's mean pair loss (InstructGPT's per-prompt weighting).
    """
    sequences = [ids for group in groups for ids in group.responses]
    return {
        "input_ids": training.right_pad(sequences, pad_id).to(device),
        "attention_mask": training.right_pad([[1] * len(s) for s in sequences], 0).to(device),
        **pair_indices(groups, device),
    }


def collate_shared(groups: list[Group], pad_id: int, device) -> training.Batch:
    """`collate`'s batch with each group as ONE packed row: its prompt once, then every response, each
    attending to the prompt and itself (packing.pack). The scores, loss and gradients are `collate`'s up to
    float rounding; the prompt's tokens are computed once instead of K times. `tokens` counts the tokens
    of the responses as `collate`'s batch holds them (its non-pad tokens), for throughput metrics."""
    return {
        **packing.pack([group.responses for group in groups], pad_id, device),
        **pair_indices(groups, device),
        "tokens": torch.tensor(float(sum(len(ids) for group in groups for ids in group.responses))),
    }


def pair_indices(groups: list[Group], device) -> dict[str, torch.Tensor]:
    """The pairs of the groups as indices into all their responses in order, with per-prompt weights."""
    better, worse, weight, offset = [], [], [], 0
    for group in groups:
        for b, w in group.pairs:
            better.append(offset + b)
            worse.append(offset + w)
            weight.append(1.0 / len(group.pairs))
        offset += len(group.responses)
    return {
        "better": torch.tensor(better, dtype=torch.long, device=device),
        "worse": torch.tensor(worse, dtype=torch.long, device=device),
        "pair_weight": torch.tensor(weight, dtype=torch.float32, device=device),
    }


def batch_tokens(batch: training.Batch) -> float:
    """The non-pad tokens of the responses of a `collate` or `collate_shared` batch (the same for both)."""
    return float(batch["tokens"]) if "tokens" in batch else float(batch["attention_mask"].sum())


def response_scores(model, batch: training.Batch) -> torch.Tensor:
    """The score of every response of a `collate` or `collate_shared` batch, in order, as float32."""
    if "segments" in batch:
        return model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            segments=batch["segments"],
            ends=batch["ends"],
        ).float()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()


def pairwise_loss(
    better: torch.Tensor, worse: torch.Tensor, weight: torch.Tensor | None = None, margin: float = 0.0
) -> torch.Tensor:
    """Weighted mean of -log sigmoid(r_better - r_worse - margin) over pairs (unweighted mean by default)."""
    losses = -F.logsigmoid(better.float() - worse.float() - margin)
    if weight is None:
        return losses.mean()
    return (weight * losses).sum() / weight.sum()


def pair_scores(model, batch: training.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_better, r_worse) of every pair of the batch, from ONE forward pass over all its responses."""
    values = response_scores(model, batch)
    return values[batch["better"]], values[batch["worse"]]


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
    return {
        "eval/loss": weighted / max(weights, 1e-12),
        "eval/accuracy": correct / max(pairs, 1),
        "eval/margin": gaps / max(pairs, 1),
    }


@torch.no_grad()
def score_sequences(
    model: RewardModel, sequences: list[list[int]], pad_id: int, device, batch_size: int, bar=None
) -> list[float]:
    """Raw scores of token sequences, batched by similar length (no grad); returned in input order."""
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [sequences[i] for i in chunk]
        input_ids = training.right_pad(batch, pad_id).to(device)
        attention_mask = training.right_pad([[1] * len(s) for s in batch], 0).to(device)
        for index, value in zip(chunk, model(input_ids=input_ids, attention_mask=attention_mask).float().tolist()):
            scores[index] = value
        if bar is not None:
            bar.advance(len(chunk))
    return scores


@torch.no_grad()
def score_grouped(
    model: RewardModel, sequences: list[list[int]], keys: list, pad_id: int, device, batch_size: int, bar=None
) -> list[float]:
    """`score_sequences` with the sequences of equal `keys` (one prompt's responses) packed into one row
    each (packing.pack), so a prompt is computed once for all its responses; `batch_size` sequences a batch
    (whole groups). Falls back to `score_sequences` for a model that cannot take packed rows."""
    if not packing.supports(model.body):
        return score_sequences(model, sequences, pad_id, device, batch_size, bar)
    model.eval()
    members: dict = {}
    for index, key in enumerate(keys):
        members.setdefault(key, []).append(index)
    groups = sorted(members.values(), key=lambda group: packing.packed_length([sequences[i] for i in group]))
    scores_out = [0.0] * len(sequences)
    start = 0
    while start < len(groups):
        end, count = start, 0
        while end < len(groups) and (count == 0 or count + len(groups[end]) <= batch_size):
            count += len(groups[end])
            end += 1
        chunk = groups[start:end]
        batch = packing.pack([[sequences[i] for i in group] for group in chunk], pad_id, device)
        values = model(**batch).float().tolist()
        for index, value in zip((i for group in chunk for i in group), values):
            scores_out[index] = value
        if bar is not None:
            bar.advance(count)
        start = end
    return scores_out


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


def load_reward_model(run_dir: Path, quantization: str = "nf4", device: str | torch.device = "auto"):
    """A complete rm run ready to score: (RewardModel in eval mode, tokenizer, reward normalisation dict)."""
    from peft import PeftModel

    manifest = artifacts.require_complete(Path(run_dir), "rm", flag="--model")
    source = models.resolve_model(str(run_dir))
    trained = manifest.get("quantization")
    if quantization == "auto":  # eval's default: score as the reward model was trained
        quantization = trained or "nf4"
    if trained and trained != quantization:
        warn(
            f"The reward model was trained on a {trained} base and is loaded on a {quantization} one; scores "
            f"shift slightly (pass --quantization {trained} to match)"
        )
    device = models.pick_device(device) if isinstance(device, str) else device
    tokenizer = models.load_tokenizer(source)
    base = models.load_base_model(source, quantization, device)
    body = PeftModel.from_pretrained(base, str(source.adapter), is_trainable=False)
    head = heads.load_head(source.adapter, device=device)
    model = RewardModel(body, head).eval()
    norm = manifest.get("reward_normalization") or {"gain": 1.0, "bias": 0.0, "mean": 0.0, "std": 1.0}
    return model, tokenizer, norm
