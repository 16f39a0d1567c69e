"""TRL's side of bench_sft/bench_rm: TRL installed for the benchmark alone (benchmarks/.trl, git-ignored,
only ever on the TRL worker's PYTHONPATH), the worker subprocess, the model kwargs it loads with, and its
training loop timed and counted like instruct's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .paths import BENCH_DIR, PYTHON
from .process import base_env, measure
from .timing import CountingCollator, step_timer_callback

TRL_DIR = BENCH_DIR / ".trl"
TRL_VERSION = "1.16.0"


def ensure_trl() -> bool:
    """Install TRL into benchmarks/.trl (no dependencies: transformers, accelerate, datasets are already there);
    False, with a message saying so, when the package registry cannot be reached (the TRL side is skipped)."""
    if (TRL_DIR / "trl" / "__init__.py").is_file():
        return True
    print(
        f"[bench] TRL is not installed for the benchmark: installing trl=={TRL_VERSION} into {TRL_DIR} "
        "(--no-deps; the project's venv is not changed)",
        flush=True,
    )
    installed = subprocess.run(
        [
            PYTHON,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "--target",
            str(TRL_DIR),
            f"trl=={TRL_VERSION}",
        ],
        check=False,
    )
    if installed.returncode != 0:
        print(
            f"[bench] SKIPPED the TRL side: trl=={TRL_VERSION} could not be installed (exit {installed.returncode}; "
            "is the package registry reachable?). Only instruct's side runs.",
            flush=True,
        )
        return False
    return True


def trl_env(work: Path) -> dict[str, str]:
    """base_env plus TRL on the import path."""
    env = base_env(work)
    env["PYTHONPATH"] = str(TRL_DIR)
    return env


def run_trl(script: str, step: str, label: str, model: Path, data: Path, work: Path, args, index: int) -> dict:
    """TRL's trainer in its own subprocess (`script --trl-worker SPEC`), with TRL on PYTHONPATH."""
    spec = {
        **{k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "model": str(model),
        "data": str(data),
        "out": str(work / f"trl-{step}-run-{index}"),
        "result": str(work / f"trl-{step}-result-{index}.json"),
    }
    spec_file = work / f"trl-{step}-spec-{index}.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    cmd = [PYTHON, str(Path(script).resolve()), "--trl-worker", str(spec_file)]
    usage = measure(cmd, trl_env(work), work / f"trl-{step}-{index}.log", label, args.wait_quiet)
    result = {"side": "TRL", **usage}
    if usage["rc"] == 0:
        result.update(json.loads(Path(spec["result"]).read_text()))
    return result


def trl_model_kwargs(quantization: str, **extra) -> dict:
    """from_pretrained kwargs of the TRL side: fp32, or the 4-bit config instruct uses on a CPU."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = {"dtype": torch.float32, **extra}
    if quantization == "nf4":
        kwargs.update(
            device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        )
    return kwargs


def train_and_record(trainer, result_path: str, **extra) -> None:
    """Train a TRL trainer with a step timer and a counting collator; write step end times, per-step batches
    and TRL's own token count as JSON to `result_path` (what run_trl reads back)."""
    import trl

    timer = step_timer_callback()
    trainer.add_callback(timer)
    trainer.data_collator = counter = CountingCollator(trainer.data_collator)
    output = trainer.train()
    batches = counter.batches[: len(timer.step_ends)]
    loop_s = timer.step_ends[-1] - timer.begin
    reported = [log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log]
    result = {
        "trl_version": trl.__version__,
        "step_ends": timer.step_ends,
        "batches": batches,
        "loop_s": loop_s,
        "loop_tokens_per_s": sum(b["tokens"] for b in batches) / loop_s,
        "trl_num_tokens": reported[-1] if reported else None,
        "train_runtime": output.metrics["train_runtime"],
        **extra,
    }
    Path(result_path).write_text(json.dumps(result))
