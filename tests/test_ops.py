"""ops.py: the hand-written backward passes equal plain autograd, and the bf16 products on the
fp32 kernels equal the native bf16 kernels."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lora
import ops
from loss import masked_cross_entropy
from model import load_model
from nf4 import NF4Linear
from ops import rms_norm, swiglu


def plain_rms_norm(x, w, eps):
    xf = x if x.dtype == torch.float64 else x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rms_norm_values_and_gradients_equal_plain_autograd(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, dtype=dtype)).requires_grad_()
    g = torch.randn(3, 5, 16, dtype=dtype)
    ours = rms_norm(x, w, 1e-5)
    ref = plain_rms_norm(x, w, 1e-5)
    tol = dict(rtol=0, atol=0) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours, ref, **tol)
    gx, gw = torch.autograd.grad(ours, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gw, rw, **tol)


def test_rms_norm_passes_gradcheck():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))


def test_swiglu_values_and_gradients_equal_plain_autograd():
    gate = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(swiglu(gate, up), F.silu(gate) * up, rtol=0, atol=0)
    assert torch.autograd.gradcheck(swiglu, (gate, up))


def test_rms_norm_keeps_no_fp32_copy_of_a_bf16_input():
    x = torch.randn(2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-5)
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)


# ---------------------------------------------------------------------------------------------
# bf16 linear and attention through the fp32 kernels (CPUs without AMX: see ops.bf16_gemm_is_slow)

BF16_TOL = dict(rtol=2 ** -7, atol=1e-2)  # one bf16 rounding of the result


def native_bf16_linear(x, w, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.linear(x, w, b)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_bf16_linear_on_the_fp32_kernel_equals_the_native_bf16_linear(weight_trains):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, requires_grad=True)
    w = torch.randn(24, 32, dtype=torch.float32 if weight_trains else torch.bfloat16, requires_grad=weight_trains)
    b = torch.randn(24, requires_grad=weight_trains)
    g = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ops.BF16LinearFunction.apply(x, w, b)
    ref = native_bf16_linear(x, w, b)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, **BF16_TOL)
    inputs = (x, w, b) if weight_trains else (x,)
    for got, want in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **BF16_TOL)


def test_bf16_linear_on_the_fp32_kernel_is_the_exact_product_of_the_bf16_values_rounded_once():
    torch.manual_seed(0)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    w = torch.randn(128, 256, dtype=torch.bfloat16)
    exact = x.double() @ w.double().t()  # bf16 products are exact in fp32; only the sums round
    ours = ops.BF16LinearFunction.apply(x, w, None)
    torch.testing.assert_close(ours.double(), exact.to(torch.bfloat16).double(), rtol=2 ** -8, atol=1e-6)


def test_bf16_linear_with_a_frozen_weight_keeps_no_activation_for_backward():
    x = torch.randn(2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.BF16LinearFunction.apply(x, w, None)
    assert [t.shape for t in saved] == [w.shape]


@pytest.mark.parametrize("slow", [True, False])
def test_linear_takes_the_fp32_kernel_only_where_the_bf16_gemm_is_slow(monkeypatch, slow):
    monkeypatch.setattr(ops, "bf16_gemm_is_slow", lambda device: slow)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    y = ops.linear(x, torch.randn(16, 32, dtype=torch.bfloat16))
    assert ("BF16LinearFunction" in type(y.grad_fn).__name__) == slow
    y32 = ops.linear(x.float(), torch.randn(16, 32))  # fp32 is never rerouted
    assert "BF16LinearFunction" not in type(y32.grad_fn).__name__


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_attention_on_the_fp32_kernel_equals_the_native_bf16_attention(masked):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, requires_grad=True)   # (B, H, T, d)
    k = torch.randn(2, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True)   # 2 kv heads (GQA)
    v = torch.randn(2, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 4, 16, 8, dtype=torch.bfloat16)
    # packing: two documents of 8 tokens, each causal within itself (block-causal)
    doc = torch.arange(16) // 8
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril())[None, None] if masked else None
    ours = ops.BF16AttentionFunction.apply(q, k, v, mask, not masked, True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked, enable_gqa=True)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, **BF16_TOL)
    for got, want in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_bf16_attention_keeps_only_the_bf16_q_k_v_for_backward():
    q, k, v = (torch.randn(1, 2, 32, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.BF16AttentionFunction.apply(q, k, v, None, True, False)
    assert len(saved) == 3 and all(t.dtype == torch.bfloat16 for t in saved)


def lora_loss_and_grads(model_dir):
    torch.manual_seed(0)
    model = load_model(model_dir, dtype=torch.bfloat16)
    lora.prepare_model(model, "lora", lora_rank=4, lora_alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, dims=1)
    targets[:, :12] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = masked_cross_entropy(model(ids, return_hidden=True), model.lm_head.weight, targets)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_a_bf16_lora_step_gives_the_same_loss_and_gradients_on_either_kernel(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(ops, "bf16_gemm_is_slow", lambda device: True)
    loss_fp32_kernel, grads_fp32_kernel = lora_loss_and_grads(tiny_model_dir)
    monkeypatch.setattr(ops, "bf16_gemm_is_slow", lambda device: False)
    loss_native, grads_native = lora_loss_and_grads(tiny_model_dir)
    assert loss_fp32_kernel == pytest.approx(loss_native, rel=1e-2)
    for name, grad in grads_native.items():
        torch.testing.assert_close(grads_fp32_kernel[name], grad, rtol=5e-2, atol=5e-3, msg=name)


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matrix product that reaches a kernel (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layer", ["linear", "nf4"])
def test_under_autocast_the_bf16_products_reach_the_fp32_kernel_where_bf16_is_slow(monkeypatch, layer):
    monkeypatch.setattr(ops, "bf16_gemm_is_slow", lambda device: True)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 64)
    module = NF4Linear(torch.nn.Linear(64, 32, bias=False)) if layer == "nf4" else None
    with MatmulDtypes() as record:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x) if module is not None else ops.linear(x, w.bfloat16())
        y.sum().backward()
    assert record.dtypes and set(record.dtypes) == {torch.float32}
