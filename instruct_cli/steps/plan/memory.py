"""Bytes of the things a step keeps on the device, by the memory model of the package docstring: the dtypes
of a step (`Precision`, `precision`), the frozen base's weights (`nf4_bytes`, `int8_bytes`,
`base_weight_bytes`), what autograd keeps per layer (`layer_inventory` and the activation totals of a
training or an inference forward), the KV cache and the vocabulary-sized logits.

Uses `shapes` (the model's numbers and its LoRA); nothing of the core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .shapes import Lora, ModelShape, parameter_counts


# ------------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """The dtypes (in bytes per element) of one step on one device."""

    compute: int
    """The matmul dtype: bf16 (2) on a GPU, fp32 (4) on a CPU."""
    stream: int
    """The residual stream's dtype = the embedding weight's: fp32 after kbit preparation, else compute."""
    autocast: bool
    """Runs under bf16 autocast (accelerate's mixed precision: GPU training)."""
    quantized: bool
    """The Linear layers are 4- or 8-bit (bitsandbytes returns its input's dtype)."""
    cuda: bool
    """CUDA's fused dropout keeps a 1-byte mask; the CPU keeps a mask in the input's dtype."""

    @property
    def lora(self) -> int:
        """The dtype LoRA's matmuls run in: autocast's, else the fp32 of the LoRA weights."""
        return self.compute if self.autocast else 4


def precision(device: str, quantization: str, training: bool, autocast: bool | None = None) -> Precision:
    """The Precision of a step: `training` steps prepare a quantised base for kbit training (fp32 embeddings,
    norms and lm_head); `autocast` defaults to on for training on a GPU."""
    cuda = device.startswith("cuda")
    compute = 4 if device == "cpu" else 2  # "cpu-bf16": a CPU running a GPU's dtypes (the benchmark's emulation)
    quantized = quantization in ("nf4", "int8")
    stream = 4 if (quantized and training) else compute
    if autocast is None:  # accelerate's bf16 mixed precision, wherever the compute dtype is bf16
        autocast = training and compute == 2
    return Precision(compute=compute, stream=stream, autocast=autocast, quantized=quantized, cuda=cuda)


# ---------------------------------------------------------------------------------------------- weights
def nf4_bytes(weights: int, modules: int) -> int:
    """Bytes of `weights` 4-bit NF4 weights in `modules` Linear layers with double quantisation: 4 bits each,
    an 8-bit absmax per block of 64, an fp32 absmax per 256 blocks, and two small code tables per layer."""
    blocks = math.ceil(weights / 64)
    return math.ceil(weights / 2) + blocks + 4 * math.ceil(blocks / 256) + modules * (256 + 16) * 4


def int8_bytes(weights: int, rows: int) -> int:
    """Bytes of LLM.int8() weights: 1 byte each and an fp32 scale per output row."""
    return weights + 4 * rows


def base_weight_bytes(shape: ModelShape, quantization: str, prec: Precision) -> int:
    """The frozen base: quantised Linear layers plus the unquantised rest in the stream's dtype (fp32 after
    kbit preparation, the compute dtype otherwise)."""
    counts = parameter_counts(shape)
    if quantization == "none":
        return counts.total * prec.compute
    modules = shape.layers * len(shape.linears())
    if quantization == "nf4":
        linear = nf4_bytes(counts.linear, modules)
    else:
        linear = int8_bytes(counts.linear, shape.layers * sum(o for _, o in shape.linears().values()))
    return linear + counts.unquantised * prec.stream


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Saved:
    """One tensor autograd keeps for the backward: `width` elements per token of `nbytes` bytes each."""

    name: str
    width: int
    nbytes: int

    @property
    def per_token(self) -> int:
        """Bytes per token."""
        return self.width * self.nbytes


def _linear_out(dx: int, prec: Precision, lora_on: bool) -> int:
    """Output dtype of a (LoRA'd) Linear whose input has dtype `dx`: bitsandbytes returns the input's dtype,
    a plain Linear autocast's, and LoRA's branch adds in the autocast (or the input's) dtype."""
    base = dx if prec.quantized or not prec.autocast else prec.compute
    return max(base, prec.compute if prec.autocast else dx) if lora_on else base


def _lora_branch_dtype(dx: int, prec: Precision) -> int:
    """The dtype of the input entering LoRA's branch. peft casts it to the LoRA weights' fp32 unless it sees
    autocast, and it asks `torch.is_autocast_enabled()`, which is CUDA's: on a CPU under autocast it casts too."""
    return dx if (prec.autocast and prec.cuda) else 4


def _lora_saved(name: str, width: int, dx: int, prec: Precision, lora: Lora) -> list[Saved]:
    """What one LoRA'd Linear keeps beyond its (shared) input: A's output, and with dropout a mask and the
    dropped input; without dropout a copy only when the input was cast on its way to LoRA's matmul."""
    branch = _lora_branch_dtype(dx, prec)
    items = [Saved(f"{name}: LoRA A output", lora.r, prec.lora)]
    if lora.dropout > 0:
        items += [
            Saved(f"{name}: dropout mask", width, 1 if prec.cuda else branch),
            Saved(f"{name}: dropped input", width, prec.lora),
        ]
    elif not _keeps_shared_input([name], dx, prec, lora):
        items.append(Saved(f"{name}: input cast for LoRA", width, prec.lora))
    return items


def _keeps_shared_input(names: list[str], dx: int, prec: Precision, lora: Lora | None) -> bool:
    """Whether some LoRA'd Linear keeps its input tensor itself (no dropout, no cast on the way)."""
    return bool(names) and lora is not None and lora.dropout == 0 and dx == _lora_branch_dtype(dx, prec) == prec.lora


def layer_inventory(
    shape: ModelShape, prec: Precision, lora: Lora | None, seq: int, mask: bool = True, first: bool = False
) -> list[Saved]:
    """The tensors one decoder layer keeps for the backward, per token (frozen base, LoRA trainable).

    `seq` is the sequence length (the float attention mask costs `seq` elements per token); `mask` says a
    padding mask is present (then sdpa gets k and v repeated to n_q heads for grouped-query attention);
    `first` is layer 0 when the embedding output does not require grad (nothing before its LoRA needs it).
    """
    h, i, s = shape.hidden, shape.intermediate, prec.stream
    targets = set(lora.targets) if lora else set()
    linears = shape.linears()
    items: list[Saved] = []
    if not first:
        items.append(Saved("input norm: fp32 input", h, 4))
    items.append(Saved("input norm: 1/rms", 1, 4))
    # q, k, v projections read the normed input (dtype of the stream: norm weights share it)
    qkv_names = ["qkv_proj"] if shape.fused else ["q_proj", "k_proj", "v_proj"]
    qkv = [n for n in qkv_names if n in targets]
    for name in qkv:
        kept = _lora_saved(name, h, s, prec, lora)
        items += [x for x in kept if not (first and "mask" in x.name)]
    if _keeps_shared_input(qkv, s, prec, lora):
        items.append(Saved("normed input of q/k/v", h, s))
    q_out = _linear_out(s, prec, qkv_names[0] in targets)
    rotated = max(q_out, s)  # RoPE multiplies by cos/sin in the stream's dtype
    attn = prec.compute if prec.autocast else rotated
    kv_width = shape.q_width if (mask and shape.kv_heads < shape.heads) else shape.kv_width
    items += [
        Saved("attention q", shape.q_width, attn),
        Saved("attention k", kv_width, attn),
        Saved("attention v", kv_width, attn),
        Saved("attention output", shape.q_width, attn),
        Saved("attention log-sum-exp", shape.heads, 4),
    ]
    if mask:
        items.append(Saved("attention mask (float)", seq, attn))
    if "o_proj" in targets:
        items += _lora_saved("o_proj", shape.q_width, attn, prec, lora)  # its input is the saved attention output
    o_out = _linear_out(attn, prec, "o_proj" in targets)
    after_attn = max(s, o_out)
    items += [Saved("post-attention norm: fp32 input", h, 4), Saved("post-attention norm: 1/rms", 1, 4)]
    # MLP: down(SiLU(gate(x)) * up(x))
    gate_names = ["gate_up_proj"] if shape.fused else ["gate_proj", "up_proj"]
    gate_up = [n for n in gate_names if n in targets]
    for name in gate_up:
        items += _lora_saved(name, h, after_attn, prec, lora)
    if _keeps_shared_input(gate_up, after_attn, prec, lora):
        items.append(Saved("normed input of gate/up", h, after_attn))
    g = _linear_out(after_attn, prec, gate_names[0] in targets)
    u = _linear_out(after_attn, prec, gate_names[-1] in targets)
    product = max(g, u)
    items += [Saved("MLP gate (SiLU input)", i, g), Saved("MLP SiLU(gate)", i, g), Saved("MLP up", i, u)]
    if "down_proj" in targets:
        items += _lora_saved("down_proj", linears["down_proj"][0], product, prec, lora)
        if _keeps_shared_input(["down_proj"], product, prec, lora):
            items.append(Saved("MLP product (down input)", i, product))
    return items


def layer_bytes_per_token(
    shape: ModelShape, prec: Precision, lora: Lora | None, seq: int, mask: bool = True, first: bool = False
) -> int:
    """Bytes one layer keeps per token for the backward (the sum of `layer_inventory`)."""
    return sum(item.per_token for item in layer_inventory(shape, prec, lora, seq, mask, first))


def forward_shared_bytes(shape: ModelShape, prec: Precision, batch: int, seq: int) -> int:
    """Tensors of one forward that every layer shares: RoPE's cos and sin, kept by each layer's rotation
    (per row when the step passes position ids, as rm and ppo do; an upper bound for sft)."""
    return 2 * batch * seq * shape.head_dim * prec.stream


def backward_layer_bytes(shape: ModelShape, prec: Precision, tokens: int) -> int:
    """Gradients alive while one layer runs its backward, beyond its saved tensors: the gradient of its output
    (h), and at the SiLU(gate) * up product the gradients of both factors (2i; the product's own gradient
    replaces the down projection's saved input, which is freed by then), and with a 4-bit base the weight
    bitsandbytes dequantises for the input gradient."""
    grad = max(prec.stream, prec.compute, _lora_branch_dtype(prec.stream, prec))  # the widest dtype on the way
    dequant = max(i * o for i, o in shape.linears().values()) * prec.compute if prec.quantized else 0
    return tokens * (shape.hidden * prec.stream + 2 * shape.intermediate * grad) + dequant


def training_activation_bytes(
    shape: ModelShape, prec: Precision, lora: Lora, batch: int, seq: int, checkpointing: bool
) -> tuple[int, int]:
    """(kept through the forward, extra during one layer's backward) for a training forward of `batch` x `seq`.

    Without checkpointing every layer keeps its inventory (layer 0 a little less: the embedding output does
    not require grad) and the final norm its fp32 input; with it each layer keeps only its input, and the
    layer being back-propagated is recomputed (one inventory) next to its gradients.
    """
    tokens = batch * seq
    shared = forward_shared_bytes(shape, prec, batch, seq)
    final_norm = tokens * (shape.hidden * 4 + 4)
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden * prec.stream + final_norm + shared
        during_backward = tokens * layer_bytes_per_token(shape, prec, lora, seq) + backward_layer_bytes(
            shape, prec, tokens
        )
        return kept, during_backward
    per_layer = layer_bytes_per_token(shape, prec, lora, seq)
    first = layer_bytes_per_token(shape, prec, lora, seq, first=True)
    kept = tokens * ((shape.layers - 1) * per_layer + first) + final_norm + shared
    return kept, backward_layer_bytes(shape, prec, tokens)


def inference_layer_bytes(shape: ModelShape, prec: Precision, batch: int, seq: int, mask: bool = True) -> int:
    """Transient memory of one layer's forward without gradients on `batch` x `seq` tokens: the layer's input
    and its post-attention copy and normed copy (h each), four MLP-sized tensors at the SiLU(gate) * up
    product (with LoRA's branch), and the float attention mask."""
    tokens = batch * seq
    mlp = _linear_out(prec.stream, prec, True)
    attn_mask = batch * seq * seq * (prec.compute if prec.autocast else prec.stream) if mask else 0
    return tokens * (3 * shape.hidden * prec.stream + 4 * shape.intermediate * mlp) + attn_mask


def sampling_bytes(shape: ModelShape, batch: int) -> int:
    """Sampling one token: the last position's fp32 logits, the temperature-scaled copy and the probabilities."""
    return 3 * batch * shape.vocab * 4


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, nbytes: int) -> int:
    """The KV cache of `batch` sequences of `tokens` tokens: 2 (k, v) x L x n_kv x d x tokens x batch x bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * nbytes


def sft_logits_bytes(shape: ModelShape, tokens: int) -> int:
    """The loss over `tokens` labelled positions: 3 fp32 copies of tokens x V at the peak (logits, their contiguous copy
    for cross-entropy and the log-softmax in the forward; saved log-softmax, its gradient and the input
    gradient in the backward; with bf16 logits the forward holds 10 bytes per element, the backward 12)."""
    return 3 * tokens * shape.vocab * 4


def lm_head_cast_bytes(shape: ModelShape, prec: Precision) -> int:
    """Under autocast an fp32 (kbit-prepared) lm_head is cast to bf16 for every call, and the copy is kept
    for the backward: V x h x 2 bytes."""
    return shape.vocab * shape.hidden * prec.compute if (prec.autocast and prec.stream != prec.compute) else 0
