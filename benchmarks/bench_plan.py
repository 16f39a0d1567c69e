"""Estimate vs measured: `instruct plan`'s memory model against the real peak of each step on small models.

For each step (sft, rm, ppo, eval) and setting, the script builds a random Llama at run time (the tokenizer
and chat template of `instruct_cli.core.tiny`, grouped-query attention, a realistic vocabulary), runs the step's
own code (training.load_trainable_policy + training.accumulate, rm.load_trainable_reward_model + rm.rm_loss,
ppo.make_trajectory + ppo.update on a one-base/four-adapter model built like ppo.load_roles, and the
functions `instruct eval` calls) and measures the peak memory the allocator hands out:

    measured = bytes of the model's own tensors (parameters, buffers, 4-bit quantisation state; exact)
             + peak of the running sum of every allocation and free after the model is loaded

On a CPU the allocations come from `torch.profiler` (profile_memory=True): the running sum of every
allocation and free, its peak overall and inside each labelled phase (rollout, scoring, update, perplexity,
...); on a GPU from `torch.cuda.max_memory_allocated`. The estimate is `instruct_cli.plan` for the same
shapes and settings with the device's dtypes (fp32 on a CPU). `--bf16` runs the CPU with a bf16 compute
dtype under bf16 autocast, the dtypes of a GPU, and estimates with those; it skips the runs whose residual
stream is bf16 and that take last-position logits (ppo without quantisation, eval), where torch's CPU bf16
matmul makes copies a GPU does not.

Two tables come out (markdown): per step, the model bytes and the peak above them, estimated and measured;
per phase, the transient part (what is not the model or the optimizer states) and the peak.

    .venv/bin/python benchmarks/bench_plan.py                 # sft/rm/ppo/eval x none/nf4 x ckpt (~3 min)
    .venv/bin/python benchmarks/bench_plan.py --bf16          # a GPU's dtypes, emulated on the CPU (~1 min)
    .venv/bin/python benchmarks/bench_plan.py --steps sft --quantization nf4 --hidden 256 --vocab 8192

Exit status 1 when any step's peak is off by more than --tolerance (default 20%).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from instruct_cli.core import lm, preferences


# ------------------------------------------------------------------------------------------ measurement
@dataclass
class Measured:
    """The peak of one measured run: its model bytes, the peak of allocations after it, and per phase."""

    model_bytes: int
    peak_after_load: int
    phases: dict[str, int]
    """Phase label path (e.g. "update/policy logits") -> model bytes + the peak of the running sum inside it."""

    @property
    def total(self) -> int:
        return self.model_bytes + self.peak_after_load

    def peak_in(self, prefixes: list[str]) -> int:
        """model bytes + the highest peak of the phases whose label path starts with one of `prefixes`."""
        peaks = [p for name, p in self.phases.items() if any(name == x or name.startswith(x + "/") for x in prefixes)]
        return max(peaks, default=0)

    def merge(self, other: "Measured") -> "Measured":
        """Two models measured one after the other (eval): the larger peak, every phase of both."""
        top = self if self.total >= other.total else other
        return Measured(top.model_bytes, top.peak_after_load, {**self.phases, **other.phases})


def model_bytes(module: torch.nn.Module) -> int:
    """Exact bytes of a module's tensors: parameters, buffers and bitsandbytes' quantisation state."""
    seen: dict[int, int] = {}

    def add(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for tensor in list(module.parameters()) + list(module.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    return sum(seen.values())


def _profiler_peaks(prof) -> tuple[int, dict[str, int]]:
    """(peak of the running sum of allocations, that peak per phase label path) from a CPU profile."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, str]] = []

    def walk(nodes, path):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, path))
                continue
            name = node.name
            inner = (path + "/" if path else "") + name[len("phase:") :] if name.startswith("phase:") else path
            walk(node.children, inner)

    walk(prof.profiler.kineto_results.experimental_event_tree(), "")
    events.sort(key=lambda event: event[0])
    running = peak = 0
    phases: dict[str, int] = {}
    for _, size, path in events:
        running += size
        peak = max(peak, running)
        phases[path] = max(phases.get(path, 0), running)
    return peak, phases


def measure(run, model: torch.nn.Module | list[torch.nn.Module]) -> Measured:
    """Run `run()` and measure its peak above the loaded model(s)."""
    modules = model if isinstance(model, list) else [model]
    loaded = sum(model_bytes(m) for m in modules)
    # free what earlier runs left in reference cycles now: the profiler knows the sizes of blocks allocated
    # under an earlier profile, and their frees during this one would lower the running sum
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return Measured(loaded, torch.cuda.max_memory_allocated() - base, {})
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    peak, phases = _profiler_peaks(prof)
    return Measured(loaded, peak, {name: loaded + value for name, value in phases.items()})


@contextlib.contextmanager
def labelled(module, labels: dict[str, str]):
    """While active, allocations inside `module.<function>` are reported under the phase `label`."""
    originals = {name: getattr(module, name) for name in labels}

    def wrap(function, label):
        def wrapper(*args, **kwargs):
            with phase(label):
                return function(*args, **kwargs)

        return wrapper

    for name, label in labels.items():
        setattr(module, name, wrap(originals[name], label))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def phase(name: str):
    """A label the measurement reports as the place of the peak."""
    return torch.profiler.record_function("phase:" + name)


# ----------------------------------------------------------------------------------------------- model
def build_model(
    folder: Path, *, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, seed: int = 0
) -> Path:
    """A random Llama (grouped-query attention, tied embeddings) with the tiny chat tokenizer, saved."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from instruct_cli.core.tiny import build_tiny_model

    tiny = build_tiny_model(folder.parent / (folder.name + "-tokenizer"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(tiny, ignore_errors=True)
    return folder


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
    ppo.disable_dropout(model)
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


# ------------------------------------------------------------------------------------------------ main
def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A markdown table (pastes into an issue or the README as it is)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


BENCHES = {"sft": bench_sft, "rm": bench_rm, "ppo": bench_ppo, "eval": bench_eval}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default="sft,rm,ppo,eval", help="Steps to measure (comma-separated)")
    parser.add_argument("--quantization", default="none,nf4", help="none, nf4 or both (comma-separated)")
    parser.add_argument("--checkpointing", default="off,on", help="Gradient checkpointing: off, on or both")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP size (default: 2.6875 x hidden)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768, help="Vocabulary (the embedding is padded to it)")
    parser.add_argument("--batch-size", type=int, default=2, help="sft/rm rows per batch (eval: twice this)")
    parser.add_argument("--max-length", type=int, default=256, help="sft/rm sequence length")
    parser.add_argument("--rollout-batch-size", type=int, default=8)
    parser.add_argument("--minibatch-size", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=96, help="PPO prompt / eval prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="PPO / eval response tokens")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="Run with a bf16 compute dtype and bf16 autocast, "
        "as on a GPU (on a CPU: an emulation of the GPU's dtypes)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep it low on a shared box)")
    parser.add_argument("--tolerance", type=float, default=0.20)
    parser.add_argument("--work", type=Path, help="Work folder (default: a temporary one)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Every step once on a tiny model (fp32 base, checkpointing off): checks that each runs and is "
        "measured; the estimate's tolerance is not checked at these toy shapes",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.quantization, args.checkpointing, args.hidden, args.layers, args.heads = "none", "off", 64, 2, 4
        args.kv_heads, args.vocab, args.batch_size, args.max_length, args.rollout_batch_size = 2, 1024, 1, 64, 2
        args.minibatch_size, args.prompt_length, args.new_tokens, args.tolerance = 2, 16, 8, float("inf")

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keep = args.work is not None
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-plan-"))
    args.work = work
    os.environ["INSTRUCT_CACHE"] = str(work / "cache")
    from instruct_cli.core.console import quiet_libraries

    quiet_libraries()
    from instruct_cli.steps import plan

    intermediate = args.intermediate or int(round(args.hidden * 2.6875 / 16) * 16)
    folder = work / "model"
    if not (folder / "config.json").is_file():
        build_model(
            folder,
            hidden=args.hidden,
            layers=args.layers,
            intermediate=intermediate,
            heads=args.heads,
            kv_heads=args.kv_heads,
            vocab=args.vocab,
        )
    shape = plan.read_model_shape(str(folder))
    device = "cuda" if torch.cuda.is_available() else ("cpu-bf16" if args.bf16 else "cpu")
    print(
        f"model: random Llama, hidden {shape.hidden}, {shape.layers} layers, MLP {shape.intermediate}, "
        f"{shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab} ({plan.parameter_counts(shape).total / 1e6:.1f}M "
        f"parameters); device {device}; LoRA r={args.lora_r} all-linear, dropout {args.lora_dropout}",
        flush=True,
    )
    summary, detail, worst = [], [], 0.0
    for step in [s.strip() for s in args.steps.split(",") if s.strip()]:
        for quantization in [q.strip() for q in args.quantization.split(",")]:
            for checkpointing in [c.strip() == "on" for c in args.checkpointing.split(",")]:
                if step == "eval" and checkpointing and "off" in args.checkpointing:
                    continue  # no backward in eval: checkpointing changes nothing
                if device == "cpu-bf16" and (step == "eval" or (step == "ppo" and quantization == "none")):
                    # with a bf16 residual stream the logits of the last positions (logits_to_keep) come from a
                    # sliced 3-D input, and torch's CPU bf16 matmul then expands the lm_head weight per batch row
                    # (a copy a GPU never makes): the emulation is not faithful there
                    print(f"skipped {step} {quantization} under --bf16 on a CPU (CPU-only bf16 matmul copies)")
                    continue
                started = time.time()
                measured, estimate, groups = BENCHES[step](folder, args, quantization, checkpointing, shape, device)
                error = estimate.total / measured.total - 1
                worst = max(worst, abs(error))
                label = f"{step} {quantization}"
                if step != "eval":
                    label += f" ckpt {'on' if checkpointing else 'off'}"
                loaded = estimate.weights + estimate.adapters
                summary.append(
                    (
                        label,
                        mb(loaded),
                        mb(measured.model_bytes),
                        mb(estimate.total - loaded),
                        mb(measured.peak_after_load),
                        mb(estimate.total),
                        mb(measured.total),
                        pct(error),
                        estimate.phase,
                        f"{time.time() - started:.0f}s",
                    )
                )
                print("  ".join(summary[-1]), flush=True)
                # per phase: the largest moment of the estimate there (with the gradients if they exist then)
                # against the measured peak inside the phase; "transient" leaves out the model and the optimizer
                # states, which both sides share
                static = estimate.weights + estimate.adapters + estimate.optimizer
                gradients = estimate.optimizer // 2
                for name, prefixes, moment_names in groups:
                    observed = measured.peak_in(prefixes)
                    if not observed:
                        continue
                    moment = max(
                        m.total + (gradients if m.gradients else 0) for m in estimate.moments if m.name in moment_names
                    )
                    seen = observed - measured.model_bytes - estimate.optimizer
                    detail.append(
                        (
                            label,
                            name,
                            mb(moment),
                            mb(seen),
                            pct(moment / seen - 1),
                            mb(static + moment),
                            mb(observed),
                            pct((static + moment) / observed - 1),
                        )
                    )
    print()
    print_table(
        (
            "step",
            "model MB est",
            "model MB meas",
            "above model MB est",
            "above model MB meas",
            "peak MB est",
            "peak MB meas",
            "error",
            "estimated peak at",
            "time",
        ),
        summary,
    )
    print()
    print_table(
        ("step", "phase", "transient MB est", "transient MB meas", "error", "peak MB est", "peak MB meas", "error"),
        detail,
    )
    print(f"\nworst error of a step's peak: {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%)")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
