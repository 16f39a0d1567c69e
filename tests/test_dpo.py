"""dpo: the losses against hand-computed values, the reference log-probs against the SFT model's own, learning
a planted preference, exact resume, the run as a model for other commands, recipes, and the CLI's errors."""

import dataclasses
import json
import math
import random
import shutil

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app, recipe_steps
from instruct_cli.core import artifacts, dpo_loss, lm, models, preferences, recipes
from instruct_cli.core import config as cfg
from instruct_cli.core.chat import template_ids
from instruct_cli.core.errors import UserError
from instruct_cli.steps import dpo, pipeline

runner = CliRunner()


def nll(x):
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------ the maths
# two pairs: x = (pi_c - pi_r) - (ref_c - ref_r) is 1.0 for the first and -0.5 for the second
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
REF_CHOSEN, REF_REJECTED = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -2.0])
WEIGHTS = torch.tensor([1.0, 0.5])


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        ("sigmoid", 0.0, [nll(0.5), nll(-0.25)]),  # beta * x = 0.5, -0.25
        ("sigmoid", 0.1, [nll(0.5), nll(-0.25)]),  # TRL 1.x: label smoothing does not change sigmoid
        ("ipo", 0.0, [(1.0 - 1.0) ** 2, (-0.5 - 1.0) ** 2]),  # target 1 / (2 beta) = 1
        # robust: ((1 - e) nll(bx) - e nll(-bx)) / (1 - 2e)
        ("robust", 0.1, [(0.9 * nll(0.5) - 0.1 * nll(-0.5)) / 0.8, (0.9 * nll(-0.25) - 0.1 * nll(0.25)) / 0.8]),
        ("hinge", 0.0, [1 - 0.5, 1 + 0.25]),  # max(0, 1 - beta x)
    ],
)
def test_losses_match_hand_computed_values(loss_type, smoothing, expected):
    terms = dpo_loss.pair_losses(
        POLICY_CHOSEN,
        POLICY_REJECTED,
        REF_CHOSEN,
        REF_REJECTED,
        beta=0.5,
        loss_type=loss_type,
        label_smoothing=smoothing,
    )
    assert terms.losses.tolist() == pytest.approx(expected, abs=1e-6)
    weighted = dpo_loss.weighted_mean(terms.losses, WEIGHTS)
    assert weighted.item() == pytest.approx((expected[0] + 0.5 * expected[1]) / 1.5, abs=1e-6)
    # implicit rewards beta * (log pi - log ref): chosen 0.25, 0; rejected -0.25, 0.25
    assert terms.chosen_rewards.tolist() == pytest.approx([0.25, 0.0])  # the same for every loss
    assert terms.rejected_rewards.tolist() == pytest.approx([-0.25, 0.25])
    stats = dpo_loss.reward_stats(terms, WEIGHTS)
    assert stats["accuracy"] == pytest.approx(1 / 1.5)  # the first pair (weight 1) of 1.5
    assert stats["margin"] == pytest.approx((0.5 - 0.5 * 0.25) / 1.5)
    with pytest.raises(ValueError):
        dpo_loss.pair_losses(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.5, "exo_pair")


def test_ipo_loss_compares_per_token_means_but_rewards_and_accuracy_read_the_sums():
    """TRL's IPO: x from mean log-ratios per token; implicit rewards, accuracy and margin from beta x the summed
    log-ratios. A 10-token chosen at +0.1 per token against a 40-token rejected at +0.05 per token: the sums are
    1.0 against 2.0, so the rejected answer has the larger implicit reward (accuracy 0), though per token the
    chosen one moved more."""
    zero = torch.zeros(1)
    terms = dpo_loss.pair_losses(
        torch.tensor([1.0]), torch.tensor([2.0]), zero, zero, 0.1, "ipo", 0.0, torch.tensor([10]), torch.tensor([40])
    )
    assert terms.losses.item() == pytest.approx((0.1 - 0.05 - 1 / (2 * 0.1)) ** 2, abs=1e-5)
    assert terms.chosen_rewards.item() == pytest.approx(0.1) and terms.rejected_rewards.item() == pytest.approx(0.2)
    assert dpo_loss.reward_stats(terms)["accuracy"] == 0.0


class FixedLogProbs(torch.nn.Module):
    """A stand-in policy whose summed answer log-probs and token counts are given."""

    def __init__(self, sums, counts):
        super().__init__()
        self.sums, self.counts = torch.tensor(sums), torch.tensor(counts)

    def forward(self, input_ids, attention_mask, labels):
        return self.sums, self.counts


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_step_loss_on_a_fixed_batch(loss_type):
    """The step's batch loss: a ranked prompt's 3 pairs weigh as much as one pair's prompt, and ipo compares
    mean per-token log-probs (summed for sigmoid)."""
    groups = [
        dpo.PolicyGroup([[5, 6, 7], [5, 8], [5, 9, 9, 9]], preferences.ranking_pairs([2, 0, 1]), [2, 1, 3]),
        dpo.PolicyGroup([[5, 4], [5, 3, 3]], [(0, 1)], [1, 2]),
    ]
    groups[0].reference_logps = [-2.0, -1.0, -4.5]
    groups[1].reference_logps = [-1.0, -3.0]
    batch = dpo.collate(groups, pad_id=0, device="cpu")
    assert batch["labels"][0].tolist() == [-100, 6, 7, -100] and batch["labels"][2].tolist() == [-100, 9, 9, 9]
    sums, counts = [-1.0, -1.5, -3.0, -0.5, -4.0], [2, 1, 3, 1, 2]
    config = cfg.DPOConfig(beta=0.2, loss=loss_type)
    loss, metrics = dpo.dpo_batch_loss(FixedLogProbs(sums, counts), batch, config)

    ref = [-2.0, -1.0, -4.5, -1.0, -3.0]
    if loss_type == "ipo":
        sums = [s / n for s, n in zip(sums, counts)]
        ref = [r / n for r, n in zip(ref, counts)]

    def pair(b, w):
        x = (sums[b] - sums[w]) - (ref[b] - ref[w])
        return (x - 1 / (2 * 0.2)) ** 2 if loss_type == "ipo" else nll(0.2 * x)

    ranked = (pair(2, 0) + pair(2, 1) + pair(0, 1)) / 3
    assert loss.item() == pytest.approx((ranked + pair(3, 4)) / 2, abs=1e-6)
    assert set(metrics) >= {"accuracy", "chosen_reward", "rejected_reward", "margin"}


# --------------------------------------------------------------------------------------------- fixtures
WORDS = "red blue green cat dog sun tree water stone bird fish rain hill road book lamp".split()


def planted_preferences(n, seed=0):
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


def prepare(root, model_dir, rows, task, name, eval_fraction="0.25"):
    raw = root / f"{name}.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["prepare-data", "-i", raw, "-o", root / name, "--task", task, "--eval-fraction", eval_fraction]
    result = runner.invoke(app, [str(a) for a in [*args, "--model", model_dir]])
    assert result.exit_code == 0, result.output
    return root / name


COMMON = ["--quantization", "none", "--no-gradient-checkpointing", "--lora-dropout", "0", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Preference data with a planted preference, and a short sft run (on neutral answers) to start from."""
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(1)
    demonstrations = [
        {"prompt": " ".join(rng.choices(WORDS, k=4)) + "?", "completion": " ".join(rng.choices(WORDS, k=4))}
        for _ in range(32)
    ]
    sft_data = prepare(root, tiny_model_dir, demonstrations, "sft", "data-sft")
    prefs = prepare(root, tiny_model_dir, planted_preferences(96), "prefs", "data-prefs")
    flags = ["sft", "--model", tiny_model_dir, "--data", sft_data, "--out", root / "sft", "--max-steps", "15"]
    result = runner.invoke(app, [str(a) for a in [*flags, "--lr", "5e-3", *COMMON]])
    assert result.exit_code == 0, result.output
    return {"root": root, "sft": root / "sft", "prefs": prefs, "sft-data": sft_data, "model": tiny_model_dir}


def dpo_config(runs, out, **settings):
    values = dict(
        model=str(runs["sft"]),
        data=runs["prefs"],
        out=runs["root"] / out,
        quantization="none",
        gradient_checkpointing=False,
        lora_dropout=0.0,
        warmup_ratio=0.0,
        batch_size=8,
        lr=2e-3,
    )
    values.update(settings)
    return recipes.make_config(cfg.DPOConfig, values, source="test")


def own_logprob(model, tokenizer, row_prompt, response_text, max_length):
    """The summed answer log-prob of one response under `model`, by a plain full forward (no batching, no
    labelled-only projection): the independent value the reference must equal."""
    prompt = preferences.as_messages(row_prompt, "user", "test", "prompt")
    response = preferences.as_messages(response_text, "assistant", "test", "response")
    ids = preferences.encode_response(tokenizer, prompt, response, max_length)
    start = len(template_ids(tokenizer, prompt, add_generation_prompt=True))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logps[start - 1 :].sum())


# ------------------------------------------------------------------------------------ reference log-probs
def test_reference_logprobs_equal_the_sft_models_own(runs, monkeypatch):
    captured = []
    real = dpo.compute_reference

    def capture(policy, groups, *args, **kwargs):
        real(policy, groups, *args, **kwargs)
        captured.append(groups)

    monkeypatch.setattr(dpo, "compute_reference", capture)
    dpo.run(dpo_config(runs, "dpo-reference", max_steps=1, lora_dropout=0.1, precompute_reference=True))
    (groups,) = captured
    model, tokenizer, _ = models.load_for_inference(str(runs["sft"]), "none", "cpu")
    rows = [json.loads(line) for split in ("train", "eval") for line in open(runs["prefs"] / f"prefs.{split}.jsonl")]
    assert len(groups) == len(rows) == 96
    differences = [
        abs(reference - own_logprob(model, tokenizer, row["prompt"], response, 1024))
        for row, group in list(zip(rows, groups))[::8]
        for response, reference in zip((row["chosen"], row["rejected"]), group.reference_logps)
    ]
    assert len(differences) == 24 and max(differences) < 1e-5, max(differences)
    # and the SFT adapter matters: the bare base gives other log-probs (the reference is not the base)
    base = models.load_base_model(models.resolve_model(str(runs["model"])), "none", "cpu")
    row, group = rows[0], groups[0]
    assert abs(group.reference_logps[0] - own_logprob(base, tokenizer, row["prompt"], row["chosen"], 1024)) > 1e-2


# --------------------------------------------------------------------------------------------- learning
def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_a_planted_preference_and_the_run_is_a_model(runs):
    out = runs["root"] / "dpo"
    flags = ["dpo", "--model", runs["sft"], "--data", runs["prefs"], "--out", out, "--max-steps", "30"]
    flags += ["--batch-size", "8", "--lr", "2e-3", "--beta", "0.1", "--eval-every", "10", *COMMON]
    result = runner.invoke(app, [str(a) for a in flags])
    assert result.exit_code == 0, result.output
    manifest = artifacts.require_complete(out, "dpo")
    assert manifest["metrics"]["eval/accuracy"] > 0.9, manifest["metrics"]
    evals = [row for row in metrics_of(out) if "eval/margin" in row]
    margins = [row["eval/margin"] for row in evals]
    assert len(margins) == 3 and 0 < margins[0] < margins[-1], margins
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] < math.log(2), evals  # log 2: the loss at the start
    assert evals[-1]["eval/chosen_reward"] > evals[-1]["eval/rejected_reward"]
    steps = [row for row in metrics_of(out) if "train/accuracy" in row]
    assert len(steps) == 30 and all("train/margin" in row and "train/chosen_reward" in row for row in steps)
    assert manifest["parents"]["model"]["kind"] == "sft"

    # the run is a model: generate loads it (base + the DPO adapter), export merges it, eval takes it with the
    # SFT run it started from as its KL reference
    said = runner.invoke(
        app, ["generate", "--model", str(out), "--quantization", "none", "--greedy", "--max-new-tokens", "4", "hi?"]
    )
    assert said.exit_code == 0, said.output
    merged = runs["root"] / "merged"
    exported = runner.invoke(app, ["export", str(out), "--out", str(merged), "--dtype", "float32"])
    assert exported.exit_code == 0, exported.output
    from transformers import AutoModelForCausalLM

    policy, _, _ = models.load_for_inference(str(out), "none", "cpu")
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(merged)(ids).logits, policy(ids).logits, rtol=1e-4, atol=1e-4
        )
    from instruct_cli.steps.evaluate.entries import run_entry
    from instruct_cli.steps.evaluate.plots import CURVES, plot_training_curves

    entry = run_entry(str(out))
    assert entry.kind == "dpo" and entry.reference.resolve() == runs["sft"].resolve()
    assert all(any(name in row for row in metrics_of(out)) for _, names in CURVES["dpo"] for name in names)
    assert plot_training_curves([("dpo", "dpo", out)], runs["root"] / "curves.png") is not None


def test_from_a_base_model_the_reference_is_the_base(runs, monkeypatch):
    """No sft run: a fresh, zero LoRA, so the reference log-probs are the bare base's."""
    captured = []
    real = dpo.compute_reference
    monkeypatch.setattr(dpo, "compute_reference", lambda p, g, *a, **k: (real(p, g, *a, **k), captured.append(g)))
    config = dpo_config(
        runs, "dpo-base", model=str(runs["model"]), max_steps=2, loss="ipo", beta=0.5, precompute_reference=True
    )
    out = dpo.run(config)
    assert artifacts.read_manifest(out)["metrics"]["loss/train"] > 0
    base = models.load_base_model(models.resolve_model(str(runs["model"])), "none", "cpu")
    tokenizer = models.load_tokenizer(str(runs["model"]))
    row = json.loads(open(runs["prefs"] / "prefs.train.jsonl").readline())
    expected = own_logprob(base, tokenizer, row["prompt"], row["rejected"], 1024)
    assert captured[0][0].reference_logps[1] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("start", ["sft", "model"])
def test_per_batch_reference_gives_the_precomputed_losses(runs, start):
    """The default per-batch reference (the frozen starting adapter beside the policy, or the bare base with
    adapters disabled) gives the losses, margins and adapter of the reference precomputed before step 1."""
    settings = dict(model=str(runs[start]), max_steps=4, eval_every=2, batch_size=4, lora_dropout=0.1)
    lazy = dpo.run(dpo_config(runs, f"lazy-{start}", **settings))
    eager = dpo.run(dpo_config(runs, f"eager-{start}", precompute_reference=True, **settings))
    one, two = metrics_of(lazy), metrics_of(eager)
    assert len(one) == len(two) == 4 and math.isclose(one[0]["loss/train"], math.log(2), abs_tol=1e-6)
    for x, y in zip(one, two):
        for key in ("loss/train", "train/margin", "train/chosen_reward", "eval/loss", "eval/margin"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (key, x, y)
    from safetensors.torch import load_file

    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (lazy, eager))
    assert a.keys() == b.keys()  # the reference adapter is not saved with the policy
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_interrupt_equals_uninterrupted(runs, monkeypatch):
    """The reference is computed from the starting adapter again, before the checkpoint's weights load."""
    settings = dict(max_steps=8, save_every=3, eval_every=4, lora_dropout=0.1, keep="last", batch_size=4)
    straight = dpo.run(dpo_config(runs, "straight", **settings))

    calls = {"n": 0}
    real_loss = dpo.dpo_batch_loss

    def interrupting_loss(model, batch, config):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6: checkpoints exist for step 3, and Ctrl-C saves step 5
            raise KeyboardInterrupt
        return real_loss(model, batch, config)

    monkeypatch.setattr(dpo, "dpo_batch_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(dpo_config(runs, "resumed", **settings))
    assert artifacts.read_manifest(runs["root"] / "resumed")["status"] == "interrupted"
    monkeypatch.setattr(dpo, "dpo_batch_loss", real_loss)
    resumed = dpo.run(dpo_config(runs, "resumed", resume=True, **settings))

    from safetensors.torch import load_file

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    one, two = metrics_of(straight), metrics_of(resumed)
    assert [row["step"] for row in two] == list(range(1, 9))
    for x, y in zip(one, two):
        for key in ("loss/train", "train/margin", "eval/loss", "eval/margin"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x, y)


# ------------------------------------------------------------------------------------- recipes and plan
def test_recipe_runs_dpo_after_sft_and_plan_knows_it(runs):
    recipe = runs["root"] / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {runs['model']}\n  quantization: none\n"
        f"dpo:\n  model: {runs['sft']}\n  data: {runs['prefs']}\n  out: {runs['root'] / 'recipe-dpo'}\n"
        "  max_steps: 2\n  loss: ipo\n  beta: 0.5\n  gradient_checkpointing: false\n"
    )
    tasks = pipeline.run(recipe, recipe_steps())
    assert [(t.step, t.action) for t in tasks] == [("dpo", "run")]
    manifest = artifacts.require_complete(runs["root"] / "recipe-dpo", "dpo")
    assert manifest["config"]["loss"] == "ipo" and manifest["config"]["beta"] == 0.5
    again = pipeline.run(recipe, recipe_steps(), dry_run=True)
    assert [(t.step, t.action) for t in again] == [("dpo", "skip")]

    from instruct_cli.steps.plan.recipe import plan_recipe

    (plan,) = plan_recipe(recipe)
    assert plan.step == "dpo" and plan.breakdown.total > 0

    cycle = runs["root"] / "cycle.yaml"
    cycle.write_text(
        f"dpo:\n  model: {runs['root'] / 'loop'}\n  data: {runs['prefs']}\n  out: {runs['root'] / 'loop'}\n"
    )
    with pytest.raises(UserError, match="cycle"):
        recipes.read_tasks(cycle)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_user_errors(runs, tmp_path):
    fake_rm = tmp_path / "rm"
    shutil.copytree(runs["sft"], fake_rm)
    manifest = json.loads((fake_rm / "manifest.json").read_text())
    (fake_rm / "manifest.json").write_text(json.dumps({**manifest, "kind": "rm"}))
    base = ["dpo", "--model", str(runs["sft"]), "--out", str(tmp_path / "x"), "--quantization", "none"]
    prefs = ["--data", str(runs["prefs"])]
    cases = [
        (base + ["--data", str(runs["sft-data"])], "needs prefs data"),
        (base + prefs + ["--beta", "0"], "`beta` must be greater than 0"),
        (base + prefs + ["--beta", "-1"], "`beta` must be greater than 0"),
        (base + prefs + ["--loss", "exo"], "`loss` must be one of sigmoid, ipo, robust, hinge"),
        (base + prefs + ["--loss", "robust", "--label-smoothing", "0.5"], "below 0.5"),
        (base + prefs + ["--loss", "ipo", "--label-smoothing", "0.1"], "robust (rDPO) loss only"),
        (base + prefs + ["--label-smoothing", "0.1"], "robust (rDPO) loss only, not to sigmoid"),
        (base, "--data"),
        (["dpo", "--model", str(fake_rm), "--out", str(tmp_path / "x"), *prefs], "is a reward model"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, (
            args,
            result.output,
        )
    assert not (tmp_path / "x").exists()  # a bad input never leaves a run folder behind


# -------------------------------------------------------------------------------------------- scale-out
def test_scale_out_on_two_processes_matches_one(runs, tmp_path):
    """`accelerate launch` with 2 CPU processes of batch 4 follows the curves of 1 process of batch 8: each
    process scores half of the reference log-probs and all of them receive all."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    flags = ["--model", str(runs["sft"]), "--data", str(runs["prefs"]), "--max-steps", "4", "--lr", "2e-3"]
    flags += [*COMMON, "--eval-every", "2"]
    single = runner.invoke(app, ["dpo", *flags, "--batch-size", "8", "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    accelerate = Path(sys.executable).parent / "accelerate"
    launched = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29551"]
        + ["-m", "instruct_cli", "dpo", *flags, "--batch-size", "4", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    for key in ("loss/train", "train/margin", "eval/loss", "eval/accuracy", "eval/margin"):
        one = [row[key] for row in metrics_of(tmp_path / "one") if key in row]
        two = [row[key] for row in metrics_of(tmp_path / "two") if key in row]
        assert len(one) == len(two) > 0, key
        assert two == pytest.approx(one, rel=0.02, abs=1e-3), (key, one, two)


@pytest.mark.parametrize("precompute", [True, False])
def test_reference_and_policy_agree_at_the_start_under_bf16_autocast(runs, monkeypatch, precompute):
    """The reference is scored under the same autocast as the training forwards: in the first step (no dropout)
    the policy IS the reference, so their log-probs agree to bf16's batch-to-batch noise, and the loss is log 2."""
    gaps = []
    real_loss = dpo.dpo_batch_loss

    def measuring_loss(model, batch, config):
        if "reference_logps" not in batch:  # per batch: the frozen starting adapter, as the loss would
            batch["reference_logps"] = dpo.batch_reference(model, batch)
        with torch.no_grad():
            logp_sums, _ = lm.batch_logprobs(model, batch)  # padded or packed batch
        gaps.append(float((logp_sums - batch["reference_logps"]).abs().max()))
        return real_loss(model, batch, config)

    monkeypatch.setattr(dpo, "dpo_batch_loss", measuring_loss)
    config = dpo_config(runs, f"bf16-{precompute}", max_steps=1, precision="bf16", eval_every=100)
    out = dpo.run(dataclasses.replace(config, precompute_reference=precompute))
    (row,) = metrics_of(out)
    assert row["loss/train"] == pytest.approx(math.log(2), abs=1e-3)
    assert gaps[0] < 0.02, gaps
