"""eval: win-rate, bootstrap interval, distinct-n and KL against hand-computed and exact values; plots;
the whole report from the CLI on a tiny sft -> rm -> ppo pipeline; --generations; --compare; bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from instruct_cli.core import artifacts, models
from instruct_cli.core.chat import encode_prompt
from instruct_cli.core.config import EvalConfig
from instruct_cli.steps import evaluate
from tests.cli_helpers import fails, invoke

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ statistics
def test_win_rate_counts_ties_as_half():
    assert evaluate.outcomes([1, 2, 3], [1, 1, 4]).tolist() == [0.5, 1.0, 0.0]
    assert evaluate.win_rate([1, 2, 3], [1, 1, 4]) == pytest.approx((0.5 + 1 + 0) / 3)
    assert evaluate.win_rate([1.0 + 5e-7], [1.0]) == 0.5  # equal within 1e-6: a tie
    assert evaluate.win_rate([1.0 + 5e-6], [1.0]) == 1.0
    assert evaluate.win_rate([0.0, 0.0, 0.0, 0.0], [1.0, -1.0, -1.0, 0.0]) == pytest.approx((0 + 1 + 1 + 0.5) / 4)
    with pytest.raises(ValueError):
        evaluate.outcomes([1.0, 2.0], [1.0])


def test_bootstrap_interval_matches_hand_computed_cases():
    # no spread, no uncertainty
    assert evaluate.bootstrap_interval([1.0] * 5) == (1.0, 1.0)
    assert evaluate.bootstrap_interval([0.5] * 5) == (0.5, 0.5)
    # two prompts, a win and a loss: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1
    assert evaluate.bootstrap_interval([1.0, 0.0]) == (0.0, 1.0)
    # a win, a tie and a loss: a mean of 0 (or of 1) has probability 1/27 = 3.7% > 2.5%
    assert evaluate.bootstrap_interval([1.0, 0.5, 0.0]) == (0.0, 1.0)
    # 60 wins in 100: close to the normal approximation 0.6 +- 1.96 * sqrt(0.24 / 100)
    outcomes = [1.0] * 60 + [0.0] * 40
    low, high = evaluate.bootstrap_interval(outcomes, resamples=2000, seed=1)
    half_width = 1.96 * math.sqrt(0.6 * 0.4 / 100)
    assert low == pytest.approx(0.6 - half_width, abs=0.02) and high == pytest.approx(0.6 + half_width, abs=0.02)
    # seeded: the same interval every time; another seed, a slightly different one
    assert evaluate.bootstrap_interval(outcomes, seed=3) == evaluate.bootstrap_interval(outcomes, seed=3)
    assert math.isnan(evaluate.bootstrap_interval([])[0])


def test_distinct_n_and_sequence_kl_by_hand():
    texts = ["a b a b", "a b"]
    assert evaluate.distinct_n(texts, 1) == pytest.approx(2 / 6)
    assert evaluate.distinct_n(texts, 2) == pytest.approx(2 / 4)  # "a b", "b a", "a b" + "a b"
    assert evaluate.distinct_n(["one"], 2) == 0.0
    kl = evaluate.sequence_kl([[-1.0, -2.0], [-0.5]], [[-1.5, -1.0], [-0.5]])
    assert kl == pytest.approx([0.5 - 1.0, 0.0])
    with pytest.raises(ValueError):
        evaluate.sequence_kl([[-1.0, -2.0]], [[-1.0]])


# --------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_sft_rm):
    """The shared tiny sft and rm runs (conftest) and a 2-iteration ppo run from them."""
    root = tmp_path_factory.mktemp("eval-pipeline")
    invoke(
        "ppo",
        "--sft",
        tiny_sft_rm["sft"],
        "--reward",
        tiny_sft_rm["rm"],
        "--data",
        tiny_sft_rm["data-prompts"],
        "--out",
        root / "ppo",
        "--quantization",
        "none",
        "--no-gradient-checkpointing",
        "--iterations",
        2,
        "--rollout-batch-size",
        4,
        "--minibatch-size",
        4,
        "--ppo-epochs",
        1,
        "--max-new-tokens",
        8,
        "--lr",
        "1e-2",
        "--eval-every",
        100,
        "--eval-prompts",
        2,
    )
    return {**tiny_sft_rm, "root": root, "ppo": root / "ppo"}


@pytest.fixture(scope="module")
def report(pipeline):
    """One full evaluation through the CLI: sft and ppo against the bare base model."""
    out = pipeline["root"] / "report"
    result = invoke(
        "eval",
        "--models",
        f"{pipeline['sft']},{pipeline['ppo']}",
        "--baseline",
        "base",
        "--reward",
        pipeline["rm"],
        "--data",
        pipeline["data-prompts"],
        "--out",
        out,
        "--quantization",
        "none",
        "--max-new-tokens",
        8,
        "--bootstrap",
        200,
    )
    return {"out": out, "output": result.output}


def test_cli_writes_every_output(pipeline, report):
    out, sft, ppo = report["out"], str(pipeline["sft"]), str(pipeline["ppo"])
    manifest = artifacts.require_complete(out, "report")
    data = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in data["models"]]
    assert names == [sft, ppo, "base"] and data["baseline"] == "base"
    prompts = data["prompts"]
    assert prompts == len(pipeline["data-prompts"].joinpath("prompts.eval.jsonl").read_text().splitlines()) > 0
    by_name = {m["name"]: m for m in data["models"]}
    for name in (sft, ppo):
        win = by_name[name]["win_rate"]
        assert win["against"] == "base" and win["wins"] + win["ties"] + win["losses"] == prompts
        assert win["low"] <= win["rate"] <= win["high"]
        assert win["rate"] == pytest.approx((win["wins"] + 0.5 * win["ties"]) / prompts)
    assert by_name["base"]["win_rate"] is None
    # KL: an sft run is its own reference; ppo and base are measured against the sft run
    assert by_name[sft]["kl"] == {"mean": 0.0, "std": 0.0}
    assert math.isfinite(by_name[ppo]["kl"]["mean"]) and by_name[ppo]["reference"] == sft
    assert by_name["base"]["kl"]["mean"] > 1.0  # the bare base is far from the fine-tuned model
    for model in data["models"]:  # perplexity and RM accuracy found through the runs' own data folders
        assert model["perplexity"]["perplexity"] > 1 and model["perplexity"]["conversations"] > 0
        assert 0 <= model["eos_rate"] <= 1 and 1 <= model["length"] <= 8 and 0 <= model["distinct_2"] <= 1
        assert model["reward"]["n"] == prompts
    assert 0 <= data["reward_model"]["accuracy"] <= 1 and data["reward_model"]["pairs"] > 0
    # settings and the inputs' hashes that produced the figures
    assert data["settings"]["temperature"] == 0.7 and data["settings"]["max_new_tokens"] == 8
    assert data["inputs"]["reward"]["sha256"] == artifacts.sha256_folder(pipeline["rm"])
    assert data["inputs"][f"model:{ppo}"]["sha256"] == artifacts.sha256_folder(pipeline["ppo"])
    assert manifest["parents"] == data["inputs"]
    assert manifest["metrics"][f"{ppo}/win_rate"] == by_name[ppo]["win_rate"]["rate"]
    assert manifest["metrics"][f"{ppo}/kl"] == by_name[ppo]["kl"]["mean"]
    # samples side by side: every prompt, every model
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == prompts and all(set(row["responses"]) == set(names) for row in samples)
    for name in names:
        assert np.mean(_rewards_from(samples, name)) == pytest.approx(by_name[name]["reward"]["mean"])
    assert np.mean([row["responses"][ppo]["kl"] for row in samples]) == pytest.approx(by_name[ppo]["kl"]["mean"])
    # the terminal shows the first answers side by side under the table
    shown = " ".join(report["output"].split())
    assert "3 of the" in shown and "answers side by side" in shown
    first = samples[0]["responses"][ppo]
    assert f"(reward {first['reward']:+.2f})" in shown
    # report.md: the verdict first, then the table, samples and plots
    markdown = (out / "report.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "# Evaluation report"
    assert lines[2].startswith(f"**{sft} ") and "of prompts (95% CI" in lines[2] and "base" in lines[2]
    assert f"| {ppo} |" in markdown and "| base (baseline) |" in markdown and "## Samples" in markdown
    for plot in ("reward_distribution.png", "win_rate.png", "reward_kl.png", "training_curves.png"):
        assert (out / plot).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({plot})" in markdown and plot in data["plots"]
    # the terminal shows the table and the verdict
    terminal = " ".join(report["output"].split())
    assert "reward model accuracy" in terminal and "of prompts (95% CI" in terminal
    assert any(verdict in terminal for verdict in ("beats base", "loses to base", "are level by"))


def test_reward_kl_frontier_draws_each_model_and_each_ppo_runs_in_run_evals(tmp_path):
    """The frontier plot: one point per model (this eval's mean KL and reward) and, per ppo run, the held-out
    reward of its in-run evaluations in order; nothing drawn when there is nothing to show."""
    run = tmp_path / "ppo"
    run.mkdir()
    rows = [{"step": 1, "objective/score": 0.1}, {"step": 10, "eval/reward": 0.2, "eval/kl": 0.5},
            {"step": 20, "eval/reward": 0.6, "eval/kl": 1.5}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    models_ = [
        {"name": "sft", "kl": {"mean": 0.0, "std": 0.0}, "reward": {"mean": -0.1}},
        {"name": "ppo", "kl": {"mean": 1.4, "std": 0.3}, "reward": {"mean": 0.5}},
    ]
    (panel,) = evaluate.plot_reward_kl(models_, [("ppo", run)], tmp_path / "frontier.png", "the rm").values()
    assert panel == {"ppo: in-run evals": [0.2, 0.6], "sft: this eval": [-0.1], "ppo: this eval": [0.5]}
    assert (tmp_path / "frontier.png").read_bytes()[:8] == PNG_SIGNATURE
    assert evaluate.plot_reward_kl([], [], tmp_path / "none.png", "the rm") is None


def _rewards_from(samples, name):
    return [row["responses"][name]["reward"] for row in samples]


def test_generations_file_is_scored_like_generated_samples(pipeline, report, tmp_path):
    """A report's samples.jsonl read back with --generations gives the same rewards (same RM, same texts)."""
    sft, ppo = str(pipeline["sft"]), str(pipeline["ppo"])
    out = tmp_path / "rescored"
    invoke(
        "eval",
        "--models",
        f"{sft},{ppo}",
        "--reward",
        pipeline["rm"],
        "--generations",
        report["out"] / "samples.jsonl",
        "--out",
        out,
        "--quantization",
        "none",
        "--bootstrap",
        200,
    )
    first = [json.loads(line) for line in (report["out"] / "samples.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for name in (sft, ppo):  # the token ids travel with the samples: lengths, EOS and KL are exactly the same
        for field in ("text", "ids", "tokens", "eos"):
            assert [r["responses"][name][field] for r in again] == [r["responses"][name][field] for r in first]
        assert _rewards_from(again, name) == pytest.approx(_rewards_from(first, name), abs=1e-5)
        assert [r["responses"][name]["kl"] for r in again] == pytest.approx(
            [r["responses"][name]["kl"] for r in first], abs=1e-4
        )
    assert json.loads((out / "report.json").read_text())["baseline"] == sft  # the first model by default
    assert "generations" in artifacts.read_manifest(out)["parents"]

    # --compare prints the differences between the two reports
    result = invoke("eval", "--compare", report["out"], out)
    text = " ".join(result.output.split())
    assert "reward" in text and "win-rate" in text and "change (b - a)" in text
    assert "baseline" in text and "generations" in text  # the settings that differ
    differences = evaluate.compare([report["out"], out])
    assert any(row[:2] == [sft, "reward"] and row[4] in ("+0.000", "-0.000") for row in differences["metrics"])


def test_plots_are_pngs_with_the_expected_series(pipeline, tmp_path):
    rewards = {"runs/sft": [0.1, -0.4, 1.2, 0.3], "runs/ppo": [0.9, 1.5, 0.2, 1.1]}
    series = evaluate.plot_reward_distribution(rewards, tmp_path / "rewards.png")
    (panel,) = series.values()
    assert set(panel) == {"runs/sft (mean +0.30)", "runs/ppo (mean +0.93)"}
    assert all(sum(counts) == 4 for counts in panel.values())

    models_ = [
        {"name": "runs/sft", "win_rate": None},
        {"name": "runs/ppo", "win_rate": {"rate": 0.68, "low": 0.55, "high": 0.8}},
        {"name": "runs/ppo2", "win_rate": {"rate": 0.3, "low": 0.2, "high": 0.41}},
    ]
    (panel,) = evaluate.plot_win_rates(models_, "runs/sft", tmp_path / "win.png").values()
    assert panel["win-rate vs runs/sft"] == pytest.approx([68.0, 30.0])

    runs = [("sft", "sft", pipeline["sft"]), ("rm", "rm", pipeline["rm"]), ("ppo", "ppo", pipeline["ppo"])]
    panels = evaluate.plot_training_curves(runs, tmp_path / "curves.png")
    assert set(panels) == {
        "sft (sft): loss",
        "rm (rm): loss",
        "rm (rm): accuracy",
        "ppo (ppo): score",
        "ppo (ppo): KL (nats)",
        "ppo (ppo): beta",
    }
    sft_rows = evaluate.read_metrics(pipeline["sft"])
    ppo_rows = evaluate.read_metrics(pipeline["ppo"])
    assert panels["sft (sft): loss"]["loss/train"] == pytest.approx([row["loss/train"] for row in sft_rows])
    assert panels["ppo (ppo): beta"]["objective/beta"] == pytest.approx([row["objective/beta"] for row in ppo_rows])
    assert len(panels["ppo (ppo): KL (nats)"]["objective/kl"]) == 2

    import matplotlib.image

    for name in ("rewards.png", "win.png", "curves.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, channels = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100 and channels in (3, 4)


def test_reading_generate_output_as_generations(tmp_path):
    """Rows of `instruct generate --output` (one model per row): prompts in file order, only those every model
    answered, at most --max-prompts of them."""
    rows = [
        {"prompt": "one", "response": "a", "model": "runs/sft"},
        {"prompt": [{"role": "user", "content": "two"}], "response": "b", "model": "runs/sft/"},
        {"prompt": "one", "response": "c", "model": "runs/ppo"},
        {"prompt": "two", "response": {"text": "d", "eos": False}, "model": "runs/ppo"},
        {"prompt": "three", "response": "e", "model": "runs/ppo"},
        {"prompt": "four", "response": "f", "model": "runs/sft"},
        {"prompt": "four", "response": "g", "model": "runs/ppo"},
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    entries = [evaluate.Entry("runs/sft", "runs/sft", "sft"), evaluate.Entry("runs/ppo", "runs/ppo", "ppo")]
    prompts, answers = evaluate.read_generations(path, entries, max_prompts=2)
    assert [p[-1]["content"] for p in prompts] == ["one", "two"]
    assert [a["text"] for a in answers["runs/sft"]] == ["a", "b"] and answers["runs/ppo"][1]["eos"] is False
    prompts, _ = evaluate.read_generations(path, entries, max_prompts=10)
    assert [p[-1]["content"] for p in prompts] == ["one", "two", "four"]  # "three" has no sft answer


# ---------------------------------------------------------------------------------------------- the KL
@pytest.fixture(scope="module")
def two_models(pipeline):
    """The sft run (the model) and the bare tiny base (the reference): same tokenizer, different weights."""
    model, tokenizer, _ = models.load_for_inference(str(pipeline["sft"]), "none", "cpu")
    reference, _, _ = models.load_for_inference(str(pipeline["model"]), "none", "cpu")
    return model, reference, tokenizer


def test_kl_estimate_against_the_exact_kl_of_one_token(two_models):
    """With one response token, KL(p || q) = sum_v p(v) (log p(v) - log q(v)) at the prompt's last position."""
    model, reference, tokenizer = two_models
    temperature = 0.7
    prompt = [{"role": "user", "content": "red cat sun?"}]
    query = encode_prompt(tokenizer, prompt)
    with torch.no_grad():
        p_logits = model(input_ids=torch.tensor([query])).logits[0, -1].double() / temperature
        q_logits = reference(input_ids=torch.tensor([query])).logits[0, -1].double() / temperature
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    exact = float((log_p.exp() * (log_p - log_q)).sum())
    assert exact > 0.1

    # every token of the vocabulary as a one-token response: the log-ratios weighted by p sum to the exact KL
    vocab = list(range(len(log_p)))
    own = evaluate.response_logprobs(
        model,
        [query] * len(vocab),
        [[v] for v in vocab],
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        batch_size=128,
    )
    ref = evaluate.response_logprobs(
        reference,
        [query] * len(vocab),
        [[v] for v in vocab],
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        batch_size=128,
    )
    assert [lp[0] for lp in own] == pytest.approx(log_p.tolist(), abs=1e-4)
    log_ratio = torch.tensor(evaluate.sequence_kl(own, ref), dtype=torch.float64)
    assert float((log_p.exp() * log_ratio).sum()) == pytest.approx(exact, abs=1e-4)

    # and the sample estimate over the model's own samples (the real sampling code) approaches it
    torch.manual_seed(0)
    samples = evaluate.sample_responses(
        model,
        tokenizer,
        [prompt] * 1500,
        max_new_tokens=1,
        temperature=temperature,
        top_p=1.0,
        batch_size=500,
        max_length=1024,
    )
    own = evaluate.response_logprobs(
        model,
        samples.queries,
        samples.responses,
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        batch_size=500,
    )
    ref = evaluate.response_logprobs(
        reference,
        samples.queries,
        samples.responses,
        pad_id=tokenizer.pad_token_id,
        temperature=temperature,
        batch_size=500,
    )
    estimates = np.array(evaluate.sequence_kl(own, ref))
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < 4 * standard_error + 1e-3, (estimates.mean(), exact, standard_error)


def test_batched_log_probs_equal_an_unpadded_recomputation(two_models):
    """Prompts of different lengths and responses of different lengths in one batch (left and right padding):
    every per-token log-prob equals a plain forward pass over that one prompt + response."""
    model, reference, tokenizer = two_models
    prompts = [[{"role": "user", "content": text}] for text in ("red?", "blue green cat dog sun?", "tree water?")]
    torch.manual_seed(1)
    samples = evaluate.sample_responses(
        model, tokenizer, prompts, max_new_tokens=6, temperature=0.7, top_p=1.0, batch_size=3, max_length=1024
    )
    assert len({len(q) for q in samples.queries}) == 3
    for scorer in (model, reference):
        batched = evaluate.response_logprobs(
            scorer, samples.queries, samples.responses, pad_id=tokenizer.pad_token_id, temperature=0.7, batch_size=3
        )
        for query, response, got in zip(samples.queries, samples.responses, batched):
            with torch.no_grad():
                logits = scorer(input_ids=torch.tensor([query + response])).logits[0].float() / 0.7
            expected = torch.log_softmax(logits[len(query) - 1 : -1], -1).gather(-1, torch.tensor(response)[:, None])
            assert got == pytest.approx(expected[:, 0].tolist(), abs=1e-4)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_a_one_paragraph_error(pipeline, report, tmp_path):
    sft, ppo, rm = str(pipeline["sft"]), str(pipeline["ppo"]), str(pipeline["rm"])
    data = str(pipeline["data-prompts"])
    common = ["eval", "--quantization", "none", "--out", str(tmp_path / "x")]
    assert "--reward" in fails(*common, "--models", sft, "--data", data)
    assert "--models" in fails(*common, "--reward", rm, "--data", data)
    assert "needs the output of `instruct sft, ppo or dpo`" in fails(
        *common, "--models", f"{sft},{ppo}", "--baseline", rm, "--reward", rm, "--data", data
    )
    assert "needs the output of `instruct rm`" in fails(*common, "--models", sft, "--reward", sft, "--data", data)
    assert "no sft or ppo run folder" in fails(
        *common, "--models", pipeline["model"], "--baseline", "base", "--reward", rm, "--data", data
    )
    assert "listed twice" in fails(*common, "--models", f"{sft},{sft}/", "--reward", rm, "--data", data)
    same_run = f"{sft}/../{Path(sft).name}"  # another spelling of the same folder
    assert "listed twice" in fails(*common, "--models", f"{sft},{same_run}", "--reward", rm, "--data", data)
    assert "max_prompts" in fails(*common, "--models", sft, "--reward", rm, "--data", data, "--max-prompts", 0)
    assert "does not exist" in fails(*common, "--models", sft, "--reward", rm, "--generations", tmp_path / "no.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "hi", "response": "hello", "model": "runs/elsewhere"}) + "\n")
    message = fails(*common, "--models", sft, "--reward", rm, "--generations", other)
    assert "no responses of" in message and "runs/elsewhere" in message
    assert "holds prompts data" in fails(*common, "--models", sft, "--reward", rm, "--data", data, "--sft-data", data)
    assert "already holds a complete report" in fails(
        "eval", "--models", sft, "--reward", rm, "--data", data, "--quantization", "none", "--out", report["out"]
    )
    assert "needs the output of `instruct eval`" in fails("eval", "--compare", report["out"], sft)

    # an unfinished input run is refused, with how to finish it
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    manifest = artifacts.read_manifest(pipeline["ppo"])
    artifacts.atomic_write_json(unfinished / "manifest.json", {**manifest, "status": "interrupted"})
    assert "--resume" in fails(*common, "--models", f"{sft},{unfinished}", "--reward", rm, "--data", data)


def test_a_failed_evaluation_never_looks_complete(pipeline, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(evaluate.measure, "answer_and_measure", broken)  # where run looks it up
    config = EvalConfig(
        models=[str(pipeline["sft"])],
        reward=pipeline["rm"],
        data=pipeline["data-prompts"],
        out=tmp_path / "half",
        quantization="none",
    )
    with pytest.raises(RuntimeError):
        evaluate.run(config)
    assert artifacts.read_manifest(tmp_path / "half")["status"] == "failed"
    assert not (tmp_path / "half" / "report.json").exists()
    message = fails("eval", "--compare", tmp_path / "half", tmp_path / "half")
    assert "not complete" in message
    with pytest.raises(RuntimeError):  # a report has nothing to resume: running it again starts it over
        evaluate.run(config)


def test_eval_and_ppo_give_the_same_reward_to_the_same_sample(pipeline, tmp_path):
    """eval scores the sampled ids with PPO's missing-EOS penalty: a response cut at max_new_tokens is not
    scored as a complete one, and both tools report the same reward for each sample."""
    from instruct_cli.core import chat, recipes, training
    from instruct_cli.core import config as cfg
    from instruct_cli.steps import ppo
    from instruct_cli.steps.evaluate import entries, measure

    config = recipes.build_config(
        cfg.PPOConfig,
        "ppo",
        None,
        dict(sft=pipeline["sft"], reward=pipeline["rm"], data=pipeline["data-prompts"], out=tmp_path / "x")
        | dict(quantization="none", gradient_checkpointing=False, max_new_tokens=2, missing_eos_penalty=1.5),
    )
    accelerator = training.make_accelerator(0, "no", "cpu")
    roles, tokenizer, _, _ = ppo.load_roles(config, "cpu")
    prompts = [[{"role": "user", "content": f"{w} cat sun?"}] for w in ("red", "blue", "green", "dog")]
    torch.manual_seed(0)
    batch = ppo.rollout(roles, tokenizer, [chat.encode_prompt(tokenizer, p) for p in prompts], config, accelerator)
    ppo_rewards = ppo.trajectory.score(roles, batch, config.missing_eos_penalty).tolist()
    assert not batch.ended.all()  # 2 new tokens: some answers are cut, and penalised
    samples = entries.Samples(
        [chat.encode_prompt(tokenizer, p) for p in prompts],
        [row[mask.bool()].tolist() for row, mask in zip(batch.response, batch.response_mask)],
        [
            tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
            for row, mask in zip(batch.response, batch.response_mask)
        ],
        batch.ended.tolist(),
    )
    entry = entries.Entry(name="ppo", spec=str(pipeline["sft"]), kind="sft", samples=samples)
    eval_config = EvalConfig(reward=pipeline["rm"], quantization="none", device="cpu", missing_eos_penalty=1.5)
    scored = measure.score_with_reward_model([entry], prompts, [], "", eval_config)
    assert scored["scored_on"] == {"ppo": "sampled ids"}
    assert entry.rewards == pytest.approx(ppo_rewards, abs=1e-4)
