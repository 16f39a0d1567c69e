"""The experiment trackers `--report-to` may name (those accelerate integrates) and the check of a list of them:
what the configs declare and trackers.py starts. May use: errors."""

from __future__ import annotations

import difflib

from instruct_cli.core.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
"""The experiment trackers accelerate integrates, for --report-to (trackers.py starts them)."""


def check_trackers(names: list[str], source: str) -> None:
    """--report-to names trackers accelerate knows, or is `none` alone."""
    for name in names:
        if name not in TRACKERS and name != "none":
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            raise UserError(
                f"Unknown experiment tracker `{name}` in report_to",
                where=source,
                fix=(f"Did you mean `{close[0]}`? " if close else "")
                + f"Use one or more of {', '.join(TRACKERS)} (comma-separated), or none",
            )
    if "none" in names and len(names) > 1:
        raise UserError(
            f"report_to lists `none` together with trackers ({', '.join(names)})",
            where=source,
            fix="Use none alone to report to no tracker, or list only the trackers",
        )
