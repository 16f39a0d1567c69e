"""Configuration: one dataclass per step, the documentation of each field, and range checks.

Each field carries its documentation as an attribute docstring (the string right below it), which is also
the `--help` text of the matching flag. Reading recipes and flags into these dataclasses is recipes.py's
job; `validate` holds the range checks every config passes. May use: errors.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from instruct_cli.core.errors import UserError

RECIPE_VERSION = 1
BUILTIN_MODEL = "smollm2-135m"
QUANTIZATIONS = ("nf4", "int8", "none")
# keys of a recipe's `model` section that are spelled differently in the step sections
MODEL_SECTION_ALIASES = {"base": "model"}
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
"""The experiment trackers accelerate integrates, for --report-to (trackers.py starts them)."""


# ------------------------------------------------------------------------------------- shared field sets
@dataclass
class ModelOptions:
    """Which model to load and how."""

    model: str = BUILTIN_MODEL
    """Model: `smollm2-135m` (built in), a hub id, a local transformers folder, a .gguf file, or a run folder."""
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    """How the frozen base weights are stored: nf4 (4-bit, default), int8, or none (16/32-bit)."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""


@dataclass
class InferenceOptions:
    """Which model to sample from and how (generate, chat, label): unlike training, the weights' format is
    chosen for speed when none is asked for."""

    model: str = BUILTIN_MODEL
    """Model: `smollm2-135m` (built in), a hub id, a local transformers folder, a .gguf file, or a run folder."""
    quantization: Literal["auto", "nf4", "int8", "none"] = "auto"
    """How the base weights are stored: auto (default: the fastest for the device and the model's size, said in
    one line; unquantised when it fits in memory), nf4 (4-bit), int8, or none (16/32-bit)."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""


@dataclass
class LoraOptions:
    """The LoRA adapter trained on top of the frozen base."""

    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get an adapter: `all-linear` (default) or module names such as q_proj, v_proj."""


@dataclass
class OutputOptions:
    """Where a step writes and what it does with an existing output."""

    out: Optional[Path] = None
    """Output folder."""
    force: bool = False
    """Replace an existing output folder."""


@dataclass
class TrackingOptions:
    """Where a training step sends its metrics besides metrics.jsonl."""

    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also get every metric of metrics.jsonl, comma-separated: tensorboard (writes
    OUT/tensorboard/), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (default: none). Each needs
    its package: tensorboard, wandb and mlflow come with instruct-cli's extra of the same name."""


@dataclass
class TrainOptions(TrackingOptions):
    """The optimisation settings shared by sft and rm."""

    data: Optional[Path] = None
    """Data folder written by `instruct prepare-data`."""
    epochs: int = 1
    """Passes over the training split (ignored when max_steps is set)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps."""
    batch_size: int = 4
    """Rows per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to 0."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    max_length: int = 1024
    """Longest sequence in tokens; longer rows are truncated (filter them in prepare-data with --max-tokens)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, about 30% slower."""
    eval_every: int = 50
    """Evaluate on the eval split every this many steps (and at the end)."""
    save_every: int = 50
    """Write a checkpoint for --resume every this many steps (and on Ctrl-C)."""
    keep: Literal["best", "last"] = "best"
    """Which adapter the run keeps: the one with the best eval metric, or the last."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision: auto (bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, none on a CPU),
    no, bf16 (also on a CPU, slowly: it exercises the GPU arithmetic), or fp16 (GPUs only, with loss scaling)."""
    seed: int = 0
    """Seed for initialisation, data order and dropout (process N of a data-parallel run uses seed + N)."""
    resume: bool = False
    """Continue an interrupted run in --out from its last checkpoint."""


# -------------------------------------------------------------------------------------- step configs
@dataclass
class SFTConfig(TrainOptions, LoraOptions, ModelOptions, OutputOptions):
    """`instruct sft`: supervised fine-tuning of a LoRA adapter on demonstrations (loss on assistant tokens)."""

    packing: bool = False
    """Padding-free batches: the rows of a batch packed side by side into as few sequences as fit the batch's
    longest row, each attending only to itself (the same loss and gradients as padded rows). Off by default:
    with rows batched by similar length there is little padding to remove, and on a CPU it measured no faster.
    Needs an sdpa or eager attention; other models train padded."""


@dataclass
class RMConfig(TrainOptions, LoraOptions, ModelOptions, OutputOptions):
    """`instruct rm`: a reward model (LoRA + scalar head) trained on preference pairs or K-wise rankings."""

    margin: float = 0.0
    """Optional margin in the pairwise loss: -log sigmoid(r_chosen - r_rejected - margin)."""
    shared_prefix: bool = True
    """Run each prompt through the model once for all its responses (one packed row per prompt, each response
    attending to the prompt and itself); the same scores and loss as one sequence per response, faster when
    prompts are long. Off: one padded sequence per response."""


@dataclass
class DPOConfig(TrainOptions, LoraOptions, ModelOptions, OutputOptions):
    """`instruct dpo`: direct preference optimisation of a LoRA policy on preference pairs or K-wise rankings;
    the starting model (an SFT run's adapter, or the bare base) is the frozen reference, on the same base."""

    beta: float = 0.1
    """How strongly the policy is held to the reference (DPO's beta, IPO's tau): smaller lets it drift further."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO: -log sigmoid(beta x)) or ipo ((x - 1/(2 beta))^2 on mean per-token log-probs), where x is the
    policy's chosen-minus-rejected log-ratio minus the reference's."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a pair's preference is flipped (0 = plain DPO; below 0.5;
    sigmoid loss only)."""
    lr: float = 5e-5
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to 0 (lower than sft's: DPO overfits
    preferences quickly)."""


@dataclass
class PPOConfig(TrackingOptions, OutputOptions):
    """`instruct ppo`: optimise the SFT policy against the reward model with PPO, on one shared base model.

    Defaults follow InstructGPT (Ouyang et al. 2022) and "The N Implementation Details of RLHF with PPO"
    (Huang et al. 2024) unless noted; the learning rate is higher than theirs because only LoRA weights train.
    """

    sft: Optional[Path] = None
    """SFT run folder: the policy and the KL reference start from its adapter."""
    reward: Optional[Path] = None
    """Reward-model run folder: the reward (frozen) and the value function (trained) start from it. Optional
    with --reward-fn."""
    data: Optional[Path] = None
    """Data folder with prompts (prompts.train/eval; an sft folder works too: its conversations minus the answer)."""
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    """How the shared frozen base is stored: nf4 (4-bit, default), int8, or none."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    iterations: int = 100
    """PPO iterations: each samples a rollout batch, scores it, and updates policy and value."""
    rollout_batch_size: int = 16
    """Prompts sampled per iteration on each process (N processes sample N x this many, each its own share)."""
    minibatch_size: int = 4
    """Rollouts per gradient step in the update, on each process."""
    ppo_epochs: int = 4
    """Passes over each rollout batch in the update (InstructGPT: 4)."""
    lr: float = 5e-5
    """Learning rate of the policy and value adapters (AdamW), decayed linearly to 0."""
    max_new_tokens: int = 64
    """Longest response sampled in a rollout."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are cut from the left."""
    temperature: float = 0.7
    """Sampling temperature of rollouts; the log-probs of the update use the same one."""
    kl_coef: float = 0.05
    """Initial KL coefficient beta (reward = score - beta * KL per token)."""
    target_kl: Optional[float] = None
    """Adaptive beta: target KL per response (e.g. 6.0); None keeps beta fixed."""
    kl_horizon: int = 5
    """Adaptive beta: the controller's horizon in iterations; beta moves by up to 20%/kl_horizon per iteration
    towards the target (Ziegler et al. 2019, who count the horizon in samples)."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    """How advantages are estimated: gae (PPO with a value function, the default), rloo (leave-one-out
    baseline over K samples per prompt) or grpo (group-normalised over K samples). rloo and grpo need no value
    function: the value adapter and head are not loaded at all."""
    samples_per_prompt: Optional[int] = None
    """K: responses sampled per prompt in an iteration (rollout_batch_size counts responses and must be a
    multiple of K); default 1 for gae, 4 for rloo and grpo."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: reward (a per-token penalty in the reward, as InstructGPT) or loss
    (the k3 estimator times beta added to the policy loss, as GRPO)."""
    reward_fn: Optional[str] = None
    """A reward function FILE.py:NAME, called as NAME(prompts, responses) -> list of floats once per rollout
    batch (prompts as message lists, responses as strings): instead of --reward, or added to it."""
    reward_fn_weight: float = 1.0
    """Weight of --reward-fn's rewards in the score (added to the reward model's normalised score, if any)."""
    clip_range: float = 0.2
    """PPO clipping of the policy ratio."""
    value_clip_range: float = 0.2
    """Clipping of the value function around its rollout-time values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that hits max_new_tokens without an EOS."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of a log-likelihood term on SFT demonstrations (0 = off)."""
    ptx_data: Optional[Path] = None
    """Data folder with the sft split used by PPO-ptx (defaults to the SFT run's data)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (less memory, slower)."""
    merged_rollouts: bool = True
    """Sample rollouts with the policy adapter folded into the base weights (faster decoding; the original
    weights are put back bit for bit afterwards). Ignored on a quantised base, which cannot be merged."""
    packing: bool = True
    """Run the reward, log-prob and value passes without padding: rollouts side by side in packed rows, a
    prefix they share (one prompt's K responses, the chat template's system prompt) computed once; the same
    numbers as padded rows up to float rounding. Off: padded rows. Needs an sdpa or eager attention (others
    run padded)."""
    eval_every: int = 10
    """Evaluate on held-out prompts every this many iterations (and at the end)."""
    eval_prompts: int = 16
    """Held-out prompts used per evaluation."""
    save_every: int = 10
    """Write a checkpoint for --resume every this many iterations (and on Ctrl-C)."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision: auto (bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, none on a CPU),
    no, bf16 (also on a CPU, slowly: it exercises the GPU arithmetic), or fp16 (GPUs only, with loss scaling)."""
    seed: int = 0
    """Seed for sampling, data order and initialisation (process N of a data-parallel run samples with seed + N)."""
    resume: bool = False
    """Continue an interrupted run in --out from its last checkpoint."""


@dataclass
class RMScoreConfig(ModelOptions):
    """`instruct rm score`: add a normalised `reward` field to rows of prompt + response."""

    input: Optional[Path] = None
    """JSONL rows with `prompt` (text or messages) and `response` (text or assistant messages)."""
    output: Optional[Path] = None
    """Where the scored rows go (JSONL); standard output when not given."""
    batch_size: int = 8
    """Rows scored per forward pass."""
    max_length: int = 1024
    """Longest prompt + response in tokens; longer rows are cut from the left of the prompt."""


@dataclass
class PrepareDataConfig(OutputOptions):
    """`instruct prepare-data`: raw files in common formats -> a data folder of canonical JSONL splits."""

    inputs: list[Path] = field(default_factory=list)
    """Input files or folders (JSON, JSONL, CSV, Parquet, text, or a `datasets.save_to_disk` folder)."""
    format: Literal[
        "auto", "alpaca", "sharegpt", "messages", "prompt-completion", "preference", "hh", "ranked", "text"
    ] = "auto"
    """Input format; `auto` detects it from the first rows of each file."""
    task: Literal["auto", "sft", "prefs", "prompts"] = "auto"
    """What the rows are for: sft demonstrations, prefs (preference pairs or rankings), prompts; auto infers it."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for the eval split."""
    seed: int = 0
    """Seed of the train/eval shuffle."""
    system: Optional[str] = None
    """System prompt to add to every conversation that has none."""
    max_tokens: Optional[int] = None
    """Drop rows longer than this many tokens once the chat template is applied."""
    model: str = BUILTIN_MODEL
    """Model whose tokenizer and chat template measure token lengths."""
    strict: bool = False
    """Fail on the first malformed row instead of skipping and counting it."""


@dataclass
class SamplingOptions:
    """How answers are sampled: the flags `instruct generate` and `instruct chat` share."""

    max_new_tokens: int = 256
    """Most tokens to generate per answer."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    greedy: bool = False
    """Always take the most likely token (ignores temperature, top_p, top_k)."""
    seed: int = 0
    """Random seed for sampling."""
    engine: Literal["transformers", "llama.cpp"] = "transformers"
    """What samples the answers: transformers (default), or llama.cpp through llama-cpp-python (an optional
    install; runs the model as a GGUF file on the CPU: the base's own file, or one written once into the cache)."""


@dataclass
class GenerateConfig(SamplingOptions, InferenceOptions):
    """`instruct generate`: answer a prompt (streamed) or a file of prompts (batched) with any model or run."""

    prompt: Optional[str] = None
    """The prompt; `-` reads it from standard input."""
    input: Optional[Path] = None
    """A JSONL file of prompts (`{"prompt": ...}` as text or messages) to answer in batches; `-` reads stdin."""
    output: Optional[Path] = None
    """Where the batch answers go (JSONL); standard output when not given."""
    system: Optional[str] = None
    """System prompt."""
    batch_size: int = 8
    """Prompts per batch with --input."""


@dataclass
class ChatConfig(SamplingOptions, InferenceOptions):
    """`instruct chat`: a multi-turn conversation in the terminal with any model or run, answers streamed."""

    system: Optional[str] = None
    """System prompt at the start of the conversation (change it during the chat with /system TEXT)."""
    max_context: Optional[int] = None
    """Most tokens of conversation the model sees, its answer included (default and upper limit: the model's
    context length); when the history outgrows it, the oldest exchanges are left out."""


@dataclass
class EvalConfig(OutputOptions):
    """`instruct eval`: compare models on held-out prompts by reward, win-rate, KL and perplexity."""

    models: list[str] = field(default_factory=list)
    """Models to evaluate, comma-separated: sft/ppo run folders, `base` (the bare base model of the SFT run),
    or any model reference."""
    baseline: Optional[str] = None
    """Model the others are judged against, prompt by prompt (default: the first of --models; may be `base`)."""
    reward: Optional[Path] = None
    """Reward-model run folder that scores every response."""
    data: Optional[Path] = None
    """Data folder whose eval split gives the prompts (a prompts, sft or prefs folder)."""
    sft_data: Optional[Path] = None
    """SFT data folder for perplexity (default: --data if it is one, else the SFT run's own data)."""
    prefs_data: Optional[Path] = None
    """Preference data folder for the reward model's accuracy (default: --data if it is one, else the RM's own)."""
    generations: Optional[Path] = None
    """Score these responses instead of generating: JSONL from `instruct generate --output` (a `model` field per
    row) or a report's samples.jsonl."""
    quantization: Literal["auto", "nf4", "int8", "none"] = "auto"
    """How the base weights of the models that answer are stored: auto (default: the fastest for the device and
    the model's size), nf4, int8, or none. The reward model keeps the quantisation it was trained with."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    max_new_tokens: int = 128
    """Longest response sampled per prompt."""
    temperature: float = 0.7
    """Sampling temperature (the same for every model; the KL is measured at it too)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off, which keeps the KL estimate exact in expectation)."""
    seed: int = 0
    """Sampling seed, reset before each model so that all of them draw the same random numbers."""
    max_prompts: int = 64
    """Most held-out rows used per measurement: prompts answered, conversations for perplexity, preference rows."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_length: int = 1024
    """Longest prompt + response in tokens for scoring and perplexity (longer ones lose the start of the prompt)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the reward of a response that ends without an EOS (cut at max_new_tokens), as ppo does."""
    bootstrap: int = 1000
    """Bootstrap resamples of the prompts for the win-rate's 95% interval."""
    compare: list[Path] = field(default_factory=list)
    """Two report folders: print the differences between them instead of evaluating."""


# ------------------------------------------------------------------------------------- field documentation
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its bases: {field name: doc}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def doc(cls: type, name: str) -> str:
    """The help text of one field (for typer options)."""
    return field_docs(cls)[name]


# ------------------------------------------------------------------------------------- building configs


def validate(config: Any, source: str) -> None:
    """Range checks shared by every step (the dataclass types already passed)."""
    positive = (
        "lora_r",
        "lora_alpha",
        "max_new_tokens",
        "max_context",
        "batch_size",
        "max_tokens",
        "epochs",
        "max_steps",
        "grad_accum",
        "max_length",
        "eval_every",
        "save_every",
        "iterations",
        "rollout_batch_size",
        "minibatch_size",
        "ppo_epochs",
        "max_prompt_length",
        "eval_prompts",
        "kl_horizon",
        "target_kl",
        "beta",
    )
    for name in positive:
        value = getattr(config, name, None)
        if value is not None and value <= 0:
            raise UserError(
                f"`{name}` must be greater than 0, not {value}", where=source, fix=f"Set `{name}` to a positive number"
            )
    fractions = ("eval_fraction", "lora_dropout", "top_p", "gamma", "lam", "warmup_ratio")
    for name in fractions:
        value = getattr(config, name, None)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(
                f"`{name}` must be between 0 and 1, not {value}",
                where=source,
                fix=f"Set `{name}` to a fraction such as 0.1",
            )
    smoothing = getattr(config, "label_smoothing", None)
    if smoothing is not None and not 0.0 <= smoothing < 0.5:
        raise UserError(
            f"`label_smoothing` must be at least 0 and below 0.5, not {smoothing}",
            where=source,
            fix="Set it to the fraction of preferences you expect to be wrong, e.g. 0.1 (0 = plain DPO)",
        )
    if smoothing and getattr(config, "loss", None) == "ipo":
        raise UserError(
            "`label_smoothing` applies to the sigmoid (DPO) loss only, not to ipo",
            where=source,
            fix="Drop label_smoothing, or use loss: sigmoid",
        )
    check_trackers(getattr(config, "report_to", None) or [], source)
    for name in ("temperature", "lr", "learning_rate"):
        value = getattr(config, name, None)
        if value is not None and value <= 0:
            raise UserError(
                f"`{name}` must be greater than 0, not {value}",
                where=source,
                fix=f"Set `{name}` to a positive number"
                + (
                    " (use --greedy for deterministic output)"
                    if name == "temperature" and hasattr(config, "greedy")
                    else ""
                ),
            )


def check_trackers(names: list[str], source: str) -> None:
    """--report-to names trackers accelerate knows, or is `none` alone."""
    for name in names:
        if name not in TRACKERS and name != "none":
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            raise UserError(
                f"Unknown experiment tracker `{name}` in report_to",
                where=source,
                fix=(f"Did you mean `{close[0]}`? " if close else "")
                + f"Use one or more of {', '.join(TRACKERS)} (comma-separated), or none",
            )
    if "none" in names and len(names) > 1:
        raise UserError(
            f"report_to lists `none` together with trackers ({', '.join(names)})",
            where=source,
            fix="Use none alone to report to no tracker, or list only the trackers",
        )


# ------------------------------------------------------------------------------------------------ recipes


def to_recipe_dict(config: Any) -> dict[str, Any]:
    """A config as plain YAML-able values (what a run writes to its recipe.yaml)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in ("force", "resume", "report_to"):
            # how to treat an existing output, and where else its metrics go, are not part of what the step
            # computes: changing them never makes `instruct run` redo a step
            continue
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[f.name] = value
    return out


@dataclass
class LabelConfig(InferenceOptions):
    """`instruct label`: sample K responses per prompt and collect a person's ranking of them in the terminal."""

    prompts: Optional[Path] = None
    """Data folder from `instruct prepare-data` whose prompts are labelled (a prompts, sft or prefs folder)."""
    split: Literal["train", "eval"] = "train"
    """Which split of the data folder gives the prompts."""
    out: Optional[Path] = None
    """Labels folder (rankings.jsonl, samples.jsonl); running the command again resumes where you stopped."""
    k: int = 4
    """Responses sampled per prompt and ranked (InstructGPT used 4 to 9)."""
    labeler: Optional[str] = None
    """Who is labelling; each labeler resumes at their own next unlabelled prompt (default: $USER)."""
    max_prompts: Optional[int] = None
    """Label only the first N prompts of the split."""
    max_new_tokens: int = 256
    """Longest response sampled, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (1.0 keeps the K responses varied, as ranking needs)."""
    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    seed: int = 0
    """Sampling seed (each batch is seeded from it and the index of its first prompt)."""
    batch_size: int = 4
    """Prompts sampled together ahead of the labeler (each is K sequences)."""
    stats: Optional[Path] = None
    """Print counts, time per judgment and agreement between labelers for this labels folder, and exit."""
