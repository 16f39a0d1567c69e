"""`instruct export`: merge a run's LoRA adapter into a 16-bit copy of its base, as a plain transformers folder.

The result loads with `AutoModelForCausalLM.from_pretrained` alone (no peft, no bitsandbytes), with its
tokenizer and chat template, ready for vLLM, llama.cpp conversion or the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instruct_cli.core import artifacts, models
from instruct_cli.core.console import summary_table
from instruct_cli.core.errors import UserError


def run(run_dir: Path, out: Path, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Merge the adapter of `run_dir` (an sft or ppo run) into its base and save the result to `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = artifacts.require_complete(run_dir, ("sft", "ppo"), flag="RUN")
    if out is None:
        raise UserError("No output folder given", where="--out", fix="Pass --out DIR")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty", where="--out", fix="Pass --force to replace it")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"Unknown dtype {dtype!r}", where="--dtype", fix="Use bfloat16, float16 or float32")
    source = models.resolve_model(str(run_dir))
    tokenizer = models.load_tokenizer(source)
    # merging needs the real 16-bit weights of the base, not its 4-bit copy
    base = AutoModelForCausalLM.from_pretrained(source.load_path, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, str(source.adapter)).merge_and_unload()
    with artifacts.atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        artifacts.atomic_write_json(
            tmp / "instruct-export.json",
            {
                "run": str(Path(run_dir).resolve()),
                "run_sha256": artifacts.sha256_folder(run_dir),
                "base_model": manifest.get("base_model"),
                "dtype": dtype,
            },
        )
    summary_table("export", {"run": str(run_dir), "base": source.reference, "dtype": dtype, "output": str(out)})
    return out
