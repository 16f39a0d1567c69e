"""sft: the label mask, learning a memorisable set, exact resume, export, and the CLI's errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts, chat, lm, models, recipes
from instruct_cli.core import config as cfg
from instruct_cli.core.errors import UserError
from instruct_cli.steps import sft

runner = CliRunner()

FACTS = [
    ("What colour is the sky?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour is an apple?", "red"),
    ("How many legs has a dog?", "four"),
    ("Say hello.", "hello world"),
    ("What is one plus one?", "two"),
]


def conversation(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def make_data(tmp_path, model_dir, rows, name="data"):
    """A data folder through the real prepare-data command; eval holds the training rows (memorisation)."""
    raw = tmp_path / f"{name}.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / name
    result = runner.invoke(
        app,
        [
            "prepare-data",
            "-i",
            str(raw),
            "-o",
            str(out),
            "--task",
            "sft",
            "--eval-fraction",
            "0",
            "--model",
            str(model_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    (out / "sft.eval.jsonl").write_text((out / "sft.train.jsonl").read_text())
    return out


def test_label_mask_token_by_token(tiny_model_dir):
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "three"},
    ]
    input_ids, labels = chat.encode_conversation(tokenizer, messages, max_length=512)
    kept = [tokenizer.decode([t]) for t, label in zip(input_ids, labels) if label != chat.IGNORE]
    assert "".join(kept) == "hello world<|im_end|>three<|im_end|>"
    for token, label in zip(input_ids, labels):
        assert label in (chat.IGNORE, token)
    # exactly the assistant contents and their EOS are kept: nothing of the system or user turns
    masked_text = tokenizer.decode([t for t, label in zip(input_ids, labels) if label == chat.IGNORE])
    assert "Be brief." in masked_text and "one two" in masked_text and "assistant" in masked_text
    assert labels.count(tokenizer.eos_token_id) == 2  # both EOS kept (pad is a different token)


def test_loss_on_labelled_positions_equals_the_full_forward_loss(tiny_model_dir):
    """token_nll projects only labelled positions onto the vocabulary; loss and LoRA gradients must equal
    the plain full-logits cross-entropy."""
    from peft import LoraConfig, get_peft_model

    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = get_peft_model(
        models.load_base_model(models.resolve_model(str(tiny_model_dir)), "none", "cpu"),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    rows = [
        chat.encode_conversation(tokenizer, conversation(q, a)["messages"], 512)
        for q, a in [("red cat?", "blue dog sun"), ("a much longer question with words?", "tree")]
    ]
    batch = lm.collate(rows, tokenizer.pad_token_id, "cpu")  # right-padded: the second row is shorter

    def loss_and_grads(loss_fn):
        model.zero_grad()
        total, count = loss_fn()
        total.backward()
        return total.item(), count, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    def full_forward():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=chat.IGNORE, reduction="sum"
        )
        return total, int((labels != chat.IGNORE).sum())

    fast, reference = loss_and_grads(lambda: lm.token_nll(model, batch)), loss_and_grads(full_forward)
    assert fast[1] == reference[1] == lm.labelled_tokens(batch) > 0
    assert fast[0] == pytest.approx(reference[0], rel=1e-5)
    for mine, theirs in zip(fast[2], reference[2]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def sft_config(tmp_path, tiny_model_dir, data, out="sft", **overrides):
    values = dict(
        model=str(tiny_model_dir),
        data=data,
        out=tmp_path / out,
        quantization="none",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lr=1e-2,
        batch_size=3,
        max_steps=300,
        eval_every=50,
        save_every=100,
        warmup_ratio=0.0,
        gradient_checkpointing=False,
        seed=0,
    )
    values.update(overrides)
    return recipes.build_config(cfg.SFTConfig, "sft", None, values)


def eval_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["time/step"] > 0 for row in rows)  # per-phase timing
    assert all(row["time/eval"] > 0 for row in rows if "eval/loss" in row)
    return [row["eval/loss"] for row in rows if "eval/loss" in row]


def test_sft_memorises_and_generate_reproduces(tmp_path, tiny_model_dir):
    data = make_data(tmp_path, tiny_model_dir, [conversation(q, a) for q, a in FACTS])
    out = sft.run(sft_config(tmp_path, tiny_model_dir, data))
    manifest = artifacts.require_complete(out, "sft")
    assert manifest["parents"]["data"]["sha256"] == artifacts.sha256_folder(data)
    losses = eval_losses(out)
    assert losses[-1] < 0.1 * losses[0] or losses[-1] < 0.05, losses
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(out),
            "--quantization",
            "none",
            "--greedy",
            "--max-new-tokens",
            "8",
            "What colour is grass?",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "green"


def test_sft_on_4bit_base_learns(tmp_path, tiny_model_dir):
    data = make_data(tmp_path, tiny_model_dir, [conversation(q, a) for q, a in FACTS])
    out = sft.run(
        sft_config(
            tmp_path, tiny_model_dir, data, quantization="nf4", max_steps=60, eval_every=20, gradient_checkpointing=True
        )
    )
    losses = eval_losses(out)
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    data = make_data(tmp_path, tiny_model_dir, [conversation(q, a) for q, a in FACTS])
    settings = dict(max_steps=8, save_every=3, eval_every=4, lora_dropout=0.1, keep="last")
    straight = sft.run(sft_config(tmp_path, tiny_model_dir, data, out="straight", **settings))

    calls = {"n": 0}
    real_loss = lm.sft_loss

    def interrupting_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6: checkpoints exist for step 3, and Ctrl-C saves step 5
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(lm, "sft_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        sft.run(sft_config(tmp_path, tiny_model_dir, data, out="resumed", **settings))
    assert artifacts.read_manifest(tmp_path / "resumed")["status"] == "interrupted"
    monkeypatch.setattr(lm, "sft_loss", real_loss)

    # a checkpoint that does not fit the run (other LoRA settings, another version): a clear error, no KeyError
    checkpoint = max((tmp_path / "resumed").rglob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    original = checkpoint.read_bytes()
    state = torch.load(checkpoint, weights_only=False)
    state["trainable"] = {f"renamed.{name}": value for name, value in state["trainable"].items()}
    torch.save(state, checkpoint)
    with pytest.raises(UserError, match="does not fit this run"):
        sft.run(sft_config(tmp_path, tiny_model_dir, data, out="resumed", resume=True, **settings))
    checkpoint.write_bytes(original)

    resumed = sft.run(sft_config(tmp_path, tiny_model_dir, data, out="resumed", resume=True, **settings))

    from safetensors.torch import load_file

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_export_loads_without_peft_and_matches(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = make_data(tmp_path, tiny_model_dir, [conversation(q, a) for q, a in FACTS])
    run = sft.run(sft_config(tmp_path, tiny_model_dir, data, max_steps=5))
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged, "peft_config")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "chat_template.jinja").exists() or "chat_template" in (
        tmp_path / "merged" / "tokenizer_config.json"
    ).read_text()


def test_cli_errors(tmp_path, tiny_model_dir):
    data = make_data(tmp_path, tiny_model_dir, [conversation(q, a) for q, a in FACTS])
    base = ["sft", "--model", str(tiny_model_dir), "--quantization", "none", "--max-steps", "1"]
    cases = [
        (base + ["--out", str(tmp_path / "x")], "--data"),
        (base + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "does not exist"),
        (base + ["--data", str(data), "--out", str(tmp_path / "x"), "--lr", "0"], "lr"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output
    ok = runner.invoke(app, base + ["--data", str(data), "--out", str(tmp_path / "done")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, base + ["--data", str(data), "--out", str(tmp_path / "done")])
    assert again.exit_code == 2 and "--force" in again.output


def test_scale_out_on_two_processes_matches_one(tmp_path, tiny_model_dir):
    """`accelerate launch` with 2 CPU processes of batch 2 follows the loss curve of 1 process of batch 4."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = make_data(tmp_path, tiny_model_dir, [conversation(q, a) for q, a in FACTS * 3])
    flags = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--quantization",
        "none",
        "--max-steps",
        "8",
        "--lr",
        "5e-3",
        "--no-gradient-checkpointing",
        "--lora-dropout",
        "0",
        "--eval-every",
        "4",
        "--warmup-ratio",
        "0",
    ]
    single = runner.invoke(app, ["sft", *flags, "--batch-size", "4", "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    # --multi_gpu selects accelerate's torchrun launcher, which on a machine without GPUs forms a CPU (gloo)
    # group; `--cpu` alone starts a single process unless MPI is installed
    accelerate = Path(sys.executable).parent / "accelerate"
    launched = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29533",
            "-m",
            "instruct_cli",
            "sft",
            *flags,
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stderr.count("steps of 4 rows") == 1  # one global batch of 4, one process talking

    def curve(run, key):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [row[key] for row in rows if key in row]

    for key in ("loss/train", "eval/loss"):
        one, two = curve(tmp_path / "one", key), curve(tmp_path / "two", key)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            assert b == pytest.approx(a, rel=0.02), (key, one, two)


def test_rows_whose_answer_is_cut_away_are_left_out_and_counted(tmp_path, tiny_model_dir):
    """A row whose prompt fills --max-length keeps no answer token: it is left out with a count (never trained
    on an empty mask); when no row keeps one, the error names the fix."""
    long_questions = [f"Tell me {n} " + "very " * 60 + "much?" for n in range(3)]
    rows = [conversation(q, a) for q, a in FACTS] + [conversation(q, "Yes.") for q in long_questions]
    data = make_data(tmp_path, tiny_model_dir, rows)
    base = ["sft", "--model", str(tiny_model_dir), "--quantization", "none", "--max-steps", "1", "--data", str(data)]
    result = runner.invoke(app, base + ["--max-length", "48", "--out", str(tmp_path / "cut")])
    assert result.exit_code == 0, result.output
    assert "3 training rows have no answer token within --max-length 48" in " ".join(result.output.split())
    nothing = runner.invoke(app, base + ["--max-length", "4", "--out", str(tmp_path / "none")])
    assert nothing.exit_code == 2 and "No assistant tokens" in nothing.output and "Traceback" not in nothing.output
