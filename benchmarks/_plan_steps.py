"""bench_plan's steps: each runs the code of one `instruct` step (sft, rm, ppo, eval) on a saved model and
returns (measured peak, `instruct plan`'s estimate for the same shapes and settings, the phase groups that
compare them); `BENCHES` maps a step's name to its function. `--bf16` loads with a bf16 compute dtype under
bf16 autocast, the dtypes of a GPU."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from _plan_measure import labelled, measure, phase

from instruct_cli.core import lm, preferences


def random_rows(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`batch` token-id rows of `length` tokens (the last one token shorter, so batches carry padding)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(10, vocab, (batch, length), generator=generator).tolist()
    rows[-1] = rows[-1][:-1]
    return rows


@contextlib.contextmanager
def bf16_compute(enabled: bool):
    """Make the CPU load models with a bf16 compute dtype (as on a GPU) while enabled."""
    from instruct_cli.core import models

    original = models.compute_dtype
    if enabled:
        models.compute_dtype = lambda device: torch.bfloat16
    try:
        yield
    finally:
        models.compute_dtype = original


def make_accelerator(bf16: bool):
    """The step's Accelerator; with bf16, the CPU runs under bf16 autocast as a GPU would."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not bf16:
        from instruct_cli.core import training

        return training.make_accelerator(0)
    set_seed(0)
    return Accelerator(mixed_precision="bf16", cpu=not torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------- steps
TRAINING_GROUPS = [
    ("forward + backward", ["step"], ["loss", "backward"]),
    ("optimizer step", ["optimizer"], ["optimizer step"]),
]


def _train_twice(trainable, accelerator, loss_fn, batch, weight_of):
    """Two optimizer steps (the second runs with the optimizer states in memory), labelled by phase."""
    from instruct_cli.core import training

    def run():
        for _ in range(2):
            with phase("step"):
                training.accumulate(trainable.model, accelerator, loss_fn, [batch], weight_of)
            with phase("optimizer"):
                accelerator.clip_grad_norm_(trainable.model.parameters(), 1.0)
                trainable.optimizer.step()
                trainable.optimizer.zero_grad(set_to_none=True)

    return measure(run, trainable.model)


def bench_sft(folder: Path, args, quantization: str, checkpointing: bool, shape, device: str):
    """`instruct sft`'s model and loss: training.load_trainable_policy, training.accumulate(lm.sft_loss)."""
    from instruct_cli.core import models, training
    from instruct_cli.core.config import SFTConfig
    from instruct_cli.steps import plan

    config = SFTConfig(
        model=str(folder),
        quantization=quantization,
        gradient_checkpointing=checkpointing,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lora_r=args.lora_r,
        lora_dropout=args.lora_dropout,
    )
    torch_device = _device()
    with bf16_compute(args.bf16):
        model, tokenizer = training.load_trainable_policy(config, models.resolve_model(str(folder)), torch_device)
    accelerator = make_accelerator(args.bf16)
    trainable = training.make_trainable(model, accelerator, 1e-4, 0.0, 0.0, 10)
    trainable.model.train()
    rows = random_rows(config.batch_size, config.max_length, shape.vocab, 1)
    batch = lm.collate([(ids, ids) for ids in rows], tokenizer.pad_token_id, torch_device)
    measured = _train_twice(trainable, accelerator, lm.sft_loss, batch, lm.labelled_tokens)
    return measured, plan.estimate_sft(shape, config, device), TRAINING_GROUPS


def bench_rm(folder: Path, args, quantization: str, checkpointing: bool, shape, device: str):
    """`instruct rm`'s model and loss: rm.load_trainable_reward_model, training.accumulate(rm.rm_loss)."""
    from instruct_cli.core import models, training
    from instruct_cli.core.config import RMConfig
    from instruct_cli.steps import plan, rm

    config = RMConfig(
        model=str(folder),
        quantization=quantization,
        gradient_checkpointing=checkpointing,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lora_r=args.lora_r,
        lora_dropout=args.lora_dropout,
    )
    torch_device = _device()
    with bf16_compute(args.bf16):
        model, tokenizer = rm.load_trainable_reward_model(config, models.resolve_model(str(folder)), torch_device)
    accelerator = make_accelerator(args.bf16)
    trainable = training.make_trainable(model, accelerator, 1e-4, 0.0, 0.0, 10)
    trainable.model.train()
    responses = random_rows(2 * config.batch_size, config.max_length, shape.vocab, 2)
    groups = [preferences.Group(responses[2 * k : 2 * k + 2], [(0, 1)]) for k in range(config.batch_size)]
    batch = preferences.collate(groups, tokenizer.pad_token_id, torch_device)
    measured = _train_twice(trainable, accelerator, partial(rm.rm_loss, margin=0.0), batch, rm.prompts_in)
    return measured, plan.estimate_rm(shape, config, device), TRAINING_GROUPS


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _adapter_folders(folder: Path, work: Path, args) -> tuple[Path, Path]:
    """An SFT-like adapter and an RM-like adapter + head saved on disk."""
    from peft import get_peft_model

    from instruct_cli.core import heads, models
    from instruct_cli.core.config import SFTConfig

    sft_dir, rm_dir = work / "sft-adapter", work / "rm-adapter"
    if (rm_dir / heads.HEAD_WEIGHTS).is_file():
        return sft_dir, rm_dir
    base = models.load_base_model(models.resolve_model(str(folder)), "none", "cpu")
    peft_model = get_peft_model(base, models.lora_config(SFTConfig(lora_r=args.lora_r, lora_dropout=args.lora_dropout)))
    peft_model.save_pretrained(sft_dir)
    peft_model.save_pretrained(rm_dir)
    heads.save_head(heads.ScalarHead(base.config.hidden_size, seed=0), rm_dir)
    return sft_dir, rm_dir


PPO_GROUPS = [
    ("rollout (generate)", ["rollout"], ["rollout prefill", "rollout end"]),
    ("score + values", ["score", "values"], ["scoring"]),
    ("rollout log-probs + entropy", ["policy logits", "log-probs", "entropy"], ["rollout log-probs"]),
    ("update", ["update"], ["update loss", "update backward", "optimizer step"]),
]


def bench_ppo(folder: Path, args, quantization: str, checkpointing: bool, shape, device: str):
    """Two PPO iterations (ppo.make_trajectory + ppo.update) on one base with four adapters, as ppo.load_roles
    builds it (from adapter folders instead of run folders)."""
    from peft import PeftModel

    from instruct_cli.core import heads, models, rl, training
    from instruct_cli.core.config import PPOConfig
    from instruct_cli.steps import plan, ppo

    sft_dir, rm_dir = _adapter_folders(folder, args.work, args)
    config = PPOConfig(
        quantization=quantization,
        gradient_checkpointing=checkpointing,
        rollout_batch_size=args.rollout_batch_size,
        minibatch_size=args.minibatch_size,
        ppo_epochs=1,
        max_prompt_length=args.prompt_length,
        max_new_tokens=args.new_tokens,
    )
    torch_device = _device()
    source = models.resolve_model(str(folder))
    real = models.load_tokenizer(source)
    # an EOS the random model rarely samples, so responses run to max_new_tokens (the rollout reads only these)
    tokenizer = SimpleNamespace(eos_token_id=shape.vocab - 1, pad_token_id=real.pad_token_id)
    with bf16_compute(args.bf16):
        base = models.load_base_model(source, quantization, torch_device)
        base = training.prepare_for_training(base, quantization, checkpointing)
        model = PeftModel.from_pretrained(base, str(sft_dir), adapter_name=ppo.POLICY, is_trainable=True)
        model.load_adapter(str(sft_dir), adapter_name=ppo.REFERENCE, is_trainable=False)
        model.load_adapter(str(rm_dir), adapter_name=ppo.VALUE, is_trainable=True)
        model.load_adapter(str(rm_dir), adapter_name=ppo.REWARD, is_trainable=False)
    models.disable_dropout(model)
    roles = ppo.Roles(
        model, heads.load_head(rm_dir).to(torch_device), heads.load_head(rm_dir).to(torch_device), 1.0, 0.0
    )
    accelerator = make_accelerator(args.bf16)
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=1e-5, eps=1e-5)
    prompts = random_rows(config.rollout_batch_size, config.max_prompt_length, shape.vocab - 2, 3)

    def run():
        for _ in range(2):  # the second iteration runs with the optimizer states in memory
            batch = ppo.rollout(roles, tokenizer, prompts, config, accelerator)
            trajectory, _ = ppo.make_trajectory(roles, batch, config, 0.05, accelerator)
            ppo.update(roles, optimizer, trajectory, config, accelerator)
            del trajectory

    with (
        labelled(ppo, {"rollout": "rollout", "update": "update"}),
        labelled(
            ppo.trajectory,
            {"score": "score", "response_values": "values", "response_logits": "policy logits"},
        ),
        labelled(rl, {"token_logprobs": "log-probs", "entropy_from_logits": "entropy"}),
    ):
        measured = measure(run, roles)
    sft_lora = plan.Lora(args.lora_r, plan.lora_targets(shape, ["all-linear"]), 0.0)
    return measured, plan.estimate_ppo(shape, config, sft_lora, sft_lora, device), PPO_GROUPS


EVAL_GROUPS = [
    ("generation", ["generation"], ["sampling prefill", "sampling end"]),
    ("response log-probs", ["response log-probs"], ["response log-probs"]),
    ("perplexity", ["perplexity"], ["perplexity"]),
    ("reward model", ["reward model"], ["reward model"]),
]


def bench_eval(folder: Path, args, quantization: str, checkpointing: bool, shape, device: str):
    """What `instruct eval` runs, one model at a time: sampling, response log-probs and perplexity with the
    policy (models.load_for_inference), then the reward model on preference pairs (preferences.load_reward_model)."""
    from peft import PeftModel

    from instruct_cli.core import heads, models, sampling
    from instruct_cli.core.config import EvalConfig
    from instruct_cli.steps import evaluate, plan, rm

    sft_dir, rm_dir = _adapter_folders(folder, args.work, args)
    config = EvalConfig(
        quantization=quantization,
        batch_size=args.batch_size * 2,
        max_length=args.prompt_length,
        max_new_tokens=args.new_tokens,
    )
    torch_device = _device()
    source = models.resolve_model(str(folder))
    real = models.load_tokenizer(source)
    tokenizer = SimpleNamespace(eos_token_id=shape.vocab - 1, pad_token_id=real.pad_token_id)
    batch, length = config.batch_size, config.max_length
    prompts = random_rows(batch, length, shape.vocab - 2, 4)
    with bf16_compute(args.bf16):
        model = PeftModel.from_pretrained(
            models.load_base_model(source, quantization, torch_device), str(sft_dir), is_trainable=False
        ).eval()

    def run_policy():
        torch.manual_seed(0)
        with phase("generation"), torch.no_grad():
            query, mask = sampling.left_pad(prompts, tokenizer.pad_token_id, torch_device)
            output = model.generate(
                input_ids=query,
                attention_mask=mask,
                do_sample=True,
                temperature=0.7,
                top_p=1.0,
                top_k=0,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            responses = output[:, query.shape[1] :].tolist()
            del output
        with phase("response log-probs"):
            evaluate.response_logprobs(
                model, prompts, responses, pad_id=tokenizer.pad_token_id, temperature=0.7, batch_size=batch
            )
        with phase("perplexity"):
            rows = random_rows(batch, length, shape.vocab, 5)
            lm.evaluate(model, [lm.collate([(ids, ids) for ids in rows], tokenizer.pad_token_id, torch_device)])

    policy = measure(run_policy, model)
    model = None  # one model at a time, as instruct eval does
    evaluate.release_memory()
    with bf16_compute(args.bf16):
        body = PeftModel.from_pretrained(
            models.load_base_model(source, quantization, torch_device), str(rm_dir), is_trainable=False
        )
    reward = rm.RewardModel(body, heads.load_head(rm_dir, device=torch_device)).eval()
    responses = random_rows(2 * batch, length, shape.vocab, 6)
    groups = [preferences.Group(responses[2 * k : 2 * k + 2], [(0, 1)]) for k in range(batch)]

    def run_reward():
        with phase("reward model"):
            preferences.evaluate(reward, [preferences.collate(groups, tokenizer.pad_token_id, torch_device)])

    measured = policy.merge(measure(run_reward, reward))
    sft_lora = plan.Lora(args.lora_r, plan.lora_targets(shape, ["all-linear"]), 0.0)
    return measured, plan.estimate_eval(shape, config, sft_lora, device), EVAL_GROUPS


BENCHES = {"sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo, "eval": bench_eval}
