"""Shared fixtures: a tiny random chat model built once per session, and an isolated, offline cache."""

import os

import pytest

from instruct_cli.tiny import build_tiny_model

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
