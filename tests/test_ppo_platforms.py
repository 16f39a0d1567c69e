"""PPO where users run it, brought to this CPU: several processes (gloo), bf16 autocast (a GPU's arithmetic),
fp16 loss scaling, and models whose generation_config would change sampling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instruct_cli.core import chat, rl, sampling, training
from instruct_cli.core.errors import UserError
from instruct_cli.steps import ppo
from tests.test_ppo import ppo_config

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.fixture(scope="module")
def pipeline(tiny_sft_rm):
    return {**tiny_sft_rm, "prompts": tiny_sft_rm["data-prompts"]}


def launch(args, processes=2, port=29541, **popen):
    """`accelerate launch --multi_gpu` on a machine without GPUs: a CPU (gloo) group of `processes`."""
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process, timeout=900):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# ------------------------------------------------------------------------------------------- precision
def test_bf16_autocast_first_minibatch_ratio_is_one(pipeline, tmp_path):
    """Under bf16 autocast (what a bf16 GPU runs) the trajectory's log-probs and the update's come from the
    same arithmetic: the first minibatch's ratio is 1. Computing the trajectory without autocast, as the old
    code did, gives a ratio that is not (the test's contrast)."""
    config = ppo_config(pipeline, tmp_path / "unused", precision="bf16")
    bf16 = training.make_accelerator(0, "bf16", "cpu")
    assert bf16.mixed_precision == "bf16"
    roles, tokenizer, _, _ = ppo.load_roles(config, "cpu")
    words = "red blue green dog sun tree water stone".split()
    encoded = [chat.encode_prompt(tokenizer, [{"role": "user", "content": f"{w} cat?"}]) for w in words]
    torch.manual_seed(0)
    batch = ppo.rollout(roles, tokenizer, encoded, config, bf16)
    trajectory, _ = ppo.make_trajectory(roles, batch, config, 0.05, bf16)
    first = torch.arange(config.minibatch_size)
    stats = ppo.update_minibatch(roles, trajectory.rows(first), config, bf16)
    assert stats["policy/approxkl"] < 1e-6 and stats["policy/clipfrac"] == 0.0, stats
    roles.zero_grad(set_to_none=True)

    old_way, _ = ppo.make_trajectory(roles, batch, config, 0.05, training.make_accelerator(0, "no", "cpu"))
    bf16 = training.make_accelerator(0, "bf16", "cpu")
    mixed = ppo.update_minibatch(roles, old_way.rows(first), config, bf16)
    assert mixed["policy/approxkl"] > 1e-6, mixed
    roles.zero_grad(set_to_none=True)


def test_heads_compute_in_fp32_under_autocast():
    from instruct_cli.core.heads import ScalarHead

    head = ScalarHead(16, seed=0)
    hidden = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = head(hidden.bfloat16())
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, head(hidden.bfloat16().float()))


def test_fp16_needs_a_gpu_and_trains_through_the_loss_scaler(pipeline, tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="needs a GPU"):
        training.mixed_precision("fp16", on_cpu=True)
    assert training.mixed_precision("auto", on_cpu=True) == "no"
    # the loss-scaling path accelerate takes on an fp16 GPU, wired here by hand on the CPU: the loss is scaled
    # in backward, unscaled before clipping, and the step goes through the scaler (skipped on overflow)
    accelerator = training.make_accelerator(0, "no", "cpu")
    model = torch.nn.Linear(4, 1)
    reference = torch.nn.Linear(4, 1)
    reference.load_state_dict(model.state_dict())
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainable = training.make_trainable(model, accelerator, lr=0.1, weight_decay=0.0, warmup_ratio=0.0, total_steps=2)
    x = torch.randn(8, 4)
    accelerator.backward(model(x).pow(2).mean())
    assert model.weight.grad.abs().max() > 100  # still scaled by 2^10
    accelerator.clip_grad_norm_(model.parameters(), 1e9)  # unscales
    trainable.optimizer.step()
    plain = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.0)
    reference(x).pow(2).mean().backward()
    plain.param_groups[0]["lr"] = trainable.optimizer.param_groups[0]["lr"]
    plain.step()
    torch.testing.assert_close(model.weight, reference.weight)
    accelerator.scaler = None


# -------------------------------------------------------------------------------------------- sampling
def test_rollouts_sample_exactly_softmax_over_temperature_whatever_the_generation_config(pipeline, tmp_path):
    """A model that ships a repetition penalty, no_repeat_ngram_size and min_new_tokens: the sampler's own
    scores are the policy's log-probs at temperature T, and the first rollout's KL is exactly 0."""
    from transformers import GenerationConfig

    config = ppo_config(pipeline, tmp_path / "unused", temperature=0.7)
    accelerator = training.make_accelerator(0, "no", "cpu")
    roles, tokenizer, _, _ = ppo.load_roles(config, "cpu")
    inner = roles.model.get_base_model()
    hostile = GenerationConfig(
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        min_new_tokens=6,
        suppress_tokens=[5, 6, 7],
        top_k=3,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    inner.generation_config = hostile
    encoded = [chat.encode_prompt(tokenizer, [{"role": "user", "content": f"{w} cat?"}]) for w in ("red", "sun")]
    query, query_mask = sampling.left_pad(encoded, tokenizer.pad_token_id, "cpu")
    roles.use(ppo.POLICY)
    roles.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        output = sampling.sample(
            roles.model,
            tokenizer,
            query,
            query_mask,
            do_sample=True,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            max_new_tokens=12,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert inner.generation_config is hostile  # set back afterwards
    response = output.sequences[:, query.shape[1] :]
    mask, _ = rl.truncate_after_eos(response, tokenizer.eos_token_id)
    sampler = torch.stack(output.scores, 1).log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        logits = ppo.trajectory.response_logits(roles, ppo.POLICY, query, query_mask, response, mask)
    policy = rl.token_logprobs(logits, response, 0.7)
    torch.testing.assert_close(policy * mask, sampler * mask, rtol=1e-4, atol=1e-4)

    torch.manual_seed(0)
    batch = ppo.rollout(roles, tokenizer, encoded, config, accelerator)
    trajectory, stats = ppo.make_trajectory(roles, batch, config, 0.05, accelerator)
    assert stats["objective/kl"] == 0.0
    # without setting the generation_config aside, the penalties change what is sampled
    torch.manual_seed(0)
    with torch.no_grad():
        hostile_output = roles.model.generate(
            input_ids=query, attention_mask=query_mask, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=12
        )
    assert hostile_output.shape[1] - query.shape[1] >= 6  # min_new_tokens applied: not softmax(logits / T)


# ------------------------------------------------------------------------------------------ data parallel
def test_each_process_gets_its_own_share_of_the_prompts(pipeline, tmp_path):
    config = ppo_config(pipeline, tmp_path / "unused", rollout_batch_size=4)

    class Rank:
        def __init__(self, index, count):
            self.process_index, self.num_processes = index, count

    for iteration in range(5):
        one = ppo.iteration_prompts(40, ppo_config(pipeline, tmp_path, rollout_batch_size=8), iteration, Rank(0, 1))
        shares = [ppo.iteration_prompts(40, config, iteration, Rank(r, 2)) for r in range(2)]
        assert not set(shares[0]) & set(shares[1])
        assert shares[0] + shares[1] == one


def test_two_processes_update_like_one_with_twice_the_batch(pipeline, tmp_path):
    """From the same rollouts, 2 processes x 4 rollouts (minibatch 2 each) give the statistics, KL
    controller and weights of 1 process x 8 rollouts (minibatch 4)."""
    args = [str(pipeline["sft"]), str(pipeline["rm"]), str(pipeline["prompts"])]
    worker = str(REPO / "tests" / "ppo_dp_worker.py")
    single = subprocess.run(
        [sys.executable, worker, *args, "8", "4", str(tmp_path / "one.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    code, _, err = finish(launch([worker, *args, "4", "2", str(tmp_path / "two.pt")], port=29542))
    assert code == 0, err[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["stats"].keys() == two["stats"].keys()
    for name, value in one["stats"].items():
        if not name.startswith("time/"):  # seconds differ; every statistic of the learning must not
            assert two["stats"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert two["beta"] == pytest.approx(one["beta"], rel=1e-6)
    assert one["weights"].keys() == two["weights"].keys()
    for name, value in one["weights"].items():
        # atol 1e-4, a tenth of a step (lr = 1e-3): two processes sum the same gradients in another order,
        # pack each minibatch's rollouts with other neighbours (packing.shared_bins) and multiply matrices of
        # half the rows (oneDNN blocks them differently), so float rounding differs, and Adam's g / sqrt(v)
        # turns the rounding of a near-zero gradient into up to a few 1e-5 of weight (measured 4.1e-5 on 1
        # of 1024 weights). A minibatch mixed up or a gradient not summed moves weights by ~lr.
        torch.testing.assert_close(two["weights"][name], value, rtol=1e-4, atol=1e-4)


def ppo_flags(pipeline, out, iterations):
    flags = ["-m", "instruct_cli", "ppo", "--sft", pipeline["sft"], "--reward", pipeline["rm"], "--data"]
    flags += [pipeline["prompts"], "--out", out, "--quantization", "none", "--no-gradient-checkpointing"]
    flags += ["--iterations", iterations, "--rollout-batch-size", 4, "--minibatch-size", 2, "--ppo-epochs", 1]
    flags += ["--max-new-tokens", 12, "--eval-every", 2, "--eval-prompts", 6, "--save-every", 2, "--lr", "1e-3"]
    return [str(flag) for flag in flags]


def test_two_process_ppo_runs_writes_once_and_resumes_after_ctrl_c(pipeline, tmp_path):
    """The real command on 2 processes: complete, one metrics row per iteration, samples without duplicates;
    interrupted with Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and resumed, it ends
    with the adapter of the uninterrupted run."""
    code, _, err = finish(launch(ppo_flags(pipeline, tmp_path / "straight", 6), port=29543))
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    samples = [json.loads(line) for line in (tmp_path / "straight" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 6  # evaluations at 2, 4, 6 of 6 prompts, written once
    for iteration in (2, 4, 6):
        prompts = [json.dumps(s["prompt"]) for s in samples if s["iteration"] == iteration]
        assert len(prompts) == len(set(prompts)) == 6
    assert err.count("rollouts on 2 processes") == 1  # one process talks

    interrupted = launch(ppo_flags(pipeline, tmp_path / "resumed", 6), port=29544, start_new_session=True)
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and interrupted.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(interrupted.pid, signal.SIGINT)
    code, _, err = finish(interrupted)
    assert code != 0
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted", err[-3000:]
    # Ctrl-C stopped the run at an iteration boundary and checkpointed there, every logged row kept
    logged = len(metrics.read_text().splitlines())
    saved = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "resumed" / "checkpoints").glob("step-*.pt"))
    assert saved[-1] == logged and 3 <= logged < 6, (saved, logged)
    code, _, err = finish(launch([*ppo_flags(pipeline, tmp_path / "resumed", 6), "--resume"], port=29545))
    assert code == 0, err[-3000:]
    resumed_rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in resumed_rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, resumed_rows):
        assert b["objective/score"] == pytest.approx(a["objective/score"], rel=1e-4, abs=1e-5)
    from safetensors.torch import load_file

    for folder in ("adapter", "value"):
        a = load_file(tmp_path / "straight" / folder / "adapter_model.safetensors")
        b = load_file(tmp_path / "resumed" / folder / "adapter_model.safetensors")
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
