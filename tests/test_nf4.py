"""NF4 4-bit weights (nf4.quantize_nf4 / dequantize_nf4 / NF4Linear, and their fast twins in fast.py).

bitsandbytes is the oracle: our bytes, statistics and dequantized values must be identical to
what its CPU path produces, so a QLoRA adapter trained here sees the same frozen weights as one
trained with bitsandbytes (and the other way round).
"""
import pytest
import torch
import torch.nn as nn

import fast
import nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(576, 576), (192, 576), (7, 13), (1, 100), (3, 5)]
DEQUANTIZE = {"plain": nf4.dequantize_nf4, "fast": fast.dequantize_nf4}
NF4_LINEAR = {"plain": nf4.NF4Linear, "fast": fast.FastNF4Linear}
both = pytest.mark.parametrize("kind", ["plain", "fast"])


def bnb_quantize(w, double_quant=True):
    return bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant,
                                        blocksize=64)


def bnb_dequantize(packed, state, dtype):
    state.dtype = dtype  # dequantize_4bit returns the dtype recorded in the state
    with torch.compiler.set_stance("force_eager"):  # bnb compiles its odd-shape path: slow, same numbers
        return bnb_functional.dequantize_4bit(packed, state)


def random_weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[:70] = 0  # an all-zero block (and a partly zero one) must round-trip too
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_bytes_and_double_quant_statistics_match_bitsandbytes(shape, dtype):
    w = random_weight(shape, dtype)
    packed, state = bnb_quantize(w)
    ours = nf4.quantize_nf4(w)
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)               # uint8 codes of absmax - offset
    assert torch.equal(ours.absmax_scale, state.state2.absmax)  # fp32, one per 256 blocks
    assert torch.equal(ours.absmax_offset, state.offset)


@both
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weight_is_identical_to_bitsandbytes(kind, shape, out_dtype):
    w = random_weight(shape, seed=1)
    packed, state = bnb_quantize(w)
    ours = DEQUANTIZE[kind](nf4.quantize_nf4(w), out_dtype)
    assert ours.shape == w.shape and ours.dtype == out_dtype
    assert torch.equal(ours, bnb_dequantize(packed, state, out_dtype))


@pytest.mark.parametrize("shape", [(64, 96), (4, 32)])
def test_rows_not_a_multiple_of_64_use_flat_blocks_like_bitsandbytes_reference(shape):
    # Blocks run over the flattened weight, across row ends (as bitsandbytes' CUDA and pure-torch
    # paths do). bitsandbytes 0.50.2's native CPU dequantize gets these shapes wrong (even row
    # length not divisible by 64): compare with its pure-torch reference instead.
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    w = random_weight(shape, seed=4)
    packed, state = bnb_quantize(w, double_quant=False)
    ours = nf4.quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))
    with torch.compiler.set_stance("force_eager"):
        reference = _dequantize_4bit_compute(packed.view(-1), state.absmax, nf4.NF4_CODE, 64, shape,
                                             torch.float32)
    assert torch.equal(nf4.dequantize_nf4(ours), reference)


def test_without_double_quant_matches_bitsandbytes():
    w = random_weight((192, 576), seed=2)
    packed, state = bnb_quantize(w, double_quant=False)
    ours = nf4.quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(nf4.dequantize_nf4(ours), bnb_dequantize(packed, state, torch.float32))


def test_dynamic_code_is_bitsandbytes_signed_dynamic_map():
    assert torch.equal(nf4.DYNAMIC_CODE, bnb_functional.create_dynamic_map(signed=True))


def test_codes_are_nf4_values_two_per_byte_high_nibble_first():
    w = torch.tensor([[-1.0, 1.0, 0.0, 0.5626170039176941, -0.09105003625154495]])  # absmax 1
    packed = nf4.quantize_nf4(w).packed
    # codes 0, 15, 7, 13, 6, and a padding 0.0 (code 7) after the odd last element
    assert packed.tolist() == [0x0F, 0x7D, 0x67]


def test_storage_is_about_4_127_bits_per_weight():
    w = random_weight((2048, 2048))
    bits = nf4.quantize_nf4(w).nbytes * 8 / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3  # 4.127
    assert abs(nf4.quantize_nf4(w, double_quant=False).nbytes * 8 / w.numel() - 4.5) < 1e-3


def test_quantization_error_is_within_half_a_code_gap():
    w = random_weight((64, 64), seed=3)
    back = nf4.dequantize_nf4(nf4.quantize_nf4(w))
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    widest_gap = (nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max()
    # + 1%: the absmax itself is stored in 8 bits
    assert ((back - w).view(-1, 64).abs() <= absmax * (widest_gap / 2 + 0.01)).all()


def test_nan_weight_is_rejected_with_its_shape():
    w = torch.zeros(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"\(4, 64\).*NaN"):
        nf4.quantize_nf4(w)


def nf4_layer(kind, linear):
    layer = nf4.NF4Linear(linear)
    if kind == "fast":
        fast.accelerate(layer)
    return layer


@both
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_input_grad_equals_plain_linear_with_dequantized_weight(kind, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(192, 96, bias=True).to(dtype)
    layer = nf4_layer(kind, linear)
    plain = nn.Linear(192, 96).to(dtype)
    with torch.no_grad():
        plain.weight.copy_(nf4.dequantize_nf4(layer.nf4, dtype))
        plain.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 192, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), plain(x2)
    assert y1.dtype == dtype
    # fast: bias added after the matmul, plain: inside it (addmm); one rounding apart in bf16
    torch.testing.assert_close(y1, y2, rtol=0, atol=0 if dtype == torch.float32 or kind == "plain" else 2e-2)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(x1.grad, x2.grad)


@both
def test_nf4_base_weight_gets_no_gradient(kind):
    torch.manual_seed(0)
    layer = nf4_layer(kind, nn.Linear(64, 32, bias=True))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is None
    assert not layer.nf4.packed.requires_grad and layer.nf4.packed.grad is None


@both
def test_nf4_linear_computes_in_bf16_under_autocast(kind):
    torch.manual_seed(0)
    layer = nf4_layer(kind, nn.Linear(64, 32, bias=False))
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    w16 = nf4.dequantize_nf4(layer.nf4, torch.bfloat16)
    expected = torch.nn.functional.linear(x.bfloat16(), w16) if kind == "plain" else x.bfloat16() @ w16.t()
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)  # the bf16 product of the bf16 values
