"""Shared fixtures: a tiny random chat model built once per session, and an isolated, offline cache."""

import os

import pytest

from instruct_cli.core.tiny import build_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point INSTRUCT_CACHE at a temporary folder so tests neither read nor fill the user's cache."""
    path = tmp_path_factory.mktemp("instruct-cache")
    old = os.environ.get("INSTRUCT_CACHE")
    os.environ["INSTRUCT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("INSTRUCT_CACHE", None)
    else:
        os.environ["INSTRUCT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama chat model folder, built once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from several threads, and on a busy 2-core machine idle OpenMP threads
    spinning against other processes make them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sft_rm(tmp_path_factory, tiny_model_dir):
    """Data folders, an sft run and an rm run (from the sft run) on the tiny model, built once per session.

    The data: answers of 1-8 random words for sft, and preferences for short answers (1-3 words over 5-8),
    a preference a tiny model can act on (when to emit EOS), so PPO against this reward model can learn.
    """
    import json
    import random

    from typer.testing import CliRunner

    from instruct_cli.cli import app

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    words = "red blue green cat dog sun tree water stone bird fish rain hill road book lamp".split()
    root = tmp_path_factory.mktemp("sft-rm-pipeline")
    rng = random.Random(0)
    rows = {"sft": [], "prefs": [], "prompts": []}
    for _ in range(96):
        prompt = " ".join(rng.choices(words, k=3)) + "?"
        rows["sft"].append({"prompt": prompt, "completion": " ".join(rng.choices(words, k=rng.randint(1, 8)))})
        rows["prefs"].append(
            {
                "prompt": prompt,
                "chosen": " ".join(rng.choices(words, k=rng.randint(1, 3))),
                "rejected": " ".join(rng.choices(words, k=rng.randint(5, 8))),
            }
        )
        rows["prompts"].append({"prompt": prompt})
    folders = {}
    for task, task_rows in rows.items():
        raw = root / f"{task}.jsonl"
        raw.write_text("".join(json.dumps(row) + "\n" for row in task_rows))
        folders[f"data-{task}"] = root / f"data-{task}"
        invoke("prepare-data", "-i", raw, "-o", folders[f"data-{task}"], "--task", task, "--model", tiny_model_dir)
    common = ["--quantization", "none", "--no-gradient-checkpointing", "--lora-dropout", "0"]
    invoke(
        "sft",
        "--model",
        tiny_model_dir,
        "--data",
        folders["data-sft"],
        "--out",
        root / "sft",
        "--max-steps",
        150,
        "--lr",
        "5e-3",
        *common,
    )
    invoke(
        "rm",
        "--model",
        root / "sft",
        "--data",
        folders["data-prefs"],
        "--out",
        root / "rm",
        "--max-steps",
        60,
        "--lr",
        "3e-3",
        "--batch-size",
        8,
        *common,
    )
    return {"root": root, "sft": root / "sft", "rm": root / "rm", "model": tiny_model_dir, **folders}
