"""Tables on stdout: fixed-width (bench_sft, bench_rm, bench_ppo, bench_generate) and markdown (bench_plan),
with the number formatting and the instruct / TRL ratios they share."""

from __future__ import annotations


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A plain fixed-width table (stdout)."""
    cells = [header] + [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\n{title}")
    print(line)
    for index, row in enumerate(cells):
        print(" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print(line)
    print(line)


def ratio_row(a: list, b: list, skip=()) -> list:
    """The "instruct / TRL" row of two table rows (first column a label; columns in `skip` left blank)."""
    return ["instruct / TRL"] + ["" if i in skip else ratio(x, y) for i, (x, y) in enumerate(zip(a, b)) if i > 0]


def ratio(a, b) -> float:
    try:
        return a / b
    except (TypeError, ZeroDivisionError):
        return float("nan")


def print_markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A markdown table (pastes into an issue or the README as it is)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
