"""`instruct prepare-data`: raw files in common formats -> a data folder of canonical JSONL splits.

Reading happens in three small stages, each with one owner:

1. `read_source` (formats.py): a file or folder -> raw rows (dicts), each with where it came from (file, line).
   JSON, JSONL, CSV, Parquet, plain text, a `datasets.save_to_disk` folder, or a `labels/` folder.
2. `detect_format` + `CONVERTERS` (formats.py): one raw row -> one canonical record, by input format:
   sft `{"messages"}`, prefs `{"prompt", "chosen", "rejected"}` or `{"prompt", "responses", "ranking"}`,
   prompts `{"prompt"}`. A row that cannot be converted raises `Malformed`. `extra_fields` keeps the fields the
   format did not read, the columns a prompts row carries (e.g. `answer`) for reward functions.
3. `run` (stages.py): converts every row, turns records into the requested task, drops empty, duplicate, too
   long, malformed and flagged (by a labeler) rows, counted by reason, splits train/eval with a seed, and
   writes the folder atomically with a manifest (sources + sha256, format, counts, drops, token-length
   statistics). What one row goes through (as a task's row, --system, why it is dropped, its conversations),
   the split and the length statistics are rows.py's.

Every training step reads a data folder through core/data_folders.py's `read_split`, which refuses an
incomplete folder and says how to make the split that is missing.
"""

from instruct_cli.steps.prepare_data.formats import Malformed, convert, detect_format, read_source
from instruct_cli.steps.prepare_data.rows import (
    add_system,
    as_task,
    check_row,
    conversations_of,
    length_stats,
    split_rows,
)
from instruct_cli.steps.prepare_data.stages import run

__all__ = [
    "Malformed",
    "add_system",
    "as_task",
    "check_row",
    "conversations_of",
    "convert",
    "detect_format",
    "length_stats",
    "read_source",
    "run",
    "split_rows",
]
