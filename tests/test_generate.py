"""`instruct generate` through the real CLI on the tiny model: streaming, batches, run folders, bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import config, inference, models, recipes
from instruct_cli.core.errors import UserError
from tests.test_models import make_run_folder

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_single_prompt_streams_an_answer(tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--max-new-tokens", 8, "--greedy", "hello world")
    assert result.exit_code == 0, result.output
    assert len(result.stdout) > 1  # a random model says something (here newlines), and says it on stdout
    again = invoke("generate", "--model", tiny_model_dir, "--max-new-tokens", 8, "--greedy", "hello world")
    assert again.stdout == result.stdout  # greedy is deterministic


def test_prompt_from_stdin(tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--max-new-tokens", 4, "-", input="hello\n")
    assert result.exit_code == 0, result.output


def test_batch_prompts_from_stdin(tiny_model_dir):
    result = invoke(
        "generate",
        "--model",
        tiny_model_dir,
        "--max-new-tokens",
        4,
        "--input",
        "-",
        input='{"prompt": "one"}\n{"prompt": "two"}\n',
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["prompt"][-1]["content"] for row in rows] == ["one", "two"]


def test_batch_file_to_jsonl(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "one"}\n\n{"prompt": [{"role": "user", "content": "two two two"}]}\n{"prompt": "three"}\n'
    )
    out = tmp_path / "answers.jsonl"
    result = invoke(
        "generate",
        "--model",
        tiny_model_dir,
        "--input",
        prompts,
        "--output",
        out,
        "--max-new-tokens",
        5,
        "--batch-size",
        2,
        "--system",
        "Be brief.",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"][-1]["content"] for row in rows] == ["one", "two two two", "three"]
    assert all(row["prompt"][0] == {"role": "system", "content": "Be brief."} for row in rows)
    assert all(isinstance(row["response"], str) for row in rows)


def test_run_folder_uses_its_adapter(tmp_path, tiny_model_dir):
    run = make_run_folder(tmp_path, tiny_model_dir)
    base = invoke(
        "generate",
        "--model",
        tiny_model_dir,
        "--quantization",
        "none",
        "--greedy",
        "--max-new-tokens",
        12,
        "apple banana",
    )
    tuned = invoke(
        "generate", "--model", run, "--quantization", "none", "--greedy", "--max-new-tokens", 12, "apple banana"
    )
    assert tuned.exit_code == 0, tuned.output
    assert tuned.stdout != base.stdout  # the random adapter changes the greedy answer


def test_bad_inputs_are_one_paragraph_errors(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    cases = [
        (["generate", "--model", tiny_model_dir], "Give either a prompt or --input"),
        (["generate", "--model", tiny_model_dir, "--input", bad], "line 2"),
        (["generate", "--model", tiny_model_dir, "--input", tmp_path / "none.jsonl"], "does not exist"),
        (["generate", "--model", tmp_path / "nowhere", "hi"], "does not exist"),
        (["generate", "--model", tiny_model_dir, "--temperature", "-1", "hi"], "temperature"),
    ]
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output


def test_help_and_version():
    result = invoke("--help")
    for command in ("prepare-data", "sft", "rm", "ppo", "generate", "eval", "run"):
        assert command in result.output
    assert "instruct 0.1.0" in invoke("--version").output
    assert "Examples" in invoke("generate", "--help").output


# ------------------------------------------------------------------------------------ fast inference paths
def greedy_tokens(model, tokenizer, text="apple banana cherry", new_tokens=16):
    from instruct_cli.core import chat

    ids = torch.tensor([chat.encode_prompt(tokenizer, chat.to_messages(text))])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[0, ids.shape[1] :].tolist()


def count_merges(monkeypatch):
    """Count calls of inference.merge_adapter (the real one still runs)."""
    calls = []
    real = inference.merge_adapter

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "merge_adapter", counting)
    return calls


def test_merged_adapter_gives_the_unmerged_greedy_tokens(tmp_path, tiny_model_dir):
    from peft import PeftModel

    run = make_run_folder(tmp_path, tiny_model_dir)
    merged, tokenizer, _ = inference.load_for_inference(str(run), "none", "cpu")
    unmerged, _, _ = models.load_for_inference(str(run), "none", "cpu")
    base, _, _ = inference.load_for_inference(str(tiny_model_dir), "none", "cpu")
    assert not isinstance(merged, PeftModel) and isinstance(unmerged, PeftModel)
    tokens = greedy_tokens(merged, tokenizer)
    assert tokens == greedy_tokens(unmerged, tokenizer)
    assert tokens != greedy_tokens(base, tokenizer)  # the adapter is in the merged weights


def test_the_merge_is_cached_and_keyed_by_the_adapters_content(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file, save_file

    merges = count_merges(monkeypatch)
    run = make_run_folder(tmp_path, tiny_model_dir)
    shutil.rmtree(inference.ready_folder(models.resolve_model(str(run)), torch.float32), ignore_errors=True)
    first, tokenizer, source = inference.load_for_inference(str(run), "none", "cpu")
    folder = inference.ready_folder(source, first.dtype)
    assert len(merges) == 1 and (folder / inference.READY_RECORD).is_file()
    second, _, _ = inference.load_for_inference(str(run), "none", "cpu")
    assert len(merges) == 1  # read from the cache, not merged again
    assert greedy_tokens(second, tokenizer) == greedy_tokens(first, tokenizer)

    weights = run / models.ADAPTER_DIR / "adapter_model.safetensors"  # retrained in place: other content
    tensors = load_file(weights)
    save_file({name: tensor * 2 if "lora_B" in name else tensor for name, tensor in tensors.items()}, weights)
    third, _, _ = inference.load_for_inference(str(run), "none", "cpu")
    assert len(merges) == 2 and inference.ready_folder(source, first.dtype) != folder
    assert greedy_tokens(third, tokenizer) != greedy_tokens(first, tokenizer)


def test_an_interrupted_merge_leaves_nothing_in_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    run = make_run_folder(tmp_path, tiny_model_dir)
    source = models.resolve_model(str(run))
    folder = inference.ready_folder(source, torch.float32)
    shutil.rmtree(folder, ignore_errors=True)  # the same adapter (same seed) may be cached by an earlier test

    def killed(*args, **kwargs):  # the weights are written, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(inference.artifacts, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        inference.load_for_inference(str(run), "none", "cpu")
    assert not folder.exists() and not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")]
    monkeypatch.undo()
    merges = count_merges(monkeypatch)
    inference.load_for_inference(str(run), "none", "cpu")
    assert len(merges) == 1 and (folder / inference.READY_RECORD).is_file()


def test_old_merges_are_pruned_least_recently_used_first(tmp_path):
    folders = []
    for number in range(6):
        folder = tmp_path / f"m{number}"
        folder.mkdir()
        os.utime(folder, (1000 + number, 1000 + number))
        folders.append(folder)
    removed = inference.prune_ready(keep=folders[0], limit=3)
    assert sorted(removed) == [folders[1], folders[2]]  # m5, m4, m3 are newest; m0 is the one just written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m3", "m4", "m5"]


def test_old_gguf_files_are_pruned_too_and_writes_in_progress_kept(tmp_path):
    """The llama.cpp engine's cache holds files, not folders: the same rule applies to them."""
    files = []
    for number in range(5):
        path = tmp_path / f"g{number}-f16.gguf"
        path.write_bytes(b"GGUF")
        os.utime(path, (1000 + number, 1000 + number))
        files.append(path)
    partial = tmp_path / ".g9-f16.gguf.123.partial"
    partial.write_bytes(b"")
    os.utime(partial, (1, 1))
    removed = inference.prune_ready(keep=files[4], limit=2)
    assert sorted(removed) == files[:3] and partial.exists()


def test_auto_quantization_picks_the_fast_path_and_says_so(tiny_model_dir, monkeypatch):
    assert config.GenerateConfig().quantization == config.ChatConfig().quantization == "auto"
    assert config.LabelConfig().quantization == config.EvalConfig().quantization == "auto"
    assert config.SFTConfig().quantization == "nf4"  # training keeps its default
    cpu = torch.device("cpu")
    source = models.resolve_model(str(tiny_model_dir))
    choice = inference.choose("auto", source, cpu)
    assert (choice.quantization, choice.dtype) == ("none", inference.sampling_dtype(cpu)) and "auto:" in choice.reason
    assert inference.choose("auto", source, cpu, exact=True).dtype == torch.float32  # eval's log-probs
    assert inference.choose("nf4", source, cpu) == inference.Choice("nf4", torch.float32, cpu)  # as asked
    assert inference.choose("none", source, cpu) == inference.Choice("none", torch.float32, cpu)
    monkeypatch.setattr(inference, "native_bf16_cpu", lambda: True)
    assert inference.choose("auto", source, cpu).dtype == torch.bfloat16  # twice as fast where the CPU has bf16
    monkeypatch.setattr(inference, "free_memory", lambda device: 1000)  # the weights do not fit
    assert inference.choose("auto", source, cpu).quantization == "nf4"
    hub = models.ModelSource("someone/some-model", "someone/some-model", "0" * 64)
    assert inference.choose("auto", hub, cpu).quantization == "nf4"  # size unknown: 4-bit to be safe
    monkeypatch.undo()

    flags = ["generate", "--model", tiny_model_dir, "--greedy", "--max-new-tokens", 8, "hello world"]
    for native_bf16, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(inference, "native_bf16_cpu", lambda native_bf16=native_bf16: native_bf16)
        result = invoke(*flags)
        assert result.exit_code == 0, result.output
        assert f"unquantised {dtype} on cpu (auto:" in result.stderr and "unquantised" not in result.stdout
    explicit = invoke(*flags[:-1], "--quantization", "none", flags[-1])
    assert explicit.stdout == result.stdout and "auto:" not in explicit.stderr  # fp32 as before, nothing said


def test_a_base_stored_in_another_dtype_is_converted_once(tiny_model_dir, monkeypatch):
    loads = []
    real = models.load_base_model
    monkeypatch.setattr(models, "load_base_model", lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    source = models.resolve_model(str(tiny_model_dir))  # stored in fp32
    shutil.rmtree(inference.ready_folder(source, torch.bfloat16), ignore_errors=True)  # made by an earlier test
    first, converted = inference.ready_model(source, torch.bfloat16, torch.device("cpu"))
    assert converted and len(loads) == 1
    assert (inference.ready_folder(source, torch.bfloat16) / inference.READY_RECORD).is_file()
    second, converted = inference.ready_model(source, torch.bfloat16, torch.device("cpu"))
    assert not converted and len(loads) == 1  # read from the cache, as stored
    assert second.dtype == torch.bfloat16
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    _, converted = inference.ready_model(source, torch.float32, torch.device("cpu"))  # as stored: no copy
    assert not converted and not inference.ready_folder(source, torch.float32).exists()


def test_auto_is_for_sampling_only(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("generate:\n  quantization: auto\n")
    assert recipes.build_config(config.GenerateConfig, "generate", recipe, {}).quantization == "auto"
    with pytest.raises(UserError, match="must be one of nf4, int8, none"):
        recipes.make_config(config.SFTConfig, {"quantization": "auto"}, "test")


def test_help_and_bad_flags_import_no_heavy_library():
    check = (
        "import sys\n"
        "from instruct_cli.cli import main\n"
        "sys.argv = ['instruct', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'bitsandbytes') "
        "if m in sys.modules))\n"
    )
    for args in (["--help"], ["generate", "--help"], ["generate", "--no-such-flag"], ["chat", "--help"]):
        result = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True, timeout=120)
        assert "LOADED []" in result.stdout, (args, result.stdout[-500:], result.stderr[-2000:])


def test_the_process_ends_without_teardown_and_keeps_exit_codes_and_output(tiny_model_dir, isolated_cache):
    """`instruct generate` ends with os._exit after flushing (no second of module teardown): the answer and
    the exit code are still what they are."""
    env = {**os.environ, "INSTRUCT_CACHE": str(isolated_cache)}
    command = [sys.executable, "-m", "instruct_cli", "generate", "--model", str(tiny_model_dir), "--greedy"]
    ok = subprocess.run([*command, "--max-new-tokens", "8", "hello world"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert (
        ok.stdout
        == invoke("generate", "--model", tiny_model_dir, "--greedy", "--max-new-tokens", 8, "hello world").stdout
    )
    bad = subprocess.run([*command, "--temperature", "-1", "hi"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "temperature" in bad.stderr
