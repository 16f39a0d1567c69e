"""The four roles of PPO as LoRA adapters on ONE shared base, switched with `set_adapter`, and the two heads.

    policy     trainable, starts as a copy of the SFT adapter
    reference  frozen copy of the SFT adapter: the KL is measured against the SFT model, not the bare base
    value      trainable, starts from the reward model's adapter and head (as in InstructGPT)
    reward     frozen reward-model adapter + head, normalised with the gain/bias stored by `instruct rm`

Memory grows by adapters, not by models. May use: core (artifacts, heads, models, training, errors).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from instruct_cli.core import artifacts, heads, models, training
from instruct_cli.core.config import PPOConfig
from instruct_cli.core.errors import UserError

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"


class Roles(nn.Module):
    """The shared base with its four adapters, plus the two scalar heads (value trainable, reward frozen)."""

    def __init__(self, model, value_head: nn.Module, reward_head: nn.Module, reward_gain: float, reward_bias: float):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.reward_head = reward_head.requires_grad_(False)
        self.reward_gain = reward_gain
        self.reward_bias = reward_bias

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
        return adapters + list(self.value_head.parameters())


def check_runs(config: PPOConfig) -> tuple[models.ModelSource, dict]:
    """The SFT run (as a model source) and the RM run's manifest, checked: complete, of the right kinds, on
    the same base model."""
    artifacts.require_complete(config.sft, "sft", flag="--sft")  # the error names the command that makes one
    sft_source = models.resolve_model(str(config.sft), flag="--sft")
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
    config: PPOConfig, device, runs: tuple[models.ModelSource, dict] | None = None
) -> tuple[Roles, object, models.ModelSource, dict]:
    """Load the base once and attach the four role adapters and the two heads; returns (roles, tokenizer,
    source of the SFT run, manifest of the RM run). `runs` is what `check_runs` returned, if it already ran."""
    from peft import PeftModel

    sft_source, rm_manifest = runs or check_runs(config)
    tokenizer = models.load_tokenizer(sft_source)
    base = models.load_base_model(sft_source, config.quantization, device)
    base = training.prepare_for_training(base, config.quantization, config.gradient_checkpointing)
    sft_adapter, rm_adapter = str(sft_source.adapter), str(Path(config.reward) / models.ADAPTER_DIR)
    model = PeftModel.from_pretrained(base, sft_adapter, adapter_name=POLICY, is_trainable=True)
    model.load_adapter(sft_adapter, adapter_name=REFERENCE, is_trainable=False)
    model.load_adapter(rm_adapter, adapter_name=VALUE, is_trainable=True)
    model.load_adapter(rm_adapter, adapter_name=REWARD, is_trainable=False)
    disable_dropout(model)
    norm = rm_manifest.get("reward_normalization") or {"gain": 1.0, "bias": 0.0}
    reward_head = heads.load_head(rm_adapter).to(device)
    value_head = heads.load_head(rm_adapter).to(device)
    # The value head starts as the RM's head in the units of the (normalised) rewards it must predict. Left
    # in raw RM units (a std of 5-10 is common), its first estimates are off by that much at every token,
    # GAE turns the error into advantages, and the policy follows the value head's noise instead of the reward.
    with torch.no_grad():
        value_head.bias.mul_(norm["gain"]).add_(norm["bias"])
        value_head.weight.mul_(norm["gain"])
    return Roles(model, value_head, reward_head, norm["gain"], norm["bias"]), tokenizer, sft_source, rm_manifest


def disable_dropout(model: nn.Module) -> None:
    """PPO runs with dropout off: the log-probs of the update must match those of the rollout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def save_outputs(roles: Roles, folder: Path) -> None:
    """Write the policy adapter to adapter/ (what generate/export/eval load) and the value adapter and head
    to value/."""
    for role, target in ((POLICY, "adapter"), (VALUE, "value")):
        with artifacts.atomic_folder(folder / target) as tmp:
            roles.model.save_pretrained(tmp / "saved", selected_adapters=[role])
            saved = tmp / "saved" / role  # peft puts named adapters in a subfolder
            for item in saved.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp / "saved")
            if role == VALUE:
                heads.save_head(roles.value_head, tmp)
