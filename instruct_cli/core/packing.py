"""Shared-prefix packing: several sequences that begin with the same tokens (one prompt's K responses) as ONE
row, so the shared tokens go through the network once instead of once per sequence.

A group of sequences becomes the row `prefix + suffix_1 + ... + suffix_K`, where `prefix` is their longest
common prefix. Each token carries a segment number (0 for the prefix, k for suffix k, -1 for padding) and a
position id (the prefix 0..P-1, every suffix P..P+len-1 again), and attends causally to the prefix and to
its own segment only (`attention_mask`, 4-D). Suffix k's tokens then see exactly what they see in the
sequence `prefix + suffix_k` alone, at the same positions, so every hidden state of that sequence is
reproduced up to float rounding: reading a score at a sequence's last token (`ends`) gives today's score.

Sharing is exact whatever the sequences are: sequences cut to different lengths from the left share less
(or nothing) and are packed side by side. Every suffix keeps at least its last token, where its score is read.

Padding-free packing (sft) is the same layout with no shared prefix (`shared=False`): unrelated sequences side
by side in one row, segments 1..K, each attending causally to itself only, positions restarting at 0; `bins`
decides which sequences share a row. `shared_bins` does both at once (ppo's passes): sequences side by side in
rows of bounded width, each row's sequences sharing whatever prefix they have in common (at least the chat
template's system prompt, often).

Owns: `shared_prefix_length`, `packed_length`, `row_layout`, `pack`, `bins`, `shared_bins`, `first_fit`, `flat_columns`
(where each token of each sequence is, for per-token log-probs), `attention_mask` and `supports` (which
attention implementations take the 4-D mask). May use: nothing else of the core.
"""

from __future__ import annotations

import torch

MASKABLE = ("sdpa", "eager")
"""Attention implementations that take a custom 4-D mask: sdpa a boolean one, eager an additive one.
(flash-attention's kernels take no mask; a model loaded with them is scored unpacked.)"""


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix of `sequences`, stopping short of the shortest one's last token:
    every sequence keeps at least one token of its own, the one its score is read at."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    length = 0
    while length < shortest - 1 and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def packed_length(sequences: list[list[int]]) -> int:
    """Positions of the packed row of `sequences`: the shared prefix once plus every sequence's remainder."""
    prefix = shared_prefix_length(sequences)
    return prefix + sum(len(s) - prefix for s in sequences)


def row_layout(
    sequences: list[list[int]], shared: bool = True
) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One group's packed row: (token ids, position ids, segments, and for each sequence the column of each
    of its tokens in the row; the shared prefix's columns appear in every sequence's list). `shared=False`:
    no prefix is shared, every sequence is whole in its own segment (padding-free packing)."""
    prefix = shared_prefix_length(sequences) if shared else 0
    ids, positions, segments = list(sequences[0][:prefix]), list(range(prefix)), [0] * prefix
    columns = []
    for number, sequence in enumerate(sequences, start=1):
        rest = sequence[prefix:]
        columns.append(list(range(prefix)) + list(range(len(ids), len(ids) + len(rest))))
        ids += rest
        positions += range(prefix, prefix + len(rest))
        segments += [number] * len(rest)
    return ids, positions, segments, columns


def flat_columns(groups: list[list[list[int]]]) -> list[list[int]]:
    """For every sequence of `pack(groups)`'s batch, group by group, the flat index (row * width + column) of
    each of its tokens: where its hidden states are in the packed batch's (rows * width) positions."""
    layouts = [row_layout(sequences) for sequences in groups]
    width = max(len(ids) for ids, _, _, _ in layouts)
    return [[row * width + c for c in columns] for row, layout in enumerate(layouts) for columns in layout[3]]


def pack(groups: list[list[list[int]]], pad_id: int, device, shared: bool = True) -> dict[str, torch.Tensor]:
    """Each group of sequences as one right-padded packed row (`shared=False`: no shared prefix, see
    `row_layout`).

    Returns `input_ids`, `position_ids` and `segments` (rows x longest packed row; the mask is built from the
    segments in the forward pass, see `attention_mask`), and `ends`: for every sequence, group by group in
    order, the flat index (row * width + column) of its last token.
    """
    layouts = [row_layout(sequences, shared) for sequences in groups]
    width = max(len(ids) for ids, _, _, _ in layouts)
    input_ids = torch.full((len(layouts), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(layouts), width), dtype=torch.long)
    segments = torch.full((len(layouts), width), -1, dtype=torch.long)
    ends = []
    for row, (ids, positions, segment, columns) in enumerate(layouts):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[row, : len(ids)] = torch.tensor(positions, dtype=torch.long)
        segments[row, : len(ids)] = torch.tensor(segment, dtype=torch.long)
        ends += [row * width + sequence[-1] for sequence in columns]
    return {
        "input_ids": input_ids.to(device),
        "position_ids": position_ids.to(device),
        "segments": segments.to(device),
        "ends": torch.tensor(ends, dtype=torch.long, device=device),
    }


def bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths add up to at most `capacity` (first-fit
    decreasing; an item longer than `capacity` gets a bin of its own). Ties are broken by index, so the same
    lengths always give the same bins."""
    return first_fit(lengths, capacity, lambda members: sum(lengths[i] for i in members))


ROW_WIDTH = 256
"""The width a `shared_bins` row may reach (ppo) even when the padded batch is narrower. The 4-D mask makes
the attention compute every pair of positions in a row; at 256 positions that costs under a tenth of the
linear layers' arithmetic per token for the smallest model this tool trains (SmolLM2-135M: 2.3k x 256
against 7.1M FLOPs per token and layer), and less for larger ones."""


def shared_bins(sequences: list[list[int]], capacity: int) -> list[list[int]]:
    """`bins` of sequences whose rows share their longest common prefix: a row's size is its
    `packed_length`, so rows of sequences that begin alike (the chat template's system prompt) hold more."""
    return first_fit(
        [len(s) for s in sequences], capacity, lambda members: packed_length([sequences[i] for i in members])
    )


def first_fit(lengths: list[int], capacity: int, size) -> list[list[int]]:
    """First-fit decreasing: items taken longest first (ties by index), each into the first bin whose
    `size(members + [item])` stays within `capacity`, else into a new bin."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((group for group in groups if size([*group, index]) <= capacity), None)
        if fit is None:
            groups.append([index])
        else:
            fit.append(index)
    return groups


def attention_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The (rows, 1, width, width) mask of packed rows: a token sees earlier tokens of the prefix (segment 0)
    and of its own segment. Boolean (True = attend) for sdpa; additive (0 or the dtype's minimum) for eager.

    Rows packed without a shared prefix (`shared=False`) have no segment 0: each token sees its own segment.
    Padding (segment -1) sees the prefix and earlier padding, so no row of the mask is empty (an empty row
    gives NaN in sdpa, and NaN leaks into the gradients even where the output is unused).
    """
    width = segments.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (causal & ((key == 0) | (key == query)))[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def supports(model) -> bool:
    """True when `model` (a transformers model, peft-wrapped or not) can run packed rows exactly: a causal
    decoder with an attention implementation that takes a 4-D mask and no sliding-window layers (a custom
    mask would replace their windows)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    if config is None or not getattr(config, "is_causal", True):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return False
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    return getattr(config, "_attn_implementation", None) in MASKABLE
