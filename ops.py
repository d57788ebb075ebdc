"""Four operations of the transformer with their backward pass written by hand.

RMSNorm and SwiGLU: to save memory.

Autograd keeps, for the backward pass, every intermediate tensor an operation needs. For the
two elementwise layers below that is more than necessary, and on a small model the kept
activations, not the weights, decide the peak memory of a LoRA step. Measured on SmolLM2-135M
(batch 4 x 256, bf16 autocast): plain autograd keeps an fp32 copy of x in every RMSNorm
(135 MiB in all) and silu(gate) in every MLP (90 MiB). These functions keep only what the
gradient formula needs and recompute the rest.

Both compute what the plain formulas in their docstrings compute, RMSNorm up to the last bit of
its fp32 sums (tests/test_ops.py checks values and gradients against plain autograd).

recompute_in_backward: the same idea one level up. The outputs of those two layers are kept by
the layers that consume them (LoRA's A, ...); model.py has them recomputed in backward instead.

Linear and attention, in bf16: to run at the speed of the hardware (see bf16_gemm_is_slow).
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def upcast(x):
    """bf16/fp16 -> fp32 for the arithmetic; fp32 and fp64 stay as they are."""
    return x if x.dtype == torch.float64 else x.float()


# bf16 layers do their arithmetic in fp32: gemm() below multiplies fp32 copies of its operands,
# RMSNorm normalises an fp32 copy of x. Those fp32 temporaries live in one buffer that every call
# reuses (cuBLAS keeps a workspace for the same reason). Allocated afresh each time, they (0.4-6 MiB
# each on SmolLM2) are freed between tensors that stay alive for backward, and the holes they leave
# in glibc's heap are too small or misplaced for what comes next: measured on SmolLM2-135M, LoRA at
# batch 4 x 256, the heap grew ~23 MB per block of the forward for ~11 MB of kept activations. With
# the workspace and the other changes that avoid such temporaries (RMSNorm below, LoRA's addmm_,
# loss.py), the peak RSS of that step went from 1.49-1.52 GiB to 1.27-1.29 (README, bench.py).
# On a GPU, PyTorch's caching allocator already reuses freed blocks; the workspace does no harm.
_workspaces = {}


def workspace(device, numel):
    """A flat fp32 buffer of numel elements, the same memory on every call: what one caller wrote
    there is gone at the next call, so a caller must be done with it before it calls anything that
    may use it (one thread at a time). Under torch.compile a fresh tensor (the compiler plans memory)."""
    if torch.compiler.is_compiling():
        return torch.empty(numel, dtype=torch.float32, device=device)
    buffer = _workspaces.get(device)
    if buffer is None or buffer.numel() < numel:
        _workspaces.pop(device, None)  # free the smaller one first
        buffer = _workspaces[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel]


def fp32_copy(t, flat):
    """t copied into flat (fp32, as many elements as t), in t's own layout: a transposed 2-D weight
    stays column-major, so the copy reads memory in order and the GEMM gets the transposed operand."""
    if t.dim() == 2 and t.t().is_contiguous() and not t.is_contiguous():
        return flat.view(t.shape[1], t.shape[0]).t().copy_(t)
    return flat.view(t.shape).copy_(t)


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
        # No (..., C) fp32 tensor is allocated (see workspace() above for why): a bf16 x is
        # copied into the shared fp32 workspace, mean(x^2) is taken as ||x||^2 / C (no tensor of
        # squares), and x * r is computed in fp32 and written straight into x's dtype.
        xf = fp32_copy(x, workspace(x.device, x.numel())) if x.dtype in (torch.bfloat16, torch.float16) else x
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).pow(2) / x.shape[-1] + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * torch.mul(xf, r, out=torch.empty_like(x))

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
        return F.silu(gate).mul_(up)  # the product in place: one fewer (..., I) temporary

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        grad_up = g * F.silu(gate)
        # silu_backward(dy, a) = dy * s * (1 + a (1 - s)): one fused kernel, as autograd uses
        grad_gate = torch.ops.aten.silu_backward(g * up, gate)
        return grad_gate, grad_up


def swiglu(gate, up):
    return SwiGLUFunction.apply(gate, up)


def rerun_recipe(saved):
    """The unpack hook of recompute_in_backward: a kept tensor as it is, a recipe rerun."""
    if isinstance(saved, torch.Tensor):
        return saved
    recompute, view = saved
    return recompute().as_strided(*view)  # the view the operation saved (e.g. flattened to 2-D)


@contextlib.contextmanager
def recompute_in_backward(output, fn, *inputs):
    """Inside this block, autograd keeps no copy of `output` for backward: where an operation
    would save `output` (or a view of it), the recipe fn(*inputs) is saved, and backward reruns it.

    For cheap layers whose inputs are kept anyway: a norm's output (its input x is kept by the
    norm's own backward) or SwiGLU's (gate and up are kept by its backward). Their consumers,
    LoRA's A or a trained weight, would otherwise each keep the output itself: on SmolLM2-135M at
    batch 4 x 256 that is 158 MiB of the ~500 MiB a bf16 LoRA step keeps. Megatron-LM calls this
    selective activation recomputation (Korthikanti et al. 2022); torch.utils.checkpoint recomputes
    whole blocks, matmuls included. fn must give the same value again: a deterministic function
    of inputs that nothing changes in place before backward (checked by the version counters).
    Blocks nest (the MLP's inside the block's norm's). The block does nothing where something else
    decides what backward keeps: inside activation checkpointing (the whole block is recomputed;
    its saved-tensor hooks must see what is saved here) and under torch.compile (its partitioner
    recomputes cheap elementwise work by itself).
    """
    # PyTorch's internal query for the saved-tensor hooks in force: None, or (pack, unpack)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    nested = outer is not None and outer[1] is rerun_recipe  # inside another recompute block
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or (outer is not None and not nested):
        yield
        return
    outer_pack = outer[0] if nested else (lambda t: t)
    storage = output.untyped_storage().data_ptr()

    def versions():  # a tensor's version is bumped by every in-place change
        return [t._version for t in inputs if isinstance(t, torch.Tensor)]

    versions_at_forward = versions()
    uses, value = [0], []  # saved uses not yet unpacked; the recomputed value while they last

    def recompute():  # once for all the operations that saved it (q, k and v share a norm output)
        if versions() != versions_at_forward:
            raise RuntimeError("recompute_in_backward: an input was modified in place before backward")
        if not value:
            with torch.no_grad():
                value.append(fn(*inputs))
        result = value[0]
        uses[0] -= 1
        if uses[0] <= 0:
            value.clear()  # the last use: let it go
        return result

    def pack(t):
        if t.untyped_storage().data_ptr() == storage:
            uses[0] += 1
            return recompute, (t.shape, t.stride(), t.storage_offset())
        return outer_pack(t)  # another tensor: the enclosing block's business, or kept as it is

    with torch.autograd.graph.saved_tensors_hooks(pack, rerun_recipe):
        yield


# ---------------------------------------------------------------------------------------------
# Linear layers in bf16 on CPUs whose bf16 matrix product is slower than their fp32 one


def bf16_gemm_is_slow(device):
    """True on a CPU without AMX (Intel's matrix tiles, Sapphire Rapids and later).

    There, oneDNN's bf16 GEMM uses AVX-512 BF16 dot products, which do no more multiply-adds per
    cycle than fp32 FMAs and pay for conversions: measured on this repository's 2-core VM
    (`python bench.py` prints it), a 2048^3 bf16 matmul runs at 165-185 GFLOP/s, fp32 at 270-360.
    With AMX (or on a GPU) bf16 is several times faster than fp32, and the native kernel is kept.
    """
    # torch.cpu._is_amx_tile_supported: PyTorch's own CPU-feature check (private; torch 2.13 has it)
    return device.type == "cpu" and not torch.cpu._is_amx_tile_supported()


def gemm(a, b, dtype):
    """a @ b as a GEMM in `dtype` computes it, a (..., K) and b (K, M): operands rounded to `dtype`,
    result (..., M) in `dtype`.

    For bf16 where the bf16 kernel is slow, the operands go to fp32 and the fp32 kernel runs: a
    product of two bf16 numbers (8-bit significands) is exact in fp32 (24 bits), and a bf16 GEMM
    accumulates in fp32 as well, so the result is the bf16 GEMM's up to the order of the sums.
    The fp32 operands and the fp32 result are views of the workspace; only the bf16 result is new.
    """
    a, b = a.to(dtype), b.to(dtype)
    if dtype == torch.bfloat16 and bf16_gemm_is_slow(a.device):
        a2 = a.reshape(-1, a.shape[-1])                                           # (N, K)
        (n, k), m = a2.shape, b.shape[-1]
        work = workspace(a.device, n * k + k * m + n * m)
        a32, b32 = fp32_copy(a2, work[:n * k]), fp32_copy(b, work[n * k:n * k + k * m])
        c32 = work[n * k + k * m:].view(n, m)                                     # (N, M)
        with torch.autocast(a.device.type, enabled=False):  # else autocast would make it bf16 again
            torch.mm(a32, b32, out=c32)
        return c32.view(*a.shape[:-1], m).to(dtype)  # a new tensor, not a view of the workspace
    return a @ b


class BF16LinearFunction(torch.autograd.Function):
    """y = x W^T + b computed as a bf16 GEMM (what autocast computes), through gemm() above.

    Backward, with g = dL/dy flattened to (N, out) and x to (N, in):
        dL/dx = g W        dL/dW = g^T x        dL/db = sum over rows of g
    Kept: x in bf16 only if W trains (full fine-tuning), W only if x needs a gradient; a frozen
    W (LoRA's base) keeps no activation at all, as with autograd's own linear.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = gemm(x, weight.t(), torch.bfloat16)                                   # (..., out)
        if bias is not None:
            y = y + bias.to(torch.bfloat16)
        ctx.save_for_backward(x.to(torch.bfloat16) if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.dtypes = x.dtype, weight.dtype, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm(g, weight, torch.bfloat16).to(x_dtype)                 # (..., in)
        g2 = g.reshape(-1, g.shape[-1])                                           # (N, out)
        if ctx.needs_input_grad[1]:
            grad_w = gemm(g2.t(), x.reshape(-1, x.shape[-1]), torch.bfloat16).to(w_dtype)  # (out, in)
        if ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b


def matmul_dtype(x):
    """The dtype a matrix product on x computes in: autocast's when autocast is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def linear(x, weight, bias=None):
    """F.linear, except a bf16 product on a CPU with a slow bf16 GEMM (see bf16_gemm_is_slow)."""
    if matmul_dtype(x) == torch.bfloat16 and bf16_gemm_is_slow(x.device):
        return BF16LinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose product goes through linear()."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class BF16AttentionFunction(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v for bf16 q, k, v, computed by PyTorch's fp32 fused kernel.

    On a CPU with a slow bf16 GEMM (see bf16_gemm_is_slow) the fused attention kernel is slow in
    bf16 too: measured at (B, H, T, d) = (4, 9, 256, 64), forward + backward takes 23.5 ms in bf16
    and 10.9 ms in fp32. The fp32 kernel would keep fp32 copies of q, k, v and the output for
    backward, so instead forward keeps only the bf16 q, k, v, and backward recomputes the forward
    in fp32 and differentiates it (recomputing attention rather than storing it is FlashAttention's
    trick, Dao et al. 2022); the extra forward costs ~2.7 ms of the 12.6 ms saved. Autocast is
    switched off around the fp32 kernel: SDPA is on its bf16 list and it would cast q, k, v back.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, enable_gqa):
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.flags = is_causal, enable_gqa
        with torch.autocast(q.device.type, enabled=False):  # else autocast casts q, k, v to bf16 again
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                               is_causal=is_causal, enable_gqa=enable_gqa)
        return y.to(q.dtype)                                                    # (B, H, T, d)

    @staticmethod
    def backward(ctx, g):
        q, k, v, attn_mask = ctx.saved_tensors
        is_causal, enable_gqa = ctx.flags
        with torch.enable_grad():
            qkv = [t.detach().float().requires_grad_() for t in (q, k, v)]
            y = F.scaled_dot_product_attention(*qkv, attn_mask=attn_mask, is_causal=is_causal,
                                               enable_gqa=enable_gqa)
            grads = torch.autograd.grad(y, qkv, g.float())
        grads = [grad.to(t.dtype) if need else None
                 for grad, t, need in zip(grads, (q, k, v), ctx.needs_input_grad)]
        return *grads, None, None, None


def attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """F.scaled_dot_product_attention, except bf16 on a CPU with a slow bf16 GEMM (see above)."""
    if q.dtype == torch.bfloat16 and bf16_gemm_is_slow(q.device):
        return BF16AttentionFunction.apply(q, k, v, attn_mask, is_causal, enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=enable_gqa)
