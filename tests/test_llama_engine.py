"""`instruct generate --engine llama.cpp`: the same answers as the transformers engine from a GGUF written once
into the cache, seeded sampling, and clear errors. The llama.cpp tests skip where llama-cpp-python (an optional
install that compiles llama.cpp) is missing; the errors are tested everywhere."""

import importlib.util
import json
import os

import pytest
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import chat, llama_engine, models
from instruct_cli.core.config import SamplingOptions
from tests.test_export_gguf import FACTS, greedy, merged_reference, prompt_ids, tiny_run  # noqa: F401 (fixture)
from tests.test_export_gguf import invoke_fails as fails

runner = CliRunner()
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)


def test_missing_binding_is_a_one_paragraph_error(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(llama_engine, "available", lambda: False)
    message = fails("generate", "--engine", "llama.cpp", "--model", tiny_model_dir, "hi")
    assert "needs llama-cpp-python" in message and "pip install" in message


def test_quantization_and_device_do_not_apply_to_llama_cpp(tiny_model_dir):
    assert "does not apply to the llama.cpp engine" in fails(
        "generate", "--engine", "llama.cpp", "--quantization", "nf4", "--model", tiny_model_dir, "hi"
    )
    assert "does not apply to the llama.cpp engine" in fails(
        "chat", "--engine", "llama.cpp", "--quantization", "nf4", "--model", tiny_model_dir
    )
    if llama_engine.available():
        assert "--device cuda is not supported" in fails(
            "generate", "--engine", "llama.cpp", "--device", "cuda", "--model", tiny_model_dir, "hi"
        )
    assert "engine" in fails("generate", "--engine", "vllm", "--model", tiny_model_dir, "hi")


@needs_llama_cpp
def test_greedy_answers_equal_the_merged_models(tmp_path, monkeypatch, tiny_run):  # noqa: F811
    """A run's adapter merged, written as an f32 GGUF once, then llama.cpp's greedy tokens = transformers'."""
    monkeypatch.setenv("INSTRUCT_CACHE", str(tmp_path / "cache"))
    engine, written = llama_engine.load(str(tiny_run), gguf_type="f32", context=128)
    assert written and engine.path.is_file() and engine.path.parent == tmp_path / "cache" / "gguf"
    assert not list(engine.path.parent.glob(".*partial"))
    reference, tokenizer = merged_reference(tiny_run)
    for question, _ in FACTS:
        want = greedy(reference, prompt_ids(tokenizer, question), 8, tokenizer.eos_token_id)
        want = [t for t in want if t != tokenizer.eos_token_id]
        got = engine.answer(chat.to_messages(question), SamplingOptions(max_new_tokens=8, greedy=True))
        assert got == tokenizer.decode(want, skip_special_tokens=True), question
    again, written = llama_engine.load(str(tiny_run), gguf_type="f32", context=128)
    assert not written and again.path == engine.path  # cached: the second call does not write it again


@needs_llama_cpp
def test_seeded_sampling_repeats_and_streams_what_it_returns(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("INSTRUCT_CACHE", str(tmp_path / "cache"))
    engine, _ = llama_engine.load(str(tiny_model_dir), context=128)
    messages = chat.to_messages("Say hello.")
    flags = dict(max_new_tokens=12, greedy=False, temperature=1.5, top_p=1.0, top_k=0)
    pieces: list[str] = []
    first = engine.answer(messages, SamplingOptions(**flags, seed=3), on_text=pieces.append)
    assert "".join(pieces) == first
    assert engine.answer(messages, SamplingOptions(**flags, seed=3)) == first
    others = {engine.answer(messages, SamplingOptions(**flags, seed=seed)) for seed in range(4, 10)}
    assert others - {first}, "six other seeds all gave the same answer"


@needs_llama_cpp
def test_cli_streams_one_answer_and_writes_a_batch(tmp_path, monkeypatch, tiny_run):  # noqa: F811
    """The command's answers are the engine's (an f16 GGUF written by the first call, reused by the next)."""
    monkeypatch.setenv("INSTRUCT_CACHE", str(tmp_path / "cache"))
    questions = [q for q, _ in FACTS[:3]]
    result = runner.invoke(
        app, ["generate", "--engine", "llama.cpp", "--model", str(tiny_run), "--greedy", questions[1]]
    )
    assert result.exit_code == 0, result.output
    assert "written as" in result.output and "f16.gguf" in result.output
    engine, written = llama_engine.load(str(tiny_run))
    assert not written
    flags = SamplingOptions(max_new_tokens=256, greedy=True)
    want = [engine.answer(chat.to_messages(q), flags) for q in questions]
    engine.close()
    assert want[1] and want[1] in result.output
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    out = tmp_path / "answers.jsonl"
    args = ["-i", str(tmp_path / "prompts.jsonl"), "-o", str(out)]
    result = runner.invoke(app, ["generate", "--engine", "llama.cpp", "--model", str(tiny_run), "--greedy", *args])
    assert result.exit_code == 0, result.output
    assert "written as" not in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"][-1]["content"] for r in rows] == questions
    assert [r["response"] for r in rows] == [w.strip() for w in want]


def test_cached_path_changes_with_the_adapter(tmp_path, monkeypatch, tiny_run):  # noqa: F811
    """A retrained adapter (other bytes) gets its own GGUF; the same adapter finds the one written before."""
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("INSTRUCT_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    before = llama_engine.cached_path(models.resolve_model(str(copy)))
    assert llama_engine.cached_path(models.resolve_model(str(copy))) == before
    weights = next(models.resolve_model(str(copy)).adapter.rglob("*.safetensors"))
    save_file({k: v + 1e-3 for k, v in load_file(weights).items()}, weights)
    assert llama_engine.cached_path(models.resolve_model(str(copy))) != before


def test_the_gguf_appears_whole_or_not_at_all(tmp_path, monkeypatch, tiny_run):  # noqa: F811
    """A write that fails leaves neither the file nor its partial copy; a copy left by a killed process
    (SIGKILL runs no cleanup) is never read as the model and is removed by the next write."""
    import subprocess
    import sys

    from instruct_cli.core import gguf_file

    monkeypatch.setenv("INSTRUCT_CACHE", str(tmp_path / "cache"))
    source = models.resolve_model(str(tiny_run))
    tokenizer = models.load_tokenizer(source)
    path = llama_engine.cached_path(source, "f32")
    real_write = gguf_file.write

    def write_then_fail(model, tokenizer, partial, *args, **kwargs):
        real_write(model, tokenizer, partial, *args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_file, "write", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        llama_engine.gguf_for(source, tokenizer, "f32")
    assert not path.exists() and not list(path.parent.glob(".*.partial"))
    monkeypatch.setattr(gguf_file, "write", real_write)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = path.with_name(f".{path.name}.{int(dead.stdout)}.partial")
    orphan.write_bytes(b"GGUF half")
    busy = path.with_name(f".{path.name}.{os.getppid()}.partial")  # a live writer's copy stays
    busy.write_bytes(b"GGUF busy")
    written, now = llama_engine.gguf_for(source, tokenizer, "f32")
    assert now and written == path and path.stat().st_size > 1000
    assert not orphan.exists() and busy.exists()


@needs_llama_cpp
def test_chat_answers_with_the_engine_and_keeps_the_conversation(tmp_path, monkeypatch, tiny_run):  # noqa: F811
    """`instruct chat --engine llama.cpp` from a pipe: each answer is the engine's answer to the whole
    conversation so far (the second message sees the first exchange)."""
    monkeypatch.setenv("INSTRUCT_CACHE", str(tmp_path / "cache"))
    first, second = FACTS[0][0], FACTS[1][0]
    result = runner.invoke(
        app,
        ["chat", "--engine", "llama.cpp", "--model", str(tiny_run), "--greedy", "--max-new-tokens", "8"],
        input=f"{first}\n{second}\n",
    )
    assert result.exit_code == 0, result.output
    engine, written = llama_engine.load(str(tiny_run))
    assert not written  # the chat wrote it
    flags = SamplingOptions(max_new_tokens=8, greedy=True)
    one = engine.answer(chat.to_messages(first), flags)
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": one.strip()},
        {"role": "user", "content": second},
    ]
    two = engine.answer(chat.to_messages(history), flags)
    engine.close()
    assert one.strip() and two.strip()
    assert f"{one}\n{two}\n" in result.stdout
