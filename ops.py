"""Two layers of the transformer with their backward pass written by hand, to save memory.

Autograd keeps, for the backward pass, every intermediate tensor an operation needs. For the
two elementwise layers below that is more than necessary, and on a small model the kept
activations, not the weights, decide the peak memory of a LoRA step. Measured on SmolLM2-135M
(batch 4 x 256, bf16 autocast): plain autograd keeps an fp32 copy of x in every RMSNorm
(135 MiB in all) and silu(gate) in every MLP (90 MiB). These functions keep only what the
gradient formula needs and recompute the rest.

Both compute exactly what the plain formulas in their docstrings compute (tests/test_ops.py
checks values and gradients against plain autograd).
"""
import torch
import torch.nn.functional as F


def upcast(x):
    """bf16/fp16 -> fp32 for the arithmetic; fp32 and fp64 stay as they are."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x * r) with r = 1 / sqrt(mean(x^2) + eps) per token, computed in fp32 and
    returned in x's dtype (the Llama recipe: normalise in fp32, cast, then scale by w).

    Backward, with x_hat = x r and g = dL/dy (C = the size of the last dimension):
        dL/dw = sum over tokens of g * x_hat
        dL/dx = r * (g w - x_hat * mean(g w x_hat))
    Kept for backward: x (its own dtype) and r (one fp32 number per token).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = upcast(x)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)           # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        x_hat = upcast(x) * r
        gw = upcast(g) * upcast(weight)
        grad_x = r * (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            # the forward rounded x_hat to x's dtype before the product with w: use that value
            grad_w = (upcast(g) * upcast(x_hat.to(x.dtype))).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def rms_norm(x, weight, eps):
    return RMSNormFunction.apply(x, weight, eps)


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(gate) * up, silu(a) = a * sigmoid(a)   (Shazeer 2020, "GLU Variants").

    Backward, with s = sigmoid(gate):
        dL/dup   = g * silu(gate)
        dL/dgate = g * up * s * (1 + gate * (1 - s))        (the derivative of a * sigmoid(a))
    Kept: gate and up; silu(gate) is recomputed instead of stored.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        grad_up = g * F.silu(gate)
        # silu_backward(dy, a) = dy * s * (1 + a (1 - s)): one fused kernel, as autograd uses
        grad_gate = torch.ops.aten.silu_backward(g * up, gate)
        return grad_gate, grad_up


def swiglu(gate, up):
    return SwiGLUFunction.apply(gate, up)
