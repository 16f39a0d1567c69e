"""Config building: recipe sections, flag overrides, strict validation with 'did you mean'."""

from pathlib import Path

import pytest

from instruct_cli.core import config as cfg
from instruct_cli.core import recipes, settings
from instruct_cli.core.errors import UserError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_recipe_section_flags_override_and_model_section(tmp_path):
    recipe = write(
        tmp_path / "r.yaml",
        "version: 1\nmodel:\n  base: ./m\n  quantization: none\ngenerate:\n  temperature: 0.3\n  max_new_tokens: 12\n",
    )
    (tmp_path / "m").mkdir()
    config = recipes.build_config(cfg.GenerateConfig, "generate", recipe, {"max_new_tokens": 5, "top_p": None})
    assert config.temperature == 0.3
    assert config.max_new_tokens == 5  # the flag wins
    assert config.top_p == 0.9  # neither given: the default
    assert config.quantization == "none"
    assert config.model == str(tmp_path / "m")  # relative to the recipe file


def test_unknown_key_names_file_key_and_nearest(tmp_path):
    recipe = write(tmp_path / "r.yaml", "generate:\n  temprature: 0.3\n")
    with pytest.raises(UserError) as info:
        recipes.build_config(cfg.GenerateConfig, "generate", recipe, {})
    message = info.value.paragraph()
    assert "temprature" in message and "temperature" in message and str(recipe) in message


def test_wrong_type_and_bad_value(tmp_path):
    recipe = write(tmp_path / "r.yaml", "generate:\n  max_new_tokens: many\n")
    with pytest.raises(UserError, match="max_new_tokens.*whole number"):
        recipes.build_config(cfg.GenerateConfig, "generate", recipe, {})
    with pytest.raises(UserError, match="temperature.*greater than 0"):
        recipes.build_config(cfg.GenerateConfig, "generate", None, {"temperature": 0.0})
    with pytest.raises(UserError, match="quantization.*nf4"):
        recipes.build_config(cfg.GenerateConfig, "generate", None, {"quantization": "nf5"})


def test_recipe_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        recipes.read_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="line 2"):
        recipes.read_recipe(write(tmp_path / "bad.yaml", "a: 1\n b: [\n"))
    with pytest.raises(UserError, match="version"):
        recipes.read_recipe(write(tmp_path / "v.yaml", "version: 99\n"))


def test_every_field_is_documented():
    for cls in (cfg.GenerateConfig, cfg.PrepareDataConfig):
        docs = settings.field_docs(cls)
        for field in cls.__dataclass_fields__:
            assert docs.get(field), f"{cls.__name__}.{field} has no docstring"


def test_to_recipe_dict_round_trips(tmp_path):
    config = recipes.build_config(cfg.GenerateConfig, "generate", None, {"input": tmp_path / "p.jsonl", "seed": 3})
    values = cfg.to_recipe_dict(config)
    assert values["input"] == str(tmp_path / "p.jsonl")
    again = recipes.make_config(cfg.GenerateConfig, values, source="recipe.yaml")
    assert again == config


def test_sections_of_commands_run_does_not_run_are_accepted_by_run(tmp_path):
    """A shared recipe may carry `generate:`, `chat:` and `label:` settings; `instruct run` reads past them."""
    steps = "version: 1\nprepare-data:\n  inputs: [raw.jsonl]\n  task: sft\n  out: data\n"
    recipe = write(tmp_path / "r.yaml", steps + "chat:\n  temperature: 0.2\ngenerate:\n  greedy: true\n")
    assert [task.step for task in recipes.read_tasks(recipe)] == ["prepare-data"]
    assert recipes.load_recipe_section(recipe, "chat", cfg.ChatConfig)["temperature"] == 0.2
    with pytest.raises(UserError, match="Unknown section `chats`"):
        recipes.read_tasks(write(tmp_path / "bad.yaml", steps + "chats:\n  temperature: 0.2\n"))


def test_a_recipes_reward_function_file_is_relative_to_the_recipe(tmp_path):
    recipe = write(tmp_path / "r.yaml", "ppo:\n  reward_fn: [rewards.py:correct, final_number]\n")
    config = recipes.build_config(cfg.PPOConfig, "ppo", recipe, {})
    assert config.reward_fn == [f"{tmp_path / 'rewards.py'}:correct", "final_number"]
