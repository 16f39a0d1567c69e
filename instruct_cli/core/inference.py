"""Loading a model to sample from (generate, chat, eval's answers, label) as fast as the device allows.

Owns: the weights' format when none is asked for (`choose`): unquantised wherever the weights fit in half the
free memory (nf4 where they do not, or where the model's size is unknown), in bf16 on a CPU with bf16
instructions, where decoding runs twice as fast as in fp32 (45 vs 24 tokens/s for the built-in model on an
AVX512-BF16 CPU; fp32 is kept where exact log-probs matter, and on request with --quantization none); the
unquantised weights ready to sample, kept in the cache (`ready_model`): a run's adapter merged into its base
once (keyed by the base's fingerprint and the adapter's content hash, so a retrained adapter is merged again),
and a base stored in another dtype converted once, so that later calls memory-map the file instead of
converting it; and `load_for_inference`, which puts them together and says in one line what `auto` chose.
Training never comes here: its default stays nf4. May use: artifacts, console, errors, models.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from instruct_cli.core import artifacts, models
from instruct_cli.core.console import info
from instruct_cli.core.errors import UserError

AUTO = "auto"
MEMORY_SHARE = 0.5
"""Unquantised weights are chosen when they take at most this share of the memory free on the device (the
rest is for activations, the KV cache and everything else running)."""
READY_DIR = "sampling"
READY_KEEP = 4
"""Folders of ready weights kept in the cache; the least recently used beyond these go when one is added."""
READY_RECORD = "instruct-sampling.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Choice:
    """How a model is loaded to sample from."""

    quantization: str
    """nf4, int8 or none."""
    dtype: torch.dtype
    """The dtype of unquantised weights and of the compute."""
    device: torch.device
    reason: str = ""
    """Why `auto` chose this ("" when the quantisation was asked for)."""


# ------------------------------------------------------------------------------------------------ choosing
def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), which make torch's bf16 matmuls fast;
    without them bf16 is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def sampling_dtype(device: torch.device, exact: bool = False) -> torch.dtype:
    """The fastest dtype to sample in: bf16 on a CPU with bf16 instructions (unless `exact` log-probs are
    needed), else the device's compute dtype (bf16/fp16 on a GPU, fp32 on the CPU)."""
    if device.type == "cpu" and not exact and native_bf16_cpu():
        return torch.bfloat16
    return models.compute_dtype(device)


def stored_weights(source: models.ModelSource) -> tuple[int, set[torch.dtype | str]] | None:
    """(number of weights, their dtypes) of a local base, read from its safetensors headers without loading a
    tensor; None for a hub id or a folder without safetensors files."""
    folder = Path(source.load_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    count, dtypes = 0, set()
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_slice(name)
                count += math.prod(tensor.get_shape())
                dtypes.add(SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype()))
    return count, dtypes


def free_memory(device: torch.device) -> int:
    """Bytes of memory free for a model on `device`: the GPU's free memory, or the RAM available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # a dependency of accelerate

    return psutil.virtual_memory().available


def choose(requested: str, source: models.ModelSource, device: torch.device, exact: bool = False) -> Choice:
    """The quantisation and dtype to sample with: `requested` when given (unquantised in the device's compute
    dtype), else (auto) unquantised in `sampling_dtype` when the weights fit in MEMORY_SHARE of the free
    memory, nf4 when they do not or when their size is unknown."""
    if requested != AUTO:
        return Choice(requested, models.compute_dtype(device), device)
    stored = stored_weights(source)
    if stored is None:
        return Choice(
            "nf4", models.compute_dtype(device), device, "auto: the model's size is unknown, so 4-bit to be safe"
        )
    dtype, count = sampling_dtype(device, exact), stored[0]
    needed, free = count * torch.finfo(dtype).bits // 8, free_memory(device)
    size = f"{count / 1e9:.2g}B parameters"
    if needed <= MEMORY_SHARE * free:
        exact_path = models.compute_dtype(device)
        other = f"none for {_name(exact_path)}, nf4 for 4-bit" if exact_path != dtype else "nf4 for 4-bit"
        return Choice("none", dtype, device, f"auto: the fastest here for {size}; --quantization {other}")
    return Choice(
        "nf4",
        models.compute_dtype(device),
        device,
        f"auto: {size} need {needed / 2**30:.1f} GiB unquantised, more than half of the {free / 2**30:.1f} GiB "
        f"free on {device.type}",
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------- ready-to-sample weights
def adapter_digest(adapter: Path) -> str:
    """A content hash of an adapter folder: every file's name and sha256 (memoised per file by
    models.file_digest, so asking again costs a few stat calls)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(adapter).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(adapter)}:{models.file_digest(path)}\n".encode())
    return digest.hexdigest()


def cache_stem(source: models.ModelSource) -> str:
    """The name cached copies of `source` (its adapter merged in, for a run) are kept under, here and by the
    llama.cpp engine: the base's name, `-merged` for a run, and a key of the base's fingerprint and the
    adapter's content hash (a retrained adapter gets another name)."""
    parts = [source.fingerprint] + ([adapter_digest(source.adapter)] if source.adapter is not None else [])
    key = hashlib.sha256(":".join(parts).encode()).hexdigest()
    kind = "-merged" if source.adapter is not None else ""
    return f"{Path(source.load_path).name}{kind}-{key[:16]}"


def ready_folder(source: models.ModelSource, dtype: torch.dtype) -> Path:
    """Where the unquantised weights of `source` in `dtype` (its adapter merged in, for a run) are kept."""
    return models.cache_dir() / READY_DIR / f"{cache_stem(source)}-{_name(dtype)}"


def merge_adapter(source: models.ModelSource, dtype: torch.dtype, device: torch.device):
    """The base of `source` with its adapter merged into the weights: a plain transformers model in `dtype`.
    On a CPU the merge is done in fp32 and rounded once."""
    from peft import PeftModel

    base = models.load_base_model(source, "none", device, torch.float32 if device.type == "cpu" else dtype)
    merged = PeftModel.from_pretrained(base, str(source.adapter), is_trainable=False).merge_and_unload()
    return merged.to(dtype).eval()


def ready_model(source: models.ModelSource, dtype: torch.dtype, device: torch.device):
    """The unquantised weights of `source` in `dtype`, its adapter merged in: read (memory-mapped) from the
    cache when they were prepared before, else prepared now (merged, or converted from the dtype the base is
    stored in) and saved there for the next call. Returns (model, prepared_now)."""
    from transformers import AutoModelForCausalLM

    stored = stored_weights(source)
    if source.adapter is None and (stored is None or stored[1] == {dtype}):
        return models.load_base_model(source, "none", device, dtype), False  # already as needed
    folder = ready_folder(source, dtype)
    if (folder / READY_RECORD).is_file():
        os.utime(folder)  # recently used: kept when older ones are pruned
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        return models.to_device(model, device).eval(), False
    if source.adapter is not None:
        model = merge_adapter(source, dtype, device)
    else:
        model = models.load_base_model(source, "none", device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    folder.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes < shutil.disk_usage(folder.parent).free / 4:  # never fill the disk with copies
        with artifacts.atomic_folder(folder) as tmp:
            model.save_pretrained(tmp)
            adapter = str(Path(source.adapter).resolve()) if source.adapter is not None else None
            artifacts.atomic_write_json(
                tmp / READY_RECORD, {"base": source.record(), "adapter": adapter, "dtype": _name(dtype)}
            )
        prune_ready(keep=folder)
    return model, True


def prune_ready(keep: Path, limit: int = READY_KEEP) -> list[Path]:
    """Remove the least recently used entries of `keep`'s cache folder beyond `limit` (never `keep`): ready
    weights (folders) here, the llama.cpp engine's GGUF files (core/llama_engine.py). Names starting with a
    dot (writes in progress) are left alone. Returns what was removed."""
    entries = [p for p in keep.parent.iterdir() if not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = [p for p in entries[limit:] if p != keep]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


# ------------------------------------------------------------------------------------------------- loading
def resolve_generator(spec: str) -> models.ModelSource:
    """`spec` resolved (models.resolve_model), refused with a clear error when it is a reward-model run."""
    source = models.resolve_model(spec)
    if source.run_manifest is not None and source.run_manifest.get("kind") == "rm":
        raise UserError(
            f"{spec} is a reward model; it scores text but does not generate it",
            where="--model",
            fix="Use `instruct rm score` to score responses, or pass an sft, ppo or dpo run",
        )
    return source


def load_for_inference(
    spec: str, quantization: str = AUTO, device: str = "auto", announce: bool = True, exact: bool = False
):
    """Load `spec` (any model reference) ready to sample: the quantisation asked for, or chosen for the device
    (`choose`; said in one line when `announce`; `exact` keeps the device's compute dtype, for log-probs);
    unquantised weights come ready from the cache (`ready_model`: a run's adapter merged in), a quantised base
    gets the adapter through peft. Returns (model, tokenizer, source)."""
    source = resolve_generator(spec)
    choice = choose(quantization, source, models.pick_device(device), exact)
    tokenizer = models.load_tokenizer(source)
    adapter = ""
    if choice.quantization == "none":
        model, prepared_now = ready_model(source, choice.dtype, choice.device)
        if source.adapter is not None:
            adapter = " + adapter " + ("merged now, cached for the next call" if prepared_now else "merged (cached)")
    else:
        model = models.load_base_model(source, choice.quantization, choice.device, choice.dtype)
        if source.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(source.adapter), is_trainable=False).eval()
            adapter = " + adapter"
    if announce and choice.reason:
        weights = f"unquantised {_name(choice.dtype)}" if choice.quantization == "none" else choice.quantization
        info(escape(f"{source.reference}{adapter}: {weights} on {choice.device} ({choice.reason})"))
    return model, tokenizer, source
