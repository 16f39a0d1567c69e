"""Writing a merged model as one GGUF file that llama.cpp, Ollama and transformers' GGUF loader read.

It writes what llama.cpp's own converter (convert_hf_to_gguf.py) writes for these families, with the `gguf`
package's writer, tensor name tables, vocabulary reader and quantisers:
  * the hyperparameters under the architecture's keys (`llama.*`, `qwen2.*`), rope scaling included;
  * every tensor under its llama.cpp name (`gguf.get_tensor_name_map`); for the `llama` architecture the rows
    of q_proj and k_proj permuted into the order llama.cpp's rotary embedding wants (transformers' GGUF loader
    permutes them back); no `output.weight` when the embeddings are tied; norms and other 1-D tensors in F32;
  * the byte-level BPE tokenizer (`tokenizer.ggml.*`: tokens, token types, merges, special token ids, add_bos),
    the name llama.cpp knows its pre-tokenizer by, and the chat template.
Only the `llama` and `qwen2` architectures are written; anything else is refused before any work is done.
`exportable_model` prepares what `write` takes, for `instruct export` and the llama.cpp engine alike.
May use: errors, inference, models.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from instruct_cli.core.errors import UserError

# --gguf-type -> (the file type recorded in the header, the type of the 2-D weight tensors)
GGUF_TYPES = {
    "f16": ("MOSTLY_F16", "F16"),
    "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
    "f32": ("ALL_F32", "F32"),
}

# transformers' model_type -> (llama.cpp's architecture, the families that use it, the rope types written)
ARCHITECTURES = {
    "llama": ("LLAMA", "Llama 2/3, SmolLM, SmolLM2 and other Llama-style models", ("default", "linear", "llama3")),
    "qwen2": ("QWEN2", "Qwen2, Qwen2.5", ("default", "linear", "yarn")),
}

# The pre-tokenizer split patterns of the tokenizers we know, by the name llama.cpp gives them
# (`tokenizer.ggml.pre`); transformers' GGUF loader maps the same names back to the same patterns.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def supported_families() -> str:
    """The architectures GGUF export writes, as a sentence fragment for error messages and help."""
    return "; ".join(f"{model_type} ({families})" for model_type, (_, families, _) in ARCHITECTURES.items())


def check_gguf_type(gguf_type: str) -> None:
    """A UserError unless `gguf_type` is one of GGUF_TYPES."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(
            f"Unknown GGUF type {gguf_type!r}",
            where="--gguf-type",
            fix=f"Use one of {', '.join(GGUF_TYPES)} (quantise further with llama.cpp's llama-quantize)",
        )


def check_exportable(config, tokenizer, where: str) -> str:
    """Refuse, with a UserError, a model this writer cannot write faithfully; otherwise return the name of its
    pre-tokenizer. Called before the (slow) merge, so that a bad export fails at once."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export does not support the {model_type!r} architecture; it supports {supported_families()}",
            where=where,
            fix="Export with --format transformers and convert that folder with llama.cpp's convert_hf_to_gguf.py",
        )
    rope_type = _rope(config)[0]
    allowed = ARCHITECTURES[model_type][2]
    if rope_type not in allowed:
        raise UserError(
            f"GGUF export of {model_type} models does not support rope scaling {rope_type!r}",
            where=where,
            fix=f"Supported: {', '.join(allowed)}; or export with --format transformers",
        )
    return pre_tokenizer_name(tokenizer, where)


def pre_tokenizer_name(tokenizer, where: str = "the run's tokenizer") -> str:
    """The name llama.cpp gives this tokenizer's pre-tokenizer (`tokenizer.ggml.pre`), read from its structure.

    llama.cpp's converter recognises a tokenizer by hashing how it encodes a test text; we read the split rules
    instead, which also works for a tokenizer that was converted, trained or extended here.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = _pre_tokenizer_parts(state)
    kinds = [part.get("type") for part in parts]
    if state.get("model", {}).get("type") != "BPE" or "ByteLevel" not in kinds:
        raise UserError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as in Llama 3, SmolLM2 and Qwen2); "
            "this model's tokenizer is not one",
            where=where,
            fix="Export with --format transformers and convert that folder with llama.cpp's convert_hf_to_gguf.py",
        )
    splits = [part.get("pattern", {}).get("Regex") for part in parts if part.get("type") == "Split"]
    for name, pattern in KNOWN_SPLITS.items():
        if pattern in splits:
            return name
    byte_level = parts[kinds.index("ByteLevel")]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    raise UserError(
        f"GGUF export does not know this tokenizer's pre-tokenizer ({json.dumps(parts)[:200]}); llama.cpp would "
        "split text differently from it",
        where=where,
        fix="Export with --format transformers and convert that folder with llama.cpp's convert_hf_to_gguf.py",
    )


def gguf_pre_tokenizer(path: Path) -> str | None:
    """The `tokenizer.ggml.pre` recorded in a GGUF file (None if it has none or is not a BPE vocabulary)."""
    import gguf

    reader = gguf.GGUFReader(path)
    model = reader.get_field(gguf.Keys.Tokenizer.MODEL)
    pre = reader.get_field(gguf.Keys.Tokenizer.PRE)
    if model is None or pre is None or model.contents() != "gpt2":
        return None
    return pre.contents()


def exportable_model(source, tokenizer, dtype: torch.dtype, where: str):
    """`source` (a models.ModelSource) as a plain transformers model for `write` — a run's adapter merged in
    fp32 on the CPU and rounded once to `dtype` — and the pre-tokenizer name to write. The model is checked
    first, so one that cannot be written fails before the merge; a base that came as a GGUF file names its own
    pre-tokenizer best (SmolLM2's splits digits: "smollm")."""
    from transformers import AutoConfig

    from instruct_cli.core import inference, models

    pre_tokenizer = check_exportable(AutoConfig.from_pretrained(source.load_path), tokenizer, where)
    origin = models.gguf_origin(source)
    if origin is not None:
        pre_tokenizer = gguf_pre_tokenizer(origin) or pre_tokenizer
    cpu = torch.device("cpu")
    if source.adapter is not None:
        return inference.merge_adapter(source, dtype, cpu), pre_tokenizer
    return models.load_base_model(source, "none", cpu, dtype), pre_tokenizer


def write(model, tokenizer, path: Path, gguf_type: str, name: str, pre_tokenizer: str) -> dict:
    """Write `model` (a plain transformers causal LM, adapter merged) and `tokenizer` to the GGUF file `path`.

    `pre_tokenizer` is the `tokenizer.ggml.pre` name (from `check_exportable`, or from the base's own GGUF).
    Returns counts for the summary: tensors written, and how many of them are in the 2-D weight type.
    """
    import gguf

    config = model.config
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type][0])
    file_type, weight_type = GGUF_TYPES[gguf_type]
    # tensors wait in a spooled temporary file, not in memory, until the header is written
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hyperparameters(writer, config, arch, getattr(gguf.LlamaFileType, file_type))
    _add_tokenizer(writer, tokenizer, config, pre_tokenizer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts = {"tensors": 0, weight_type: 0}
    for tensor_name, data in _tensors(model, config, arch):
        encoded, qtype = _encode(tensor_name, data, getattr(gguf.GGMLQuantizationType, weight_type))
        writer.add_tensor(tensor_name, encoded, raw_dtype=qtype)
        counts["tensors"] += 1
        counts[weight_type] += qtype.name == weight_type
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


# ------------------------------------------------------------------------------------------ hyperparameters
def _rope(config) -> tuple[str, dict, float]:
    """(rope type, its parameters, rope theta) from a transformers 5 `rope_parameters` or an older `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type")) or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return rope_type, params, float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer, config, arch, file_type) -> None:
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope_type, rope, theta = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(_head_dim(config))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)


def _llama3_rope_factors(config) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp takes it: one factor per rotary frequency, in
    the `rope_freqs` tensor (the same formula as convert_hf_to_gguf.py)."""
    _, rope, theta = _rope(config)
    dim = _head_dim(config)
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# ------------------------------------------------------------------------------------------------- tokenizer
def _looks_special(token: str) -> bool:
    """Added tokens that are control tokens even when not marked special (llama.cpp's rule)."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """The token list and token types, padded to the embedding size, as convert_hf_to_gguf.py makes them."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(
            f"The tokenizer has token ids up to {max(by_id)}, but the model's embeddings have only {vocab_size} rows",
            where="the run's tokenizer",
            fix="Export with --format transformers; a tokenizer larger than the model cannot be written to GGUF",
        )
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[index].normalized:  # llama.cpp takes added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[index].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _add_tokenizer(writer, tokenizer, config, pre_tokenizer: str) -> None:
    import gguf

    tokens, types = _vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = [part for part in _pre_tokenizer_parts(state) if part.get("type") == "ByteLevel"]
    writer.add_add_space_prefix(bool(byte_level and byte_level[0].get("add_prefix_space")))
    # merges, special token ids and the chat template the way llama.cpp reads them: gguf's SpecialVocab on the
    # saved tokenizer files (config.json supplies ids the tokenizer leaves out, as for Qwen2's BOS)
    with tempfile.TemporaryDirectory(prefix="instruct-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        config.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # What the tokenizer really does, not what its config claims: does encoding add BOS or EOS?
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    template = tokenizer.chat_template
    special.chat_template = template if isinstance(template, str) else None
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer_parts(state: dict) -> list[dict]:
    pre = state.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


# --------------------------------------------------------------------------------------------------- tensors
def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections: each head's two rotary halves interleaved (HF keeps them apart)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensors(model, config, arch):
    """(llama.cpp name, float32 array in transformers' layout) for every tensor the GGUF file holds."""
    import gguf

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if arch == gguf.MODEL_ARCH.LLAMA and _rope(config)[0] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(config)
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed by the reader / the same matrix as token_embd
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(
                f"The model has a tensor llama.cpp has no name for: {name}",
                where=f"a {config.model_type} model",
                fix="Export with --format transformers and convert that folder with llama.cpp's convert_hf_to_gguf.py",
            )
        data = tensor.detach().to(torch.float32).cpu()
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, kv_heads)
        yield gguf_name, data.numpy()


def _encode(name: str, data: np.ndarray, weight_type):
    """The tensor's bytes and type: F32 for 1-D tensors and norms (as llama.cpp keeps them), otherwise the
    chosen weight type, or F16 where a row does not fit that type's blocks (as convert_hf_to_gguf.py does)."""
    import gguf

    qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or name.endswith("_norm.weight") else weight_type
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
