"""What bench_sft and bench_rm share around their step-specific parts: their command-line flags, the --smoke
shape, instruct's side (the real CLI in its own process, its numbers from metrics.jsonl) and the body that
builds the model and data, runs both sides interleaved and reports."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .data import prepare_data, read_jsonl, write_jsonl
from .machine import prewarm_memory, print_machine_header
from .model import default_model
from .paths import INSTRUCT
from .process import base_env, measure
from .timing import instruct_step_ends
from .trl_side import ensure_trl


def add_model_flags(parser) -> None:
    """Flags shared by both benchmarks: the model, the data size, and the training shape."""
    parser.add_argument(
        "--model",
        help="A transformers chat-model folder (with a chat template) to use instead of "
        "the random Llama built at run time",
    )
    parser.add_argument("--hidden", type=int, default=256, help="Hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="Layers of the random Llama")
    parser.add_argument("--intermediate", type=int, default=688, help="MLP size of the random Llama")
    parser.add_argument("--heads", type=int, default=8, help="Attention heads of the random Llama")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="Pad the random Llama's vocabulary to this size (0: the tokenizer's 384 tokens; "
        "e.g. 32000 makes the LM head as costly as in a real model)",
    )
    parser.add_argument("--rows", type=int, default=200, help="Synthetic rows to generate")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows per optimizer step (no accumulation)")
    parser.add_argument("--max-steps", type=int, default=40, help="Optimizer steps on each side")
    parser.add_argument("--max-length", type=int, default=512, help="Longest sequence in tokens")
    parser.add_argument("--lr", type=float, default=2e-4, help="Learning rate on both sides")
    parser.add_argument(
        "--quantization",
        choices=("none", "nf4"),
        default="none",
        help="none: fp32 base on CPU (default); nf4: 4-bit base via bitsandbytes on both sides",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Turn gradient checkpointing on for both sides (off by default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, the model and both trainings")
    parser.add_argument(
        "--work",
        type=Path,
        help="Folder for the model, data and runs (default: a fresh "
        "folder under /tmp, removed at the end unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the work folder")
    parser.add_argument("--only", choices=("instruct", "trl"), help="Run one side only")
    parser.add_argument(
        "--repeats", type=int, default=2, help="Runs per side, interleaved; the table shows each side's fastest run"
    )
    parser.add_argument(
        "--trl-group-by-length",
        action="store_true",
        help="Give TRL length-grouped batches (train_sampling_strategy=group_by_length), as instruct "
        "always batches; by default TRL keeps its random sampler",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="Before each run, wait up to this long for other work to leave the CPUs (0: do not wait)",
    )
    parser.add_argument(
        "--prewarm-gib", type=float, default=0, help="GiB of memory to touch once before timing (0: off); see README"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="The same code path on a tiny model, a few steps, each side once (well under a minute of training): "
        "checks that every side runs and produces its numbers; exits non-zero if one does not",
    )


SMOKE_SHAPE = dict(hidden=64, layers=2, intermediate=128, heads=4, rows=24, max_steps=3, max_length=256, repeats=1)
"""What --smoke sets (sft and rm)."""


def apply_smoke(args) -> None:
    """Shrink the work to SMOKE_SHAPE when --smoke was given; then raise --max-length to `args.max_length_floor`
    when the script set one (bench_rm's real-shaped data)."""
    if getattr(args, "smoke", False):
        for key, value in SMOKE_SHAPE.items():
            setattr(args, key, value)
    floor = getattr(args, "max_length_floor", 0)
    if args.max_length < floor:
        print(f"[bench] --max-length {args.max_length} -> {floor} (no row cut or dropped)", flush=True)
        args.max_length = floor


def run_instruct(
    step: str,
    model: Path,
    data: Path,
    work: Path,
    args,
    index: int,
    batches: Callable[[], list[dict]],
    extra: tuple[str, ...] = (),
) -> dict:
    """`instruct STEP` (sft or rm) through the real CLI, in its own subprocess, with the settings both sides
    share (and the step's own flags `extra`); its numbers from metrics.jsonl, its per-step batches from
    `batches()` (the CLI's own batcher)."""
    run = work / f"instruct-{step}-run-{index}"
    cmd = [
        INSTRUCT,
        step,
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(run),
        "--quantization",
        args.quantization,
        "--device",
        "cpu",
        "--lora-r",
        "16",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0",
        "--lora-targets",
        "all-linear",
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        "1",
        "--max-steps",
        str(args.max_steps),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--warmup-ratio",
        "0.03",
        "--weight-decay",
        "0",
        "--max-grad-norm",
        "1.0",
        "--seed",
        str(args.seed),
        "--eval-every",
        "100000",
        "--save-every",
        "100000",
        "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
        "--force",
        *extra,
    ]
    usage = measure(cmd, base_env(work), work / f"instruct-{step}-{index}.log", f"instruct {step}", args.wait_quiet)
    result = {"side": "instruct", **usage}
    if usage["rc"] != 0 or not (run / "metrics.jsonl").is_file():
        return result
    rows = read_jsonl(run / "metrics.jsonl")
    result.update(step_ends=instruct_step_ends(run), loop_tokens_per_s=rows[-1].get("train/tokens_per_s"))
    try:
        result["batches"] = batches()
    except Exception as exc:  # the CLI's internals moved: a failed side, not a row of n/a
        result["failed"] = f"could not recompute instruct's batches ({type(exc).__name__}: {exc})"
    return result


def run_benchmark(
    args,
    *,
    step: str,
    task: str,
    rows: Callable[[int, int, Path], list[dict]],
    run_instruct: Callable,
    run_trl: Callable,
    report: Callable,
) -> None:
    """The body of bench_sft/bench_rm: model, data folder (`task`, from `rows(n, seed, model)`), interleaved runs of
    both sides (so slow spells of a shared machine hit both), results.json, the report; the work folder is
    removed at the end unless --work or --keep."""
    apply_smoke(args)
    print_machine_header()
    if args.only != "instruct" and not ensure_trl():
        args.only = "instruct"
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix=f"bench-{step}-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        prewarm_memory(args.prewarm_gib)
        model = default_model(work, args)
        raw = write_jsonl(work / f"raw-{task}.jsonl", rows(args.rows, args.seed, model))
        data = prepare_data(raw, work / f"data-{task}", task, model, base_env(work))
        args.model_folder, args.data_folder = str(model), str(data)  # for the report
        runs: dict[str, list[dict]] = {}
        for index in range(args.repeats):
            if args.only != "trl":
                runs.setdefault("instruct", []).append(run_instruct(model, data, work, args, index))
            if args.only != "instruct":
                runs.setdefault("TRL", []).append(run_trl(model, data, work, args, index))
        (work / "results.json").write_text(json.dumps(runs, indent=1))
        report(runs, args)
        failed = [f"{side} run {i + 1}: {why}" for side, results in runs.items() for i, r in enumerate(results)
                  if (why := failure(r))]  # fmt: skip
        if failed:
            print("[bench] FAILED: " + "; ".join(failed), flush=True)
            raise SystemExit(1)
        print(
            f"[bench] done in {time.time() - started:.0f} s; work folder {work}"
            + ("" if args.keep or args.work else " (removed)")
        )
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


def failure(result: dict) -> str | None:
    """Why a side's run did not produce its numbers (None when it did): a failed side fails the benchmark."""
    if result.get("rc") != 0:
        return f"exit code {result.get('rc')}"
    if result.get("failed"):
        return result["failed"]
    if result.get("loop_tokens_per_s") is None:
        return "no throughput measured"
    return None
