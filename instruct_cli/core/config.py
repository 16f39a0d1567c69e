"""Configuration: one dataclass per step, each field one setting.

Each field declares its type, default, documentation (the attribute docstring right below it, which is also
the `--help` line of its flag) and, through `setting(...)`, its allowed range and command-line spelling
(settings.py says how). Reading recipes and flags into these dataclasses is recipes.py's job; the CLI builds
each command's flags from them (cli/options.py). May use: errors, methods, settings, tracker_names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from instruct_cli.core.errors import UserError
from instruct_cli.core.methods import ADVANTAGE_ESTIMATORS, DPO_LOSSES, GRPO_LOSS_TYPES, REWARD_SCALES
from instruct_cli.core.settings import FRACTION, POSITIVE, Range, setting
from instruct_cli.core.tracker_names import check_trackers

AdvantageName = Literal[tuple(ADVANTAGE_ESTIMATORS)]
DPOLossName = Literal[tuple(DPO_LOSSES)]
RECIPE_VERSION = 1
BUILTIN_MODEL = "smollm2-135m"
QUANTIZATIONS = ("nf4", "int8", "none")
# keys of a recipe's `model` section that are spelled differently in the step sections
MODEL_SECTION_ALIASES = {"base": "model"}


# ------------------------------------------------------------------------------------- shared field sets
@dataclass
class ModelOptions:
    """Which model to load and how."""

    model: str = setting(BUILTIN_MODEL, flags=("--model", "-m"))
    """Model: `smollm2-135m` (built in), a hub id, a local transformers folder, a .gguf file, or a run folder."""
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    """How the frozen base weights are stored: nf4 (4-bit, default), int8, or none (16/32-bit)."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""


@dataclass
class InferenceOptions:
    """Which model to sample from and how (generate, chat, label): unlike training, the weights' format is
    chosen for speed when none is asked for."""

    model: str = setting(BUILTIN_MODEL, flags=("--model", "-m"))
    """Model: `smollm2-135m` (built in), a hub id, a local transformers folder, a .gguf file, or a run folder."""
    quantization: Literal["auto", "nf4", "int8", "none"] = "auto"
    """How the base weights are stored: auto (default: the fastest for the device and the model's size, said in
    one line; unquantised when it fits in memory), nf4 (4-bit), int8, or none (16/32-bit)."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""


@dataclass
class LoraOptions:
    """The LoRA adapter trained on top of the frozen base."""

    lora_r: int = setting(16, allowed=POSITIVE)
    """LoRA rank."""
    lora_alpha: int = setting(32, allowed=POSITIVE)
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = setting(0.05, allowed=FRACTION)
    """Dropout on the LoRA input during training."""
    lora_targets: list[str] = setting(factory=lambda: ["all-linear"])
    """Modules that get an adapter: `all-linear` (default) or module names such as q_proj, v_proj."""


@dataclass
class OutputOptions:
    """Where a step writes and what it does with an existing output."""

    out: Optional[Path] = setting(None, flags=("--out", "-o"))
    """Output folder."""
    force: bool = False
    """Replace an existing output folder."""


@dataclass
class TrackingOptions:
    """Where a training step sends its metrics besides metrics.jsonl."""

    report_to: list[str] = setting(factory=list, check=check_trackers)
    """Experiment trackers that also get every metric of metrics.jsonl, comma-separated: tensorboard (writes
    OUT/tensorboard/), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (default: none). Each needs
    its package: tensorboard, wandb and mlflow come with instruct-cli's extra of the same name."""


@dataclass
class TrainOptions(TrackingOptions):
    """The optimisation settings shared by sft and rm."""

    data: Optional[Path] = setting(None, flags=("--data", "-d"))
    """Data folder written by `instruct prepare-data`."""
    epochs: int = setting(1, allowed=POSITIVE)
    """Passes over the training split (ignored when max_steps is set)."""
    max_steps: Optional[int] = setting(None, allowed=POSITIVE)
    """Stop after this many optimizer steps."""
    batch_size: int = setting(4, allowed=POSITIVE)
    """Rows per micro-batch on each process."""
    grad_accum: int = setting(1, allowed=POSITIVE)
    """Micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)."""
    lr: float = setting(2e-4, allowed=POSITIVE)
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to 0."""
    warmup_ratio: float = setting(0.03, allowed=FRACTION)
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = setting(0.0, allowed=Range(low=0.0))
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    max_length: int = setting(1024, allowed=POSITIVE)
    """Longest sequence in tokens; longer rows are cut (sft keeps the start, rm and dpo the prompt's end)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, about 30% slower."""
    eval_every: int = setting(50, allowed=POSITIVE)
    """Evaluate on the eval split every this many steps (and at the end)."""
    save_every: int = setting(50, allowed=POSITIVE)
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
    normalization_samples: int = setting(2000, allowed=POSITIVE)
    """Training responses whose rewards fit the reward normalisation (gain and bias: mean 0, std 1), a seeded
    sample of whole prompts (every response when there are fewer); the manifest records how many."""
    shared_prefix: bool = True
    """Run each prompt through the model once for all its responses (one packed row per prompt, each response
    attending to the prompt and itself); the same scores and loss as one sequence per response, faster when
    prompts are long. Off: one padded sequence per response."""


@dataclass
class DPOConfig(TrainOptions, LoraOptions, ModelOptions, OutputOptions):
    """`instruct dpo`: direct preference optimisation of a LoRA policy on preference pairs or K-wise rankings;
    the starting model (an SFT run's adapter, or the bare base) is the frozen reference, on the same base."""

    beta: float = setting(0.1, allowed=POSITIVE)
    """How strongly the policy is held to the reference (DPO's beta, IPO's tau): smaller lets it drift further."""
    loss: DPOLossName = "sigmoid"
    """The loss, with x the policy's chosen-minus-rejected log-ratio minus the reference's (TRL 1.x's
    formulas): sigmoid (DPO, -log sigmoid(beta x)), ipo ((x - 1/(2 beta))^2 on mean per-token log-probs),
    robust (DPO corrected for --label-smoothing flipped preferences) or hinge (SLiC, max(0, 1 - beta x))."""
    label_smoothing: float = setting(
        0.0,
        allowed=Range(0.0, 0.5, high_open=True),
        fix="Set it to the fraction of preferences you expect to be wrong, e.g. 0.1 (0 = plain DPO)",
    )
    """The assumed share of preference pairs whose order is flipped, below 0.5 (robust loss only)."""
    disable_dropout: bool = True
    """Turn every dropout off (the LoRA adapter's included) while training and scoring the reference, as TRL's
    disable_dropout: the policy's log-ratios against the reference are then exactly 0 at step 1 and the first
    loss is log 2. --no-disable-dropout trains with the adapter's own lora_dropout."""
    precompute_reference: bool = False
    """Score every response with the reference once before step 1 (TRL's precompute_ref_log_probs); by default
    each batch's reference log-probs come from the frozen starting adapter as training reaches it."""
    lr: float = setting(5e-5, allowed=POSITIVE)
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to 0 (lower than sft's: DPO overfits
    preferences quickly)."""

    def check_combination(self, source: str) -> None:
        """Label smoothing belongs to the losses that model flipped preferences (methods.DPO_LOSSES)."""
        if self.label_smoothing and not DPO_LOSSES[self.loss].takes_label_smoothing:
            takes = [loss for loss in DPO_LOSSES.values() if loss.takes_label_smoothing]
            raise UserError(
                f"`label_smoothing` applies to the {' and '.join(loss.title for loss in takes)} loss only, "
                f"not to {self.loss}",
                where=source,
                fix=f"Drop label_smoothing, or use loss: {' or '.join(loss.name for loss in takes)}",
            )


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
    data: Optional[Path] = setting(None, flags=("--data", "-d"))
    """Data folder with prompts (prompts.train/eval; an sft folder works too: its conversations minus the answer)."""
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    """How the shared frozen base is stored: nf4 (4-bit, default), int8, or none."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    iterations: int = setting(100, allowed=POSITIVE)
    """PPO iterations: each samples a rollout batch, scores it, and updates policy and value."""
    rollout_batch_size: int = setting(16, allowed=POSITIVE)
    """Responses sampled per iteration on each process, K per prompt (N processes sample N x this many, each its
    own share)."""
    minibatch_size: Optional[int] = setting(None, allowed=POSITIVE)
    """Rollouts per gradient step in the update, on each process (default: 4 for gae; the whole rollout batch
    for rloo and grpo, one update per batch as TRL's num_iterations=1)."""
    micro_batch_size: Optional[int] = setting(None, allowed=POSITIVE)
    """Rollouts per forward pass in the update and the log-prob passes, on each process: a minibatch's micro-
    batches add their gradients up to one step, so memory follows this, not the minibatch (default: the whole
    minibatch for gae; 4 for rloo and grpo, as TRL's per-device batch under its one update per batch)."""
    ppo_epochs: Optional[int] = setting(None, allowed=POSITIVE)
    """Passes over each rollout batch in the update (default: 4 for gae, as InstructGPT; 1 for rloo and grpo,
    as TRL)."""
    lr: float = setting(5e-5, allowed=POSITIVE)
    """Learning rate of the policy and value adapters (AdamW), decayed linearly to 0."""
    max_new_tokens: int = setting(64, allowed=POSITIVE)
    """Longest response sampled in a rollout."""
    max_prompt_length: int = setting(512, allowed=POSITIVE)
    """Prompts longer than this many tokens are cut from the left."""
    temperature: float = setting(0.7, allowed=POSITIVE)
    """Sampling temperature of rollouts; the log-probs of the update use the same one."""
    kl_coef: Optional[float] = setting(None, allowed=Range(low=0.0))
    """Initial KL coefficient beta (default: 0.05 for gae and rloo; 0 for grpo, TRL's default: the KL to the
    reference is still measured and logged, but not in the loss)."""
    target_kl: Optional[float] = setting(None, allowed=POSITIVE)
    """Adaptive beta: target KL per response (e.g. 6.0); None keeps beta fixed."""
    kl_horizon: int = setting(5, allowed=POSITIVE)
    """Adaptive beta: the controller's horizon in iterations; beta moves by up to 20%/kl_horizon per iteration
    towards the target (Ziegler et al. 2019, who count the horizon in samples)."""
    gamma: float = setting(1.0, allowed=FRACTION)
    """Discount factor of GAE."""
    lam: float = setting(0.95, allowed=FRACTION)
    """GAE lambda."""
    advantage: AdvantageName = "gae"
    """How advantages are estimated: gae (PPO with a value function, the default), rloo (leave-one-out
    baseline over K samples per prompt) or grpo (group-normalised over K samples). rloo and grpo need no value
    function: the value adapter and head are not loaded at all."""
    samples_per_prompt: Optional[int] = None
    """K: responses sampled per prompt in an iteration (rollout_batch_size counts responses and must be a
    multiple of K); default 1 for gae, 4 for rloo and grpo."""
    kl_penalty: Optional[Literal["reward", "loss"]] = None
    """Where the KL to the reference goes: reward (a per-token penalty in the reward, as InstructGPT; the default
    for gae and rloo) or loss (the k3 estimator times beta in the policy loss, as GRPO: its only choice, since
    its group normalisation would scale a KL in the reward)."""
    loss_type: Optional[Literal[GRPO_LOSS_TYPES]] = None
    """grpo only: how the per-token loss becomes one number, as TRL's loss_type: dapo (the token mean over the
    minibatch, TRL's default), grpo (the mean of each response's token mean), bnpo (the token mean of each
    process's batch) or dr_grpo (the token sum over responses x max_new_tokens)."""
    scale_rewards: Optional[Literal[REWARD_SCALES]] = None
    """rloo and grpo, as TRL's trainers: for grpo (scale_rewards) each advantage divided by the std of its
    group's rewards (group, the default), of the whole batch's (batch), or by nothing (none); for rloo
    (normalize_advantages) the advantages whitened over the batch (batch), or not (none, the default)."""
    reward_fn: list[str] = setting(factory=list)
    """Reward functions FILE.py:NAME, package.module:NAME or a ready-made checker (final_number, answer_in_tags,
    math_answer); repeat the flag for several: instead of --reward, or added to it. A function taking **kwargs is called as TRL calls
    it, NAME(prompts, completions, **columns) with the prompts' data columns (answer, ...); otherwise as
    NAME(prompts, responses). It returns a float per response, or None for one it does not judge."""
    reward_fn_weight: list[float] = setting(factory=list)
    """Weights of the --reward-fn functions, comma-separated in their order (default: 1 each); their weighted sum
    is added to the reward model's normalised score, if any."""
    clip_range: float = 0.2
    """PPO clipping of the policy ratio."""
    clip_range_high: Optional[float] = setting(None, allowed=Range(low=0.0))
    """The upper clip of the policy ratio, 1 + this, for every estimator (DAPO's clip-higher, TRL's epsilon_high;
    default: clip_range)."""
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
    weight_decay: float = setting(0.0, allowed=Range(low=0.0))
    """AdamW weight decay of the policy and value adapters (TRL's default, 0)."""
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
    eval_every: int = setting(10, allowed=POSITIVE)
    """Evaluate on held-out prompts every this many iterations (and at the end)."""
    eval_prompts: int = setting(16, allowed=POSITIVE)
    """Held-out prompts used per evaluation."""
    save_every: int = setting(10, allowed=POSITIVE)
    """Write a checkpoint for --resume every this many iterations (and on Ctrl-C)."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision: auto (bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, none on a CPU),
    no, bf16 (also on a CPU, slowly: it exercises the GPU arithmetic), or fp16 (GPUs only, with loss scaling)."""
    seed: int = 0
    """Seed for sampling, data order and initialisation (process N of a data-parallel run samples with seed + N)."""
    resume: bool = False
    """Continue an interrupted run in --out from its last checkpoint."""

    def __post_init__(self) -> None:
        """Fill in the settings left to the advantage estimator (None) from its row of
        methods.ADVANTAGE_ESTIMATORS, so that every reader of the config sees the values the run uses."""
        estimator = ADVANTAGE_ESTIMATORS.get(self.advantage)
        if estimator is None:  # not a known name: building the config from a recipe or flags refuses it
            return
        self.samples_per_prompt = estimator.group_size(self.samples_per_prompt)
        self.ppo_epochs = self.ppo_epochs or estimator.default_epochs
        self.minibatch_size = self.minibatch_size or estimator.default_minibatch or self.rollout_batch_size
        self.micro_batch_size = self.micro_batch_size or min(
            estimator.default_micro_batch or self.minibatch_size, self.minibatch_size
        )
        self.kl_coef = estimator.default_kl_coef if self.kl_coef is None else self.kl_coef
        self.kl_penalty = self.kl_penalty or estimator.kl_penalties[0]
        if estimator.policy_loss == "token":
            self.loss_type = self.loss_type or GRPO_LOSS_TYPES[0]
        self.scale_rewards = self.scale_rewards or (estimator.scales[0] if estimator.scales else None)
        self.clip_range_high = self.clip_range if self.clip_range_high is None else self.clip_range_high

    def check_combination(self, source: str) -> None:
        """The estimator's own choices: where its KL may go, and which of loss_type and scale_rewards apply."""
        estimator = ADVANTAGE_ESTIMATORS[self.advantage]
        if self.kl_penalty is not None and self.kl_penalty not in estimator.kl_penalties:
            raise UserError(
                f"`kl_penalty: {self.kl_penalty}` does not go with `advantage: {self.advantage}`: its advantages "
                "divide each group's rewards by their standard deviation, which would scale a KL in the reward too",
                where=source,
                fix=f"Use kl_penalty: {' or '.join(estimator.kl_penalties)} (as TRL's GRPO), or leave it out",
            )
        if self.target_kl is not None and self.kl_coef == 0:
            raise UserError(
                f"`target_kl: {self.target_kl}` adapts beta by multiplying it, and beta is 0"
                + (f" (advantage: {self.advantage}'s default)" if estimator.default_kl_coef == 0 else ""),
                where=source,
                fix="Give a starting kl_coef above 0 (e.g. 0.04), or drop target_kl",
            )
        if self.loss_type is not None and estimator.policy_loss != "token":
            takes = [name for name, e in ADVANTAGE_ESTIMATORS.items() if e.policy_loss == "token"]
            raise UserError(
                f"`loss_type` applies to advantage: {' or '.join(takes)}, not {self.advantage}",
                where=source,
                fix="Drop loss_type, or use advantage: " + " or ".join(takes),
            )
        if self.scale_rewards is not None and self.scale_rewards not in estimator.scales:
            takes = [name for name, e in ADVANTAGE_ESTIMATORS.items() if self.scale_rewards in e.scales]
            raise UserError(
                f"`scale_rewards: {self.scale_rewards}` does not apply to advantage: {self.advantage}",
                where=source,
                fix=(f"Use one of {', '.join(estimator.scales)}" if estimator.scales else "Drop scale_rewards")
                + (f", or advantage: {' or '.join(takes)}" if takes else ""),
            )


@dataclass
class RMScoreConfig(ModelOptions):
    """`instruct rm score`: add a normalised `reward` field to rows of prompt + response."""

    input: Optional[Path] = setting(None, flags=("--input", "-i"))
    """JSONL rows with `prompt` (text or messages) and `response` (text or assistant messages)."""
    output: Optional[Path] = setting(None, flags=("--output", "-o"))
    """Where the scored rows go (JSONL); standard output when not given."""
    batch_size: int = setting(8, allowed=POSITIVE)
    """Rows scored per forward pass."""
    max_length: int = setting(1024, allowed=POSITIVE)
    """Longest prompt + response in tokens; longer rows are cut from the left of the prompt."""


@dataclass
class PrepareDataConfig(OutputOptions):
    """`instruct prepare-data`: raw files in common formats -> a data folder of canonical JSONL splits."""

    inputs: list[Path] = setting(factory=list, flags=("--input", "-i"))
    """Input files or folders (JSON, JSONL, CSV, Parquet, text, or a `datasets.save_to_disk` folder)."""
    format: Literal[
        "auto", "alpaca", "sharegpt", "messages", "prompt-completion", "preference", "hh", "ranked", "text"
    ] = "auto"
    """Input format; `auto` detects it from the first rows of each file."""
    task: Literal["auto", "sft", "prefs", "prompts"] = "auto"
    """What the rows are for: sft demonstrations, prefs (preference pairs or rankings), prompts; auto infers it."""
    eval_fraction: float = setting(0.1, allowed=FRACTION)
    """Fraction of rows held out for the eval split."""
    seed: int = 0
    """Seed of the train/eval shuffle."""
    system: Optional[str] = None
    """System prompt to add to every conversation that has none."""
    max_tokens: Optional[int] = setting(None, allowed=POSITIVE)
    """Drop rows longer than this many tokens once the chat template is applied (see --truncate)."""
    truncate: bool = False
    """Keep rows over --max-tokens by cutting their prompt from the left (never an answer); drop only the rest."""
    model: str = BUILTIN_MODEL
    """Model whose tokenizer and chat template measure token lengths."""
    split_judge: Optional[Path] = None
    """prefs only: move a seeded half of the prompts (all rows of a prompt together) to a second data folder here,
    to train a judge reward model on preferences the training one never saw (then `instruct eval --judge`)."""
    strict: bool = False
    """Fail on the first malformed row instead of skipping and counting it."""


@dataclass
class SamplingOptions:
    """How answers are sampled: the flags `instruct generate` and `instruct chat` share."""

    max_new_tokens: int = setting(256, allowed=POSITIVE)
    """Most tokens to generate per answer."""
    temperature: float = setting(
        0.7, allowed=POSITIVE, fix="Set `temperature` to a positive number (use --greedy for deterministic output)"
    )
    """Sampling temperature."""
    top_p: float = setting(0.9, allowed=FRACTION)
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

    prompt: Optional[str] = setting(None, argument=True)
    """The prompt; `-` reads it from standard input."""
    input: Optional[Path] = setting(None, flags=("--input", "-i"))
    """A JSONL file of prompts (`{"prompt": ...}` as text or messages) to answer in batches; `-` reads stdin."""
    output: Optional[Path] = setting(None, flags=("--output", "-o"))
    """Where the batch answers go (JSONL); standard output when not given."""
    system: Optional[str] = None
    """System prompt."""
    batch_size: int = setting(8, allowed=POSITIVE)
    """Prompts per batch with --input."""


@dataclass
class ChatConfig(SamplingOptions, InferenceOptions):
    """`instruct chat`: a multi-turn conversation in the terminal with any model or run, answers streamed."""

    system: Optional[str] = None
    """System prompt at the start of the conversation (change it during the chat with /system TEXT)."""
    max_context: Optional[int] = setting(None, allowed=POSITIVE)
    """Most tokens of conversation the model sees, its answer included (default and upper limit: the model's
    context length); when the history outgrows it, the oldest exchanges are left out."""


@dataclass
class EvalConfig(OutputOptions):
    """`instruct eval`: compare models on held-out prompts by reward, win-rate, KL and perplexity."""

    models: list[str] = setting(factory=list, flags=("--models", "-m"))
    """Models to evaluate, comma-separated: sft/ppo run folders, `base` (the bare base model of the SFT run),
    or any model reference."""
    baseline: Optional[str] = None
    """Model the others are judged against, prompt by prompt (default: the first of --models; may be `base`)."""
    reward: Optional[Path] = None
    """Reward-model run folder that scores every response (optional when --reward-fn is given)."""
    reward_fn: list[str] = setting(factory=list)
    """Reward functions that judge every response, FILE.py:NAME, package.module:NAME or a ready-made checker
    (final_number, answer_in_tags, math_answer); repeat the flag for several: next to --reward, or instead of
    it. A function taking **kwargs is called as TRL calls it, NAME(prompts, completions, **columns) with the
    prompts' data columns (answer, ...); otherwise as NAME(prompts, responses). The report gives each one's
    mean over the samples it judged (None = not judged) and, for 0/1 values, the accuracy with its 95% interval."""
    reward_fn_weight: list[float] = setting(factory=list)
    """Weights of the --reward-fn functions, comma-separated in their order (default: 1 each); without --reward,
    their weighted sum (minus --missing-eos-penalty) is the reward that win-rates compare, as ppo scores it."""
    judge: list[Path] = setting(factory=list)
    """More reward-model run folders that judge every response as --reward does (each with its own
    normalisation, the same missing-EOS penalty), e.g. one trained on a held-out half of the preferences or with
    another seed; repeat the flag for several. Each gets its own mean reward, win-rate and length-controlled
    win-rate against the baseline: the training reward model's win and a judge's side by side show
    over-optimisation."""
    data: Optional[Path] = setting(None, flags=("--data", "-d"))
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
    max_new_tokens: int = setting(128, allowed=POSITIVE)
    """Longest response sampled per prompt."""
    temperature: float = setting(0.7, allowed=POSITIVE)
    """Sampling temperature (the same for every model; the KL is measured at it too)."""
    top_p: float = setting(1.0, allowed=FRACTION)
    """Nucleus sampling (1.0 = off, which keeps the KL estimate exact in expectation)."""
    seed: int = 0
    """Sampling seed, reset before each model so that all of them draw the same random numbers."""
    max_prompts: int = 64
    """Most held-out rows used per measurement: prompts answered, conversations for perplexity, preference rows."""
    batch_size: int = setting(8, allowed=POSITIVE)
    """Sequences per forward pass."""
    max_length: int = setting(1024, allowed=POSITIVE)
    """Longest prompt + response in tokens for scoring and perplexity (longer ones lose the start of the prompt)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the reward of a response that ends without an EOS (cut at max_new_tokens), as ppo does."""
    bootstrap: int = 1000
    """Bootstrap resamples of the prompts for the win-rate's 95% interval."""
    compare: list[Path] = setting(factory=list, nargs=2, metavar="REPORT_A REPORT_B")
    """Two report folders: print the differences between them instead of evaluating."""


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

    prompts: Optional[Path] = setting(None, flags=("--prompts", "-p"))
    """Data folder from `instruct prepare-data` whose prompts are labelled (a prompts, sft or prefs folder)."""
    split: Literal["train", "eval"] = "train"
    """Which split of the data folder gives the prompts."""
    out: Optional[Path] = setting(None, flags=("--out", "-o"))
    """Labels folder (rankings.jsonl, samples.jsonl); running the command again resumes where you stopped."""
    k: int = setting(4, flags=("--k", "-k"))
    """Responses sampled per prompt and ranked (InstructGPT used 4 to 9)."""
    labeler: Optional[str] = None
    """Who is labelling; each labeler resumes at their own next unlabelled prompt (default: $USER)."""
    max_prompts: Optional[int] = None
    """Label only the first N prompts of the split."""
    max_new_tokens: int = setting(256, allowed=POSITIVE)
    """Longest response sampled, in tokens."""
    temperature: float = setting(1.0, allowed=POSITIVE)
    """Sampling temperature (1.0 keeps the K responses varied, as ranking needs)."""
    top_p: float = setting(0.95, allowed=FRACTION)
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    seed: int = 0
    """Sampling seed (each batch is seeded from it and the index of its first prompt)."""
    batch_size: int = setting(4, allowed=POSITIVE)
    """Prompts sampled together ahead of the labeler (each is K sequences)."""
    stats: Optional[Path] = setting(None, metavar="LABELS_DIR")
    """Print counts, time per judgment and agreement between labelers for this labels folder, and exit."""
