"""console: plain progress lines where stderr is not a terminal; table cells are never read as markup."""

from instruct_cli.core import console as console_module
from instruct_cli.core.console import ProgressTask, print_table, progress


def test_progress_prints_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(ProgressTask, "PLAIN_LINE_EVERY_S", 0.0)
    with console_module.console.capture() as captured:
        assert not console_module.console.is_terminal
        with progress("training", total=4) as bar:
            for step in range(4):
                bar.advance(loss=1.0 / (step + 1))
    lines = [line for line in captured.get().splitlines() if line.startswith("training  ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], captured.get()
    assert "elapsed 0:00:00" in lines[0] and "loss 0.25" in lines[-1]


def test_progress_stays_quiet_between_plain_lines(monkeypatch):
    monkeypatch.setattr(ProgressTask, "PLAIN_LINE_EVERY_S", 3600.0)
    with console_module.console.capture() as captured:
        with progress("training", total=3) as bar:
            for _ in range(3):
                bar.advance()
    assert not [line for line in captured.get().splitlines() if line.startswith("training  ")]


def test_table_cells_are_plain_text():
    with console_module.console.capture() as captured:
        print_table("[bold]title[/bold]", ["a [b]"], [["[red]not markup[/red]"], ["[/oops]"]])
    text = captured.get()
    assert "[red]not markup[/red]" in text and "[/oops]" in text and "[bold]title[/bold]" in text
