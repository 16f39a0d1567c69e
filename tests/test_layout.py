"""The layout rules of DESIGN.md, checked: cli > steps > core (import-linter contracts in pyproject.toml),
no module over 600 lines, a docstring at the top of every module, no logic in a package's __init__.py -- in
the package and in benchmarks/ alike (where, besides, no function sets a module global at run time)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "instruct_cli"
BENCHMARKS = REPO / "benchmarks"
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


def logic_in(tree: ast.Module) -> list[str]:
    """What a module holds beyond a docstring, imports and `__all__`: each such top-level statement, by line."""
    found = []
    for index, node in enumerate(tree.body):
        docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        exports = isinstance(node, ast.Assign) and [ast.unparse(target) for target in node.targets] == ["__all__"]
        if not (docstring or exports or isinstance(node, (ast.Import, ast.ImportFrom))):
            found.append(f"line {node.lineno}: {type(node).__name__}")
    return found


def test_a_packages_init_only_documents_and_re_exports():
    logic = {
        str(path.relative_to(REPO)): found
        for path in PACKAGE.rglob("__init__.py")
        if (found := logic_in(ast.parse(path.read_text())))
    }
    assert logic == {}


def test_logic_in_an_init_is_found():
    tree = ast.parse(
        '"""Docs."""\nimport gc\nfrom x import y\n__all__ = ["y"]\nLIMIT = 3\ndef run():\n    pass\ngc.collect()\n'
    )
    assert logic_in(tree) == ["line 5: Assign", "line 6: FunctionDef", "line 8: Expr"]


def benchmark_modules() -> list[Path]:
    """benchmarks/ and its helper packages, without the TRL installed there for the benchmarks (.trl)."""
    return [path for path in BENCHMARKS.rglob("*.py") if ".trl" not in path.relative_to(BENCHMARKS).parts]


def test_benchmarks_are_checked():
    names = {str(path.relative_to(BENCHMARKS)) for path in benchmark_modules()}
    assert {"bench_sft.py", "bench_ppo.py", "common/__init__.py"} <= names


def test_no_benchmark_module_is_over_600_lines():
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in benchmark_modules()}
    assert {path: lines for path, lines in sizes.items() if lines > 600} == {}


def test_a_benchmark_packages_init_only_documents_and_re_exports():
    logic = {
        str(path.relative_to(REPO)): found
        for path in benchmark_modules()
        if path.name == "__init__.py" and (found := logic_in(ast.parse(path.read_text())))
    }
    assert logic == {}


def test_every_benchmark_module_opens_with_a_docstring():
    missing = [
        str(path.relative_to(REPO))
        for path in benchmark_modules()
        if path.read_text().strip() and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert missing == []


MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add", "remove"}


def run_time_globals(tree: ast.Module) -> list[int]:
    """Lines where a function rebinds a global (`global X`) or changes a module-level variable in place
    (`X[k] = v`, `X.update(...)`, `X.append(...)`, ...)."""
    names = {
        target.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    lines = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            changed = (
                isinstance(node, ast.Global)
                or (isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del))
                    and isinstance(node.value, ast.Name) and node.value.id in names)
                or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in names)
            )  # fmt: skip
            if changed:
                lines.append(node.lineno)
    return sorted(set(lines))


def test_no_benchmark_module_sets_globals_at_run_time():
    """Values a run needs (the model, the environment of its sides) are passed along, never left in a
    module global by main()."""
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for path in benchmark_modules()
        for line in run_time_globals(ast.parse(path.read_text()))
    ]
    assert found == []


def test_the_run_time_globals_check_can_fail():
    tree = ast.parse("X = 0\nENV = {}\ndef main():\n    global X\n    X = 1\n    ENV['a'] = 1\n    ENV.update(b=2)\n")
    assert run_time_globals(tree) == [4, 6, 7]
