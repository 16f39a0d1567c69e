"""Padding-free sft batches (lm.collate_packed, packing.bins): the layout, and packed == padded on the same rows
(summed loss, labelled-token count and every LoRA gradient) under sdpa and eager attention, in fp32 and bf16
autocast, for rows of very different lengths and packs filled to --max-length; sft end to end with --packing."""

import json

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import chat, lm, models, packing, recipes
from instruct_cli.core import config as cfg
from instruct_cli.steps import sft
from tests import test_sft

runner = CliRunner()
IGNORE = chat.IGNORE


# ------------------------------------------------------------------------------------------- the layout
def test_bins_are_first_fit_decreasing_and_deterministic():
    assert packing.bins([5, 2, 7, 3, 1], capacity=8) == [[2, 4], [0, 3], [1]]
    assert packing.bins([9, 2], capacity=8) == [[0], [1]]  # too long for any bin: a bin of its own
    assert packing.bins([4, 4, 4], capacity=8) == [[0, 1], [2]]  # ties by index
    assert packing.bins([3, 3], capacity=6) == [[0, 1]]  # exactly full


def test_collate_packed_layout():
    rows = [([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, IGNORE, 4, 5, 6]), ([7, 8, 9], [IGNORE, 8, 9]), ([5, 6], [5, 6])]
    batch = lm.collate_packed(rows, pad_id=0, device="cpu")  # width 6: the longest row
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 5, 6, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["segments"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, -1]]
    # each row's first token is never a target: no token is predicted from the row before it
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 4, 5, 6], [IGNORE, 8, 9, IGNORE, 6, IGNORE]]
    assert lm.labelled_tokens(batch) == lm.labelled_tokens(lm.collate(rows, 0, "cpu")) == 6
    assert lm.real_tokens(batch) == lm.real_tokens(lm.collate(rows, 0, "cpu")) == 11
    mask = packing.attention_mask(batch["segments"], "sdpa", torch.float32)[1, 0]
    assert mask.tolist() == [
        [True, False, False, False, False, False],
        [True, True, False, False, False, False],
        [True, True, True, False, False, False],
        [False, False, False, True, False, False],  # row 2 starts: it sees only itself
        [False, False, False, True, True, False],
        [False, False, False, False, False, True],  # padding sees itself (no empty mask row)
    ]
    wide = lm.collate_packed(rows, pad_id=0, device="cpu", width=11)
    assert wide["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 5, 6]]


# --------------------------------------------------------------------------------- packed == padded
CONVERSATIONS = [
    [{"role": "user", "content": "red cat?"}, {"role": "assistant", "content": "blue dog sun"}],
    [
        {"role": "system", "content": "Be brief and answer in colours only please."},
        {"role": "user", "content": "a much longer question with many words about the sky and the sea?"},
        {"role": "assistant", "content": "blue " * 30},
        {"role": "user", "content": "and the grass?"},
        {"role": "assistant", "content": "green green green"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two three four five six"}],
    [{"role": "user", "content": "tree?"}, {"role": "assistant", "content": "stone"}],
]


@pytest.fixture(scope="module")
def encoded(tiny_model_dir):
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    rows = [chat.encode_conversation(tokenizer, messages, 512) for messages in CONVERSATIONS]
    lengths = [len(ids) for ids, _ in rows]
    assert max(lengths) > 4 * min(lengths)  # very different lengths: the short rows share packed rows
    return rows, tokenizer.pad_token_id


def lora_lm(tiny_model_dir, attention: str):
    from peft import LoraConfig, get_peft_model

    base = models.load_base_model(models.resolve_model(str(tiny_model_dir)), "none", "cpu")
    base.set_attn_implementation(attention)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert lm.NextTokenLoss(model).packs
    return model


def nll_and_grads(model, batch, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, count = lm.token_nll(lm.NextTokenLoss(model), batch)
    (total / count).backward()  # the training loss: the mean over labelled tokens (lm.sft_loss)
    return total.item(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(packed, padded, loss_atol, rtol, atol):
    assert packed[1] == padded[1] > 0  # the same labelled tokens
    assert packed[0] / packed[1] == pytest.approx(padded[0] / padded[1], abs=loss_atol)  # per-token mean
    assert packed[0] == pytest.approx(padded[0], rel=max(loss_atol, 1e-6))  # the fp32 sum, to its rounding
    assert packed[2].keys() == padded[2].keys() and len(packed[2]) > 0
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_gives_the_padded_loss_and_gradients(tiny_model_dir, encoded, attention):
    rows, pad_id = encoded
    model = lora_lm(tiny_model_dir, attention)
    padded = lm.collate(rows, pad_id, "cpu")
    packed = lm.collate_packed(rows, pad_id, "cpu")
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]  # no wider than padding ...
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # ... in fewer rows
    reference = nll_and_grads(model, padded)
    assert_same(nll_and_grads(model, packed), reference, loss_atol=1e-5, rtol=1e-4, atol=1e-6)
    # every row in one sequence up to a max length: still the same
    everything = lm.collate_packed(rows, pad_id, "cpu", width=sum(len(ids) for ids, _ in rows))
    assert everything["input_ids"].shape[0] == 1
    assert_same(nll_and_grads(model, everything), reference, loss_atol=1e-5, rtol=1e-4, atol=1e-6)


def test_packed_batch_under_bf16_autocast(tiny_model_dir, encoded):
    rows, pad_id = encoded
    model = lora_lm(tiny_model_dir, "sdpa")
    padded = nll_and_grads(model, lm.collate(rows, pad_id, "cpu"), autocast=True)
    packed = nll_and_grads(model, lm.collate_packed(rows, pad_id, "cpu"), autocast=True)
    fp32 = nll_and_grads(model, lm.collate(rows, pad_id, "cpu"))
    assert abs(padded[0] - fp32[0]) > 1e-4  # autocast really ran in bf16
    assert_same(packed, padded, loss_atol=0.02 * abs(padded[0]), rtol=0.05, atol=2e-3)


def test_two_row_pack_with_a_row_at_max_length(tiny_model_dir, encoded):
    rows, pad_id = encoded
    max_length = 40
    long_ids, long_labels = rows[1]
    at_max = (long_ids[:max_length], long_labels[:max_length])  # a row cut to --max-length
    short = rows[2]
    filler = (rows[3][0][: max_length - len(short[0])], rows[3][1][: max_length - len(short[0])])
    pair = [at_max, short, filler]
    packed = lm.collate_packed(pair, pad_id, "cpu", width=max_length)
    # the row at max length is alone; the other two fill a pack of exactly max_length tokens
    assert packed["input_ids"].shape == (2, max_length)
    assert (packed["segments"] >= 0).all() and packed["segments"][1].max() == 2
    model = lora_lm(tiny_model_dir, "sdpa")
    reference = nll_and_grads(model, lm.collate(pair, pad_id, "cpu"))
    assert_same(nll_and_grads(model, packed), reference, loss_atol=1e-5, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ end to end
def make_data(tmp_path, model_dir):
    words = "red blue green cat dog sun tree water stone bird fish rain hill road book lamp".split()
    rows = []
    for i in range(12):  # answers of 1 to 24 words: rows of very different lengths in every batch
        answer = " ".join(words[(i + k) % len(words)] for k in range(1 + (i * 7) % 24))
        rows.append({"prompt": f"{words[i]} {words[-i - 1]}?", "completion": answer})
    return test_sft.make_data(tmp_path, model_dir, rows)


def train(tmp_path, tiny_model_dir, data, name, **overrides):
    settings = dict(lora_r=8, lora_alpha=16, batch_size=4, grad_accum=2, max_steps=60, eval_every=20)
    config = test_sft.sft_config(
        tmp_path, tiny_model_dir, data, out=name, **{**settings, "save_every": 1000, **overrides}
    )
    out = sft.run(config)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


def test_sft_with_packing_learns_like_padded(tmp_path, tiny_model_dir):
    data = make_data(tmp_path, tiny_model_dir)
    packed, out = train(tmp_path, tiny_model_dir, data, "packed", packing=True)
    assert json.loads((out / "manifest.json").read_text())["config"]["packing"] is True
    padded, _ = train(tmp_path, tiny_model_dir, data, "padded", packing=False)
    # the same rows per step, the same per-token mean over grad accumulation: the same run, to float rounding
    assert [row["train/tokens"] for row in packed] == [row["train/tokens"] for row in padded]  # padding not counted
    for mine, theirs in zip(packed[:10], padded[:10]):
        assert mine["loss/train"] == pytest.approx(theirs["loss/train"], abs=1e-4)
    evals = [row["eval/loss"] for row in packed if "eval/loss" in row]
    assert evals[0] > evals[1] > evals[2] and evals[-1] < 0.75 * evals[0], evals
    assert evals == pytest.approx([row["eval/loss"] for row in padded if "eval/loss" in row], rel=1e-2)


def test_cli_packing_flag_and_fallback(tmp_path, tiny_model_dir, monkeypatch):
    data = make_data(tmp_path, tiny_model_dir)
    args = ["sft", "--model", tiny_model_dir, "--data", data, "--quantization", "none", "--max-steps", "2"]
    result = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "on", "--packing"]])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "on" / "manifest.json").read_text())["config"]["packing"] is True
    # a model whose attention takes no custom mask trains padded, and says so
    monkeypatch.setattr(packing, "supports", lambda model: False)
    result = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "off", "--packing"]])
    assert result.exit_code == 0, result.output
    assert "padded batches" in result.output


def test_real_shaped_sft_benchmark_rows(tiny_model_dir):
    """bench_sft --data-shape real: bench_rm's real prompts (100-400 tokens, some multi-turn), answers of 30-200."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    rows = common.real_sft_rows(40, 0, tiny_model_dir)
    assert rows == common.real_sft_rows(40, 0, tiny_model_dir)  # deterministic
    tokenizer = models.load_tokenizer(str(tiny_model_dir))

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert all(row["messages"][-1]["role"] == "assistant" for row in rows)
    prompts = [sum(tokens(m["content"]) for m in row["messages"][:-1]) for row in rows]
    answers = [tokens(row["messages"][-1]["content"]) for row in rows]
    assert 70 <= min(prompts) and max(prompts) <= 480 and 150 < sum(prompts) / len(prompts) < 350
    assert 15 <= min(answers) and max(answers) <= 260
    assert any(len(row["messages"]) >= 4 for row in rows) and any(len(row["messages"]) == 2 for row in rows)
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    # one prompt generator for both benchmarks: the first prompt of a seed is the same
    assert rows[0]["messages"][:-1] == common.real_preference_rows(1, 0, tiny_model_dir)[0]["prompt"]


def test_packed_on_two_processes_matches_padded_on_one(tmp_path, tiny_model_dir):
    """Data parallel: `accelerate launch` with 2 CPU processes of batch 2, packed, follows the loss curve of
    1 process of batch 4, padded (each process packs its own share of the global batch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = make_data(tmp_path, tiny_model_dir)
    flags = ["--model", tiny_model_dir, "--data", data, "--quantization", "none", "--max-steps", "6", "--lr", "5e-3"]
    flags += ["--no-gradient-checkpointing", "--lora-dropout", "0", "--eval-every", "3", "--warmup-ratio", "0"]
    flags = [str(flag) for flag in flags]
    single = runner.invoke(app, ["sft", *flags, "--batch-size", "4", "--no-packing", "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    accelerate = Path(sys.executable).parent / "accelerate"  # --multi_gpu: a CPU (gloo) group without GPUs
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547"]
    launched = subprocess.run(
        [
            *launch,
            "-m",
            "instruct_cli",
            "sft",
            *flags,
            "--batch-size",
            "2",
            "--packing",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "steps of 4 rows" in launched.stderr and "packed" in launched.stderr

    def curve(run, key):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [row[key] for row in rows if key in row]

    for key in ("loss/train", "eval/loss", "train/tokens"):
        one, two = curve(tmp_path / "one", key), curve(tmp_path / "two", key)
        assert len(one) == len(two) > 0
        assert two == pytest.approx(one, rel=1e-3), (key, one, two)


def test_recipe_key_packing(tmp_path):
    from instruct_cli.core.errors import UserError

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sft:\n  packing: true\n")
    assert recipes.build_config(cfg.SFTConfig, "sft", recipe, {}).packing is True
    assert recipes.build_config(cfg.SFTConfig, "sft", recipe, {"packing": False}).packing is False  # flag wins
    assert recipes.build_config(cfg.SFTConfig, "sft", None, {}).packing is False  # the default
    recipe.write_text("sft:\n  packing: sometimes\n")
    with pytest.raises(UserError) as error:
        recipes.build_config(cfg.SFTConfig, "sft", recipe, {})
    assert "packing" in str(error.value)
