"""Checkpoints and stops: what makes `--resume` continue exactly, however a run was interrupted.

Consistency by construction: a checkpoint is written only at a step boundary (after the step's update, its
metrics row and its eval), and it holds everything the next step depends on: the trainable weights, the
optimizer, the scheduler, the loss scaler (fp16), extra state such as PPO's KL controller, and the random
state of EVERY process. A resumed run therefore replays exactly the steps an uninterrupted run would take.

How a run stops:
    Ctrl-C or SIGTERM   `StopSignals` records the request; the loop finishes the step it is in, writes a
                        checkpoint at that boundary and stops (all processes agree on the boundary).
    Ctrl-C again        stops at once (KeyboardInterrupt); resume then starts from the last checkpoint.
    SIGKILL, a crash    the same: the last checkpoint on disk is a consistent one.
On resume the metrics log is cut back to the checkpoint's step, so redone steps are not logged twice.
May use: artifacts, console, errors.
"""

from __future__ import annotations

import math
import random
import signal
import threading
from pathlib import Path

import torch

from instruct_cli.core.artifacts import RunFolder
from instruct_cli.core.console import info, warn
from instruct_cli.core.errors import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary
    instead of killing it mid-step; the same signal again stops at once. Use as a context manager."""

    def __init__(self):
        self.requested_by: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.requested_by == name:
            raise KeyboardInterrupt  # the same signal again: stop now
        if self.requested_by is not None:
            return  # torchrun answers Ctrl-C by sending its workers SIGTERM: still one request
        self.requested_by = name
        info(f"{self.requested_by}: stopping after this step and saving a checkpoint (again to stop at once)")

    def should_stop(self, accelerator) -> bool:
        """True when any process was asked to stop (so that all of them stop at the same boundary)."""
        asked = self.requested_by is not None
        if accelerator.num_processes == 1:
            return asked
        flag = torch.tensor([1.0 if asked else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Stopped(KeyboardInterrupt):
    """The run stopped at a step boundary on request, with a checkpoint written there."""


class Checkpointer:
    """Saves and restores everything --resume needs; keeps the two newest checkpoints.

    `save` must be called by every process at the same step boundary (it gathers their random states);
    only the main process writes."""

    KEEP = 2

    def __init__(self, run: RunFolder, trainable, extra=None):
        self.run = run
        self.trainable = trainable
        self.extra = extra  # anything else with state_dict/load_state_dict (PPO's KL controller)
        self.folder = run.checkpoints
        self.best_dir = self.folder / "best-adapter"

    def latest(self) -> Path | None:
        """The newest checkpoint file, if any."""
        files = sorted(self.folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        return files[-1] if files else None

    def save(self, step: int, best: float) -> None:
        """Write checkpoint `step` (at the boundary after step `step`), atomically."""
        accelerator = self.trainable.accelerator
        rng = [rng_state()]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)  # one per process, in process order
        if not accelerator.is_main_process:
            return
        scaler = getattr(accelerator, "scaler", None)
        state = {
            "step": step,
            "best": best,
            "trainable": {name: p.detach().cpu() for name, p in self._optimized_parameters().items()},
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "optimizer": self.trainable.optimizer.state_dict(),
            "scheduler": self.trainable.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"step-{step}.pt"
        tmp = target.with_suffix(".pt.tmp")
        try:
            torch.save(state, tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        files = sorted(self.folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        for old in files[: -self.KEEP]:
            old.unlink()

    def end_of_step(self, step: int, best: float, *, total: int, every: int, stop: StopSignals) -> None:
        """At the boundary after step `step`: when a stop was asked for, checkpoint here and raise Stopped;
        otherwise checkpoint every `every` steps (the last step's result is the run's output, not a checkpoint)."""
        if stop.should_stop(self.trainable.accelerator):
            self.save(step, best)
            raise Stopped
        if step % every == 0 and step < total:
            self.save(step, best)

    def restore(self) -> tuple[int, float]:
        """Load the newest checkpoint into the trainable; returns (step, best eval value). The metrics log is
        cut back to that step."""
        latest = self.latest()
        if latest is None:
            warn("No checkpoint to resume from; starting at step 0")
            self.run.truncate_log(0)
            return 0, math.inf
        state = torch.load(latest, map_location="cpu", weights_only=False)
        parameters = self._optimized_parameters()
        if set(state["trainable"]) != set(parameters) or any(
            value.shape != parameters[name].shape for name, value in state["trainable"].items()
        ):
            raise UserError(
                "The checkpoint does not fit this run's trainable weights (it was written with other "
                "LoRA settings or by another version of instruct)",
                where=str(latest),
                fix="Resume with the settings the run started with, or start it again with --force",
            )
        with torch.no_grad():
            for name, value in state["trainable"].items():
                parameters[name].copy_(value)
        self.trainable.optimizer.load_state_dict(state["optimizer"])
        self.trainable.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.trainable.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(self._my_rng(state["rng"], latest))
        if self.extra is not None and state.get("extra") is not None:
            self.extra.load_state_dict(state["extra"])
        self.run.truncate_log(state["step"])
        return state["step"], state["best"]

    def _my_rng(self, saved: list | dict, where: Path) -> dict:
        """This process's random state from a checkpoint (one per process that wrote it)."""
        accelerator = self.trainable.accelerator
        saved = saved if isinstance(saved, list) else [saved]
        if len(saved) != accelerator.num_processes:
            raise UserError(
                f"The checkpoint was written by {len(saved)} process(es), and this run has "
                f"{accelerator.num_processes}: each process's random stream cannot be continued exactly",
                where=str(where),
                fix=f"Resume with {len(saved)} process(es) (accelerate launch --num_processes {len(saved)}), "
                "or start over with --force",
            )
        return saved[accelerator.process_index]

    def _optimized_parameters(self) -> dict[str, torch.nn.Parameter]:
        # the parameters the optimizer updates, by name (requires_grad is not a guide: peft's set_adapter
        # switches it per active adapter)
        model = self.trainable.accelerator.unwrap_model(self.trainable.model)
        optimized = {id(p) for group in self.trainable.optimizer.param_groups for p in group["params"]}
        return {name: p for name, p in model.named_parameters() if id(p) in optimized}


def rng_state() -> dict:
    """Every RNG a training step draws from."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
