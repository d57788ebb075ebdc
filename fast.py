"""The fast layer: every speed and memory optimisation of the training step, in one file.

model.py, lora.py, nf4.py are written plainly, with PyTorch's built-ins and autograd. This file holds
their fast twins, and accelerate(model) swaps them in, the way apply_lora swaps linears:

    model = load_model(...); prepare_model(model, "lora", ...)
    accelerate(model)          # kernels = "fast" (the default); kernels = "plain" skips this call

Each twin is a subclass with the same parameters and names, so state dicts, adapters and checkpoints
do not change; only forward, and what autograd keeps for backward, differ. The twins compute what the
plain modules compute (tests/test_fast.py: the same loss and gradients, plain against fast). One more
piece, the fused loss, lives beside the plain loss in loss.py.

Why they help: on a small model the activations that autograd keeps for backward, not the weights,
decide the peak memory of a LoRA step, and plain autograd keeps more than the gradient formulas need.
Short-lived temporaries count too on a CPU: freed between tensors that live until backward, they leave
holes in the C heap that later, larger tensors do not fit, and the peak resident memory grows.

    rmsnorm   RMSNorm with its backward written out: keeps x and one number per token, and makes
              no (..., C) temporaries (gemma3's (1 + w) norm: one, its fp32 product)
    mlp       SwiGLU (gemma3: GeGLU) with its backward written out (keeps gate and up, not
              silu(gate)), and its output recomputed in backward instead of kept by down_proj
    attention RoPE with fewer temporaries
    block     the two norm outputs of a block recomputed in backward instead of kept by the
              projections that read them (selective recomputation)
    lora      the LoRA update added into the base output in place: no (..., out) temporaries
    nf4       QLoRA's 4-bit weight dequantized again in backward instead of kept, and dequantized
              by one table lookup per byte, a cache-sized chunk at a time

Each piece's measured effect on speed and peak memory: docs/results/fast.md.
"""
import contextlib

import torch
import torch.nn.functional as F

from lora import LoRALinear
from model import MLP, Attention, Block, GemmaBlock, GemmaRMSNorm, RMSNorm
from nf4 import NF4_CODE, NF4Linear, nf4_absmax


def matmul_dtype(x):
    """The dtype a matrix product on x computes in: autocast's when autocast is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def upcast(x):
    """bf16/fp16 -> fp32 for the arithmetic; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


# ---------------------------------------------------------------------------------------------
# rmsnorm


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x * r) with r = 1 / sqrt(mean(x^2) + eps) per token: model.RMSNorm's formula (equal
    up to the rounding of the sum of squares). With offset (gemma3, model.GemmaRMSNorm) the gain is
    1 + w and the product is taken in fp32 before the cast to x's dtype.

    Backward, with x_hat = x r, g = dL/dy and the gain w (1 + w with offset):
        dL/dw = sum over tokens of g * x_hat
        dL/dx = r * (g w - x_hat * mean(g w x_hat))
    Kept for backward: x (its own dtype) and r (one fp32 number per token); plain autograd keeps an
    fp32 copy of a bf16 x and, when w trains, x_hat as well.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset=False):
        # mean(x^2) as ||x||^2 / C, and x * r written straight into x's dtype: no (..., C) temporaries
        xf = upcast(x)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).pow(2) / x.shape[-1] + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        ctx.offset = offset
        if offset:
            return (xf * r).mul_(1.0 + weight.to(xf.dtype)).to(x.dtype)
        return weight * torch.mul(xf, r, out=torch.empty_like(x))

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        x_hat = upcast(x) * r
        gw = upcast(g) * (upcast(weight) + ctx.offset)
        grad_x = r * (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            # without offset the forward rounded x_hat to x's dtype before the product with w: use that value
            x_hat = x_hat if ctx.offset else upcast(x_hat.to(x.dtype))
            grad_w = (upcast(g) * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None, None


class FastRMSNorm(RMSNorm):
    def forward(self, x):
        return RMSNormFunction.apply(x, self.weight, self.eps)


class FastGemmaRMSNorm(GemmaRMSNorm):
    def forward(self, x):
        return RMSNormFunction.apply(x, self.weight, self.eps, True)


# ---------------------------------------------------------------------------------------------
# recomputation in backward (used by mlp and block)


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
    LoRA's A or a trained weight, would otherwise each keep the output itself. Megatron-LM calls
    this selective activation recomputation (Korthikanti et al. 2022); torch.utils.checkpoint
    recomputes whole blocks, matmuls included. fn must give the same value again: a deterministic
    function of inputs that nothing changes in place before backward (checked by the version
    counters). Blocks nest (the MLP's inside the block's norm's). The block does nothing where
    something else decides what backward keeps: inside activation checkpointing (the whole block
    is recomputed) and under torch.compile (its partitioner recomputes cheap elementwise work).
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
# mlp


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


class GeGLUFunction(torch.autograd.Function):
    """y = gelu(gate) * up, gelu in its tanh form (gemma3's GeGLU): as SwiGLUFunction, with the
    derivative of gelu from the kernel autograd uses. Kept: gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.gelu(gate, approximate="tanh").mul_(up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        grad_up = g * F.gelu(gate, approximate="tanh")
        return torch.ops.aten.gelu_backward(g * up, gate, approximate="tanh"), grad_up


def geglu(gate, up):
    return GeGLUFunction.apply(gate, up)


GATED = {"silu": swiglu, "gelu_pytorch_tanh": geglu}  # model.MLP.activation -> its gated product


class FastMLP(MLP):
    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)                      # (B, T, I) each
        glu = GATED[self.activation]
        h = glu(gate, up)
        with recompute_in_backward(h, glu, gate, up):  # down_proj keeps the recipe, not h
            return self.down_proj(h)


# ---------------------------------------------------------------------------------------------
# attention


def apply_rope(x, cos, sin):
    """model.apply_rope, x cos + rotated sin, with the sum and one product made in place: two fewer
    (B, H, T, d) temporaries."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype)).add_(rotated.mul_(sin.to(x.dtype)))


class FastAttention(Attention):
    rope = staticmethod(apply_rope)


# ---------------------------------------------------------------------------------------------
# block


class FastBlock(Block):
    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):
        h = self.input_layernorm(x)
        with recompute_in_backward(h, self.input_layernorm, x):  # q, k, v keep the recipe, not h
            x = x + self.self_attn(h, cos, sin, attn_mask, kv_cache, layer)
        h = self.post_attention_layernorm(x)
        with recompute_in_backward(h, self.post_attention_layernorm, x):
            return x + self.mlp(h)


class FastGemmaBlock(GemmaBlock):
    """The same for gemma3's block: its two input norms recomputed (the output norms' outputs go
    straight into the residual sum, which keeps nothing)."""

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):
        h = self.input_layernorm(x)
        with recompute_in_backward(h, self.input_layernorm, x):
            x = x + self.post_attention_layernorm(self.self_attn(h, cos, sin, attn_mask, kv_cache, layer))
        h = self.pre_feedforward_layernorm(x)
        with recompute_in_backward(h, self.pre_feedforward_layernorm, x):
            return x + self.post_feedforward_layernorm(self.mlp(h))


# ---------------------------------------------------------------------------------------------
# lora


class FastLoRALinear(LoRALinear):
    """y += s (x A^T) B^T in place, as one addmm, the scaling applied to the (..., r) intermediate:
    no (..., out) tensors for the LoRA term, its scaling and the sum. Nothing keeps the base output
    y for backward (the base is frozen), so overwriting it is safe."""

    def forward(self, x):
        y = self.base_layer(x)                                             # (..., out)
        if self.merged or self.disabled:
            return y
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.weight.dtype)
        a = self.lora_A(h) * self.scaling                                  # (..., r)
        b = self.lora_B.weight.to(a.dtype)                                 # (out, r)
        if y.dtype != a.dtype:  # no autocast and a bf16 base: the LoRA term in fp32, then rounded
            return y + F.linear(a, b).to(y.dtype)
        # view, not reshape: a copy would silently drop the update
        y.view(-1, y.shape[-1]).addmm_(a.reshape(-1, self.rank), b.t())
        return y


# ---------------------------------------------------------------------------------------------
# nf4

# One byte holds two codes: element 2i in the high nibble, 2i+1 in the low one. Decoding a byte
# is then one row of this (256, 2) table, and a row read as one int64 word makes one lookup.
NF4_BYTE_TABLE = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 15]], 1)
DEQUANT_CHUNK = 1 << 19  # values per chunk on a CPU: 2 MiB of fp32, so each chunk's passes run in cache


def dequantize_nf4(state, dtype=torch.float32):
    """nf4.dequantize_nf4, the same bits: each byte's two fp32 values gathered as one int64 word,
    a chunk of whole 64-blocks at a time on a CPU (one chunk on a GPU, where chunks only add launches)."""
    n, bs, device = state.shape.numel(), state.blocksize, state.packed.device
    absmax = nf4_absmax(state)                                                  # (n_blocks,)
    result = torch.empty(state.shape, dtype=dtype, device=device)
    table = NF4_BYTE_TABLE.to(device).view(torch.int64).view(-1)               # (256,)
    step = -(-min(DEQUANT_CHUNK if device.type == "cpu" else n, n) // bs) * bs
    values = torch.empty(step, dtype=torch.float32, device=device)             # one chunk, fp32
    for start in range(0, n, step):
        stop = min(n, start + step)
        packed = state.packed[start // 2:(stop + 1) // 2]                      # two values a byte
        torch.index_select(table, 0, packed.int(), out=values[:2 * packed.numel()].view(torch.int64))
        blocks = -(-(stop - start) // bs)  # a partial last block: its tail is never read back
        chunk = values[:blocks * bs].view(blocks, bs).mul_(absmax[start // bs:start // bs + blocks, None])
        result.view(-1)[start:stop].copy_(chunk.view(-1)[:stop - start].to(dtype))
    return result


class NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized from 4 bits in forward, and again in backward.

    Only a reference to the packed state is kept for backward: the plain F.linear keeps the
    dequantized W, a full-precision copy of every weight, and QLoRA then needs more memory than
    LoRA. W is frozen, so the only gradient is the input's: dL/dx = dL/dy W.
    """

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        return x @ dequantize_nf4(state, x.dtype).t()                          # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_y @ dequantize_nf4(ctx.state, grad_y.dtype), None         # (..., in)


class FastNF4Linear(NF4Linear):
    def forward(self, x):
        dtype = matmul_dtype(x)
        y = NF4Matmul.apply(x.to(dtype), self.nf4)
        return y if self.bias is None else y + self.bias.to(dtype)


# ---------------------------------------------------------------------------------------------

PIECES = {"rmsnorm": ((RMSNorm, FastRMSNorm), (GemmaRMSNorm, FastGemmaRMSNorm)), "mlp": ((MLP, FastMLP),),
          "attention": ((Attention, FastAttention),), "block": ((Block, FastBlock), (GemmaBlock, FastGemmaBlock)),
          "lora": ((LoRALinear, FastLoRALinear),), "nf4": ((NF4Linear, FastNF4Linear),)}


def accelerate(model, skip=()):
    """Swap each module that has a fast twin for the twin, in place, and return the model. The twin is
    a subclass of the module's class with the same state, so this changes its class, nothing else.
    Call it after lora.prepare_model (the LoRA and NF4 layers must exist); calling it again is harmless.
    skip: names of PIECES to leave plain (bench.py measures each piece that way)."""
    for module in model.modules():
        for piece, twins in PIECES.items():
            for plain, fast in twins:
                if type(module) is plain and piece not in skip:
                    module.__class__ = fast
    return model
