"""Experiment trackers (`--report-to tensorboard,wandb,mlflow,...`): every metrics.jsonl row, also sent to them.

Owns: the package each tracker needs and the error when it is missing (`require_installed`), and `RunTrackers`,
which a run folder holds while a training step writes it. The trackers are accelerate's own (`accelerate.
tracking`); they get the same grouped names and step as metrics.jsonl, the run's resolved config as
hyper-parameters and the run folder's name as the run name. TensorBoard writes into `<run>/tensorboard/`, so
`tensorboard --logdir runs/` shows every run.

A resumed run continues the same tracker run where the tracker can: TensorBoard writes a new event file in the
same folder that starts with a restart marker (SummaryWriter's `purge_step`), so a reader drops the steps that
the interrupted run logged after its checkpoint (metrics.jsonl drops them too); wandb resumes the run by id. May use:
artifacts (the run folder's layout), config, console, errors.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from instruct_cli.core.artifacts import TENSORBOARD
from instruct_cli.core.console import warn
from instruct_cli.core.errors import UserError
from instruct_cli.core.tracker_names import TRACKERS

PROJECT = "instruct"
"""The wandb project, mlflow experiment (MLFLOW_EXPERIMENT_NAME overrides it) and project of the other trackers."""

EXTRA_OF = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Trackers that instruct-cli installs as an extra: `pip install 'instruct-cli[NAME]'`."""


def active(names: list[str] | None) -> list[str]:
    """The trackers asked for, each once, in order (`none` asks for none)."""
    return list(dict.fromkeys(name for name in names or [] if name != "none"))


def install_command(name: str) -> str:
    """How to install what tracker `name` needs (each tracker's module and PyPI package are named like it)."""
    if name in EXTRA_OF:
        return f"pip install 'instruct-cli[{EXTRA_OF[name]}]'"
    return f"pip install {name}"


def is_installed(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require_installed(names: list[str] | None, where: str = "--report-to") -> None:
    """A UserError naming the extra to install when a tracker's package is missing (accelerate would only skip
    the tracker with a debug message). Called before the run folder is opened."""
    for name in active(names):
        if name in TRACKERS and not is_installed(name):
            raise UserError(
                f"--report-to {name} needs the `{name}` package, which is not installed",
                where=where,
                fix=f"Install it with `{install_command(name)}`, or leave {name} out of --report-to",
            )


def hyperparameters(config: dict[str, Any], kind: str) -> dict[str, Any]:
    """A resolved config as the flat scalars trackers take as hyper-parameters (TensorBoard's hparams accept
    numbers, strings and booleans only): lists become comma-separated strings, None becomes `null`."""
    flat: dict[str, Any] = {"kind": kind}
    for key, value in config.items():
        if value is None:
            value = "null"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        flat[key] = value
    return flat


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a row (what a tracker plots), as floats."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class RunTrackers:
    """The trackers of one run folder. They start at the first logged step (on a resumed run, the first step
    after the checkpoint, which TensorBoard needs to know), log every row, and finish with the run. Only the
    process that writes the run folder has one (accelerate's trackers log on the main process only)."""

    def __init__(self, names: list[str], run_dir: Path, hparams: dict[str, Any], run_id: str, resuming: bool):
        self.names = active(names)
        self.run_dir = Path(run_dir)
        self.hparams = hparams
        self.run_id = run_id
        self.resuming = resuming
        self.trackers: list = []
        self.started = False

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Send one metrics row to every tracker, at `step`."""
        if not self.started:
            self.start(step)
        values = scalars(metrics)
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def start(self, first_step: int) -> None:
        """Create and start the trackers; store the hyper-parameters, except on a tracker run that continues."""
        self.started = True
        for name in self.names:
            tracker = self.build(name, first_step)
            tracker.start()
            self.trackers.append(tracker)
            if not (self.resuming and name in ("tensorboard", "wandb")):  # these continue the same run
                tracker.store_init_configuration(self.hparams)

    def build(self, name: str, first_step: int):
        """accelerate's tracker `name`, set up for this run folder (not started)."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, MLflowTracker, TensorBoardTracker, WandBTracker

        run_name = self.run_dir.name
        if name == "tensorboard":
            # purge_step: the new event file begins with a restart marker at first_step, and a reader that honours
            # it (tensorboard's EventAccumulator, tested) drops what earlier files logged at that step or later
            resume = {"purge_step": first_step} if self.resuming else {}
            return TensorBoardTracker(TENSORBOARD, self.run_dir, **resume)
        if name == "wandb":
            return WandBTracker(PROJECT, name=run_name, id=self.run_id, resume="allow", dir=str(self.run_dir))
        if name == "mlflow":
            return MLflowTracker(experiment_name=PROJECT, run_name=run_name)
        tracker_class = LOGGER_TYPE_TO_CLASS[name]
        if tracker_class.requires_logging_directory:
            return tracker_class(PROJECT, self.run_dir)
        return tracker_class(PROJECT)

    def finish(self) -> None:
        """Close every tracker (flushes what is buffered). A tracker that fails to close is reported, not
        raised: the run's own files are already written."""
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - a tracker's network or disk trouble must not fail the run
                warn(f"The {tracker.name} tracker did not close cleanly: {exc}")
        self.trackers = []
        self.started = False


def attach(run, names: list[str] | None) -> None:
    """Give a run folder (opened by this process for writing) the trackers `names`; nothing when none."""
    names = active(names)
    if not names or not run.writer:
        return
    manifest = run.manifest
    # stable over --resume (`created` is kept), new after --force: wandb resumes the one and not the other
    run_id = hashlib.sha256(f"{Path(run.path).resolve()}|{manifest.get('created')}".encode()).hexdigest()[:16]
    hparams = hyperparameters(manifest.get("config") or {}, manifest.get("kind", ""))
    run.trackers = RunTrackers(names, run.path, hparams, run_id, resuming=run.resuming)
