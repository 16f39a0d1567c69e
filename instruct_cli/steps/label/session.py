"""A labeling session: `run` (checks, the prompts, the folder, the sampler, the UI), the loop that shows prompts
and acts on what the labeler types, and the summary at the end.

The only module of the package that uses all the others (commands, store, sampler, ui, stats); it also uses
instruct_cli.core (artifacts, config, console, errors, data_folders).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from instruct_cli.core import artifacts
from instruct_cli.core.config import LabelConfig
from instruct_cli.core.console import console, info, summary_table
from instruct_cli.core.errors import UserError
from instruct_cli.steps.label.commands import OrderError, parse_command
from instruct_cli.steps.label.sampler import Queue, Sampler
from instruct_cli.steps.label.stats import kind_counts, show_stats
from instruct_cli.steps.label.store import (
    RANKINGS,
    SampleStore,
    append_judgment,
    check_samples_match,
    judgment_row,
    live_judgments,
    open_folder,
    undo_judgment,
)
from instruct_cli.steps.label.ui import Screen, pick_ui


def read_prompts(config: LabelConfig) -> list[list[dict]]:
    """The prompts to label: the chosen split of the --prompts data folder, cut to --max-prompts.

    Reads only JSON files (no torch), so a resumed session starts at once.
    """
    from instruct_cli.core import data_folders

    folder = Path(config.prompts)
    if folder.is_file():
        raise UserError(
            "--prompts takes a data folder, not a file",
            where=str(folder),
            fix=f"Make one with `instruct prepare-data -i {folder} --task prompts -o data/prompts`",
        )
    prompts = data_folders.read_prompts(folder, config.split, flag="--prompts")
    if not prompts:
        raise UserError(
            f"The {config.split} split of the data folder has no prompts",
            where=str(folder),
            fix="Pick the other split with --split, or prepare the data with more rows",
        )
    return prompts[: config.max_prompts] if config.max_prompts else prompts


def check_config(config: LabelConfig) -> None:
    """The checks the shared validation does not make."""
    if config.prompts is None or config.out is None:
        raise UserError(
            "`instruct label` needs --prompts (a data folder) and --out (the labels folder)",
            where="instruct label",
            fix="Run e.g. `instruct label --model runs/sft --prompts data/prompts --out labels/`, "
            "or `instruct label --stats labels/`",
        )
    if config.k < 2:
        raise UserError(
            f"--k must be at least 2 to rank anything, not {config.k}",
            where="--k",
            fix="Use --k 4 (InstructGPT sampled 4 to 9 responses per prompt)",
        )
    if config.max_prompts is not None and config.max_prompts <= 0:
        raise UserError(
            f"--max-prompts must be greater than 0, not {config.max_prompts}",
            where="--max-prompts",
            fix="Pass a positive number, or leave it out to label every prompt",
        )


@dataclass
class Session:
    """What this labeling session did."""

    labeler: str
    rows: list[dict] = field(default_factory=list)
    interrupted: bool = False


def default_labeler() -> str:
    """$USER, or the login name, or `anonymous`."""
    with contextlib.suppress(Exception):
        return os.environ.get("USER") or getpass.getuser()
    return "anonymous"


def run(config: LabelConfig) -> Session | None:
    """Label prompts (or, with --stats, summarise a labels folder). Returns the session (None for --stats)."""
    if config.stats is not None:
        show_stats(Path(config.stats))
        return None
    check_config(config)
    labeler = (config.labeler or default_labeler()).strip()
    if not labeler:
        raise UserError("The labeler name is empty", where="--labeler", fix="Pass --labeler NAME")
    prompts = read_prompts(config)
    open_folder(config)
    folder = Path(config.out)
    store = SampleStore(folder)
    check_samples_match(store, prompts, config)
    judged = {row["index"] for row in live_judgments(artifacts.read_jsonl(folder / RANKINGS), labeler)}
    queue = Queue([i for i in range(len(prompts)) if i not in judged])
    session = Session(labeler)
    if len(queue) == 0:
        info(f"Nothing left to label for {labeler}: all {len(prompts)} prompts of {config.prompts} are judged.")
        summarise(session, folder, len(prompts))
        return session
    ui = pick_ui()
    sampler = None
    try:
        if any(store.get(i) is None for i in queue.upcoming(len(queue))):
            sampler = Sampler(config, prompts, store, queue).start()
        label_loop(ui, queue, store, sampler, session, folder, total=len(prompts))
    except KeyboardInterrupt:
        session.interrupted = True
        console.print()
        info("Stopped (Ctrl-C). Every judgment made is saved; run the same command to go on.")
    finally:
        if sampler is not None:
            sampler.stop()
    summarise(session, folder, len(prompts))
    return session


def label_loop(
    ui, queue: Queue, store: SampleStore, sampler: Sampler | None, session: Session, folder: Path, total: int
) -> None:
    """Show prompts and read commands until every prompt is judged or the labeler quits.

    `total` is the number of prompts; the screen shows the labeler's place among them.
    """
    notice = None  # said under the next screen (an undo clears the screen it was typed on)
    while (index := queue.current()) is not None:
        if sampler is not None:
            sampler.check()
        sample = store.get(index)
        if sample is None:
            doing = "Sampling" if sampler.loaded else "Loading the model and sampling"
            with ui.waiting(f"{doing} the responses to prompt #{index} ..."):
                sample = sampler.wait_for(index)
        screen = Screen(
            sample, position=total - len(queue) + 1, total=total, labeler=session.labeler, judged=len(session.rows)
        )
        ui.show(screen)
        if notice:
            ui.say(notice, "cyan")
            notice = None
        started = time.monotonic()
        while True:
            typed = ui.ask()
            if typed is None:
                return  # end of input: as `q`
            try:
                command = parse_command(typed, len(sample["responses"]))
            except OrderError as exc:
                ui.say(str(exc))
                continue
            if command.action == "quit":
                return
            if command.action == "help":
                ui.help()
            elif command.action in ("more", "view"):
                ui.page(screen, command.response)
                if not ui.plain:
                    ui.show(screen)
            elif command.action == "undo":
                undone = undo_judgment(folder, session.labeler)
                if undone is None:
                    ui.say("Nothing to undo: you have no judgments in this folder yet.")
                    continue
                session.rows = [row for row in session.rows if row.get("id") != undone.get("id")]
                queue.push_front(undone["index"])
                notice = f"Undid your judgment of prompt #{undone['index']} ({undone.get('typed', '')})."
                break
            else:  # rank, skip, flag
                row = judgment_row(sample, session.labeler, command, typed, time.monotonic() - started)
                append_judgment(folder, row)
                session.rows.append(row)
                queue.pop()
                break


def summarise(session: Session, folder: Path, prompts: int) -> None:
    """The summary table at the end of a session."""
    live = live_judgments(artifacts.read_jsonl(folder / RANKINGS))
    mine = [row for row in live if row.get("labeler") == session.labeler]
    seconds = [row["seconds"] for row in session.rows if isinstance(row.get("seconds"), (int, float))]
    kinds = kind_counts(session.rows)
    summary_table(
        "label",
        {
            "labeler": session.labeler,
            "judged this session": f"{len(session.rows)} ({kinds['ranked']} ranked, {kinds['skipped']} skipped, "
            f"{kinds['flagged']} flagged)",
            f"judged by {session.labeler}": f"{len(mine)} of {prompts} prompts",
            "judgments in the folder": f"{len(live)} by {len({row.get('labeler') for row in live})} labeler(s)",
            "time per judgment (median)": f"{statistics.median(seconds):.1f} s" if seconds else "-",
            "rankings": str(folder / RANKINGS),
        },
    )
    if kinds["ranked"] and len(mine) < prompts:
        info(f"Run the same command again to go on from prompt {len(mine) + 1} of {prompts}.")
    if kinds["ranked"]:
        info(
            f"Train a reward model on them: instruct prepare-data -i {folder} --task prefs -o data/labelled "
            "&& instruct rm --data data/labelled --out runs/rm"
        )
