"""`instruct plan`: the memory arithmetic against real models, hand-computed cases, verdicts and the CLI.

Fast: configs are built on the meta device (no weights) and the only weights loaded are the tiny model's.
"""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import training
from instruct_cli.core.config import EvalConfig, PPOConfig, RMConfig, SFTConfig
from instruct_cli.core.errors import UserError
from instruct_cli.steps import plan

runner = CliRunner()
GiB = plan.GiB

LLAMA = dict(
    model_type="llama",
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama, grouped-query, untied": LLAMA,
    "llama, tied, biases": {**LLAMA, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    "llama, explicit head_dim": {**LLAMA, "head_dim": 16},
    "mistral": {**LLAMA, "model_type": "mistral"},
    "qwen2 (q/k/v bias)": {**LLAMA, "model_type": "qwen2"},
    "qwen3 (per-head q/k norms)": {**LLAMA, "model_type": "qwen3", "head_dim": 16},
    "phi3 (fused qkv and gate/up)": {**LLAMA, "model_type": "phi3", "num_key_value_heads": 8, "pad_token_id": 0},
}


def meta_model(values: dict):
    """The real transformers model of a config, built on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ----------------------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_equals_the_real_model(name):
    values = CONFIGS[name]
    model = meta_model(values)
    counts = plan.parameter_counts(plan.ModelShape.from_config(values, name))
    assert counts.total == sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    assert counts.linear == linear  # what nf4/int8 quantise


def test_reference_models_have_their_published_sizes():
    sizes = {
        "Qwen/Qwen2.5-0.5B-Instruct": 0.494e9,
        "Qwen/Qwen2.5-1.5B-Instruct": 1.544e9,
        "Qwen/Qwen2.5-7B-Instruct": 7.616e9,
        "meta-llama/Llama-3.1-8B-Instruct": 8.030e9,
        "Qwen/Qwen2.5-14B-Instruct": 14.77e9,
    }
    for name, size in sizes.items():
        assert plan.parameter_counts(plan.read_model_shape(name)).total == pytest.approx(size, rel=0.002)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_count_equals_peft_trainable_count(tiny_model_dir, targets):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from instruct_cli.core import models

    options = SFTConfig(lora_r=8, lora_targets=targets)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), models.lora_config(options))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = plan.read_model_shape(str(tiny_model_dir))
    assert plan.lora_parameters(shape, plan.lora_for(shape, options)) == trainable


def test_unknown_lora_target_is_a_user_error():
    shape = plan.ModelShape.from_config(LLAMA, "llama")
    with pytest.raises(UserError, match="q_projection"):
        plan.lora_targets(shape, ["q_projection"])


def test_kv_cache_bytes_hand_computed():
    shape = plan.ModelShape(
        name="hand", vocab=10, hidden=32, intermediate=64, layers=2, heads=8, kv_heads=2, head_dim=4
    )
    # 2 (k and v) x 2 layers x 2 kv heads x 4 dims x 10 tokens x 3 sequences x 2 bytes
    assert plan.kv_cache_bytes(shape, batch=3, tokens=10, nbytes=2) == 2 * 2 * 2 * 4 * 10 * 3 * 2 == 1920


def test_nf4_costs_about_half_a_byte_per_parameter_plus_its_constants():
    weights = 7_000_000_000
    per_param = plan.nf4_bytes(weights, modules=0) / weights
    assert per_param == pytest.approx(0.5 + 0.127 / 8, rel=0.002)


def test_weights_of_a_4bit_8b_model_keep_fp32_embeddings_for_training():
    shape = plan.read_model_shape("meta-llama/Llama-3.1-8B-Instruct")
    counts = plan.parameter_counts(shape)
    training = plan.base_weight_bytes(shape, "nf4", plan.precision("cuda", "nf4", training=True))
    inference = plan.base_weight_bytes(shape, "nf4", plan.precision("cuda", "nf4", training=False))
    assert training - inference == counts.unquantised * 2  # kbit preparation: bf16 -> fp32
    assert 7.0 * GiB < training < 7.5 * GiB
    assert plan.base_weight_bytes(shape, "none", plan.precision("cuda", "none", True)) == counts.total * 2


def test_layer_inventory_hand_computed():
    # fp32 on a CPU, no dropout, MHA (no repeated k/v): per token 4 bytes x (2 norm inputs h, normed inputs of
    # q/k/v and gate/up h each, q, k, v, attention output, the float mask (seq), 4 MLP tensors, 7 LoRA A outputs
    # of width r, 2 x 1/rms, the log-sum-exp per head)
    shape = plan.ModelShape(
        name="hand", vocab=10, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=4, head_dim=8
    )
    lora = plan.Lora(2, plan.lora_targets(shape, ["all-linear"]))
    prec = plan.precision("cpu", "none", training=True)
    h, i, r, seq = 32, 64, 2, 16
    expected = 4 * (2 * h + 2 * h + 4 * h + seq + 4 * i + 7 * r + 2 + 4)
    assert plan.layer_bytes_per_token(shape, prec, lora, seq) == expected
    # a GPU keeps the attention tensors and LoRA inputs in bf16, the stream (kbit) and norms in fp32
    gpu = plan.precision("cuda", "nf4", training=True)
    assert plan.layer_bytes_per_token(shape, gpu, lora, seq) < expected


def test_saved_tensors_of_a_real_forward_match_the_inventory(tiny_model_dir):
    """Everything autograd keeps during a training forward of the tiny model, counted with saved-tensor
    hooks, equals the activation estimate (fp32, without checkpointing, with and without LoRA dropout)."""
    from instruct_cli.core import models

    for dropout in (0.0, 0.1):
        config = SFTConfig(
            model=str(tiny_model_dir), quantization="none", gradient_checkpointing=False, lora_dropout=dropout, lora_r=4
        )
        model, _ = training.load_trainable_policy(
            config, models.resolve_model(str(tiny_model_dir)), torch.device("cpu")
        )
        model.train()
        batch, seq = 3, 40
        ids = torch.randint(5, 300, (batch, seq))
        mask = torch.ones_like(ids)
        mask[-1, -2:] = 0  # padding: the mask is materialised, as in real batches
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(tensor, parameters=parameters, saved=saved):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, attention_mask=mask)
        shape = plan.read_model_shape(str(tiny_model_dir))
        kept, _ = plan.training_activation_bytes(
            shape, plan.precision("cpu", "none", True), plan.lora_for(shape, config), batch, seq, checkpointing=False
        )
        assert kept == pytest.approx(sum(saved.values()), rel=0.03), dropout


def _bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_plan.py"
    spec = importlib.util.spec_from_file_location("bench_plan", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_plan", module)  # dataclasses look their module up
    spec.loader.exec_module(sys.modules["bench_plan"])
    return sys.modules["bench_plan"]


@pytest.mark.parametrize("step", ["sft", "ppo"])
def test_estimate_matches_the_measured_peak_of_a_tiny_step(tmp_path, tiny_model_dir, step):
    """The benchmark's measurement (allocator events via torch.profiler) on the tiny model: within 10%."""
    bench = _bench()
    shape = plan.read_model_shape(str(tiny_model_dir))
    args = SimpleNamespace(
        batch_size=2,
        max_length=64,
        lora_r=4,
        lora_dropout=0.05,
        bf16=False,
        work=tmp_path,
        rollout_batch_size=4,
        minibatch_size=2,
        prompt_length=24,
        new_tokens=8,
    )
    measured, estimate, _ = bench.BENCHES[step](tiny_model_dir, args, "none", False, shape, "cpu")
    assert estimate.total == pytest.approx(measured.total, rel=0.10)


# ------------------------------------------------------------------------------------ steps and verdicts
def test_checkpointing_lowers_activations_and_rm_has_no_logits():
    shape = plan.read_model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    on = plan.estimate_sft(shape, SFTConfig(gradient_checkpointing=True))
    off = plan.estimate_sft(shape, SFTConfig(gradient_checkpointing=False))
    assert on.total < off.total and on.activations < off.activations / 5
    assert on.logits == 3 * 4 * 1024 * shape.vocab * 4  # 3 fp32 copies of batch x seq x vocab
    assert plan.estimate_rm(shape, RMConfig()).logits == 0
    assert (
        sum(
            vars(on)[k]
            for k in ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "kv_cache", "workspace")
        )
        == on.total
    )


def test_ppo_keeps_four_adapters_and_two_heads_and_trains_two():
    shape = plan.read_model_shape("Qwen/Qwen2.5-0.5B-Instruct")
    lora = plan.lora_for(shape, SFTConfig())
    ppo = plan.estimate_ppo(shape, PPOConfig(), lora, lora)
    per_adapter = plan.lora_parameters(shape, lora)
    assert ppo.adapters == 4 * (4 * per_adapter + 2 * (shape.hidden + 1))
    assert {m.name for m in ppo.moments} >= {
        "rollout prefill",
        "rollout end",
        "scoring",
        "rollout log-probs",
        "update loss",
        "update backward",
        "optimizer step",
    }
    assert ppo.optimizer == 8 * (2 * per_adapter + shape.hidden + 1)
    # the rollout's KV cache: fp32 (the kbit-prepared stream) x prompt + new tokens x rollouts
    end = next(m for m in ppo.moments if m.name == "rollout end")
    assert end.kv_cache == plan.kv_cache_bytes(shape, 16, 512 + 64, 4)


def test_merged_rollouts_hold_a_copy_of_the_targeted_weights_on_an_unquantised_base():
    shape = plan.read_model_shape("Qwen/Qwen2.5-0.5B-Instruct")
    lora = plan.lora_for(shape, SFTConfig())
    linears = shape.linears()
    copy = shape.layers * sum(i * o for i, o in linears.values()) * 2  # bf16 on a GPU, all-linear targets

    def rollout(config):
        return next(m for m in plan.estimate_ppo(shape, config, lora, lora).moments if m.name == "rollout end")

    assert rollout(PPOConfig(quantization="none")).workspace == copy
    assert rollout(PPOConfig(quantization="none", merged_rollouts=False)).workspace == 0
    assert rollout(PPOConfig(quantization="nf4")).workspace == 0  # a quantised base is never merged
    notes = plan.estimate_ppo(shape, PPOConfig(quantization="none"), lora, lora).notes
    assert any("--merged-rollouts" in note for note in notes)


def test_a_step_that_does_not_fit_gets_suggestions_that_fit():
    shape = plan.read_model_shape("meta-llama/Llama-3.1-8B-Instruct")
    config = SFTConfig(gradient_checkpointing=False, batch_size=2, max_length=1024)
    step = plan.StepPlan("sft", config, shape, (plan.lora_for(shape, config),))
    memory = 16 * GiB
    assert not plan.judge(step.estimate().total, memory).fits
    suggestions = plan.suggest(step, memory)
    assert suggestions[0].startswith("gradient_checkpointing: true")
    fixed = step.estimate(replace(config, gradient_checkpointing=True)).total
    assert plan.judge(fixed, memory).fits
    # a smaller card: no single change is enough, a combination is
    combined = plan.suggest(step, 12 * GiB)
    assert len(combined) == 1 and combined[0].startswith("together: gradient_checkpointing: true")
    # and one on which nothing is enough
    impossible = plan.suggest(step, 4 * GiB)
    assert impossible[0].startswith("does not fit even with")


def test_verdicts_reserve_the_cuda_context_and_mark_tight_fits():
    assert plan.judge(int(11.6 * GiB), 12 * GiB).label == "does not fit"
    assert plan.judge(int(11.2 * GiB), 12 * GiB).label == "tight"
    assert plan.judge(int(8 * GiB), 12 * GiB).label == "fits"
    assert plan.judge(int(11.9 * GiB), 12 * GiB, device="cpu").fits


def test_memory_sizes_and_gpu_names():
    assert plan.parse_memory("12GB") == 12 * GiB
    assert plan.parse_memory("11.5 GiB") == int(11.5 * GiB)
    assert plan.parse_memory("24000MB") == 24000 * 1024**2
    assert plan.parse_memory("8") == 8 * GiB
    for bad in ("twelve", "12XB", "-3GB", ""):
        with pytest.raises(UserError):
            plan.parse_memory(bad)
    assert plan.find_gpu("RTX 4090") == ("RTX 4090 24GB", 24 * GiB)
    assert plan.find_gpu("rtx-3060")[1] == 12 * GiB
    assert plan.find_gpu("NVIDIA GeForce RTX 4060 Ti") == ("RTX 4060 Ti 16GB", 16 * GiB)
    assert plan.find_gpu("A100 80GB")[1] == 80 * GiB
    assert plan.find_gpu("a100")[1] == 40 * GiB
    assert plan.find_gpu("3080")[1] == 10 * GiB
    with pytest.raises(UserError, match="Did you mean RTX 4090"):
        plan.find_gpu("RTX 4099")


def test_mixture_of_experts_configs_are_refused():
    with pytest.raises(UserError, match="mixture-of-experts"):
        plan.ModelShape.from_config({**LLAMA, "num_local_experts": 8}, "mixtral")


# --------------------------------------------------------------------------------------------- recipes
def _recipe(tmp_path: Path, model: Path, **sft) -> Path:
    recipe = tmp_path / "recipe.yaml"
    values = {"data": "data/sft", "out": "runs/sft", **sft}
    sft_section = "\n".join(f"  {key}: {value}" for key, value in values.items())
    recipe.write_text(f"""version: 1
model:
  base: {model}
  quantization: nf4
  lora_r: 8
prepare-data:
  - inputs: [raw.jsonl]
    task: sft
    out: data/sft
sft:
{sft_section}
rm:
  model: runs/sft
  data: data/prefs
  out: runs/rm
ppo:
  sft: runs/sft
  reward: runs/rm
  data: data/prompts
  out: runs/ppo
eval:
  models: [runs/sft, runs/ppo]
  reward: runs/rm
  data: data/prompts
  out: reports/eval
""")
    return recipe


def test_a_recipe_plans_every_step_on_its_base_model(tmp_path, tiny_model_dir):
    plans = plan.plan_recipe(_recipe(tmp_path, tiny_model_dir, lora_r=4), memory=8 * GiB)
    steps = [p.step for p in plans]
    assert steps == ["prepare-data", "sft", "rm", "ppo", "eval"]
    shapes = {p.shape for p in plans if p.shape is not None}
    assert len(shapes) == 1  # rm's `model: runs/sft`, ppo's sft and eval's reward lead back to the base
    ppo = next(p for p in plans if p.step == "ppo")
    assert ppo.loras[0].r == 4 and ppo.loras[1].r == 8  # policy from the sft section, value from rm's
    assert all(p.verdict.fits for p in plans)
    assert plans[1].checkpointing[True] < plans[1].checkpointing[False]


def test_cli_plans_a_recipe_and_prints_json(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["plan", str(recipe), "--gpu", "RTX 3060"])
    assert result.exit_code == 0, result.output
    assert "RTX 3060 12GB" in result.output and "ppo" in result.output and "fits" in result.output
    result = runner.invoke(app, ["plan", str(recipe), "--gpu-memory", "12GB", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["step"] for row in data["steps"]] == ["prepare-data", "sft", "rm", "ppo", "eval"]
    assert all(row["verdict"] == "fits" for row in data["steps"])


def test_cli_plans_a_config_json_without_a_recipe(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(plan.REFERENCE_MODELS["meta-llama/Llama-3.1-8B-Instruct"]))
    result = runner.invoke(app, ["plan", "--model-config", str(config), "--gpu-memory", "8GB"])
    assert result.exit_code == 0, result.output
    assert "does not fit" in result.output and "8.03B parameters" in result.output


def test_cli_user_errors_exit_2_without_a_traceback(tmp_path):
    for args, words in (
        (["plan", "--gpu", "RTX 4099"], "Did you mean"),
        (["plan", "--gpu-memory", "lots"], "12GB"),
        (["plan", str(tmp_path / "missing.yaml")], "does not exist"),
        (["plan", "--model-config", str(tmp_path / "none.json")], "config.json"),
        (["plan", "--gpu", "T4", "--gpu-memory", "16GB"], "one of them"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "Traceback" not in result.output, (args, result.output)


def test_cli_table_is_markdown_on_stdout():
    result = runner.invoke(app, ["plan", "--table"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| model | 8 GB | 12 GB | 16 GB | 24 GB |")
    assert len(lines) == 2 + len(plan.TABLE_MODELS)
    assert result.stdout == plan.fit_table()


def test_help_has_examples():
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0 and "instruct plan" in result.output and "--gpu-memory" in result.output


def test_eval_estimate_is_one_model_at_a_time():
    shape = plan.read_model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    lora = plan.lora_for(shape, SFTConfig())
    small = plan.estimate_eval(shape, EvalConfig(batch_size=1, max_length=256), lora)
    big = plan.estimate_eval(shape, EvalConfig(batch_size=8, max_length=1024), lora)
    assert small.weights == big.weights and small.total < big.total
    assert big.phase == "perplexity"
