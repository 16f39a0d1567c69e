"""The four roles of PPO as LoRA adapters on ONE shared base, switched with `set_adapter`, and the two heads.

    policy     trainable, starts as a copy of the SFT adapter
    reference  frozen copy of the SFT adapter: the KL is measured against the SFT model, not the bare base
    value      trainable, starts from the reward model's adapter and head (as in InstructGPT); not loaded at all
               with --advantage rloo/grpo; from the SFT adapter and a zero head when there is no reward model
    reward     frozen reward-model adapter + head, normalised with the gain/bias stored by `instruct rm`; not
               loaded when a --reward-fn replaces the reward model

Memory grows by adapters, not by models. May use: core (artifacts, heads, lora_merge, models, training, errors).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch
from torch import nn

from instruct_cli.core import artifacts, heads, lora_merge, models, training
from instruct_cli.core.config import PPOConfig
from instruct_cli.core.errors import UserError
from instruct_cli.core.methods import ADVANTAGE_ESTIMATORS

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"


class Roles(nn.Module):
    """The shared base with its four adapters, plus the two scalar heads (value trainable, reward frozen)."""

    def __init__(
        self,
        model,
        value_head: nn.Module | None,
        reward_head: nn.Module | None,
        reward_gain: float = 1.0,
        reward_bias: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.value_head = value_head  # None: critic-free (no value adapter either)
        self.reward_head = reward_head.requires_grad_(False) if reward_head is not None else None
        self.reward_gain = reward_gain
        self.reward_bias = reward_bias

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go."""
        return next(p.device for p in self.model.parameters() if p.device.type != "meta")

    @property
    def has_value(self) -> bool:
        """Whether a value function is loaded (GAE); critic-free runs have none."""
        return self.value_head is not None

    @property
    def has_reward_model(self) -> bool:
        """Whether a reward model is loaded (a --reward-fn alone needs none)."""
        return self.reward_head is not None

    @functools.cached_property
    def merge_blocker(self) -> str | None:
        """Why adapters cannot be folded into the base weights for sampling (a quantised base), or None:
        fixed once the model is loaded, so worked out once (core/lora_merge walks every module)."""
        return lora_merge.merge_blocker(self.model)

    def use(self, role: str) -> None:
        """Make `role` the active adapter (frozen roles are activated in inference mode)."""
        self.model.set_adapter(role, inference_mode=role in (REFERENCE, REWARD))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters PPO updates: the policy and value adapters and the value head."""
        adapters = [
            p
            for name, p in self.model.named_parameters()
            if "lora_" in name and (f".{POLICY}." in name or f".{VALUE}." in name)
        ]
        return adapters + (list(self.value_head.parameters()) if self.has_value else [])


def check_runs(config: PPOConfig) -> tuple[models.ModelSource, dict | None]:
    """The SFT run (as a model source) and the RM run's manifest (None without --reward), checked: complete,
    of the right kinds, on the same base model."""
    artifacts.require_complete(config.sft, ("sft", "dpo"), flag="--sft")  # the error names the command that makes one
    sft_source = models.resolve_model(str(config.sft), flag="--sft")
    if config.reward is None:
        return sft_source, None
    rm_manifest = artifacts.require_complete(config.reward, "rm", flag="--reward")
    if rm_manifest["base_model"]["fingerprint"] != sft_source.run_manifest["base_model"]["fingerprint"]:
        raise UserError(
            "The reward model and the SFT run were trained on different base models "
            f"({rm_manifest['base_model']['id']} vs {sft_source.reference})",
            where="--reward",
            fix="Train the reward model on the same base (e.g. `instruct rm --model RUNS/sft`)",
        )
    return sft_source, rm_manifest


def load_roles(
    config: PPOConfig, device, runs: tuple[models.ModelSource, dict | None] | None = None
) -> tuple[Roles, object, models.ModelSource, dict | None]:
    """Load the base once and attach the role adapters and heads the run needs; returns (roles, tokenizer,
    source of the SFT run, manifest of the RM run or None). `runs` is what `check_runs` returned, if it
    already ran."""
    from peft import PeftModel

    sft_source, rm_manifest = runs or check_runs(config)
    tokenizer = models.load_tokenizer(sft_source)
    base = models.load_base_model(sft_source, config.quantization, device)
    base = training.prepare_for_training(base, config.quantization, config.gradient_checkpointing)
    sft_adapter = str(sft_source.adapter)
    model = PeftModel.from_pretrained(base, sft_adapter, adapter_name=POLICY, is_trainable=True)
    model.load_adapter(sft_adapter, adapter_name=REFERENCE, is_trainable=False)
    reward_head, value_head, norm = None, None, {"gain": 1.0, "bias": 0.0}
    if rm_manifest is not None:
        rm_adapter = str(Path(config.reward) / models.ADAPTER_DIR)
        model.load_adapter(rm_adapter, adapter_name=REWARD, is_trainable=False)
        norm = rm_manifest.get("reward_normalization") or norm
        reward_head = heads.load_head(rm_adapter).to(device)
    needs_critic = ADVANTAGE_ESTIMATORS[config.advantage].needs_critic
    if needs_critic and rm_manifest is not None:
        model.load_adapter(rm_adapter, adapter_name=VALUE, is_trainable=True)
        value_head = heads.load_head(rm_adapter).to(device)
        # The value head starts as the RM's head in the units of the (normalised) rewards it must predict.
        # Left in raw RM units (a std of 5-10 is common), its first estimates are off by that much at every
        # token, GAE turns the error into advantages, and the policy follows the value head's noise instead.
        with torch.no_grad():
            value_head.bias.mul_(norm["gain"]).add_(norm["bias"])
            value_head.weight.mul_(norm["gain"])
    elif needs_critic:  # a reward function alone: the value function starts from the SFT model
        model.load_adapter(sft_adapter, adapter_name=VALUE, is_trainable=True)
        value_head = heads.ScalarHead(heads.hidden_size_of(model)).to(device)
        with torch.no_grad():
            value_head.weight.zero_()  # predicts 0 everywhere until the value loss has taught it
    models.disable_dropout(model)  # the log-probs of the update must match those of the rollout
    roles = Roles(model, value_head, reward_head, norm["gain"], norm["bias"])
    return roles, tokenizer, sft_source, rm_manifest


def save_outputs(roles: Roles, folder: Path) -> None:
    """Write the policy adapter to adapter/ (what generate/export/eval load) and the value adapter and head
    (if any) to value/."""
    for role, target in ((POLICY, "adapter"), (VALUE, "value")):
        if role == VALUE and not roles.has_value:
            continue
        with artifacts.atomic_folder(folder / target) as tmp:
            roles.model.save_pretrained(tmp / "saved", selected_adapters=[role])
            saved = tmp / "saved" / role  # peft puts named adapters in a subfolder
            for item in saved.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp / "saved")
            if role == VALUE:
                heads.save_head(roles.value_head, tmp)
