"""`instruct plan`: will this recipe fit my GPU? Peak device memory per step, from the model's config alone.

Nothing is loaded but the model's `config.json` (a local folder, a hub id, the built-in model, or
`--model-config FILE`), so planning a 70B run is as instant as planning a 135M one. Every number is derived
from how the steps of this package actually run (sft.py, rm.py, ppo.py, evaluate.py) on transformers, peft
and bitsandbytes; `benchmarks/bench_plan.py` checks each step against the allocator's own accounting.

Notation: V vocabulary, h hidden size, i MLP (intermediate) size, L layers, n_q / n_kv attention / key-value
heads, d head size, r LoRA rank; b sequences in a batch, s tokens per sequence, N = b*s tokens. Sizes in bytes.

Weights (what stays on the device all step long)
    parameters     embedding V*h, per layer q h*n_q*d, k and v h*n_kv*d each, o n_q*d*h, gate and up h*i each,
                   down i*h, two norms h (plus the biases and per-head q/k norms some families have), the
                   final norm h, and an untied lm_head V*h.
    nf4            quantised Linear layers (q, k, v, o, gate, up, down) cost 0.5 byte/param packed, plus the
                   absmax constants: one per 64 weights, itself quantised to 8 bits with double quantisation
                   (1 byte per 64 weights, and an fp32 per 256 blocks: ~0.127 bit/param in all).
    int8           1 byte/param plus an fp32 scale per output row.
    the rest       embeddings, lm_head, norms, biases stay unquantised. In the training steps
                   peft.prepare_model_for_kbit_training casts them to fp32 (4 bytes), so a 4-bit Llama-3-8B
                   carries 2 x 0.5B fp32 embedding/lm_head parameters = 4.2 GB next to 3.7 GB of 4-bit layers.
                   Without quantisation, or in eval (no preparation), they are in the compute dtype.
    LoRA           r*(in + out) per targeted Linear (all-linear = q, k, v, o, gate, up, down), fp32.
    training       AdamW: fp32 gradient + 2 fp32 moments per trainable parameter (LoRA, scalar heads).
    PPO roles      one base; four LoRA sets (policy, reference, value, reward) and two heads (h + 1 each).

Activations (what autograd keeps for the backward pass), per token and layer, as an inventory of the
tensors saved (`layer_inventory`): the fp32 input of each RMSNorm (4h bytes each) and its 1/rms, the normed
input of the LoRA'd projections, LoRA's A outputs (r each), q, k, v (k and v repeated to n_q heads when a
padding mask is present, as transformers' sdpa path does for grouped-query attention), the attention output
and its log-sum-exp, the float attention mask (s per token), and the MLP's gate, SiLU(gate), up and their
product (4i). With LoRA dropout each LoRA'd projection keeps its own dropped copy and mask (1 byte on CUDA).
The dtypes follow the run: the residual stream has the embedding's dtype (fp32 after kbit preparation),
autocast casts the matmul inputs (and LoRA's) to bf16 on a GPU, bitsandbytes returns its input's dtype.
    without checkpointing   N * (L * inventory), plus the final norm's fp32 input (4h)
    with checkpointing      N * L * h * stream bytes (each layer's input); during the backward one layer is
                            recomputed (its inventory) next to its gradients: the output gradient (h) and at
                            the SiLU(gate) * up product two intermediate gradients (2i), plus, with a 4-bit
                            base, the largest weight dequantised for the input gradient.
Without gradients (rollouts, scoring, eval) one layer at a time is alive: its input, the post-attention sum
and the normed copy (3h) and four MLP-sized tensors (4i), plus the float mask.

Logits
    SFT      the loss over the N labelled positions (sft projects only those onto the vocabulary; planned
             as if every position were labelled, so an upper bound): the logits, the copy cross-entropy
             gets and the fp32 log-softmax; in the backward the saved log-softmax, its gradient and the
             input gradient: 3 fp32 copies, 12 bytes per N*V element (with bf16 logits the forward holds
             10, the backward 12).
             With autocast an fp32 (kbit-prepared) lm_head is also cast to bf16 and kept: V*h*2.
    PPO      only the response positions (logits_to_keep): b x (T+1) x V. Rollout log-probs and entropy:
             the logits + 4 fp32 copies (scaled, log-softmax, exp, product); the update: the logits + the
             saved log-softmax, its gradient and the input gradient.
    eval     perplexity over batch x max_length positions: logits + the fp32 copy + log-softmax (s + 8 bytes
             per element); response log-probs over b x (T+1) positions the same.
KV cache (PPO rollouts, eval sampling): 2 * L * n_kv * d * (prompt + new tokens) * b * bytes, in the dtype of
k and v: fp32 for a 4-bit base in PPO (its stream was upcast for training and bitsandbytes returns fp32).

Peak = weights + adapters + optimizer states + the largest of the moments a step goes through (the loss,
one layer's backward, the rollout's prefill and its last token, scoring, the rollout's log-probs, the PPO
update, the optimizer step), with the gradients counted where they exist (always in sft/rm, which may
accumulate; PPO frees them after every minibatch). `Breakdown.phase` names the moment.
Planned at the configured maxima (full-length batches with padding, the longest prompts and responses).
On a GPU the compute dtype is bf16 and about 0.5 GB goes to the CUDA context; the estimate is of the memory
torch allocates (`torch.cuda.max_memory_allocated`), to which the caching allocator adds some fragmentation,
so a step within 10% of the card is marked tight.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from instruct_cli.core import config as cfg
from instruct_cli.core.errors import UserError

GiB = 1024**3
MiB = 1024**2
CUDA_CONTEXT_RESERVE = GiB // 2
"""Device memory the CUDA context and kernels take before torch allocates anything."""
TIGHT_MARGIN = 0.10
"""A step whose estimate is within this fraction of the usable memory is marked tight (fragmentation)."""

# --------------------------------------------------------------------------------------------- GPUs
GPUS: dict[str, tuple[str, float]] = {
    "rtx-3060": ("RTX 3060 12GB", 12),
    "rtx-3060-ti": ("RTX 3060 Ti 8GB", 8),
    "rtx-3070": ("RTX 3070 8GB", 8),
    "rtx-3070-ti": ("RTX 3070 Ti 8GB", 8),
    "rtx-3080": ("RTX 3080 10GB", 10),
    "rtx-3080-12gb": ("RTX 3080 12GB", 12),
    "rtx-3080-ti": ("RTX 3080 Ti 12GB", 12),
    "rtx-3090": ("RTX 3090 24GB", 24),
    "rtx-3090-ti": ("RTX 3090 Ti 24GB", 24),
    "rtx-4060": ("RTX 4060 8GB", 8),
    "rtx-4060-ti": ("RTX 4060 Ti 16GB", 16),
    "rtx-4060-ti-8gb": ("RTX 4060 Ti 8GB", 8),
    "rtx-4070": ("RTX 4070 12GB", 12),
    "rtx-4070-super": ("RTX 4070 Super 12GB", 12),
    "rtx-4070-ti": ("RTX 4070 Ti 12GB", 12),
    "rtx-4070-ti-super": ("RTX 4070 Ti Super 16GB", 16),
    "rtx-4080": ("RTX 4080 16GB", 16),
    "rtx-4080-super": ("RTX 4080 Super 16GB", 16),
    "rtx-4090": ("RTX 4090 24GB", 24),
    "rtx-5060-ti": ("RTX 5060 Ti 16GB", 16),
    "rtx-5070": ("RTX 5070 12GB", 12),
    "rtx-5070-ti": ("RTX 5070 Ti 16GB", 16),
    "rtx-5080": ("RTX 5080 16GB", 16),
    "rtx-5090": ("RTX 5090 32GB", 32),
    "rtx-a4000": ("RTX A4000 16GB", 16),
    "rtx-a5000": ("RTX A5000 24GB", 24),
    "rtx-a6000": ("RTX A6000 48GB", 48),
    "rtx-6000-ada": ("RTX 6000 Ada 48GB", 48),
    "t4": ("T4 16GB", 16),
    "l4": ("L4 24GB", 24),
    "a10": ("A10 24GB", 24),
    "a10g": ("A10G 24GB", 24),
    "l40s": ("L40S 48GB", 48),
    "v100": ("V100 16GB", 16),
    "v100-32gb": ("V100 32GB", 32),
    "a100-40gb": ("A100 40GB", 40),
    "a100-80gb": ("A100 80GB", 80),
    "h100": ("H100 80GB", 80),
    "h200": ("H200 141GB", 131),
}
"""Known cards: key -> (name, memory in GiB). Spec sheets' "GB" of GPU memory are GiB (a 24 GB card reports
24564 MiB), except the H200's 141 GB, which are decimal."""
GPU_ALIASES = {
    "a4000": "rtx-a4000",
    "a5000": "rtx-a5000",
    "a6000": "rtx-a6000",
    "a100": "a100-40gb",
    "h100-80gb": "h100",
    "4060-ti-8gb": "rtx-4060-ti-8gb",
    "3080-12gb": "rtx-3080-12gb",
}


def gpu_key(name: str) -> str:
    """A card name as a lookup key: lower case, words joined by '-', without 'nvidia'/'geforce'/'rtx'."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    text = re.sub(r"(\d)-?g(i?b)?$", r"\1gb", text)  # "12 GB", "12G" -> "12gb"
    return re.sub(r"^(nvidia-)?(geforce-)?(rtx-)?", "", text)


def _gpu_index() -> dict[str, str]:
    """Every spelling `find_gpu` accepts -> the key in GPUS: the key (without "rtx-"), with or without the
    card's size ("rtx-4090", "4090", "4090-24gb"), and the aliases."""
    index: dict[str, str] = {}
    for key, (_, size) in GPUS.items():
        short = key.removeprefix("rtx-")
        for spelling in (short, f"{short}-{size:g}gb"):
            index.setdefault(spelling, key)
    for alias, key in GPU_ALIASES.items():
        index[alias] = key
    return index


def find_gpu(name: str) -> tuple[str, int]:
    """(display name, bytes) of a known card, e.g. "RTX 4090", "rtx-3060", "A100 80GB", "4060 Ti"."""
    index = _gpu_index()
    key = index.get(gpu_key(name))
    if key is not None:
        display, size = GPUS[key]
        return display, int(size * GiB)
    close = difflib.get_close_matches(gpu_key(name), list(index), n=3, cutoff=0.6)
    names = list(dict.fromkeys(GPUS[index[c]][0] for c in close))
    hint = f"Did you mean {' or '.join(names)}? " if names else ""
    raise UserError(
        f"Unknown GPU {name!r}",
        where="--gpu",
        fix=f"{hint}Or give its memory, e.g. --gpu-memory 12GB. Known cards: "
        f"{', '.join(display for display, _ in GPUS.values())}",
    )


def parse_memory(text: str) -> int:
    """Bytes of a size such as "12GB", "12 GiB", "11.5G", "24000MB" or "12" (GB). GB counts 2^30 bytes, as
    GPU spec sheets do."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(
            f"Cannot read the memory size {text!r}",
            where="--gpu-memory",
            fix="Write it as a number with a unit, e.g. 12GB, 11.5GiB or 24000MB",
        )
    unit = {"": GiB, "k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}[match.group(2)]
    return int(float(match.group(1)) * unit)


def gib(n: float) -> str:
    """Bytes as GB with one or two decimals ("0.53 GB", "12.4 GB")."""
    value = n / GiB
    return f"{value:.2f} GB" if value < 10 else f"{value:.1f} GB"


# -------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on (from its config.json)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    """The lm_head shares the embedding matrix."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Qwen3): 2*d parameters per layer."""
    fused: bool = False
    """q/k/v and gate/up are fused into qkv_proj and gate_up_proj (Phi-3)."""

    @property
    def q_width(self) -> int:
        """n_q * d: the width of q and of the attention output."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """n_kv * d: the width of k and of v."""
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """The Linear layers of one decoder layer: name -> (in features, out features)."""
        h, i = self.hidden, self.intermediate
        if self.fused:
            return {
                "qkv_proj": (h, self.q_width + 2 * self.kv_width),
                "o_proj": (self.q_width, h),
                "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h),
            }
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_config(cls, config: Any, name: str) -> "ModelShape":
        """Read a transformers config (a PretrainedConfig or a config.json dict)."""
        values = dict(config) if isinstance(config, dict) else config.to_dict()
        text = values.get("text_config")
        if isinstance(text, dict) and "hidden_size" in text:  # a multimodal wrapper: plan its language model
            values = {**text, "tie_word_embeddings": values.get("tie_word_embeddings", text.get("tie_word_embeddings"))}
        experts = [k for k in ("num_experts", "num_local_experts", "n_routed_experts") if values.get(k)]
        if experts:
            raise UserError(
                f"{name} is a mixture-of-experts model ({experts[0]} = {values[experts[0]]}); the "
                "planner covers dense decoder models only",
                where=name,
                fix="Plan a dense model of similar size, or measure with a short run",
            )
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if not values.get(k)
        ]
        if missing:
            raise UserError(
                f"The config of {name} has no {', '.join(missing)}",
                where=name,
                fix="Pass the config.json of a decoder-only language model (--model-config FILE)",
            )
        heads = int(values["num_attention_heads"])
        model_type = str(values.get("model_type", ""))
        return cls(
            name=name,
            vocab=int(values["vocab_size"]),
            hidden=int(values["hidden_size"]),
            intermediate=int(values["intermediate_size"]),
            layers=int(values["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(values.get("num_key_value_heads") or heads),
            head_dim=int(values.get("head_dim") or values["hidden_size"] // heads),
            tied=bool(values.get("tie_word_embeddings", True)),
            qkv_bias=model_type == "qwen2" or bool(values.get("attention_bias")),
            o_bias=model_type != "qwen2" and bool(values.get("attention_bias")),
            mlp_bias=bool(values.get("mlp_bias")),
            qk_norm=model_type in ("qwen3",),
            fused=model_type in ("phi3",),
        )


# Configs of common models, built in so that the README table (and tests) need no download.
REFERENCE_MODELS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-3B-Instruct": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-14B-Instruct": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
TABLE_MODELS = {
    "0.5B": "Qwen/Qwen2.5-0.5B-Instruct",
    "1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "3B": "Qwen/Qwen2.5-3B-Instruct",
    "8B": "meta-llama/Llama-3.1-8B-Instruct",
    "14B": "Qwen/Qwen2.5-14B-Instruct",
}
TABLE_GPUS = (8, 12, 16, 24)


def read_model_shape(reference: str | None = None, model_config: Path | None = None) -> ModelShape:
    """The shape of a model from its config only: `--model-config FILE` (a config.json), or a model reference
    (the built-in model, a run folder, a local folder, a hub id: only its config.json is fetched)."""
    if model_config is not None:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Cannot read the model config ({exc})",
                where=str(model_config),
                fix="Pass a config.json file (or the folder that holds one)",
            ) from None
        return ModelShape.from_config(values, path.parent.name if path.name == "config.json" else path.name)
    reference = reference or cfg.BUILTIN_MODEL
    if reference in REFERENCE_MODELS:
        return ModelShape.from_config(REFERENCE_MODELS[reference], reference)
    from instruct_cli.core import models

    source = models.resolve_model(reference)
    local = Path(source.load_path) / "config.json"
    if local.is_file():
        return ModelShape.from_config(json.loads(local.read_text()), source.reference)
    try:  # a hub id: config.json only (cached after the first time)
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(source.load_path), source.reference)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Cannot read the config of {reference!r} ({str(exc).splitlines()[0]})",
            where="--model",
            fix="Pass its config.json with --model-config FILE (works offline), or a local folder",
        ) from None


# ------------------------------------------------------------------------------------ parameter counts
@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model by how they are stored."""

    linear: int
    """Weights of the decoder's Linear layers: what nf4/int8 quantise."""
    linear_bias: int
    embedding: int
    lm_head: int
    """0 when tied to the embedding."""
    norms: int

    @property
    def unquantised(self) -> int:
        """Everything that stays in a float dtype when the Linear layers are quantised."""
        return self.linear_bias + self.embedding + self.lm_head + self.norms

    @property
    def total(self) -> int:
        """All parameters (what `sum(p.numel())` of the model gives)."""
        return self.linear + self.unquantised


def parameter_counts(shape: ModelShape) -> ParameterCounts:
    """Parameters from config arithmetic: embeddings, per-layer q/k/v/o and MLP, norms, untied lm_head."""
    linears = shape.linears()
    weights = sum(i * o for i, o in linears.values())
    bias = 0
    if shape.qkv_bias:
        bias += shape.q_width + 2 * shape.kv_width
    if shape.o_bias:
        bias += shape.hidden
    if shape.mlp_bias:
        bias += 2 * shape.intermediate + shape.hidden
    norms = 2 * shape.hidden + (2 * shape.head_dim if shape.qk_norm else 0)
    embedding = shape.vocab * shape.hidden
    return ParameterCounts(
        linear=shape.layers * weights,
        linear_bias=shape.layers * bias,
        embedding=embedding,
        lm_head=0 if shape.tied else embedding,
        norms=shape.layers * norms + shape.hidden,
    )


@dataclass(frozen=True)
class Lora:
    """One LoRA adapter as memory sees it."""

    r: int
    targets: tuple[str, ...]
    """Resolved module names of one layer, e.g. ("q_proj", ..., "down_proj")."""
    dropout: float = 0.0


def lora_targets(shape: ModelShape, targets: Iterable[str]) -> tuple[str, ...]:
    """The Linear layers of one decoder layer that `lora_targets` selects (all-linear: all of them)."""
    names = list(shape.linears())
    targets = list(targets)
    if targets == ["all-linear"]:
        return tuple(names)
    chosen = [name for name in names if any(name == t or name.endswith("." + t) or t.endswith(name) for t in targets)]
    unknown = [t for t in targets if not any(t == n or t.endswith(n) for n in names)]
    if unknown or not chosen:
        raise UserError(
            f"LoRA target {(unknown or targets)[0]!r} is not a Linear layer of {shape.name}",
            where="lora_targets",
            fix=f"Use all-linear or some of: {', '.join(names)}",
        )
    return tuple(chosen)


def lora_for(shape: ModelShape, options: Any) -> Lora:
    """The Lora of a config with lora_* fields (SFTConfig, RMConfig)."""
    return Lora(options.lora_r, lora_targets(shape, options.lora_targets), options.lora_dropout)


def lora_parameters(shape: ModelShape, lora: Lora) -> int:
    """LoRA parameters: r * (in + out) per targeted Linear, in every layer."""
    linears = shape.linears()
    return shape.layers * sum(lora.r * (linears[name][0] + linears[name][1]) for name in lora.targets)


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


def head_parameters(shape: ModelShape) -> int:
    """A scalar head (reward or value): Linear(h, 1) with bias."""
    return shape.hidden + 1


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


# -------------------------------------------------------------------------------------------- breakdown
@dataclass
class Breakdown:
    """The estimated peak device memory of one step, by component (bytes). The components add up to `total`."""

    step: str
    weights: int = 0
    """The frozen base, quantisation constants included."""
    adapters: int = 0
    """LoRA weights of every adapter in memory, and scalar heads."""
    gradients: int = 0
    optimizer: int = 0
    """AdamW's two fp32 moments per trainable parameter."""
    activations: int = 0
    """What autograd keeps (and transient layer memory) at the peak moment."""
    logits: int = 0
    """Vocabulary-sized tensors at the peak moment."""
    kv_cache: int = 0
    workspace: int = 0
    """Other transients at the peak moment: a dequantised weight, the bf16 copy of the lm_head."""
    phase: str = ""
    """The moment of the step when the peak happens."""
    notes: list[str] = field(default_factory=list)
    moments: list["Moment"] = field(default_factory=list)
    """Every moment considered (the peak is the largest)."""

    @property
    def total(self) -> int:
        """The estimated peak."""
        return (
            self.weights
            + self.adapters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.kv_cache
            + self.workspace
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for JSON)."""
        values = dataclasses.asdict(self)
        values["total"] = self.total
        values["moments"] = {m.name: m.total for m in self.moments}
        return values


@dataclass(frozen=True)
class Moment:
    """One moment of a step: the transient components alive then."""

    name: str
    activations: int = 0
    logits: int = 0
    kv_cache: int = 0
    workspace: int = 0
    gradients: bool = True
    """Whether the trainable parameters' gradients exist then (they do between micro-batches of an
    accumulating step; PPO frees them after every minibatch, so its rollout has none)."""

    @property
    def total(self) -> int:
        """The transient bytes of the moment (gradients not included)."""
        return self.activations + self.logits + self.kv_cache + self.workspace


def _peak(breakdown: Breakdown, moments: list[Moment]) -> Breakdown:
    """Fill the breakdown's transient components (and gradients, if they exist then) from the largest moment."""
    gradients = breakdown.gradients
    top = max(moments, key=lambda m: m.total + (gradients if m.gradients else 0))
    breakdown.moments = list(moments)
    breakdown.activations, breakdown.logits = top.activations, top.logits
    breakdown.kv_cache, breakdown.workspace, breakdown.phase = top.kv_cache, top.workspace, top.name
    breakdown.gradients = gradients if top.gradients else 0
    return breakdown


def _static(
    step: str,
    shape: ModelShape,
    quantization: str,
    prec: Precision,
    adapters: list[Lora],
    trainable: list[Lora],
    heads: int = 0,
    trainable_heads: int = 0,
) -> Breakdown:
    """Weights, adapters, gradients and optimizer states: there for the whole step."""
    lora = sum(lora_parameters(shape, a) for a in adapters)
    train = sum(lora_parameters(shape, a) for a in trainable) + trainable_heads * head_parameters(shape)
    return Breakdown(
        step=step,
        weights=base_weight_bytes(shape, quantization, prec),
        adapters=4 * (lora + heads * head_parameters(shape)),
        gradients=4 * train,
        optimizer=8 * train,
    )


def optimizer_step_moment(breakdown: Breakdown, prec: Precision) -> Moment:
    """The update. On a GPU AdamW runs `foreach` and takes the square root of every second moment at once: one
    more copy of the states; on a CPU it goes parameter by parameter (a negligible temporary)."""
    return Moment("optimizer step", workspace=breakdown.optimizer // 2 if prec.cuda else 0)


# ------------------------------------------------------------------------------------------------ steps
def estimate_sft(shape: ModelShape, config: cfg.SFTConfig, device: str = "cuda") -> Breakdown:
    """`instruct sft`: batch_size x max_length tokens through a LoRA'd base, the loss over every position."""
    prec = precision(device, config.quantization, training=True)
    lora = lora_for(shape, config)
    out = _static("sft", shape, config.quantization, prec, [lora], [lora])
    return _peak(
        out,
        _training_moments(
            shape, prec, lora, config.batch_size, config.max_length, config.gradient_checkpointing, logits=True, out=out
        ),
    )


def estimate_rm(shape: ModelShape, config: cfg.RMConfig, device: str = "cuda") -> Breakdown:
    """`instruct rm`: 2 x batch_size sequences (chosen and rejected; K per row for rankings) of max_length
    through a LoRA'd base; a scalar head reads the last hidden state (no vocabulary logits)."""
    prec = precision(device, config.quantization, training=True)
    lora = lora_for(shape, config)
    out = _static("rm", shape, config.quantization, prec, [lora], [lora], heads=1, trainable_heads=1)
    out.notes.append("2 sequences per row (pairs); a ranked row of K responses costs K")
    return _peak(
        out,
        _training_moments(
            shape,
            prec,
            lora,
            2 * config.batch_size,
            config.max_length,
            config.gradient_checkpointing,
            logits=False,
            out=out,
        ),
    )


def _training_moments(
    shape: ModelShape,
    prec: Precision,
    lora: Lora,
    batch: int,
    seq: int,
    checkpointing: bool,
    logits: bool,
    out: Breakdown,
) -> list[Moment]:
    """The moments of one training step: the end of the forward (the loss), one layer's backward, the update."""
    tokens = batch * seq
    kept, backward = training_activation_bytes(shape, prec, lora, batch, seq, checkpointing)
    cast = lm_head_cast_bytes(shape, prec) if logits else 0
    loss = Moment("loss", activations=kept, logits=sft_logits_bytes(shape, tokens) if logits else 0, workspace=cast)
    layer = Moment("backward", activations=kept + backward, workspace=cast)
    return [loss, layer, optimizer_step_moment(out, prec)]


def estimate_ppo(
    shape: ModelShape, config: cfg.PPOConfig, policy: Lora, value: Lora, device: str = "cuda"
) -> Breakdown:
    """`instruct ppo`: one base, four adapters; the largest of rollout, scoring, log-probs and the update."""
    prec = precision(device, config.quantization, training=True)
    plain = replace(prec, autocast=False)  # steps 1-4 run outside autocast
    policy, value = replace(policy, dropout=0.0), replace(value, dropout=0.0)  # PPO turns dropout off
    out = _static(
        "ppo",
        shape,
        config.quantization,
        prec,
        [policy, policy, value, value],
        [policy, value],
        heads=2,
        trainable_heads=1,
    )
    rollouts, prompt, new = config.rollout_batch_size, config.max_prompt_length, config.max_new_tokens
    full = prompt + new
    kv_bytes = max(_linear_out(plain.stream, plain, True), plain.stream)  # k after RoPE: stream dtype or wider
    moments = [
        # 1. rollout: the prefill of the prompts, then the cache grown to prompt + new tokens
        Moment(
            "rollout prefill",
            activations=inference_layer_bytes(shape, plain, rollouts, prompt),
            kv_cache=kv_cache_bytes(shape, rollouts, prompt, kv_bytes),
            logits=sampling_bytes(shape, rollouts),
            gradients=False,
        ),
        Moment(
            "rollout end",
            kv_cache=kv_cache_bytes(shape, rollouts, full, kv_bytes),
            logits=sampling_bytes(shape, rollouts),
            gradients=False,
        ),
        # 2. score / 4. values: the body over prompt + response without gradients
        Moment("scoring", activations=inference_layer_bytes(shape, plain, rollouts, full), gradients=False),
        # 3. log-probs and entropy, a minibatch of rollouts at a time: the policy's logits of the response
        #    positions (+1), then the scaled fp32 copy, log-softmax, its exp and the product for the entropy
        Moment(
            "rollout log-probs",
            logits=min(rollouts, config.minibatch_size) * (new + 1) * shape.vocab * (plain.stream + 12),
            gradients=False,
        ),
    ]
    # 5. update: a minibatch of prompt + response sequences with gradients through the policy
    minibatch = config.minibatch_size
    kept, backward = training_activation_bytes(shape, prec, policy, minibatch, full, config.gradient_checkpointing)
    logits_dtype = prec.compute if prec.autocast else prec.stream
    # logits of T+1 positions; in the backward the saved log-softmax, its gradient and the input gradient
    update_logits = minibatch * (new + 1) * shape.vocab * (logits_dtype + 12)
    cast = lm_head_cast_bytes(shape, prec)
    ptx_kept = ptx_logits = 0
    if config.ptx_coef > 0:  # the SFT term's forward shares the policy's backward
        ptx_kept, _ = training_activation_bytes(shape, prec, policy, minibatch, 1024, config.gradient_checkpointing)
        ptx_logits = sft_logits_bytes(shape, minibatch * 1024)
        out.notes.append("PPO-ptx adds an SFT forward of minibatch_size x 1024 tokens to the update")
    moments += [
        Moment(
            "update loss",
            activations=kept + ptx_kept,
            logits=update_logits + ptx_logits,
            workspace=cast,
            gradients=False,
        ),
        Moment("update backward", activations=kept + ptx_kept + backward, workspace=cast),
        optimizer_step_moment(out, prec),
    ]
    return _peak(out, moments)


def estimate_eval(shape: ModelShape, config: cfg.EvalConfig, lora: Lora, device: str = "cuda") -> Breakdown:
    """`instruct eval`: one model at a time (policy or reward model), no gradients: the largest of generation,
    response log-probs, perplexity and reward scoring."""
    prec = precision(device, config.quantization, training=False)
    out = _static("eval", shape, config.quantization, prec, [lora], [], heads=1)
    batch, prompt, new = config.batch_size, config.max_length, config.max_new_tokens
    full = prompt + new
    kv = _linear_out(prec.stream, prec, True)
    out.notes.append("one model in memory at a time; prompts planned at max_length tokens")
    moments = [
        Moment(
            "sampling prefill",
            activations=inference_layer_bytes(shape, prec, batch, prompt),
            kv_cache=kv_cache_bytes(shape, batch, prompt, kv),
            logits=sampling_bytes(shape, batch),
        ),
        Moment("sampling end", kv_cache=kv_cache_bytes(shape, batch, full, kv), logits=sampling_bytes(shape, batch)),
        # the response positions (+1): logits, the scaled fp32 copy and the log-softmax
        Moment("response log-probs", logits=batch * (new + 1) * shape.vocab * (prec.stream + 8)),
        # every position of batch x max_length: logits, their contiguous copy and the fp32 log-softmax
        # (fp32: logits + copy + log-softmax; bf16: logits + the fp32 copy + log-softmax, the bf16 copy freed)
        Moment("perplexity", logits=batch * prompt * shape.vocab * (prec.stream + 8)),
        Moment("reward model", activations=inference_layer_bytes(shape, prec, 2 * batch, prompt)),
    ]
    return _peak(out, moments)


# ----------------------------------------------------------------------------------------- fit verdicts
@dataclass
class Verdict:
    """Whether a step fits a GPU, and what would make it fit."""

    fits: bool
    tight: bool
    usable: int
    suggestions: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """fits / tight / does not fit."""
        return "does not fit" if not self.fits else "tight" if self.tight else "fits"


def usable_memory(memory: int, device: str = "cuda") -> int:
    """The memory torch can allocate: a card's size minus the CUDA context (all of it on a CPU)."""
    return max(memory - (CUDA_CONTEXT_RESERVE if device.startswith("cuda") else 0), 0)


def judge(total: int, memory: int, device: str = "cuda") -> Verdict:
    """Fit verdict of an estimate against a card (or a CPU's RAM)."""
    usable = usable_memory(memory, device)
    return Verdict(fits=total <= usable, tight=total > (1 - TIGHT_MARGIN) * usable, usable=usable)


@dataclass
class StepPlan:
    """One step of a recipe: its config, the model shape and adapters it runs with, and its estimate."""

    step: str
    config: Any
    shape: ModelShape | None
    loras: tuple[Lora, ...] = ()
    breakdown: Breakdown | None = None
    verdict: Verdict | None = None
    checkpointing: dict[bool, int] = field(default_factory=dict)
    """The peak with gradient checkpointing on and off (training steps)."""

    def estimate(self, config: Any | None = None, device: str = "cuda") -> Breakdown:
        """The breakdown of this step with `config` (default: its own)."""
        return estimate_step(self.step, config or self.config, self.shape, self.loras, device)


def estimate_step(
    step: str, config: Any, shape: ModelShape, loras: tuple[Lora, ...] = (), device: str = "cuda"
) -> Breakdown:
    """Dispatch to the step's estimator. sft and rm read their LoRA from `config`; ppo needs `loras` =
    (policy lora, value lora) and eval (lora,), the adapters of the runs they load."""
    if step == "sft":
        return estimate_sft(shape, config, device)
    if step == "rm":
        return estimate_rm(shape, config, device)
    if step == "ppo":
        policy, value = loras
        return estimate_ppo(shape, config, policy, value, device)
    if step == "eval":
        (lora,) = loras
        return estimate_eval(shape, config, lora, device)
    return Breakdown(step=step, phase="tokenizer only (no device memory)")


def _halvings(value: int, floor: int = 1) -> list[int]:
    """value/2, value/4, ... down to `floor`."""
    out = []
    while value // 2 >= floor and value > floor:
        value //= 2
        out.append(value)
    return out


def candidate_changes(step: str, config: Any) -> list[tuple[str, Callable[[Any], Any]]]:
    """Single changes to a step's config that lower its memory, each as (description, config -> config),
    in the order they cost the least in quality or speed."""
    changes: list[tuple[str, Callable[[Any], Any]]] = []
    if hasattr(config, "gradient_checkpointing") and not config.gradient_checkpointing and step != "eval":
        changes.append(("gradient_checkpointing: true", lambda c: replace(c, gradient_checkpointing=True)))
    if config.quantization != "nf4":
        changes.append(("quantization: nf4", lambda c: replace(c, quantization="nf4")))
    if step in ("sft", "rm"):
        for size in _halvings(config.batch_size):
            accum = config.grad_accum * config.batch_size // size
            changes.append(
                (
                    f"batch_size: {size}, grad_accum: {accum} (same global batch)",
                    lambda c, size=size, accum=accum: replace(c, batch_size=size, grad_accum=accum),
                )
            )
        for length in _halvings(config.max_length, 128):
            changes.append((f"max_length: {length}", lambda c, n=length: replace(c, max_length=n)))
    elif step == "ppo":
        for size in _halvings(config.minibatch_size):
            changes.append((f"minibatch_size: {size}", lambda c, n=size: replace(c, minibatch_size=n)))
        for size in _halvings(config.rollout_batch_size, max(config.minibatch_size, 1)):
            changes.append((f"rollout_batch_size: {size}", lambda c, n=size: replace(c, rollout_batch_size=n)))
        for length in _halvings(config.max_prompt_length, 64):
            changes.append((f"max_prompt_length: {length}", lambda c, n=length: replace(c, max_prompt_length=n)))
        for length in _halvings(config.max_new_tokens, 16):
            changes.append((f"max_new_tokens: {length}", lambda c, n=length: replace(c, max_new_tokens=n)))
    elif step == "eval":
        for size in _halvings(config.batch_size):
            changes.append((f"batch_size: {size}", lambda c, n=size: replace(c, batch_size=n)))
        for length in _halvings(config.max_length, 128):
            changes.append((f"max_length: {length}", lambda c, n=length: replace(c, max_length=n)))
    if hasattr(config, "lora_r"):
        for rank in _halvings(config.lora_r, 4):
            changes.append((f"lora_r: {rank}", lambda c, n=rank: replace(c, lora_r=n)))
    return changes


def suggest(plan: StepPlan, memory: int, device: str = "cuda") -> list[str]:
    """Changes that make a step fit `memory` bytes, each with the peak it gives.

    For each setting, the mildest single change that fits on its own. If none does: settings are added at
    their strongest, in the order of `candidate_changes`, until the step fits, and then each is relaxed back
    to its mildest value that still fits; if even all of them together do not fit, say how much it needs.
    """
    usable = usable_memory(memory, device)
    options: dict[str, list[tuple[str, Callable]]] = {}  # knob -> its changes, mildest first
    for description, change in candidate_changes(plan.step, plan.config):
        options.setdefault(description.split(":")[0], []).append((description, change))

    def total(changes: list[tuple[str, Callable]]) -> int:
        config = plan.config
        for _, change in changes:
            config = change(config)
        return plan.estimate(config, device).total

    single = []
    for knob_options in options.values():
        for option in knob_options:
            if total([option]) <= usable:
                single.append(f"{option[0]} -> {gib(total([option]))}")
                break
    if single:
        return single
    chosen: dict[str, tuple[str, Callable]] = {}
    for knob, knob_options in options.items():
        chosen[knob] = knob_options[-1]
        if total(list(chosen.values())) <= usable:
            break
    else:
        peak = total(list(chosen.values()))
        return [
            f"does not fit even with {', '.join(d for d, _ in chosen.values())} ({gib(peak)}): it needs "
            f"{gib(memory - usable + peak)} or more"
        ]
    for knob in reversed(list(chosen)):  # relax each setting as far as the rest allows
        for option in options[knob]:
            if total(list({**chosen, knob: option}.values())) <= usable:
                chosen[knob] = option
                break
    return ["together: " + ", ".join(d for d, _ in chosen.values()) + f" -> {gib(total(list(chosen.values())))}"]


# ---------------------------------------------------------------------------------------------- recipes
def _same_path(a: Any, b: Any) -> bool:
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except OSError:  # pragma: no cover - unresolvable paths are simply different
        return False


def _model_of(task: Any, tasks: list[Any], seen: int = 0) -> str:
    """The base model a task runs on: its --model, following run folders that earlier steps of the recipe
    write (`rm: model: runs/sft`), or that exist already (their manifest names the base)."""
    config = task.config
    reference = {
        "sft": lambda: config.model,
        "rm": lambda: config.model,
        "ppo": lambda: config.sft,
        "eval": lambda: config.reward or (config.models[0] if config.models else None),
    }[task.step]()
    if reference is None:
        return cfg.BUILTIN_MODEL
    for other in tasks:
        if other is not task and other.step in ("sft", "rm", "ppo") and _same_path(other.config.out, reference):
            return _model_of(other, tasks, seen + 1) if seen < 8 else cfg.BUILTIN_MODEL
    manifest = Path(str(reference)) / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())["base_model"]["id"]
        except (ValueError, KeyError, TypeError):
            pass
    return str(reference)


def _lora_of(step: str, tasks: list[Any], shape: ModelShape) -> Lora:
    """The adapter a later step inherits from the recipe's sft (or rm) section; peft's defaults otherwise."""
    for task in tasks:
        if task.step == step:
            return lora_for(shape, task.config)
    return lora_for(shape, cfg.SFTConfig())


DEFAULT_STEPS = (("sft", cfg.SFTConfig), ("rm", cfg.RMConfig), ("ppo", cfg.PPOConfig), ("eval", cfg.EvalConfig))


def recipe_tasks(recipe: Path | None, model: str | None = None) -> list[Any]:
    """The steps to plan: a recipe's (resolved as `instruct run` resolves them), or the default settings of
    sft, rm, ppo and eval."""
    from instruct_cli.core import recipes

    if recipe is not None:
        return recipes.read_tasks(Path(recipe))
    tasks = [recipes.Task(step, cls()) for step, cls in DEFAULT_STEPS]
    for task in tasks:
        if model and task.step in ("sft", "rm"):
            task.config = replace(task.config, model=model)
    return tasks


def plan_recipe(
    recipe: Path | None,
    model: str | None = None,
    model_config: Path | None = None,
    memory: int | None = None,
    device: str = "cuda",
) -> list[StepPlan]:
    """Estimate every step of a recipe (or, without one, of the default settings) on the model the recipe
    names, or on `model` / `model_config` when given, with fit verdicts and suggestions for `memory` bytes."""
    tasks = recipe_tasks(recipe, model)
    shapes: dict[str, ModelShape] = {}

    def shape_of(task) -> ModelShape:
        reference = str(model_config) if model_config else (model or _model_of(task, tasks))
        if reference not in shapes:
            shapes[reference] = read_model_shape(None if model_config else reference, model_config)
        return shapes[reference]

    plans = []
    for task in tasks:
        if task.step == "prepare-data":
            plans.append(StepPlan(task.step, task.config, None, breakdown=estimate_step(task.step, task.config, None)))
            continue
        shape = shape_of(task)
        if task.step in ("sft", "rm"):
            loras = ()  # their own config says
        elif task.step == "ppo":  # policy/reference from the SFT run, value/reward from the RM run
            loras = (_lora_of("sft", tasks, shape), _lora_of("rm", tasks, shape))
        else:
            loras = (_lora_of("sft", tasks, shape),)
        plan = StepPlan(task.step, task.config, shape, loras)
        plan.breakdown = plan.estimate(device=device)
        if task.step != "eval":
            on = task.config.gradient_checkpointing
            flipped = plan.estimate(replace(task.config, gradient_checkpointing=not on), device).total
            plan.checkpointing = {on: plan.breakdown.total, not on: flipped}
        plans.append(plan)
    if memory is not None:
        for plan in plans:
            plan.verdict = judge(plan.breakdown.total, memory, device)
            if not plan.verdict.fits and plan.shape is not None:
                plan.verdict.suggestions = suggest(plan, memory, device)
    return plans


# ------------------------------------------------------------------------------------------------ output
def step_settings(plan: StepPlan) -> str:
    """The settings the estimate depends on, in a few words."""
    c = plan.config
    ckpt = f"ckpt {'on' if getattr(c, 'gradient_checkpointing', False) else 'off'}"
    if plan.step == "sft":
        return f"{c.quantization}, {c.batch_size} x {c.max_length} tok, r {c.lora_r}, {ckpt}"
    if plan.step == "rm":
        pairs = "pair" if c.batch_size == 1 else "pairs"
        return f"{c.quantization}, {c.batch_size} {pairs} x {c.max_length} tok, r {c.lora_r}, {ckpt}"
    if plan.step == "ppo":
        return (
            f"{c.quantization}, {c.rollout_batch_size} rollouts x ({c.max_prompt_length}+{c.max_new_tokens}) tok, "
            f"minibatch {c.minibatch_size}, {ckpt}"
        )
    if plan.step == "eval":
        return f"{c.quantization}, {c.batch_size} x ({c.max_length}+{c.max_new_tokens}) tok"
    return ""


def _size(n: int) -> str:
    return gib(n) if n else "-"


def show(
    plans: list[StepPlan], memory_name: str | None = None, memory: int | None = None, device: str = "cuda"
) -> None:
    """Print the model(s), the per-step breakdown table with verdicts, and the suggestions."""
    from rich.table import Table

    from instruct_cli.core.console import console

    for shape in {p.shape.name: p.shape for p in plans if p.shape is not None}.values():
        counts = parameter_counts(shape)
        console.print(
            f"[bold]{shape.name}[/bold]: {counts.total / 1e9:.2f}B parameters, {shape.layers} layers, "
            f"hidden {shape.hidden}, MLP {shape.intermediate}, {shape.heads}/{shape.kv_heads} heads, "
            f"vocab {shape.vocab}{' (tied)' if shape.tied else ''}"
        )
    where = "GPU" if device.startswith("cuda") else "CPU"
    title = f"Estimated peak {where} memory per step"
    if memory is not None:
        title += f" on {memory_name or gib(memory)}: {gib(usable_memory(memory, device))} usable" + (
            " after the CUDA context" if where == "GPU" else ""
        )
    table = Table(title=title, title_justify="left")
    columns = [
        "step",
        "weights",
        "LoRA + optimizer",
        "activations",
        "logits",
        "KV cache",
        "other",
        "peak",
        "peak at",
        "GB with ckpt on / off",
    ] + (["verdict"] if memory is not None else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("step", "peak at", "verdict") else "right")
    data_sets = sum(plan.step == "prepare-data" for plan in plans)
    for plan in plans:
        b = plan.breakdown
        verdict = []
        if plan.verdict is not None:
            colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}[plan.verdict.label]
            verdict = [f"[{colour}]{plan.verdict.label}[/{colour}]"]
        if plan.shape is None:  # prepare-data: once, however many data sets
            if plan is next(p for p in plans if p.step == "prepare-data"):
                label = "prepare-data" + (f"\n[dim]{data_sets} data sets[/dim]" if data_sets > 1 else "")
                table.add_row(label, "-", "-", "-", "-", "-", "-", "~0", "tokenizer only", "", *verdict)
            continue
        toggled = (
            " / ".join(f"{plan.checkpointing[flag] / GiB:.1f}" for flag in (True, False)) if plan.checkpointing else ""
        )
        table.add_row(
            f"{plan.step}\n[dim]{step_settings(plan)}[/dim]",
            gib(b.weights),
            _size(b.adapters + b.gradients + b.optimizer),
            _size(b.activations),
            _size(b.logits),
            _size(b.kv_cache),
            _size(b.workspace),
            f"[bold]{gib(b.total)}[/bold]",
            b.phase,
            toggled,
            *verdict,
        )
    console.print(table)
    for plan in plans:
        if plan.verdict is None or not plan.verdict.suggestions:
            continue
        combined = plan.verdict.suggestions[0].startswith(("together", "does not"))
        console.print(f"[bold]{plan.step}[/bold] " + ("needs:" if combined else "would fit with any one of:"))
        for suggestion in plan.verdict.suggestions:
            console.print(f"  - {suggestion}")
    notes = sorted({note for plan in plans if plan.breakdown for note in plan.breakdown.notes})
    console.print(
        "[dim]Planned at the configured maximum lengths, with padded batches. "
        + "".join(f"{note[0].upper()}{note[1:]}. " for note in notes)
        + (
            "The CUDA caching allocator adds some fragmentation: a step within 10% of the card is marked tight."
            if where == "GPU"
            else ""
        )
        + "[/dim]"
    )


def fit_table(models: dict[str, str] | None = None, gpus: Iterable[int] = TABLE_GPUS, device: str = "cuda") -> str:
    """A markdown table: for common model sizes at the default step settings (nf4), which steps fit on each
    card size, and each step's peak. The README's table is this output (`instruct plan --table`)."""
    models = models or TABLE_MODELS
    gpus = list(gpus)
    steps = [step for step, _ in DEFAULT_STEPS]
    lines = [
        "| model | " + " | ".join(f"{g} GB" for g in gpus) + " | peak GB: " + " / ".join(steps) + " |",
        "|---|" + "---|" * len(gpus) + "---|",
    ]
    for label, reference in models.items():
        shape = read_model_shape(reference)
        lora = lora_for(shape, cfg.SFTConfig())
        totals = {
            step: estimate_step(step, cls(), shape, (lora, lora) if step == "ppo" else (lora,), device).total
            for step, cls in DEFAULT_STEPS
        }
        cells = []
        for size in gpus:
            fitting = [step for step in steps if totals[step] <= usable_memory(int(size * GiB), device)]
            cells.append("all" if len(fitting) == len(steps) else ", ".join(fitting) or "none")
        peaks = " / ".join(f"{totals[step] / GiB:.1f}" for step in steps)
        lines.append(f"| {label} ({reference.split('/')[-1]}) | " + " | ".join(cells) + f" | {peaks} |")
    return "\n".join(lines) + "\n"


def run(
    recipe: Path | None = None,
    gpu: str | None = None,
    gpu_memory: str | None = None,
    model: str | None = None,
    model_config: Path | None = None,
    device: str = "cuda",
    table: bool = False,
    as_json: bool = False,
) -> list[StepPlan]:
    """`instruct plan`: print the plan of a recipe (or of the default settings) for a GPU; returns the plans."""
    import sys

    from instruct_cli.core.console import console

    if gpu and gpu_memory:
        raise UserError(
            "--gpu and --gpu-memory both give the card's memory", where="--gpu / --gpu-memory", fix="Pass one of them"
        )
    if device not in ("cuda", "cpu"):
        raise UserError(f"Unknown device {device!r}", where="--device", fix="Plan for cuda (a GPU) or cpu")
    if table:
        if recipe or model or model_config:
            raise UserError(
                "--table plans its own list of models at the default settings",
                where="--table",
                fix="Drop the recipe and --model/--model-config, or drop --table",
            )
        sys.stdout.write(fit_table(device=device))
        return []
    name, memory = find_gpu(gpu) if gpu else (None, parse_memory(gpu_memory) if gpu_memory else None)
    plans = plan_recipe(recipe, model, model_config, memory, device)
    if as_json:
        rows = [
            {
                "step": p.step,
                "model": p.shape.name if p.shape else None,
                **p.breakdown.as_dict(),
                **(
                    {"verdict": p.verdict.label, "usable": p.verdict.usable, "suggestions": p.verdict.suggestions}
                    if p.verdict
                    else {}
                ),
            }
            for p in plans
        ]
        sys.stdout.write(json.dumps({"device": device, "memory": memory, "steps": rows}, indent=2) + "\n")
        return plans
    show(plans, name, memory, device)
    if memory is None:
        console.print("[dim]Add --gpu NAME or --gpu-memory 12GB for a fit verdict per step.[/dim]")
    return plans
