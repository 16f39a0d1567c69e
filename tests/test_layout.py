"""The layout rules of DESIGN.md, checked: cli > steps > core (import-linter contracts in pyproject.toml),
no module over 600 lines, a docstring at the top of every module."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "instruct_cli"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def test_import_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_step_importing_another_step_breaks_the_contracts(tmp_path):
    """The contracts can fail: a copy of the package where ppo imports sft is refused."""
    shutil.copytree(PACKAGE, tmp_path / "instruct_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    ppo = tmp_path / "instruct_cli" / "steps" / "ppo" / "update_step.py"
    ppo.write_text(ppo.read_text() + "\nfrom instruct_cli.steps import sft  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "instruct_cli.steps.ppo.update_step -> instruct_cli.steps.sft" in result.stdout


def test_no_module_is_over_600_lines():
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: lines for path, lines in sizes.items() if lines > 600} == {}


def test_every_module_opens_with_a_docstring():
    missing = [
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if path.read_text().strip() and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert missing == []
