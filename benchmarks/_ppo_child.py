"""What runs inside bench_ppo's child processes (bench_ppo.py --child ...): the import baseline, and one PPO
trajectory with the roles held the shared way (one base, four adapters: `ppo.load_roles`) or as four separate
models (`SeparateRoles`), its timings and memory written as JSON for the parent."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common import memory_status

ROLES = ("policy", "reference", "value", "reward")


def child_baseline(everything: bool) -> None:
    """Import torch and transformers (resolving the lazy model classes); with `everything`, also the other
    libraries every side imports."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if everything:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401

        from instruct_cli.steps import ppo  # noqa: F401
    print(json.dumps(memory_status()), flush=True)


class SeparateRoles:
    """Four separate models behind the interface `ppo.make_trajectory` uses: `use(role)` picks a model
    instead of an adapter, so the shared and separate one-step sides run the very same code."""

    def __init__(self, role_models: dict, value_head, reward_head, reward_gain: float, reward_bias: float):
        self.models = role_models
        self.model = role_models["policy"]
        self.value_head = value_head
        self.reward_head = reward_head
        self.reward_gain = reward_gain
        self.reward_bias = reward_bias

    has_value = True
    has_reward_model = True

    @property
    def device(self):
        """Where the inputs go (the value head sits with the models)."""
        return self.value_head.weight.device

    def use(self, role: str) -> None:
        self.model = self.models[role]

    @property
    def merge_blocker(self):
        """Why the policy model cannot be folded for sampling (as `Roles.merge_blocker`), or None."""
        from instruct_cli.core import lora_merge

        return lora_merge.merge_blocker(self.models["policy"])


def load_separate(config, device, model_ref: str):
    """Four full models on the base `model_ref`, one per role, as a four-model PPO would hold them; trainable
    roles (policy, value) are prepared for training exactly as `load_roles` prepares the shared base."""
    from peft import PeftModel

    from instruct_cli.core import artifacts, heads, models, training

    source = models.resolve_model(str(config.sft), flag="--sft")
    rm_manifest = artifacts.require_complete(config.reward, "rm", flag="--reward")
    tokenizer = models.load_tokenizer(source)
    sft_adapter, rm_adapter = str(source.adapter), str(Path(config.reward) / models.ADAPTER_DIR)
    role_models = {}
    for role in ROLES:
        trainable = role in ("policy", "value")
        base = models.load_base_model(models.resolve_model(model_ref), config.quantization, device)
        if trainable:
            base = training.prepare_for_training(base, config.quantization, config.gradient_checkpointing)
        adapter = sft_adapter if role in ("policy", "reference") else rm_adapter
        model = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
        models.disable_dropout(model)
        if not trainable:
            model.eval()
        role_models[role] = model
    value_head = heads.load_head(rm_adapter).to(device)
    reward_head = heads.load_head(rm_adapter).to(device).requires_grad_(False)
    norm = rm_manifest.get("reward_normalization") or {"gain": 1.0, "bias": 0.0}
    return SeparateRoles(role_models, value_head, reward_head, norm["gain"], norm["bias"]), tokenizer


def child_one_step(spec_file: str) -> None:
    """Load the roles (shared or separate), run one trajectory, write timings and memory as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    from instruct_cli.core.console import quiet_libraries

    quiet_libraries()
    import torch

    from instruct_cli.core import data_folders, models, training
    from instruct_cli.core.chat import encode_prompt
    from instruct_cli.core.config import PPOConfig
    from instruct_cli.core.recipes import build_config
    from instruct_cli.steps import ppo

    config = build_config(
        PPOConfig,
        "ppo",
        None,
        {
            "sft": spec["sft"],
            "reward": spec["reward"],
            "data": spec["data"],
            "quantization": spec["quantization"],
            "rollout_batch_size": spec["rollout_batch_size"],
            "minibatch_size": spec["minibatch_size"],
            "max_new_tokens": spec["max_new_tokens"],
            "seed": spec["seed"],
        },
    )
    device = models.pick_device(config.device)
    after_imports = memory_status()
    start = time.perf_counter()
    if spec["design"] == "shared":
        roles, tokenizer, _, _ = ppo.load_roles(config, device)
    else:
        roles, tokenizer = load_separate(config, device, spec["model"])
    load_s = time.perf_counter() - start
    ready_s = time.time() - float(os.environ["BENCH_LAUNCHED"])
    after_load = memory_status()
    print(f"ready after {ready_s:.1f} s (roles loaded in {load_s:.1f} s)", flush=True)

    prompts = data_folders.read_prompts(config.data, "train")  # the CLI's first rollout batch
    accelerator = training.make_accelerator(config.seed, config.precision, config.device)
    batch = [encode_prompt(tokenizer, prompts[i]) for i in ppo.iteration_prompts(len(prompts), config, 0, accelerator)]
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    rollout = ppo.rollout(roles, tokenizer, batch, config, accelerator)
    trajectory, stats = ppo.make_trajectory(roles, rollout, config, config.kl_coef, accelerator)
    step_s = time.perf_counter() - start
    result = {
        "load_s": load_s,
        "ready_s_child": ready_s,
        "step_s": step_s,
        "samples_per_s": config.rollout_batch_size / step_s,
        "response_tokens": int(trajectory.response_mask.sum()),
        "response_shape": list(trajectory.response.shape),
        "rss_after_imports_mb": after_imports["VmRSS"],
        "rss_after_load_mb": after_load["VmRSS"],
        "vmhwm_mb": memory_status()["VmHWM"],
        "stats": stats,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
