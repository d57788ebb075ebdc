"""NF4: 4-bit NormalFloat weights for QLoRA (Dettmers et al. 2023, arXiv 2305.14314), stored
exactly as bitsandbytes stores them (tests/test_nf4.py compares byte for byte).

A frozen weight W (out, in) is cut into blocks of 64 consecutive values; each block keeps its
absmax, and each value the nearest of 16 codes (NF4_CODE) of value / absmax, two codes per byte.
The absmax values are themselves quantized to 8 bits in blocks of 256 (double quantization), so
a weight costs 4 + 8/64 + 32/(64*256) = 4.127 bits. NF4Linear is the frozen 4-bit linear that
lora.py puts under a LoRA layer; its forward dequantizes the weight at every call.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# NF4: 4-bit NormalFloat, stored exactly as bitsandbytes stores it (tests compare byte for byte)

# The 16 NF4 values: quantiles of a standard normal rescaled to [-1, 1], with an exact 0
# (QLoRA paper, section 3). Pretrained weights are roughly normal, so each code is used about
# equally often.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # x goes to code i+1 iff x > midpoint i


def dynamic_code():
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2015, arXiv 1511.04561): 256 sorted
    values in [-1, 1], dense near 0. Decade i = 0..6 (magnitudes 0.1..1 times 10^(i-6)) holds
    2^i evenly spaced magnitudes, each with both signs; plus 0 and 1."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(data + [0, 1.0]), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()
# bitsandbytes' CPU kernel does not search the code for each value: it rounds the normalised
# value to one of 65536 evenly spaced points of [-1, 1] and maps that point to its nearest code
# with this table. Near 0 the code is finer than the grid, so this is not always the nearest
# code; we do the same, to produce the same bytes.
_grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
DYNAMIC_LUT = torch.searchsorted(0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]), _grid, side="left")


@dataclass
class NF4State:
    """A weight in NF4. n = numel, blocks of `blocksize` consecutive elements of the flat weight."""
    packed: torch.Tensor         # uint8 ((n+1)//2,): two 4-bit codes a byte, high nibble first
    absmax: torch.Tensor         # per block max|w|: fp32 (n_blocks,), or uint8 codes if double quant
    absmax_scale: torch.Tensor   # double quant: fp32 (ceil(n_blocks/256),) absmax of each 256-block
    absmax_offset: torch.Tensor  # double quant: fp32 () mean of absmax, subtracted before quantizing
    shape: torch.Size
    blocksize: int

    @property
    def nbytes(self):
        tensors = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_nf4(weight, blocksize=64, double_quant=True):
    """Quantize a float tensor to NF4 (bitsandbytes quantize_4bit, quant_type="nf4").

    Each block of 64 gets its absmax (fp32); w / absmax in [-1, 1] goes to the nearest of the 16
    codes. Double quantization then stores the absmax themselves in 8 bits: 4 + 32/64 = 4.5 bits
    per weight becomes 4 + 8/64 + 32/(64*256) = 4.127.
    """
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"quantize_nf4: blocksize must be a positive even number, got {blocksize}")
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ValueError(f"quantize_nf4: expected a non-empty float tensor, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)                                             # the last may be partial
    if n % blocksize:                                                         # zero padding: absmax unchanged
        flat = F.pad(flat, (0, n_blocks * blocksize - n))
    blocks = flat.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)                                         # (n_blocks,)
    if not torch.isfinite(absmax).all():                                      # max() propagates NaN and Inf
        raise ValueError(f"quantize_nf4: weight {tuple(weight.shape)} contains NaN or Inf")
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]                # an all-zero block stays 0
    if n % blocksize:  # bitsandbytes' partial last block: stores the clamped absmax, and divides
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    scaled = scaled.clamp_(-1, 1).view(-1)[: n + n % 2]                       # odd n: pad with a 0 code
    codes = torch.bucketize(scaled, NF4_MIDPOINTS.to(flat.device), out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4State(packed, absmax, None, None, weight.shape, blocksize)
    offset = absmax.mean()
    absmax_q, absmax_scale = quantize_blockwise_8bit(absmax - offset)
    return NF4State(packed, absmax_q, absmax_scale, offset, weight.shape, blocksize)


def quantize_blockwise_8bit(x, blocksize=256):
    """x (n,) fp32 -> uint8 codes (n,) of DYNAMIC_CODE and fp32 scales (n_blocks,), as the
    bitsandbytes CPU kernel does it (quantize_blockwise, lookup table included)."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    scale = blocks.abs().amax(dim=1)                                          # (n_blocks,)
    normed = (blocks * (1.0 / scale)[:, None]).clamp(-1, 1).nan_to_num(0.0)   # 0 * inf = nan: zero blocks
    grid_index = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).long()              # truncation, as in C
    codes = DYNAMIC_LUT.to(x.device)[grid_index]
    codes[scale == 0] = 0                                                     # what the kernel writes
    return codes.view(-1)[:n].to(torch.uint8), scale


def nf4_absmax(state):
    """The fp32 absmax of each 64-block, undoing the double quantization if there is one."""
    if state.absmax_scale is None:
        return state.absmax
    n = state.absmax.numel()
    codes = F.pad(DYNAMIC_CODE.to(state.absmax.device)[state.absmax.long()], (0, (-n) % 256))
    return (codes.view(-1, 256) * state.absmax_scale[:, None]).view(-1)[:n] + state.absmax_offset


def dequantize_nf4(state, dtype=torch.float32):
    """NF4State -> tensor of the original shape: code[index] * absmax[block], in fp32, then cast
    to `dtype` (bitsandbytes dequantize_4bit; the same numbers, bit for bit)."""
    n, bs = state.shape.numel(), state.blocksize
    codes = torch.stack([state.packed >> 4, state.packed & 15], dim=1).view(-1)  # (2 * bytes,) 0..15
    values = NF4_CODE.to(state.packed.device)[codes.long()]                     # (n or n + 1,) fp32
    values = F.pad(values, (0, -len(values) % bs)).view(-1, bs)                 # (n_blocks, 64)
    values = values * nf4_absmax(state)[:, None]                                # scaled per block
    return values.view(-1)[:n].view(state.shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is kept in NF4 and dequantized at every call, in the input's
    dtype (autocast then computes the product in its own). The packed state is a plain attribute,
    not a buffer, so model.to(bf16) cannot round its fp32 statistics; quantize on the device the
    model will run on."""

    def __init__(self, linear, blocksize=64, double_quant=True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.nf4 = quantize_nf4(linear.weight, blocksize, double_quant)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):                                                  # (..., in)
        return F.linear(x, dequantize_nf4(self.nf4, x.dtype), self.bias)     # (..., out)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"

