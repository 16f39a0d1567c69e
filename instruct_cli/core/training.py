"""The training loop shared by `sft`, `rm` and `dpo`: batching, accumulation, schedule, eval, checkpoints,
resume; and how every training step (ppo too) starts.

Start-up, the same order in every step: `already_done` (the flags the step needs, then --resume of an output
that is already complete), the step's own reading and checking of its inputs, then `start` (the accelerator,
the device and the run folder, opened by `open_run`), so a bad input never leaves a folder behind.

A step supplies what is specific to it — how to encode its rows, the loss of a batch, how to evaluate —
and `fit` does the rest the same way for each, on a `Schedule` taken from the step's config. The loop is
built on `accelerate.Accelerator`, so `accelerate launch --num_processes N` runs it data-parallel with no
code of our own.

Resume is exact: the data order of each epoch is a pure function of (seed, epoch), and checkpoints are
written at step boundaries only, with every process's random state (checkpoints.py, which also owns how a
run stops on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from instruct_cli.core import artifacts, distributed, models, trackers
from instruct_cli.core.artifacts import RunFolder
from instruct_cli.core.checkpoints import Checkpointer, StopSignals
from instruct_cli.core.console import info, progress
from instruct_cli.core.errors import UserError

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Batch], tuple[torch.Tensor, dict[str, float]]]
"""(model, batch) -> (mean loss of the batch, metrics such as {"tokens": n})."""


@dataclass
class Trainable:
    """A model ready to train, with everything `fit` needs to step, save and resume it."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any


# ----------------------------------------------------------------------------------------- preparation
def make_accelerator(seed: int, precision: str = "auto", device: str = "auto"):
    """An Accelerator with the mixed precision asked for (see `mixed_precision`), each process seeded with
    seed + its index: its own random stream for sampling and dropout, reproducible from the run seed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    on_cpu = not torch.cuda.is_available() or device == "cpu"
    precision = mixed_precision(precision, on_cpu)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # accelerate keeps one precision per process and refuses another; a recipe run by `instruct run` may
        # give its steps different ones. Reset the precision state only (the process group stays).
        AcceleratorState._reset_state(reset_partial_state=False)
    # without cpu=True, Accelerator ignores the torchrun environment on a machine with no GPU and every
    # process would train alone; with it, several CPU processes form a gloo group (DistributedType.MULTI_CPU)
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu)
    set_seed(seed, device_specific=True)  # seed + process index
    return accelerator


def mixed_precision(precision: str, on_cpu: bool) -> str:
    """accelerate's mixed_precision for the --precision flag: `auto` is bf16 on GPUs that have it, fp16 (with
    loss scaling: accelerate's GradScaler, used by `accelerator.backward` and the prepared optimizer) on
    older GPUs, and none on a CPU, where bf16 matmuls are many times slower than fp32."""
    if precision == "auto":
        if on_cpu:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and on_cpu:
        raise UserError(
            "fp16 mixed precision needs a GPU: on a CPU there is no loss scaling, and fp16 training without it "
            "loses small gradients",
            where="--precision",
            fix="Use --precision bf16 (CPU autocast, slow) or no (fp32, the CPU default)",
        )
    return precision


def prepare_for_training(model, quantization: str, gradient_checkpointing: bool):
    """Freeze the base, and enable gradient checkpointing (with input grads, so LoRA still gets gradients)."""
    if quantization in ("nf4", "int8"):
        from peft import prepare_model_for_kbit_training

        # also upcasts the few non-quantised weights (norms, embeddings) to fp32 for stable training
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def make_trainable(
    model, accelerator, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int
) -> Trainable:
    """AdamW over the trainable parameters with linear warmup and cosine decay; the model wrapped for DDP."""
    from transformers import get_cosine_schedule_with_warmup

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)
    # Only the model goes through accelerate: our own step counting keeps the schedule exact across
    # process counts (accelerate's scheduler wrapper would step once per process). The model is already on
    # its device (load_base_model placed it, 4-bit weights included), and a wrapper module (NextTokenLoss,
    # RewardModel) hides the 4-bit markers accelerate looks for before calling `.to()`: no placement here.
    model = accelerator.prepare_model(model, device_placement=False)
    return Trainable(model, prepare_optimizer(accelerator, optimizer), scheduler, accelerator)


def prepare_optimizer(accelerator, optimizer: torch.optim.Optimizer):
    """The optimizer wrapped by accelerate, so that under fp16 its step goes through the loss scaler (skipped
    when gradients overflowed) and `clip_grad_norm_` unscales the gradients first."""
    return accelerator.prepare_optimizer(optimizer, device_placement=False)


def require_data_and_out(config) -> None:
    """The two flags every training step needs."""
    if config.data is None:
        raise UserError(
            "No data folder given", where="--data", fix="Pass --data DIR (a folder made by `instruct prepare-data`)"
        )
    if config.out is None:
        raise UserError("No output folder given", where="--out", fix="Pass --out runs/NAME")


def nothing_to_resume(config, kind: str) -> bool:
    """True (and says so) when --resume names an output that is already complete: a retry script can always
    add --resume, even when the crash came after the end."""
    if not getattr(config, "resume", False) or getattr(config, "force", False) or config.out is None:
        return False
    manifest = artifacts.read_manifest(config.out) if Path(config.out).is_dir() else None
    if manifest and manifest.get("status") == artifacts.STATUS_COMPLETE and manifest.get("kind") == kind:
        info(f"{config.out} is already complete: nothing to resume")
        return True
    return False


def already_done(config, kind: str, check_flags: Callable[[Any], None] = require_data_and_out) -> bool:
    """The first start-up checks of every training step, in this order: the flags it needs (`check_flags`;
    --data and --out by default), then --resume of an output that is already complete. True: there is
    nothing to do (and it said so)."""
    check_flags(config)
    return nothing_to_resume(config, kind)


class Start(NamedTuple):
    """What `start` gives a training step: its accelerator, the device it trains on and its open run folder."""

    accelerator: Any
    device: Any
    run_folder: RunFolder


def start(
    config, kind: str, source: models.ModelSource, inputs: dict | None = None, extra: dict | None = None
) -> Start:
    """The last start-up step of every training step, once its inputs are read and checked: the accelerator
    (seeded, with the precision asked for), the device, and the run folder (`open_run`)."""
    accelerator = make_accelerator(config.seed, config.precision, config.device)
    device = accelerator.device if config.device == "auto" else models.pick_device(config.device)
    return Start(accelerator, device, open_run(config, kind, accelerator, source, inputs, extra))


def open_run(
    config, kind: str, accelerator, source: models.ModelSource, inputs: dict | None = None, extra: dict | None = None
) -> RunFolder:
    """Open the step's run folder on the main process, with the experiment trackers of --report-to; the other
    processes follow once it exists. Every training step (sft, rm, dpo, ppo) opens its folder here.

    The manifest names the run's parents, `inputs` (name -> folder, each recorded with its content hash on
    the main process; by default --data, and --model when it is a run folder), and its base model
    (`source`'s) and quantisation; `extra` adds fields or replaces those (ppo names the base model its SFT
    run recorded, and its reward function)."""
    from instruct_cli.core.config import to_recipe_dict

    trackers.require_installed(config.report_to)  # before the folder exists: a bad input leaves nothing behind
    if accelerator.is_main_process:
        if inputs is None:
            inputs = {"data": config.data, **({"model": Path(config.model)} if source.adapter is not None else {})}
        run = RunFolder.open(
            config.out,
            kind,
            to_recipe_dict(config),
            force=config.force,
            resume=config.resume,
            parents={name: artifacts.parent_record(folder) for name, folder in inputs.items()},
            extra={"base_model": source.record(), "quantization": config.quantization, **(extra or {})},
        )
        trackers.attach(run, config.report_to)
    accelerator.wait_for_everyone()
    return run if accelerator.is_main_process else RunFolder.follow(config.out)


# --------------------------------------------------------------------------------------------- batching
def my_batches(accelerator, lengths: Sequence[int], config, epoch: int) -> list[list[int]]:
    """This process's share of epoch `epoch`'s batches.

    Global batches of batch_size x processes rows are formed exactly as a single process would form them,
    then split across processes, so N processes see the same rows per step as one process with an N times
    larger batch (and the loss curves agree).
    """
    world = accelerator.num_processes
    global_batches = length_grouped_batches(lengths, config.batch_size * world, config.seed, epoch)
    return [batch[accelerator.process_index :: world] for batch in global_batches if len(batch) >= world]


def total_steps(config, accelerator, rows: int) -> int:
    """Optimizer steps of the run: --max-steps, or --epochs over the training rows."""
    if config.max_steps:
        return config.max_steps
    batches = math.ceil(rows / (config.batch_size * accelerator.num_processes))
    return config.epochs * max(1, batches // config.grad_accum)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of row indices in which rows have similar lengths (little compute lost to padding).

    Rows are shuffled, cut into mega-batches of 32 batches, sorted by length inside each, cut into batches,
    and the batches shuffled again: similar lengths together, yet a different mix every epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 32
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def eval_batches(items: list, lengths: Sequence[int], batch_size: int, collate: Callable[[list], Batch]) -> list[Batch]:
    """The eval split as batches of similar lengths (sorted: eval metrics are sums, so order does not matter,
    and sorting keeps padding near zero)."""
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    return [
        collate([items[i] for i in order[start : start + batch_size]]) for start in range(0, len(order), batch_size)
    ]


def right_pad(sequences: list[list[int]], pad_value: int) -> torch.Tensor:
    """Right-pad lists of ints into a (batch, longest) tensor."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


# -------------------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class Schedule:
    """How long `fit` trains, when it evaluates and saves, and which adapter it keeps: the settings sft, rm
    and dpo take from their config the same way (`Schedule.of`)."""

    total_steps: int
    grad_accum: int
    max_grad_norm: float
    eval_every: int
    save_every: int
    keep: str
    """Which adapter is kept: "best" (the lowest eval loss) or "last"; `fit` keeps the last whenever there is
    nothing to evaluate on."""

    @classmethod
    def of(cls, config, total_steps: int) -> Schedule:
        """A training step's schedule: `total_steps` optimizer steps, the rest from its config's flags."""
        return cls(
            total_steps, config.grad_accum, config.max_grad_norm, config.eval_every, config.save_every, config.keep
        )


@dataclass
class FitResult:
    """What `fit` reports back: the final metrics and the adapter that was kept."""

    metrics: dict[str, float]
    steps: int
    kept: str


def fit(
    run: RunFolder,
    trainable: Trainable,
    schedule: Schedule,
    *,
    batches_for_epoch: Callable[[int], list[Batch]],
    loss_fn: LossFn,
    evaluate: Callable[[Any], dict[str, float]] | None,
    save_adapter: Callable[[Any, Path], None],
    description: str,
    weight_of: Callable[[Batch], float] | None = None,
    eval_key: str = "eval/loss",
) -> FitResult:
    """Train for `schedule.total_steps` optimizer steps; evaluate every `eval_every`; checkpoint every
    `save_every`.

    `batches_for_epoch(e)` returns this process's micro-batches of epoch e, always in the same order.
    `evaluate(model)` gives the eval metrics, None when there is no eval split (the last adapter is kept).
    `eval_key` is the eval metric to minimise when `keep` is "best". `weight_of(batch)` is how many items
    the batch's loss is a mean over (e.g. labelled tokens); given, each step's loss is the exact mean over
    all items of all micro-batches on all processes, so N processes train like one with an N times larger batch.
    """
    model, optimizer, scheduler, accelerator = (
        trainable.model,
        trainable.optimizer,
        trainable.scheduler,
        trainable.accelerator,
    )
    total_steps, grad_accum, max_grad_norm = schedule.total_steps, schedule.grad_accum, schedule.max_grad_norm
    eval_every, save_every = schedule.eval_every, schedule.save_every
    keep = schedule.keep if evaluate is not None else "last"
    checkpoint = Checkpointer(run, trainable)
    step, best = checkpoint.restore() if run.resuming else (0, math.inf)
    if run.resuming:
        info(f"Resuming from step {step} of {total_steps}")
    metrics: dict[str, float] = {}
    tokens_seen, started = 0, time.time()
    model.train()
    cached_epoch, batches = 0, batches_for_epoch(0)
    steps_per_epoch = max(1, len(batches) // grad_accum)
    with progress(description, total=total_steps) as bar, StopSignals() as stop:
        bar.set_completed(step)
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, batches_for_epoch(epoch)
            group = batches[position * grad_accum : (position + 1) * grad_accum]
            step_began = time.perf_counter()
            step_metrics = mean_over_processes(accelerator, accumulate(model, accelerator, loss_fn, group, weight_of))
            if not math.isfinite(step_metrics["loss"]):
                raise Diverged(step + 1, step_metrics["loss"], checkpoint.latest())
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used (logged as TRL logs it)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = step_metrics.pop("tokens", 0)
            tokens_seen += step_tokens
            rate = tokens_seen / max(time.time() - started, 1e-6)
            metrics = {
                "loss/train": step_metrics.pop("loss"),
                "train/lr": step_lr,
                "train/grad_norm": float(grad_norm),
                "train/tokens": step_tokens,
                "train/tokens_per_s": rate,
                **{f"train/{k}": v for k, v in step_metrics.items()},
            }
            metrics["time/step"] = time.perf_counter() - step_began
            if step % eval_every == 0 or step == total_steps:
                evaluating = time.perf_counter()
                metrics.update(evaluate(model) if evaluate is not None else {})
                metrics["time/eval"] = time.perf_counter() - evaluating
                model.train()
                if keep == "best" and metrics[eval_key] < best:
                    best = metrics[eval_key]
                    if accelerator.is_main_process:
                        save_adapter(accelerator.unwrap_model(model), checkpoint.best_dir)
            run.log_metrics(step, metrics)
            bar.advance(
                1,
                loss=metrics["loss/train"],
                lr=metrics["train/lr"],
                tok_s=round(rate),
                **({eval_key: metrics[eval_key]} if eval_key in metrics else {}),
            )
            checkpoint.end_of_step(step, best, total=total_steps, every=save_every, stop=stop)
    kept = "best" if keep == "best" and checkpoint.best_dir.exists() else "last"
    if accelerator.is_main_process:
        with artifacts.atomic_folder(run.path / "adapter") as tmp:
            if kept == "best":
                shutil.copytree(checkpoint.best_dir, tmp, dirs_exist_ok=True)
            else:
                save_adapter(accelerator.unwrap_model(model), tmp)
    accelerator.wait_for_everyone()
    return FitResult(metrics, step, kept)


def accumulate(
    model, accelerator, loss_fn: LossFn, group: list[Batch], weight_of: Callable[[Batch], float] | None = None
) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step; returns their averaged metrics.

    Micro-batch i's loss (a mean over w_i items) is scaled by w_i / W, W the sum of all w over the step's
    micro-batches on every process, times the number of processes because DDP averages gradients over them.
    With no `weight_of`, every micro-batch weighs the same.
    """
    weights = [float(weight_of(batch)) if weight_of else 1.0 for batch in group]
    world = accelerator.num_processes
    total_weight = sum(weights)
    if world > 1:
        total_weight = float(accelerator.reduce(torch.tensor(total_weight, device=accelerator.device), "sum"))
    totals: dict[str, float] = {}
    for index, (batch, weight) in enumerate(zip(group, weights)):
        last = index == len(group) - 1
        scale = weight / max(total_weight, 1e-12) * world
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss, metrics = loss_fn(model, batch)
            accelerator.backward(loss * scale)
        totals["loss"] = totals.get("loss", 0.0) + loss.item() * scale  # averaged over processes: the exact mean
        for name, value in metrics.items():
            share = 1 if name == "tokens" else len(group)  # tokens add up; other metrics average
            totals[name] = totals.get(name, 0.0) + value / share
    return totals


def mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Average each metric over the processes of a data-parallel run (tokens are summed)."""
    summed = distributed.sum_stats(accelerator, metrics)
    return {name: total if name == "tokens" else total / accelerator.num_processes for name, total in summed.items()}


class Diverged(UserError):
    """The loss became NaN or infinite: stop, and say where the last good checkpoint is."""

    def __init__(self, step: int, loss: float, last_good: Path | None):
        super().__init__(
            f"Training diverged: the loss became {loss} at step {step}",
            where=str(last_good) if last_good else "before the first checkpoint",
            fix="Lower --lr (or raise --warmup-ratio) and rerun with --force; the last good checkpoint is kept",
        )


# ------------------------------------------------------------------------------------------ checkpoints


def load_trainable_policy(config, source: models.ModelSource, device, tokenizer=None):
    """The base model (quantised as configured) with a trainable LoRA adapter, and its tokenizer (loaded
    unless the caller already has it).

    A run folder as --model continues from that run's adapter; otherwise a new adapter is attached.
    """
    from peft import PeftModel, get_peft_model

    tokenizer = tokenizer or models.load_tokenizer(source)
    base = models.load_base_model(source, config.quantization, device)
    base = prepare_for_training(base, config.quantization, config.gradient_checkpointing)
    if source.adapter is not None:
        model = PeftModel.from_pretrained(base, str(source.adapter), is_trainable=True)
    else:
        model = get_peft_model(base, models.lora_config(config))
    return model, tokenizer
