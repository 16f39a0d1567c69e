"""A LoRA adapter folded into its base weights for a while, then taken out again bit for bit.

Owns `merged_adapter(model, name)`: while the block runs, every unquantised `lora.Linear` carrying adapter
`name` computes with W + delta in ONE matmul instead of W x plus the adapter's two small ones (PPO's rollouts
decode token by token, where the adapter's extra matmuls and their Python overhead are a large share of each
step), and afterwards the base holds its original weight tensors again. And `merge_blocker(model)`: why a
model cannot be merged (a quantised base), or None. May use: nothing of instruct_cli (torch and peft only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def merge_blocker(model) -> str | None:
    """Why adapters cannot be folded into `model`'s base weights, in a few words, or None when they can.

    A quantised (bitsandbytes 4-bit or 8-bit) base cannot take W + delta without re-quantising it, which
    changes the weights; such a model keeps its adapters unmerged."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if any(type(part).__module__.startswith("bitsandbytes") for part in (module, weight)):
            return "the base is quantised (bitsandbytes)"
        if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            return f"the base has non-float weights ({type(module).__name__})"
    return None


def mergeable_layers(model, name: str) -> list:
    """The plain `lora.Linear` layers of `model` that carry adapter `name` as vanilla LoRA (no DoRA or other
    variant, no LoRA bias) over an unquantised weight: the ones `merged_adapter` folds. Any other layer
    keeps computing its adapter at run time, which gives the same result."""
    from peft.tuners.lora import Linear

    return [
        module
        for module in model.modules()
        if type(module) is Linear  # exactly: peft's bnb and other subclasses store their weights differently
        and name in module.lora_A
        and name not in module.lora_variant
        and not module.lora_bias.get(name, False)
        and module.get_base_layer().weight.is_floating_point()
        and not module.merged
    ]


@contextlib.contextmanager
def merged_adapter(model, name: str) -> Iterator[int]:
    """Fold adapter `name` into the base weights of `model` (a peft model) while the block runs; yields how
    many layers were folded.

    Exact afterwards: no merge/unmerge arithmetic (W + d - d is not W in floating point). Each folded layer's
    base `weight.data` is pointed at a NEW tensor W + delta, and the ORIGINAL tensor object is put back in
    `finally`, so the base is bit-identical afterwards, also when the block raises (an error or Ctrl-C in the
    middle of sampling). While folded, the layer is marked merged (peft's `merged_adapters`), so that its
    forward skips the adapters instead of adding the delta a second time; peft's own `disable_adapter` must
    not be used inside the block (it would unmerge, i.e. subtract, from the folded weights).

    Inside the block the outputs equal the unmerged model's up to float rounding ((W + BA s) x is rounded
    differently from W x + B(A x) s), and the adapter receives no gradient: it is for sampling under no_grad.
    Costs a transient copy of every folded weight (for a model whose attention and MLP projections are all
    targeted, nearly the whole model) and one B @ A product per layer."""
    folded = []
    try:
        with torch.no_grad():
            for layer in mergeable_layers(model, name):
                base = layer.get_base_layer()
                original = base.weight.data
                base.weight.data = original + layer.get_delta_weight(name).to(original.dtype)
                folded.append((layer, base, original))
                layer.merged_adapters.append(name)
        yield len(folded)
    finally:
        for layer, base, original in reversed(folded):
            base.weight.data = original
            if name in layer.merged_adapters:
                layer.merged_adapters.remove(name)
