"""rm: the pairwise and K-wise losses, last-real-token scores, head round trip, learning a preference,
reward normalisation, `rm score`, and the CLI's errors."""

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts, heads, models, preferences, recipes
from instruct_cli.core import config as cfg
from instruct_cli.steps import rm

runner = CliRunner()


# ------------------------------------------------------------------------------------------ the maths
def test_pairwise_loss_matches_hand_computed_values():
    better, worse = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(0.5)) / 2  # 0.31326 and 0.69315
    assert preferences.pairwise_loss(better, worse).item() == pytest.approx(expected, abs=1e-6)
    with_margin = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert preferences.pairwise_loss(better, worse, margin=0.5).item() == pytest.approx(with_margin, abs=1e-6)


def test_k_wise_expansion_and_per_prompt_weighting():
    assert preferences.ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(preferences.ranking_pairs([3, 1, 0, 2])) == 6  # C(4, 2)
    assert preferences.ranking_pairs([3, 1, 0, 2], ties=[[1, 0]]) == [(3, 1), (3, 0), (3, 2), (1, 2), (0, 2)]
    # one K=3 group (3 pairs) and one pair group: the loss is the mean over the two prompts of their mean loss
    groups = [
        preferences.Group([[5, 6], [5, 7], [5]], preferences.ranking_pairs([2, 0, 1])),
        preferences.Group([[8], [9, 9]], [(0, 1)]),
    ]
    batch = preferences.collate(groups, pad_id=0, device="cpu")
    assert batch["better"].tolist() == [2, 2, 0, 3] and batch["worse"].tolist() == [0, 1, 1, 4]
    assert batch["input_ids"].shape == (5, 2)  # every response encoded once
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    loss = preferences.pairwise_loss(scores[batch["better"]], scores[batch["worse"]], batch["pair_weight"])

    def nll(x):
        return -math.log(1 / (1 + math.exp(-x)))

    group_a = (nll(2.0 - 0.5) + nll(2.0 + 1.0) + nll(0.5 + 1.0)) / 3
    group_b = nll(0.0 - 1.0)
    assert loss.item() == pytest.approx((group_a + group_b) / 2, abs=1e-6)


def test_normalization_gives_mean_zero_std_one():
    raw = [1.0, 2.0, 3.0, 6.0]
    norm = preferences.normalization(raw)
    normalised = torch.tensor([preferences.normalize(r, norm) for r in raw], dtype=torch.float64)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert normalised.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------------- scores and heads
@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    from peft import get_peft_model

    source = models.resolve_model(str(tiny_model_dir))
    base = models.load_base_model(source, "none", "cpu")
    options = recipes.build_config(cfg.RMConfig, "rm", None, dict(model=str(tiny_model_dir), lora_dropout=0.0))
    body = get_peft_model(base, models.lora_config(options))
    torch.manual_seed(0)
    for name, param in body.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so a lost adapter would show in the scores
            torch.nn.init.normal_(param, std=0.2)
    return heads.RewardModel(body, heads.ScalarHead(heads.hidden_size_of(base), seed=0)).eval()


def test_scores_read_at_last_real_token_whatever_the_padding(reward_model):
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = [reward_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in sequences]
    width = max(map(len, sequences))
    for side in ("right", "left"):
        ids, mask = [], []
        for s in sequences:
            pad = [0] * (width - len(s))
            ids.append(s + pad if side == "right" else pad + s)
            mask.append([1] * len(s) + pad if side == "right" else pad + [1] * len(s))
        batched = reward_model(torch.tensor(ids), torch.tensor(mask)).tolist()
        assert batched == pytest.approx(alone, abs=1e-5), side
    # the score is at the last real token: changing a pad token's id changes nothing
    ids = torch.tensor([[10, 11, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0, 0]])
    other = ids.clone()
    other[0, 3] = 99
    assert reward_model(ids, mask).item() == pytest.approx(reward_model(other, mask).item(), abs=1e-6)


def test_head_round_trip_gives_identical_scores(tmp_path, tiny_model_dir, reward_model):
    from peft import PeftModel

    heads.save_adapter(reward_model, tmp_path / "adapter")
    assert heads.has_head(tmp_path / "adapter")
    base = models.load_base_model(models.resolve_model(str(tiny_model_dir)), "none", "cpu")
    body = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    restored = heads.RewardModel(body, heads.load_head(tmp_path / "adapter")).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        assert torch.equal(restored(ids, mask), reward_model(ids, mask))


# --------------------------------------------------------------------------------- learning end to end
WORDS = "red blue green cat dog sun tree water stone bird fish rain hill road book lamp".split()


def synthetic_preferences(n, seed=0):
    """Chosen answers say 'thanks'; rejected ones are the same kind of words without it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=4)) + "?"
        plain = rng.choices(WORDS, k=rng.randint(3, 6))
        polite = list(plain)
        polite.insert(rng.randint(0, len(polite)), "thanks")
        rows.append(
            {"prompt": prompt, "chosen": " ".join(polite), "rejected": " ".join(rng.choices(WORDS, k=len(plain)))}
        )
    return rows


def make_prefs(tmp_path, model_dir, rows, name="prefs", eval_fraction="0.25"):
    raw = tmp_path / f"{name}.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = runner.invoke(
        app,
        [
            "prepare-data",
            "-i",
            str(raw),
            "-o",
            str(tmp_path / name),
            "--task",
            "prefs",
            "--eval-fraction",
            eval_fraction,
            "--model",
            str(model_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    return tmp_path / name


def rm_flags(model, data, out, *extra):
    return [
        "rm",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--quantization",
        "none",
        "--lora-dropout",
        "0",
        "--no-gradient-checkpointing",
        "--warmup-ratio",
        "0",
        *extra,
    ]


def test_rm_learns_a_preference_and_scores_are_normalised(tmp_path, tiny_model_dir):
    data = make_prefs(tmp_path, tiny_model_dir, synthetic_preferences(96))
    out = tmp_path / "rm"
    result = runner.invoke(
        app,
        rm_flags(
            tiny_model_dir,
            data,
            out,
            "--lr",
            "3e-3",
            "--batch-size",
            "8",
            "--max-steps",
            "60",
            "--eval-every",
            "20",
            "--save-every",
            "30",
        ),
    )
    assert result.exit_code == 0, result.output
    manifest = artifacts.require_complete(out, "rm")
    assert manifest["metrics"]["eval/accuracy"] > 0.9, manifest["metrics"]
    assert heads.has_head(out / "adapter")
    train_pairs = len((data / "prefs.train.jsonl").read_text().splitlines())
    assert manifest["reward_normalization"]["samples"] == 2 * train_pairs  # fewer than 2,000: all of them
    metrics = manifest["metrics"]  # the eval accuracy with its interval and the count it stands on
    assert metrics["eval/accuracy_low"] <= metrics["eval/accuracy"] <= metrics["eval/accuracy_high"]
    assert metrics["eval/accuracy_n"] == len((data / "prefs.eval.jsonl").read_text().splitlines())

    # rm score applies the stored normalisation: training responses score mean 0, std 1
    train = [json.loads(line) for line in (data / "prefs.train.jsonl").read_text().splitlines()]
    rows = [{"prompt": row["prompt"], "response": row[key]} for row in train for key in ("chosen", "rejected")]
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = runner.invoke(
        app,
        [
            "rm",
            "score",
            "--model",
            str(out),
            "--quantization",
            "none",
            "--input",
            str(tmp_path / "responses.jsonl"),
            "--output",
            str(tmp_path / "scored.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    rewards = torch.tensor(
        [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()],
        dtype=torch.float64,
    )
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert rewards.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    chosen, rejected = rewards[0::2], rewards[1::2]
    assert (chosen > rejected).float().mean() > 0.9


def test_ranked_data_trains_k_wise(tmp_path, tiny_model_dir):
    rng = random.Random(1)
    rows = []
    for _ in range(12):
        responses = [" ".join(rng.choices(WORDS, k=3)) for _ in range(4)]
        rows.append({"prompt": " ".join(rng.choices(WORDS, k=3)), "responses": responses, "ranking": [2, 0, 3, 1]})
    data = make_prefs(tmp_path, tiny_model_dir, rows, name="ranked")
    assert "responses" in json.loads((data / "prefs.train.jsonl").read_text().splitlines()[0])
    result = runner.invoke(
        app, rm_flags(tiny_model_dir, data, tmp_path / "rm", "--max-steps", "3", "--batch-size", "2")
    )
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/train" in row for row in metrics)


def test_cli_errors(tmp_path, tiny_model_dir):
    sft_raw = tmp_path / "sft.jsonl"
    sft_raw.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    runner.invoke(
        app, ["prepare-data", "-i", str(sft_raw), "-o", str(tmp_path / "sftdata"), "--model", str(tiny_model_dir)]
    )
    scoring = tmp_path / "score.jsonl"
    scoring.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    cases = [
        (rm_flags(tiny_model_dir, tmp_path / "sftdata", tmp_path / "x"), "--task prefs"),
        (rm_flags(tiny_model_dir, tmp_path / "missing", tmp_path / "x"), "does not exist"),
        (
            ["rm", "score", "--model", str(tmp_path / "sftdata"), "--input", str(scoring)],
            "needs the output of `instruct rm`",
        ),
        (["rm", "score", "--model", str(tmp_path / "sftdata"), "--input", str(sft_raw)], "`response`"),
        (["rm", "score", "--model", str(tmp_path / "nothing")], "--input"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output


def test_scale_out_on_two_processes_matches_one(tmp_path, tiny_sft_rm):
    """`accelerate launch` with 2 CPU processes of batch 4 follows the loss and accuracy curves of 1 process
    of batch 8: each step's loss is the mean over the same prompts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    flags = ["--model", str(tiny_sft_rm["sft"]), "--data", str(tiny_sft_rm["data-prefs"]), "--quantization", "none"]
    flags += ["--max-steps", "6", "--lr", "3e-3", "--no-gradient-checkpointing", "--lora-dropout", "0"]
    flags += ["--eval-every", "3", "--warmup-ratio", "0"]
    single = runner.invoke(app, ["rm", *flags, "--batch-size", "8", "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    accelerate = Path(sys.executable).parent / "accelerate"
    launched = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29537"]
        + ["-m", "instruct_cli", "rm", *flags, "--batch-size", "4", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    def curve(run, key):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [row[key] for row in rows if key in row]

    for key in ("loss/train", "eval/loss", "eval/accuracy"):
        one, two = curve(tmp_path / "one", key), curve(tmp_path / "two", key)
        assert len(one) == len(two) > 0, key
        for a, b in zip(one, two):
            assert b == pytest.approx(a, rel=0.02, abs=1e-3), (key, one, two)
    one = artifacts.read_manifest(tmp_path / "one")["reward_normalization"]
    two = artifacts.read_manifest(tmp_path / "two")["reward_normalization"]
    assert two["gain"] == pytest.approx(one["gain"], rel=0.02) and two["bias"] == pytest.approx(one["bias"], abs=0.05)


def test_the_normalisation_sample_is_whole_prompts_seeded_and_capped():
    groups = [preferences.Group([[1]] * (2 + n % 3), [(0, 1)]) for n in range(100)]  # 2-4 responses each
    total = sum(len(g.responses) for g in groups)
    sample = rm.normalization_sample(groups, 50, seed=0)
    count = sum(len(g.responses) for g in sample)
    assert 50 <= count < 50 + 4 and all(any(g is h for h in groups) for g in sample)
    assert sample == rm.normalization_sample(groups, 50, seed=0) and sample != rm.normalization_sample(groups, 50, 1)
    assert sum(len(g.responses) for g in rm.normalization_sample(groups, 10_000, seed=0)) == total


def test_a_small_eval_split_says_so():
    from instruct_cli.core import intervals

    two = intervals.accuracy_interval(1.0, 2)
    assert two == {
        "eval/accuracy_low": pytest.approx(0.342380, abs=1e-6),
        "eval/accuracy_high": 1.0,
        "eval/accuracy_n": 2,
    }
    shown = intervals.with_interval({"eval/accuracy": 1.0, **two}, "eval/accuracy")
    assert shown == "1 (95% CI 0.34-1.00, 2 prompts)"
    assert intervals.with_interval({"eval/loss": 0.5}, "eval/loss") == 0.5
