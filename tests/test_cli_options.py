"""One declaration per setting: a config field alone gives its flag, `--help` line with the default, recipe key
and range check; every config-built command shows its defaults; the method tables give the CLI's choices."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import typer
import typer.main
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.cli.app import handles_user_errors
from instruct_cli.cli.options import config_command
from instruct_cli.core import config as cfg
from instruct_cli.core import methods, settings
from instruct_cli.core.settings import Range, setting
from instruct_cli.core.step_table import STEPS


@dataclass
class WithMargin(cfg.GenerateConfig):
    """GenerateConfig plus one new field, declared once."""

    simpo_gamma: float = setting(1.5, allowed=Range(low=0.0))
    """SimPO's target reward margin (may exceed 1)."""


def tiny_app(received: list) -> typer.Typer:
    tiny = typer.Typer(rich_markup_mode="rich")

    @tiny.command()
    @handles_user_errors
    @config_command(WithMargin, "generate")
    def generate(config: WithMargin) -> None:
        """Record the config."""
        received.append(config)

    @tiny.command()
    def other() -> None:
        """A second command, so that typer keeps the command names."""

    return tiny


def test_a_new_field_is_a_flag_a_recipe_key_and_a_range_check(tmp_path):
    received: list = []
    runner = CliRunner()
    tiny = tiny_app(received)

    help_text = " ".join(runner.invoke(tiny, ["generate", "--help"], env={"COLUMNS": "300"}).output.split())
    assert "--simpo-gamma" in help_text and "SimPO's target reward margin (may exceed 1). [default: 1.5]" in help_text

    assert runner.invoke(tiny, ["generate", "--simpo-gamma", "2.5"]).exit_code == 0
    assert received[-1].simpo_gamma == 2.5  # above 1: the range is the field's, not a global list of names

    recipe = tmp_path / "r.yaml"
    recipe.write_text("generate:\n  simpo_gamma: 3\n")
    assert runner.invoke(tiny, ["generate", "--recipe", str(recipe)]).exit_code == 0
    assert received[-1].simpo_gamma == 3.0
    assert runner.invoke(tiny, ["generate"]).exit_code == 0
    assert received[-1].simpo_gamma == 1.5

    result = runner.invoke(tiny, ["generate", "--simpo-gamma", "-1"])
    assert result.exit_code == 2 and "`simpo_gamma` must be at least 0, not -1.0" in " ".join(result.output.split())
    assert len(received) == 3


def config_commands():
    """(command path, config class) of every command built from a config."""
    root = typer.main.get_command(app)
    classes = {step.name: step.config for step in STEPS.values()}
    classes.update(generate=cfg.GenerateConfig, chat=cfg.ChatConfig, label=cfg.LabelConfig)
    classes["rm score"] = cfg.RMScoreConfig
    for name, cls in classes.items():
        command = root
        for part in name.split():
            command = command.commands[part]
        yield name, command, cls


def test_every_config_flag_shows_its_default():
    for name, command, cls in config_commands():
        by_name = {param.name: param for param in command.params}
        for field in dataclasses.fields(cls):
            default = settings.default_of(field)
            param = by_name[field.name]
            if default is None or default == []:
                continue
            assert "[default: " in (param.help or ""), f"instruct {name} {param.opts}: no default in --help"


def test_flags_keep_their_names_and_short_options():
    commands = {name: command for name, command, _ in config_commands()}
    opts = {name: {opt for param in command.params for opt in param.opts} for name, command in commands.items()}
    assert {"--model", "-m", "--data", "-d", "--out", "-o", "--gradient-checkpointing", "--resume"} <= opts["sft"]
    assert {"--input", "-i", "--out", "-o", "--strict"} <= opts["prepare-data"]
    assert {"--models", "-m", "--compare"} <= opts["eval"]
    assert {"--k", "-k", "--prompts", "-p", "--stats"} <= opts["label"]
    assert {"--sft", "--reward", "--advantage", "--samples-per-prompt"} <= opts["ppo"]


def test_method_choices_come_from_the_tables():
    assert typing.get_args(typing.get_type_hints(cfg.PPOConfig)["advantage"]) == tuple(methods.ADVANTAGE_ESTIMATORS)
    assert typing.get_args(typing.get_type_hints(cfg.DPOConfig)["loss"]) == tuple(methods.DPO_LOSSES)
    help_text = CliRunner().invoke(app, ["ppo", "--help"], env={"COLUMNS": "300"}).output
    assert "|".join(methods.ADVANTAGE_ESTIMATORS) in help_text
