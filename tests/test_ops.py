"""ops.py: the hand-written backward passes equal plain autograd."""
import pytest
import torch
import torch.nn.functional as F

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
