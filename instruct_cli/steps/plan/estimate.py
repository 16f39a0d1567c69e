"""The estimate of one step: its peak (`Breakdown`, the largest of the `Moment`s it goes through), the
estimators of sft, rm, ppo, dpo and eval (`estimate_sft` ... `estimate_step`), a step of a recipe with its
estimate (`StepPlan`) and the fit verdict against a card (`Verdict`, `usable_memory`, `judge`).

Uses `gpus` (units), `shapes` and `memory` (the byte models), and the core's step configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from instruct_cli.core import config as cfg
from instruct_cli.core.methods import ADVANTAGE_ESTIMATORS

from .gpus import GiB
from .memory import (
    Precision,
    _linear_out,
    base_weight_bytes,
    inference_layer_bytes,
    kv_cache_bytes,
    lm_head_cast_bytes,
    precision,
    sampling_bytes,
    sft_logits_bytes,
    training_activation_bytes,
)
from .shapes import Lora, ModelShape, head_parameters, lora_for, lora_parameters

CUDA_CONTEXT_RESERVE = GiB // 2
"""Device memory the CUDA context and kernels take before torch allocates anything."""
TIGHT_MARGIN = 0.10
"""A step whose estimate is within this fraction of the usable memory is marked tight (fragmentation)."""


# -------------------------------------------------------------------------------------------- breakdown
@dataclass
class Breakdown:
    """The estimated peak device memory of one step, by component (bytes). The components add up to `total`."""

    step: str
    weights: int = 0
    """The frozen base, quantisation constants included."""
    adapters: int = 0
    """LoRA weights of every adapter in memory, and scalar heads."""
    gradients: int = 0
    optimizer: int = 0
    """AdamW's two fp32 moments per trainable parameter."""
    activations: int = 0
    """What autograd keeps (and transient layer memory) at the peak moment."""
    logits: int = 0
    """Vocabulary-sized tensors at the peak moment."""
    kv_cache: int = 0
    workspace: int = 0
    """Other transients at the peak moment: a dequantised weight, the bf16 copy of the lm_head."""
    phase: str = ""
    """The moment of the step when the peak happens."""
    notes: list[str] = field(default_factory=list)
    moments: list["Moment"] = field(default_factory=list)
    """Every moment considered (the peak is the largest)."""

    @property
    def total(self) -> int:
        """The estimated peak."""
        return (
            self.weights
            + self.adapters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.kv_cache
            + self.workspace
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for JSON)."""
        values = dataclasses.asdict(self)
        values["total"] = self.total
        values["moments"] = {m.name: m.total for m in self.moments}
        return values


@dataclass(frozen=True)
class Moment:
    """One moment of a step: the transient components alive then."""

    name: str
    activations: int = 0
    logits: int = 0
    kv_cache: int = 0
    workspace: int = 0
    gradients: bool = True
    """Whether the trainable parameters' gradients exist then (they do between micro-batches of an
    accumulating step; PPO frees them after every minibatch, so its rollout has none)."""

    @property
    def total(self) -> int:
        """The transient bytes of the moment (gradients not included)."""
        return self.activations + self.logits + self.kv_cache + self.workspace


def _peak(breakdown: Breakdown, moments: list[Moment]) -> Breakdown:
    """Fill the breakdown's transient components (and gradients, if they exist then) from the largest moment."""
    gradients = breakdown.gradients
    top = max(moments, key=lambda m: m.total + (gradients if m.gradients else 0))
    breakdown.moments = list(moments)
    breakdown.activations, breakdown.logits = top.activations, top.logits
    breakdown.kv_cache, breakdown.workspace, breakdown.phase = top.kv_cache, top.workspace, top.name
    breakdown.gradients = gradients if top.gradients else 0
    return breakdown


def _static(
    step: str,
    shape: ModelShape,
    quantization: str,
    prec: Precision,
    adapters: list[Lora],
    trainable: list[Lora],
    heads: int = 0,
    trainable_heads: int = 0,
) -> Breakdown:
    """Weights, adapters, gradients and optimizer states: there for the whole step."""
    lora = sum(lora_parameters(shape, a) for a in adapters)
    train = sum(lora_parameters(shape, a) for a in trainable) + trainable_heads * head_parameters(shape)
    return Breakdown(
        step=step,
        weights=base_weight_bytes(shape, quantization, prec),
        adapters=4 * (lora + heads * head_parameters(shape)),
        gradients=4 * train,
        optimizer=8 * train,
    )


def optimizer_step_moment(breakdown: Breakdown, prec: Precision) -> Moment:
    """The update. On a GPU AdamW runs `foreach` and takes the square root of every second moment at once: one
    more copy of the states; on a CPU it goes parameter by parameter (a negligible temporary)."""
    return Moment("optimizer step", workspace=breakdown.optimizer // 2 if prec.cuda else 0)


# ------------------------------------------------------------------------------------------------ steps
def estimate_sft(shape: ModelShape, config: cfg.SFTConfig, device: str = "cuda") -> Breakdown:
    """`instruct sft`: batch_size x max_length tokens through a LoRA'd base, the loss over every position."""
    prec = precision(device, config.quantization, training=True)
    lora = lora_for(shape, config)
    out = _static("sft", shape, config.quantization, prec, [lora], [lora])
    return _peak(
        out,
        _training_moments(
            shape, prec, lora, config.batch_size, config.max_length, config.gradient_checkpointing, logits=True, out=out
        ),
    )


def estimate_rm(shape: ModelShape, config: cfg.RMConfig, device: str = "cuda") -> Breakdown:
    """`instruct rm`: 2 x batch_size sequences (chosen and rejected; K per row for rankings) of max_length
    through a LoRA'd base; a scalar head reads the last hidden state (no vocabulary logits)."""
    return _pairwise("rm", shape, config, device, heads=1, logits=False)


def estimate_dpo(shape: ModelShape, config: cfg.DPOConfig, device: str = "cuda") -> Breakdown:
    """`instruct dpo`: 2 x batch_size sequences (chosen and rejected; K per row for rankings) of max_length
    through one LoRA'd base, with vocabulary logits at the response tokens. The reference is the same base and
    adapter, scored once before training: no second model, and its log-probs are a float per response."""
    return _pairwise("dpo", shape, config, device, heads=0, logits=True)


def _pairwise(step: str, shape: ModelShape, config, device: str, heads: int, logits: bool) -> Breakdown:
    """A step that trains one LoRA (and `heads` trainable scalar heads) on pairs: 2 x batch_size sequences."""
    prec = precision(device, config.quantization, training=True)
    lora = lora_for(shape, config)
    out = _static(step, shape, config.quantization, prec, [lora], [lora], heads=heads, trainable_heads=heads)
    out.notes.append("2 sequences per row (pairs); a ranked row of K responses costs K")
    moments = _training_moments(
        shape, prec, lora, 2 * config.batch_size, config.max_length, config.gradient_checkpointing, logits, out=out
    )
    return _peak(out, moments)


def _training_moments(
    shape: ModelShape,
    prec: Precision,
    lora: Lora,
    batch: int,
    seq: int,
    checkpointing: bool,
    logits: bool,
    out: Breakdown,
) -> list[Moment]:
    """The moments of one training step: the end of the forward (the loss), one layer's backward, the update."""
    tokens = batch * seq
    kept, backward = training_activation_bytes(shape, prec, lora, batch, seq, checkpointing)
    cast = lm_head_cast_bytes(shape, prec) if logits else 0
    loss = Moment("loss", activations=kept, logits=sft_logits_bytes(shape, tokens) if logits else 0, workspace=cast)
    layer = Moment("backward", activations=kept + backward, workspace=cast)
    return [loss, layer, optimizer_step_moment(out, prec)]


def estimate_ppo(
    shape: ModelShape, config: cfg.PPOConfig, policy: Lora, value: Lora, device: str = "cuda"
) -> Breakdown:
    """`instruct ppo`: one base and an adapter per role (policy, reference, and the value and reward roles
    when the run has them); the largest of rollout, scoring, log-probs and the update. `value` is the reward
    model's LoRA (the value role starts from it, or from the SFT adapter when there is no reward model)."""
    prec = precision(device, config.quantization, training=True)
    plain = replace(prec, autocast=False)  # steps 1-4 run outside autocast
    policy, value = replace(policy, dropout=0.0), replace(value, dropout=0.0)  # PPO turns dropout off
    has_value, has_reward = (
        ADVANTAGE_ESTIMATORS[config.advantage].needs_critic,
        config.reward is not None or not config.reward_fn,
    )
    value_lora = value if has_reward else policy
    out = _static(
        "ppo",
        shape,
        config.quantization,
        prec,
        [policy, policy] + [value_lora] * has_value + [value] * has_reward,
        [policy] + [value_lora] * has_value,
        heads=has_value + has_reward,
        trainable_heads=int(has_value),
    )
    if not has_value:
        out.notes.append(f"--advantage {config.advantage}: no value adapter, head, gradients or optimizer state")
    rollouts, prompt, new = config.rollout_batch_size, config.max_prompt_length, config.max_new_tokens
    full = prompt + new
    kv_bytes = max(_linear_out(plain.stream, plain, True), plain.stream)  # k after RoPE: stream dtype or wider
    merged = 0  # --merged-rollouts on an unquantised base: a copy of every policy-targeted weight, W + delta
    if config.merged_rollouts and config.quantization == "none":
        linears = shape.linears()
        merged = shape.layers * sum(linears[name][0] * linears[name][1] for name in policy.targets) * prec.compute
        out.notes.append("--merged-rollouts: rollouts hold a copy of the LoRA-targeted weights (W + delta)")
    moments = [
        # 1. rollout: the prefill of the prompts, then the cache grown to prompt + new tokens
        Moment(
            "rollout prefill",
            activations=inference_layer_bytes(shape, plain, rollouts, prompt),
            kv_cache=kv_cache_bytes(shape, rollouts, prompt, kv_bytes),
            logits=sampling_bytes(shape, rollouts),
            workspace=merged,
            gradients=False,
        ),
        Moment(
            "rollout end",
            kv_cache=kv_cache_bytes(shape, rollouts, full, kv_bytes),
            logits=sampling_bytes(shape, rollouts),
            workspace=merged,
            gradients=False,
        ),
        # 2. score / 4. values: the body over prompt + response without gradients
        Moment("scoring", activations=inference_layer_bytes(shape, plain, rollouts, full), gradients=False),
        # 3. log-probs and entropy, a micro-batch of rollouts at a time: the policy's logits of the response
        #    positions (+1), then the scaled fp32 copy, log-softmax, its exp and the product for the entropy
        Moment(
            "rollout log-probs",
            logits=min(rollouts, config.micro_batch_size) * (new + 1) * shape.vocab * (plain.stream + 12),
            gradients=False,
        ),
    ]
    # 5. update: a micro-batch of prompt + response sequences at a time with gradients through the policy
    minibatch = config.micro_batch_size
    kept, backward = training_activation_bytes(shape, prec, policy, minibatch, full, config.gradient_checkpointing)
    logits_dtype = prec.compute if prec.autocast else prec.stream
    # logits of T+1 positions; in the backward the saved log-softmax, its gradient and the input gradient
    update_logits = minibatch * (new + 1) * shape.vocab * (logits_dtype + 12)
    cast = lm_head_cast_bytes(shape, prec)
    ptx_kept = ptx_logits = 0
    if config.ptx_coef > 0:  # the SFT term's forward shares the policy's backward
        ptx_kept, _ = training_activation_bytes(shape, prec, policy, minibatch, 1024, config.gradient_checkpointing)
        ptx_logits = sft_logits_bytes(shape, minibatch * 1024)
        out.notes.append("PPO-ptx adds an SFT forward of minibatch_size x 1024 tokens to the update")
    moments += [
        Moment(
            "update loss",
            activations=kept + ptx_kept,
            logits=update_logits + ptx_logits,
            workspace=cast,
            gradients=False,
        ),
        Moment("update backward", activations=kept + ptx_kept + backward, workspace=cast),
        optimizer_step_moment(out, prec),
    ]
    return _peak(out, moments)


def estimate_eval(shape: ModelShape, config: cfg.EvalConfig, lora: Lora, device: str = "cuda") -> Breakdown:
    """`instruct eval`: one model at a time (policy or reward model), no gradients: the largest of generation,
    response log-probs, perplexity and reward scoring."""
    # auto (the default) samples unquantised only where the weights fit in half the memory: planned as nf4
    quantization = "nf4" if config.quantization == "auto" else config.quantization
    prec = precision(device, quantization, training=False)
    out = _static("eval", shape, quantization, prec, [lora], [], heads=1)
    batch, prompt, new = config.batch_size, config.max_length, config.max_new_tokens
    full = prompt + new
    kv = _linear_out(prec.stream, prec, True)
    out.notes.append("one model in memory at a time; prompts planned at max_length tokens")
    moments = [
        Moment(
            "sampling prefill",
            activations=inference_layer_bytes(shape, prec, batch, prompt),
            kv_cache=kv_cache_bytes(shape, batch, prompt, kv),
            logits=sampling_bytes(shape, batch),
        ),
        Moment("sampling end", kv_cache=kv_cache_bytes(shape, batch, full, kv), logits=sampling_bytes(shape, batch)),
        # the response positions (+1): logits, the scaled fp32 copy and the log-softmax
        Moment("response log-probs", logits=batch * (new + 1) * shape.vocab * (prec.stream + 8)),
        # every position of batch x max_length: logits, their contiguous copy and the fp32 log-softmax
        # (fp32: logits + copy + log-softmax; bf16: logits + the fp32 copy + log-softmax, the bf16 copy freed)
        Moment("perplexity", logits=batch * prompt * shape.vocab * (prec.stream + 8)),
        Moment("reward model", activations=inference_layer_bytes(shape, prec, 2 * batch, prompt)),
    ]
    return _peak(out, moments)


# ----------------------------------------------------------------------------------------- fit verdicts
@dataclass
class Verdict:
    """Whether a step fits a GPU, and what would make it fit."""

    fits: bool
    tight: bool
    usable: int
    suggestions: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """fits / tight / does not fit."""
        return "does not fit" if not self.fits else "tight" if self.tight else "fits"


def usable_memory(memory: int, device: str = "cuda") -> int:
    """The memory torch can allocate: a card's size minus the CUDA context (all of it on a CPU)."""
    return max(memory - (CUDA_CONTEXT_RESERVE if device.startswith("cuda") else 0), 0)


def judge(total: int, memory: int, device: str = "cuda") -> Verdict:
    """Fit verdict of an estimate against a card (or a CPU's RAM)."""
    usable = usable_memory(memory, device)
    return Verdict(fits=total <= usable, tight=total > (1 - TIGHT_MARGIN) * usable, usable=usable)


@dataclass
class StepPlan:
    """One step of a recipe: its config, the model shape and adapters it runs with, and its estimate."""

    step: str
    config: Any
    shape: ModelShape | None
    loras: tuple[Lora, ...] = ()
    breakdown: Breakdown | None = None
    verdict: Verdict | None = None
    checkpointing: dict[bool, int] = field(default_factory=dict)
    """The peak with gradient checkpointing on and off (training steps)."""

    def estimate(self, config: Any | None = None, device: str = "cuda") -> Breakdown:
        """The breakdown of this step with `config` (default: its own)."""
        return estimate_step(self.step, config or self.config, self.shape, self.loras, device)


def estimate_step(
    step: str, config: Any, shape: ModelShape, loras: tuple[Lora, ...] = (), device: str = "cuda"
) -> Breakdown:
    """Dispatch to the step's estimator. sft, rm and dpo read their LoRA from `config`; ppo needs `loras` =
    (policy lora, value lora) and eval (lora,), the adapters of the runs they load."""
    if step == "sft":
        return estimate_sft(shape, config, device)
    if step == "rm":
        return estimate_rm(shape, config, device)
    if step == "dpo":
        return estimate_dpo(shape, config, device)
    if step == "ppo":
        policy, value = loras
        return estimate_ppo(shape, config, policy, value, device)
    if step == "eval":
        (lora,) = loras
        return estimate_eval(shape, config, lora, device)
    return Breakdown(step=step, phase="tokenizer only (no device memory)")
