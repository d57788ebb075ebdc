"""fast.py, the speed and memory layer: each twin computes what the plain module computes, keeps less
for backward, and a whole training step gives the same loss and gradients with kernels = "plain" and
kernels = "fast", for full fine-tuning, LoRA and QLoRA, in fp32 and bf16, on a tiny random model and
on the real SmolLM2."""
import contextlib
import copy
import gc
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

import fast
import lora
import nf4
import train
from config import Config
from conftest import NewTensors, save_tiny_model
from model import GemmaRMSNorm, RMSNorm

# ---------------------------------------------------------------------------------------------
# rmsnorm and SwiGLU: hand-written backward passes


def rms_norms(dim=16, dtype=torch.float64, norm=RMSNorm):
    """A plain RMSNorm (or gemma3's, whose weight is an offset from 1) and its fast twin with the same
    random gain."""
    plain = norm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        plain.weight.copy_((norm is RMSNorm) + 0.1 * torch.randn(dim))
    return plain, fast.accelerate(copy.deepcopy(plain))


@pytest.mark.parametrize("norm", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_gives_the_plain_norms_values_and_gradients(dtype, norm):
    torch.manual_seed(0)
    plain, ours = rms_norms(dtype=dtype, norm=norm)
    assert type(ours) is {RMSNorm: fast.FastRMSNorm, GemmaRMSNorm: fast.FastGemmaRMSNorm}[norm]
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=dtype)
    y, y_ref = ours(x), plain(x)
    tol = {torch.float64: dict(rtol=1e-14, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-6),
           torch.bfloat16: dict(rtol=2 ** -8, atol=0)}[dtype]  # ||x||^2 / C and mean(x^2) round apart
    torch.testing.assert_close(y, y_ref, **tol)
    got = torch.autograd.grad(y, (x, ours.weight), g)
    want = torch.autograd.grad(y_ref, (x, plain.weight), g)
    tol = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_passes_gradcheck(offset):
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fast.RMSNormFunction.apply(x, w, 1e-6, offset), (x, w))


@pytest.mark.parametrize("glu,act", [(fast.swiglu, F.silu), (fast.geglu, lambda a: F.gelu(a, approximate="tanh"))])
def test_gated_products_values_and_gradients_equal_plain_autograd(glu, act):
    gate = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(glu(gate, up), act(gate) * up, rtol=0, atol=0)
    assert torch.autograd.gradcheck(glu, (gate, up))
    g = torch.randn(6, 10, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(glu(gate, up), (gate, up), g),
                         torch.autograd.grad(act(gate) * up, (gate, up), g)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the kernels autograd uses


def saved_by(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*inputs)
    return saved


def test_rms_norm_keeps_no_fp32_copy_of_a_bf16_input_where_plain_autograd_does():
    plain, ours = rms_norms(32, torch.bfloat16)
    x = torch.randn(2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    fp32_copies = lambda saved: [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
    assert fp32_copies(saved_by(plain, x))       # what the fast twin saves
    assert not fp32_copies(saved_by(ours, x))


@pytest.mark.parametrize("glu", [fast.swiglu, fast.geglu])
def test_gated_products_keep_gate_and_up_only(glu):
    gate, up = (torch.randn(4, 8, requires_grad=True) for _ in range(2))
    assert len(saved_by(lambda: F.silu(gate) * up)) == 3  # plain: gate, silu(gate), up
    assert [t.data_ptr() for t in saved_by(glu, gate, up)] == [gate.data_ptr(), up.data_ptr()]


# ---------------------------------------------------------------------------------------------
# Selective recomputation: recompute_in_backward keeps a recipe instead of a cheap layer's output


def rms_norm(x, w, eps=1e-5):
    return fast.RMSNormFunction.apply(x, w, eps)


def lora_a_on_norm_output(x, w, a, recompute):
    """A LoRA A product on a norm's output, the norm's output recomputed in backward or kept."""
    h = rms_norm(x, w)
    with fast.recompute_in_backward(h, rms_norm, x, w) if recompute else contextlib.nullcontext():
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
        return rms_norm(x, w)

    h = norm(x)
    with fast.recompute_in_backward(h, norm, x):
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


def lora_model_step(model, skip):
    """Gradients of a bf16 LoRA step of the model with the fast layer (but for `skip`), and whether
    the blocks' input norm outputs and the SwiGLU outputs were freed before backward."""
    fast.accelerate(model, skip=skip)
    storages = []
    for block in model.layers:
        mlp_norm = block.pre_feedforward_layernorm if model.config.gemma else block.post_attention_layernorm
        for norm in (block.input_layernorm, mlp_norm):
            norm.register_forward_hook(lambda m, i, out: storages.append(StorageWeakRef(out.untyped_storage())))
        block.mlp.down_proj.register_forward_pre_hook(
            lambda m, inputs: storages.append(StorageWeakRef(inputs[0].untyped_storage())))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = train.masked_cross_entropy(model(ids, return_hidden=True), model.lm_head.weight, ids.roll(-1, 1))
    gc.collect()
    freed = [s.expired() for s in storages]
    loss.backward()
    return freed, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_model_recomputes_norm_and_swiglu_outputs_with_the_same_gradients(tmp_path, family):
    save_tiny_model(str(tmp_path), family)
    model = make_model(str(tmp_path), "lora", "bfloat16")
    freed, grads = lora_model_step(copy.deepcopy(model), skip=())
    freed_kept, grads_kept = lora_model_step(model, skip=("block", "mlp"))
    assert freed and all(freed)       # 3 per block: two norm outputs, one SwiGLU output
    assert not any(freed_kept)        # without the recipe, LoRA's A products keep them
    for name, grad in grads_kept.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# lora and nf4


def test_under_autocast_the_lora_term_is_added_into_the_base_output_with_the_same_result():
    torch.manual_seed(0)
    plain = lora.LoRALinear(nn.Linear(32, 48, bias=False).bfloat16().requires_grad_(False), rank=4, alpha=8)
    nn.init.normal_(plain.lora_B.weight)
    layer = fast.accelerate(copy.deepcopy(plain))
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with NewTensors() as fast_record:
            y = layer(x)
        with NewTensors() as plain_record:
            ref = plain(x)
    out_sized = lambda record: [s for s, dtype in record.allocated if math.prod(s) == 3 * 5 * 48]
    assert len(out_sized(fast_record)) == 1  # the base output; the LoRA term adds no (..., out) tensor
    assert len(out_sized(plain_record)) > 1
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    for got, want in zip(torch.autograd.grad(y, (x, layer.lora_A.weight, layer.lora_B.weight), g),
                         torch.autograd.grad(ref, (x, plain.lora_A.weight, plain.lora_B.weight), g)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_without_autocast_a_bf16_base_gets_the_lora_term_in_fp32_rounded_once():
    torch.manual_seed(0)
    layer = fast.accelerate(lora.LoRALinear(nn.Linear(32, 48, bias=False).bfloat16(), rank=4, alpha=8))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    term = layer.lora_B(layer.lora_A(x.float()) * layer.scaling)  # fp32 A and B on fp32 input
    assert torch.equal(layer(x), layer.base_layer(x) + term.to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(96, 64), (7, 13), (3, 5)])
@pytest.mark.parametrize("chunk", [64, 128, 192, 1 << 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_a_chunk_at_a_time_gives_the_plain_bits(monkeypatch, shape, chunk, dtype):
    state = nf4.quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    monkeypatch.setattr(fast, "DEQUANT_CHUNK", chunk)
    assert torch.equal(fast.dequantize_nf4(state, dtype), nf4.dequantize_nf4(state, dtype))


@pytest.mark.parametrize("kind", ["plain", "fast"])
def test_only_the_fast_nf4_backward_saves_no_full_size_float_weight(kind):
    torch.manual_seed(0)
    layer = lora.LoRALinear(nf4.NF4Linear(nn.Linear(576, 576, bias=False)), rank=8, alpha=16)
    if kind == "fast":
        fast.accelerate(layer)
    x = torch.randn(2, 8, 576, requires_grad=True)  # 9216 values: far fewer than 576 * 576
    saved = saved_by(lambda: layer(x).sum().backward())
    assert saved, "the LoRA path must save its inputs: the hook saw nothing"
    big_floats = [t for t in saved if t.is_floating_point() and t.numel() >= 576 * 576]
    assert (big_floats == []) == (kind == "fast")  # plain F.linear keeps the dequantized W


# ---------------------------------------------------------------------------------------------
# accelerate(), and a whole training step plain against fast


def make_model(folder, method, dtype, kernels="plain"):
    """train.build_model's model, with every LoRA B made nonzero so that A gets a gradient too."""
    cfg = Config(model=folder, method=method, dtype=dtype, kernels=kernels, lora_rank=4, lora_alpha=8)
    torch.manual_seed(0)
    model = train.build_model(cfg, torch.device("cpu"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_accelerate_changes_classes_only_and_twice_is_once(tiny_model_dir):
    model = make_model(tiny_model_dir, "qlora", "float32")
    before = {n: p for n, p in model.named_parameters()}
    fast.accelerate(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FastRMSNorm", "FastMLP", "FastBlock", "FastLoRALinear", "FastNF4Linear"} <= kinds
    assert not kinds & {"RMSNorm", "MLP", "Block", "LoRALinear", "NF4Linear"}
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert fast.accelerate(model) is model and {type(m).__name__ for m in model.modules()} == kinds
    assert lora.lora_layers(model)  # still LoRA layers to everything that looks for them


def step(model, kernels, dtype, ids, distill):
    """Loss and gradients of one training step (train.step_loss, divided by the trained tokens)."""
    cfg = Config(kernels=kernels, distill_weight=0.5 if distill else 0.0)
    targets = ids.roll(-1, 1)
    targets[:, :ids.shape[1] // 2] = -100  # the first half is the prompt
    batch = dict(input_ids=ids, targets=targets, position_ids=None, attn_mask=None,
                 is_token=torch.ones_like(ids, dtype=torch.bool))
    teacher = train.make_teacher(model, Config(method="lora", kernels=kernels), "cpu") if distill else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss, _ = train.step_loss(model, batch, cfg, {"tokens": int((targets != -100).sum())}, teacher)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def relative_error(grads, reference):
    """||g - g_ref|| / ||g_ref|| over all the trainable parameters together."""
    a = torch.cat([grads[n].double().flatten() for n in reference])
    b = torch.cat([reference[n].double().flatten() for n in reference])
    return ((a - b).norm() / b.norm()).item()


def assert_plain_equals_fast(folder, method, dtype, vocab, seq=32, distill=False):
    plain = make_model(folder, method, dtype)
    ours = fast.accelerate(copy.deepcopy(plain))
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    loss_plain, grads_plain = step(copy.deepcopy(plain), "plain", dtype, ids, distill)
    loss_fast, grads_fast = step(ours, "fast", dtype, ids, distill)
    assert grads_fast.keys() == grads_plain.keys() and grads_plain
    if dtype == "float32":  # the same sums in another order: equal up to fp32 rounding, parameter by parameter
        assert loss_fast == pytest.approx(loss_plain, rel=1e-5)
        for name, g in grads_plain.items():
            error = relative_error({name: grads_fast[name]}, {name: g})
            assert error <= 1e-3, f"{name}: relative error {error:.2e}"  # through 30 blocks on the real model
    else:  # bf16 rounds in other places in each (the fused loss, the fast LoRA's scaling before B), and
        # a step's bf16 gradients are far from fp32's: fast must be as close to fp32 as plain is, and
        # the two no farther apart than plain is from fp32
        _, grads_fp32 = step(plain.float(), "plain", "float32", ids, distill)
        bf16_error = relative_error(grads_plain, grads_fp32)
        assert loss_fast == pytest.approx(loss_plain, rel=1e-2)
        assert relative_error(grads_fast, grads_fp32) <= 1.25 * bf16_error + 0.02, bf16_error
        assert relative_error(grads_fast, grads_plain) <= max(0.05, bf16_error), bf16_error


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_step_gives_the_same_loss_and_gradients_plain_and_fast_on_a_tiny_model(tiny_model_dir, method, dtype):
    assert_plain_equals_fast(tiny_model_dir, method, dtype, vocab=128)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_step_gives_the_same_loss_and_gradients_plain_and_fast_on_gemma3(tmp_path, method, dtype):
    save_tiny_model(str(tmp_path), "gemma3_text")
    model = fast.accelerate(make_model(str(tmp_path), method, dtype))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FastGemmaRMSNorm", "FastMLP", "FastGemmaBlock", "FastAttention"} <= kinds
    assert_plain_equals_fast(str(tmp_path), method, dtype, vocab=128, seq=24)  # 3 windows of 8


def test_a_distillation_step_gives_the_same_loss_and_gradients_plain_and_fast(tiny_model_dir):
    assert_plain_equals_fast(tiny_model_dir, "lora", "float32", vocab=128, distill=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_step_gives_the_same_loss_and_gradients_plain_and_fast_on_the_real_model(real_model_dir, method, dtype):
    assert_plain_equals_fast(real_model_dir, method, dtype, vocab=49152, seq=64)
