"""Model resolution and loading: kinds of --model, pad != EOS, 4-bit on CPU, the bitsandbytes repack trap."""

import os

import pytest
import torch

from instruct_cli.core import artifacts, models
from instruct_cli.core.errors import UserError


def make_run_folder(tmp_path, tiny_model_dir, kind="sft"):
    """A complete run folder holding a (randomly initialised) LoRA adapter on the tiny model."""
    from peft import LoraConfig, get_peft_model

    source = models.resolve_model(str(tiny_model_dir))
    base = models.load_base_model(source, "none", "cpu")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    torch.manual_seed(0)
    with torch.no_grad():  # a strong random adapter, so that it visibly changes what the model says
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    run = artifacts.RunFolder.open(tmp_path / kind, kind, {}, extra={"base_model": source.record()})
    peft_model.save_pretrained(run.path / models.ADAPTER_DIR)
    run.complete()
    return run.path


def test_resolve_local_folder_and_errors(tmp_path, tiny_model_dir):
    source = models.resolve_model(str(tiny_model_dir))
    assert source.load_path == str(tiny_model_dir.resolve()) and source.adapter is None
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a transformers model folder"):
        models.resolve_model(str(tmp_path / "empty"))


def test_resolve_run_folder_brings_base_and_adapter(tmp_path, tiny_model_dir):
    run = make_run_folder(tmp_path, tiny_model_dir)
    source = models.resolve_model(str(run))
    assert source.load_path == str(tiny_model_dir.resolve())
    assert source.adapter == run / "adapter"
    manifest = artifacts.read_manifest(run)
    manifest["status"] = "running"
    artifacts.atomic_write_json(run / "manifest.json", manifest)
    with pytest.raises(UserError, match="not complete"):
        models.resolve_model(str(run))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = models.resolve_model("nobody/no-such-model")
    with pytest.raises(UserError, match="Could not load the model"):
        models.load_tokenizer(source)


def test_pad_token_is_distinct_from_eos(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # as many chat models ship
    tokenizer.save_pretrained(tmp_path / "tok")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "tok" / name).write_bytes((tiny_model_dir / name).read_bytes())
    fixed = models.load_tokenizer(str(tmp_path / "tok"))
    assert fixed.pad_token_id != fixed.eos_token_id


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_quantized_loading_on_cpu(tiny_model_dir, quantization):
    model = models.load_base_model(models.resolve_model(str(tiny_model_dir)), quantization, "cpu")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()
    if quantization == "nf4":
        from bitsandbytes.nn import Linear4bit

        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert layers and all(layer.support_avx512bf16_for_cpu is False for layer in layers)


def test_nf4_cache_gives_identical_logits(tiny_model_dir, isolated_cache):
    source = models.resolve_model(str(tiny_model_dir))
    first = models.load_base_model(source, "nf4", "cpu")  # quantises, fills the cache
    second = models.load_base_model(source, "nf4", "cpu")  # loads the cached 4-bit weights
    assert any((isolated_cache / "quantized").iterdir())
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def lora_gradients(model, ids):
    model.zero_grad()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_lora_gradients_after_generate_equal_those_without(tiny_model_dir):
    """Known trap: bitsandbytes' CPU repack after a no-grad forward cut the gradient to earlier LoRA layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = models.load_base_model(models.resolve_model(str(tiny_model_dir)), "nf4", "cpu")
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    )
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 2]])
    before = lora_gradients(model, ids)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=ids[:, :3], max_new_tokens=5, do_sample=False)
        model(ids)
    after = lora_gradients(model, ids)
    first_layer = [name for name in before if ".layers.0." in name]
    assert first_layer and all(before[name].abs().sum() > 0 for name in first_layer)
    for name in before:
        torch.testing.assert_close(after[name], before[name])


def test_gguf_fingerprint_is_the_content_not_the_install(tmp_path):
    """The same GGUF in two installs (another venv, a reinstall) is the same base model: runs trained under one
    install stay usable from the other (ppo checks that its SFT and RM runs share a base)."""
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    os.utime(second, ns=(1, 1))
    assert models._gguf_fingerprint(first) == models._gguf_fingerprint(second) == artifacts.sha256_file(first)
    second.write_bytes(b"GGUF other weights")
    assert models._gguf_fingerprint(second) != models._gguf_fingerprint(first)
