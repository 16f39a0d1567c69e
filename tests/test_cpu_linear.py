"""Frozen fp32 Linear layers through oneDNN on a CPU (core/cpu_linear.py): the same outputs and gradients as
PyTorch's default path to fp32 rounding, and the default path wherever a weight is trained, autocast is on
or the dtype is not fp32."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instruct_cli.core import cpu_linear, models

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN linear")


@contextlib.contextmanager
def plain_linears(model: nn.Module):
    """Every OneDNNLinear of `model` back to nn.Linear while the block runs."""
    routed = [module for module in model.modules() if type(module) is cpu_linear.OneDNNLinear]
    for module in routed:
        module.__class__ = nn.Linear
    try:
        yield
    finally:
        for module in routed:
            module.__class__ = cpu_linear.OneDNNLinear


def routed_layer(out_features=48, in_features=32, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    layer.__class__ = cpu_linear.OneDNNLinear
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_gradient_equal_f_linear(bias):
    layer = routed_layer(bias=bias)
    x = torch.randn(3, 40, 32)[:, 5:37].requires_grad_(True)  # 3-D and not contiguous, as hidden states are
    y = layer(x)
    assert y.grad_fn is not None and "FrozenLinear" in type(y.grad_fn).__name__  # it really went through oneDNN
    grad = torch.randn_like(y)
    (x_grad,) = torch.autograd.grad(y, x, grad)
    expected = F.linear(x, layer.weight, layer.bias)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_a_trained_weight_gets_its_gradient_through_the_default_path():
    layer = routed_layer().requires_grad_(True)
    x = torch.randn(4, 32)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer.weight.grad, torch.ones(48, 1) * x.sum(0), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient wanted: oneDNN even for a trainable weight
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_autocast_and_other_dtypes_compute_as_before():
    layer = routed_layer()
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's bf16 matmul, as on a GPU
    assert layer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_a_loaded_model_is_routed_and_trains_lora_as_before(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = models.load_base_model(models.resolve_model(str(tiny_model_dir)), "none", "cpu")
    routed = [name for name, module in base.named_modules() if type(module) is cpu_linear.OneDNNLinear]
    assert "lm_head" in routed and any(name.endswith("mlp.down_proj") for name in routed)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 300, (2, 24))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads()
    with plain_linears(model):
        plain_loss, plain_grads = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_instruct_cpu_matmul_mkl_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV, "mkl")
    cpu_linear.available.cache_clear()
    try:
        assert not cpu_linear.available()
        model = nn.Sequential(nn.Linear(4, 4))
        assert cpu_linear.route_frozen_linears(model) == 0 and type(model[0]) is nn.Linear
    finally:
        monkeypatch.delenv(cpu_linear.ENV)
        cpu_linear.available.cache_clear()
    assert cpu_linear.available()


def test_an_unknown_instruct_cpu_matmul_is_an_error_not_ignored(monkeypatch):
    from instruct_cli.core.errors import UserError

    monkeypatch.setenv(cpu_linear.ENV, "off")
    cpu_linear.available.cache_clear()
    try:
        with pytest.raises(UserError, match="INSTRUCT_CPU_MATMUL='off'"):
            cpu_linear.available()
        monkeypatch.setenv(cpu_linear.ENV, "oneDNN")
        cpu_linear.available.cache_clear()
        assert cpu_linear.available()
    finally:
        monkeypatch.delenv(cpu_linear.ENV)
        cpu_linear.available.cache_clear()


def test_weights_read_back_from_the_ready_cache_are_routed_too(tiny_model_dir, isolated_cache):
    """generate, chat and eval load unquantised weights prepared once (core/inference.ready_model); the copy
    read back from the cache takes the oneDNN path like a fresh load."""
    from instruct_cli.core import inference

    source = models.resolve_model(str(tiny_model_dir))
    prepared, prepared_now = inference.ready_model(source, torch.bfloat16, torch.device("cpu"))
    cached, cached_now = inference.ready_model(source, torch.bfloat16, torch.device("cpu"))
    assert (prepared_now, cached_now) == (True, False)
    for model in (prepared, cached):
        assert type(model.get_output_embeddings()) is cpu_linear.OneDNNLinear
