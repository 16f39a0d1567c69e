"""What a model is, as memory sees it: `ModelShape` (read from a config.json alone, `read_model_shape`), the
configs of common models built in (`REFERENCE_MODELS`), parameter counts by how they are stored
(`parameter_counts`, `head_parameters`) and LoRA adapters (`Lora`, `lora_targets`, `lora_for`,
`lora_parameters`). Counts of elements only: what they cost in bytes is `memory`'s.

Uses the core (config for the built-in model, models to resolve a reference, errors); no other module of
the planner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from instruct_cli.core import config as cfg
from instruct_cli.core.errors import UserError


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


# Configs of common models, built in so that the fit table of docs/commands/plan.md (and tests) need no download.
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


def head_parameters(shape: ModelShape) -> int:
    """A scalar head (reward or value): Linear(h, 1) with bias."""
    return shape.hidden + 1
