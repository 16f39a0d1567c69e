"""`instruct export`'s `run`: check the flags, merge the run's adapter into its base, and write the merged
model as a transformers folder or as one GGUF file with an Ollama Modelfile beside it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from instruct_cli.core import artifacts, gguf_file, inference, models
from instruct_cli.core.console import summary_table
from instruct_cli.core.errors import UserError
from instruct_cli.core.step_table import POLICY_KINDS
from instruct_cli.steps.export import ollama

FORMATS = ("transformers", "gguf")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def run(
    run_dir: Path,
    out: Path,
    dtype: str | None = None,
    force: bool = False,
    format: str = "transformers",
    gguf_type: str | None = None,
) -> Path:
    """Merge the adapter of `run_dir` (an sft, ppo or dpo run) into its base and write it to `out` as `format`.

    `dtype` is the weight dtype of a transformers export (default bfloat16) and the dtype the adapter is merged
    in before a GGUF export (default float32, the most exact); `gguf_type` is the GGUF tensor type (default f16).
    Returns the output folder (transformers) or the GGUF file in it (gguf).
    """
    manifest = artifacts.require_complete(run_dir, POLICY_KINDS, flag="RUN")
    if out is None:
        raise UserError("No output folder given", where="--out", fix="Pass --out DIR")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty", where="--out", fix="Pass --force to replace it")
    if format not in FORMATS:
        raise UserError(f"Unknown export format {format!r}", where="--format", fix="Use transformers or gguf")
    if format == "transformers" and gguf_type is not None:
        raise UserError(
            "--gguf-type applies only to GGUF exports",
            where="--gguf-type",
            fix="Add --format gguf, or drop --gguf-type",
        )
    dtype = dtype or ("float32" if format == "gguf" else "bfloat16")
    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}", where="--dtype", fix="Use bfloat16, float16 or float32")
    record = {
        "run": str(Path(run_dir).resolve()),
        "run_sha256": artifacts.sha256_folder(run_dir),
        "base_model": manifest.get("base_model"),
        "format": format,
        "dtype": dtype,
    }
    source = models.resolve_model(str(run_dir))
    tokenizer = models.load_tokenizer(source)
    if format == "gguf":
        return _export_gguf(run_dir, out, source, tokenizer, DTYPES[dtype], gguf_type or "f16", record)

    merged = inference.merge_adapter(source, DTYPES[dtype], torch.device("cpu"))
    with artifacts.atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        artifacts.atomic_write_json(tmp / "instruct-export.json", record)
    summary_table("export", {"run": str(run_dir), "base": source.reference, "dtype": dtype, "output": str(out)})
    return out


def _export_gguf(run_dir, out: Path, source, tokenizer, dtype, gguf_type: str, record: dict) -> Path:
    gguf_file.check_gguf_type(gguf_type)
    merged, pre_tokenizer = gguf_file.exportable_model(source, tokenizer, dtype, where=f"the base model of {run_dir}")
    name = _file_stem(out) + f"-{gguf_type}.gguf"
    with artifacts.atomic_folder(out) as tmp:
        counts = gguf_file.write(
            merged, tokenizer, tmp / name, gguf_type, name=_file_stem(out), pre_tokenizer=pre_tokenizer
        )
        artifacts.atomic_write_text(tmp / "Modelfile", ollama.modelfile(name, tokenizer))
        artifacts.atomic_write_json(
            tmp / "instruct-export.json",
            {**record, "gguf_type": gguf_type, "file": name, "pre_tokenizer": pre_tokenizer},
        )
    size = (out / name).stat().st_size
    summary_table(
        "export",
        {
            "run": str(run_dir),
            "base": source.reference,
            "architecture": merged.config.model_type,
            "type": f"{gguf_type} ({counts[gguf_file.GGUF_TYPES[gguf_type][1]]} of {counts['tensors']} tensors)",
            "file": f"{out / name} ({size / 2**20:.1f} MiB)",
            "Modelfile": str(out / "Modelfile"),
        },
    )
    return out / name


def _file_stem(out: Path) -> str:
    """A file name from the output folder's name: `models/my-assistant` -> `my-assistant`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(out).resolve().name).strip("-.") or "model"
