"""What the CLI tests share: run a command that must succeed, or one that must fail on a bad input."""

from typer.testing import CliRunner

from instruct_cli.cli import app

runner = CliRunner()


def invoke(*args):
    """Run `instruct ARGS...` (any values, as text); it must succeed."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def fails(*args, user_traceback: bool = False) -> str:
    """Run a command that must fail on bad input: exit 2, a one-paragraph message, no frame of ours, and no
    traceback at all unless `user_traceback` (a user's own code that raised is shown its traceback); returns
    the message on one line."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "instruct_cli" not in result.output, result.output
    assert user_traceback or "Traceback" not in result.output, result.output
    return " ".join(result.output.split())
