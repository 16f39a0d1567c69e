"""`instruct label`: sample K responses per prompt and collect a person's ranking of them in the terminal.

InstructGPT's reward model learns from labelers who rank K sampled responses to each prompt. This command
closes that loop: it samples the K responses with an SFT run (in a background thread, ahead of the labeler),
shows one prompt at a time, reads a ranking typed as `2 1 4 3` (or `2>1>4>3`, ties as `2 1=4 3`), and
appends every judgment to the labels folder the moment it is typed (its files are described in `store`).

Without a terminal (stdin or stderr not a TTY) the screen degrades to plain text and commands are read line by
line from stdin, so a session can be scripted: `printf '2 1 3 4\\nq\\n' | instruct label ...`.

The package, one concern per module (an arrow is "may import"; nothing imports upwards, no cycles):
  commands  what the labeler types: Command, OrderError, parse_command, parse_order, format_order, key help.
  store     the labels folder on disk: rankings.jsonl, samples.jsonl, undone.jsonl, the lock, the manifest.
            -> commands
  sampler   the prompts still to judge (Queue) and the background thread that samples them (Sampler).
            -> store
  ui        the screen: TerminalUI (rich), PlainUI (pipes), fitting text to the terminal. -> commands
  stats     agreement between labelers (pairwise, Kendall tau-b) and `--stats`. -> store
  session   `run` and the labeling loop that ties the others together. -> all of the above
All of them may use instruct_cli.core, never another step. This module only re-exports the names the cli
and the tests use, so `from instruct_cli.steps import label; label.run(...)` keeps working.
"""

from instruct_cli.steps.label.commands import Command, OrderError, format_order, parse_command, parse_order
from instruct_cli.steps.label.session import Session, run
from instruct_cli.steps.label.stats import agreement, kendall_tau, levels, pairwise_agreement
from instruct_cli.steps.label.store import (
    RANKINGS,
    SAMPLES,
    UNDONE,
    SampleStore,
    append_judgment,
    live_judgments,
    undo_judgment,
    undo_last,
)
from instruct_cli.steps.label.ui import clip, line_budgets, printable

__all__ = [
    "RANKINGS",
    "SAMPLES",
    "UNDONE",
    "Command",
    "OrderError",
    "SampleStore",
    "Session",
    "agreement",
    "append_judgment",
    "clip",
    "format_order",
    "kendall_tau",
    "levels",
    "line_budgets",
    "live_judgments",
    "pairwise_agreement",
    "parse_command",
    "parse_order",
    "printable",
    "run",
    "undo_judgment",
    "undo_last",
]
