"""ops.py: the hand-written backward passes equal plain autograd, and the bf16 products on the
fp32 kernels equal the native bf16 kernels."""
import contextlib
import gc

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import NewTensors

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
    # fp64: equal up to the last bit (||x||^2 / C and mean(x^2) round differently)
    tol = dict(rtol=1e-14, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
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



def test_rms_norm_of_a_bf16_input_allocates_no_fp32_tensor_of_its_size():
    # fp32 temporaries between the tensors kept for backward fragment the heap (ops.workspace)
    x = torch.randn(2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16)
    rms_norm(x, w, 1e-5)  # the first call may create the workspace
    with NewTensors() as record:
        y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    assert (x.shape, torch.float32) not in record.allocated
    assert (x.shape, torch.bfloat16) in record.allocated  # it does see allocations

# ---------------------------------------------------------------------------------------------
# Selective recomputation: recompute_in_backward keeps a recipe instead of a cheap layer's output


def lora_a_on_norm_output(x, w, a, recompute):
    """A LoRA A product on a norm's output, the norm's output recomputed in backward or kept."""
    h = rms_norm(x, w, 1e-5)
    with ops.recompute_in_backward(h, rms_norm, x, w, 1e-5) if recompute else contextlib.nullcontext():
        out = F.linear(h, a)  # saves its input (flattened to 2-D) for a's gradient
    return out, StorageWeakRef(h.untyped_storage())


def test_recompute_in_backward_gives_exactly_the_gradients_of_keeping_the_output():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, dtype=torch.bfloat16)
    a = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    kept = torch.autograd.grad(lora_a_on_norm_output(x, w, a, False)[0], (x, a), g)
    recomputed = torch.autograd.grad(lora_a_on_norm_output(x, w, a, True)[0], (x, a), g)
    for got, want in zip(recomputed, kept):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_in_backward_frees_the_output_after_forward(recompute):
    x = torch.randn(2, 5, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    out, h_storage = lora_a_on_norm_output(x, torch.ones(16), a, recompute)
    gc.collect()
    assert h_storage.expired() == recompute  # kept by autograd only without the recipe
    out.sum().backward()
    assert a.grad is not None


def test_recompute_in_backward_runs_the_recipe_once_for_all_the_operations_that_saved_it():
    """q, k and v's LoRA A products all save the same norm output: one recomputation serves them."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.ones(16)
    a_q, a_k, a_v = (torch.randn(4, 16, requires_grad=True) for _ in range(3))
    calls = []

    def norm(x):
        calls.append(1)
        return rms_norm(x, w, 1e-5)

    h = norm(x)
    with ops.recompute_in_backward(h, norm, x):
        out = F.linear(h, a_q) + F.linear(h, a_k) + F.linear(h, a_v)
    calls.clear()
    out.sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(a_k.grad, a_v.grad)  # the same input reached all three


def test_recompute_in_backward_refuses_an_input_changed_in_place():
    x = torch.randn(2, 5, 16)
    a = torch.randn(4, 16, requires_grad=True)
    out, _ = lora_a_on_norm_output(x, torch.ones(16), a, True)
    x.mul_(2)  # the recipe would now give another value than the forward used
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_recompute_in_backward_leaves_outer_saved_tensor_hooks_in_charge():
    """Inside activation checkpointing (or any saved-tensor hooks) the outer hooks must see what
    is saved, so the block steps aside."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        out, h_storage = lora_a_on_norm_output(x, torch.ones(16), a, True)
    assert any(StorageWeakRef(t.untyped_storage()) == h_storage for t in seen)


def tiny_bf16_lora_model(model_dir):
    """The tiny model in bf16 with LoRA r=4 on all linears, B made nonzero so every A gets a gradient."""
    torch.manual_seed(0)
    model = load_model(model_dir, dtype=torch.bfloat16)
    lora.prepare_model(model, "lora", lora_rank=4, lora_alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def lora_model_step(model_dir, monkeypatch, recompute):
    """Loss gradients of a bf16 LoRA step of the tiny model, and whether the norm outputs and the
    SwiGLU outputs were freed before backward."""
    import model as model_lib
    if not recompute:
        monkeypatch.setattr(model_lib, "recompute_in_backward", lambda *args: contextlib.nullcontext())
    model = tiny_bf16_lora_model(model_dir)
    storages = []
    for block in model.layers:
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.register_forward_hook(lambda m, i, out: storages.append(StorageWeakRef(out.untyped_storage())))
        block.mlp.down_proj.register_forward_pre_hook(
            lambda m, inputs: storages.append(StorageWeakRef(inputs[0].untyped_storage())))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = masked_cross_entropy(model(ids, return_hidden=True), model.lm_head.weight, targets)
    gc.collect()
    freed = [s.expired() for s in storages]
    loss.backward()
    return freed, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_the_model_recomputes_norm_and_swiglu_outputs_with_the_same_gradients(tiny_model_dir, monkeypatch):
    freed, grads = lora_model_step(tiny_model_dir, monkeypatch, recompute=True)
    freed_kept, grads_kept = lora_model_step(tiny_model_dir, monkeypatch, recompute=False)
    assert freed and all(freed)       # 3 per block: two norm outputs, one SwiGLU output
    assert not any(freed_kept)        # without the recipe, LoRA's A products keep them
    for name, grad in grads_kept.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


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


def test_bf16_gemm_on_the_fp32_kernel_allocates_only_its_bf16_result():
    # its fp32 operands and fp32 result live in the shared workspace (ops.workspace)
    x = torch.randn(2, 64, 32, dtype=torch.bfloat16)
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    first = ops.BF16LinearFunction.apply(x, w, None)  # the first call may create the workspace
    with NewTensors() as record:
        y = ops.BF16LinearFunction.apply(x, w, None)
    assert record.allocated == [((2, 64, 48), torch.bfloat16)]
    assert torch.equal(y, first)  # the workspace's old contents do not leak into the result


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


def test_bf16_attention_under_autocast_is_the_fp32_attention_rounded_once():
    # autocast would cast the fp32 copies of q, k, v back to bf16 (SDPA is on its bf16 list)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, dtype=torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ops.BF16AttentionFunction.apply(q, k, v, None, True, False)
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.equal(ours, fp32.to(torch.bfloat16))


def test_bf16_attention_keeps_only_the_bf16_q_k_v_for_backward():
    q, k, v = (torch.randn(1, 2, 32, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.BF16AttentionFunction.apply(q, k, v, None, True, False)
    assert len(saved) == 3 and all(t.dtype == torch.bfloat16 for t in saved)


def lora_loss_and_grads(model_dir):
    model = tiny_bf16_lora_model(model_dir)
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
    # the two round to bf16 in different places (the attention's output, for one): compare each
    # gradient as a whole, |a - b| / |b| (bf16 noise here: ~1%; a wrong formula: ~100%)
    for name, grad in grads_native.items():
        error = (grads_fp32_kernel[name].float() - grad.float()).norm() / grad.float().norm()
        assert error < 0.03, name


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matrix product that reaches a kernel (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
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
