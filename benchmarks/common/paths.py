"""Where things are: the benchmarks folder, the repository, and the interpreter and `instruct` command the
sides run (the project's .venv when there is one)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
ROOT = BENCH_DIR.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
INSTRUCT = str(VENV_BIN / "instruct") if (VENV_BIN / "instruct").exists() else shutil.which("instruct") or "instruct"
