"""Frozen fp32 Linear layers on a CPU through oneDNN instead of MKL: about twice the matmul rate on AMD CPUs.

PyTorch's CPU build runs fp32 `F.linear` (and its backward) through Intel MKL's sgemm. On AMD CPUs MKL does
not use its AVX-512 kernels, while oneDNN (also inside every PyTorch CPU build, as `torch.ops.mkldnn`) picks
its kernels by instruction set. Measured on this project's 2-core AMD EPYC (torch 2.13, fp32, 1536 x 576
weight): 206 against 423 GFLOP/s at 2048 rows, 78 against 117 at 8 rows (a decoding step); the input
gradient (grad @ W) likewise. Every step here is mostly such matmuls, so this is the largest speed lever on
a CPU. On Intel CPUs MKL is fast and the two are expected to be close (not measured here).

Only FROZEN layers are routed: the base model's weights under LoRA, and the tied lm_head. Their backward
needs the input gradient alone (grad @ W, oneDNN again), never a weight gradient, so `FrozenLinear` is the
whole autograd rule. Anything else falls back to `F.linear` at call time: a weight that needs a gradient
(requires grad, outside no_grad), a dtype other than fp32 on both sides, another device, or CPU autocast (bf16 autocast must stay the GPU's
arithmetic, which the tests run on a CPU). The results equal MKL's up to fp32 rounding (the order of the
sums differs).

`torch.ops.mkldnn._linear_pointwise` is the op PyTorch's own compiler (inductor) emits for CPU linears; it
is private, so `available()` checks it once against `F.linear` and everything stays on MKL if it is missing
or wrong. INSTRUCT_CPU_MATMUL=mkl turns the routing off (to compare, or if a future torch misbehaves);
`onednn` or unset is the default, and any other value is an error rather than silently ignored.

Owns: `route_frozen_linears`, `OneDNNLinear`, `available`. May use: errors.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from instruct_cli.core.errors import UserError

ENV = "INSTRUCT_CPU_MATMUL"
"""Set to `mkl` to leave every Linear on PyTorch's default (MKL) path; `onednn` (or unset) routes them."""
CHOICES = ("onednn", "mkl")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN (weight may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def available() -> bool:
    """True when oneDNN's linear exists in this torch build, agrees with `F.linear` on a small case (forward
    and input gradient), and INSTRUCT_CPU_MATMUL is not `mkl`; a value it does not know is a UserError."""
    choice = os.environ.get(ENV, "").strip().lower() or "onednn"
    if choice not in CHOICES:
        raise UserError(
            f"{ENV}={os.environ[ENV]!r} is not a CPU matmul path this tool knows",
            where=f"the environment variable {ENV}",
            fix=f"Set it to {' or '.join(CHOICES)} (mkl: PyTorch's default path), or unset it",
        )
    if choice == "mkl":
        return False
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        generator = torch.Generator().manual_seed(0)
        x, weight = torch.randn(5, 2, 24, generator=generator), torch.randn(16, 24, generator=generator)
        bias, grad = torch.randn(16, generator=generator), torch.randn(5, 2, 16, generator=generator)
        forward_ok = torch.allclose(_onednn_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4)
        backward_ok = torch.allclose(_onednn_linear(grad, weight.t(), None), grad @ weight, atol=1e-4)
        return forward_ok and backward_ok
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class FrozenLinear(torch.autograd.Function):
    """y = x @ W.T + b through oneDNN with a frozen W and b: the backward gives x its gradient (grad @ W,
    through oneDNN too) and the weights none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (weight,) = ctx.saved_tensors
        grad_x = _onednn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose forward runs through oneDNN while its weights need no gradient and are fp32 on a
    CPU with autocast off, and exactly as `nn.Linear` otherwise. Same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class docstring
        weight, bias = self.weight, self.bias
        if (
            (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))
            or weight.dtype != torch.float32
            or x.dtype != torch.float32
            or weight.device.type != "cpu"
            or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, weight, bias)
        return FrozenLinear.apply(x, weight, bias)


def route_frozen_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` (not a subclass such as a quantised layer or a scalar head) an
    `OneDNNLinear`, in place; returns how many. Meant for a base model as loaded, before LoRA layers are
    added (those stay plain). Nothing changes when oneDNN is not `available()`. Layers decide at each call
    (see `OneDNNLinear`), so a weight being trained, a model moved to a GPU or run under autocast computes
    as before."""
    if not available():
        return 0
    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            routed += 1
    return routed
