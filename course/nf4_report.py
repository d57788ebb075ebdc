"""What QLoRA's 4-bit NF4 weights store, and what they cost before any training (course lesson 5).

    python course/nf4_report.py --config configs/course/baseline.py [--limit 100] [--json_out FILE]

1. One block of a real weight: 64 numbers -> 64 four-bit codes (indices into the 16 NF4 values)
   and one absmax; dequantized, each is NF4_CODE[code] * absmax.
2. Storage of every block linear (the weights QLoRA quantizes), measured from the NF4State tensors:
   bytes and bits per weight for bf16, NF4 with an fp32 absmax per block, and NF4 with double
   quantization (the absmax stored in 8 bits too; QLoRA's setting and ours).
3. Quantization error ||W - dequant(quant(W))|| / ||W|| over all block linears, for NF4 and for a
   uniform 4-bit grid with the same blocks and absmax: NF4's 16 values are quantiles of a normal
   distribution, so they are denser where most weights are (near 0).
4. The model's loss on the validation answers and on general text, with its own weights and with
   every block linear replaced by its NF4 round trip (no LoRA): the starting point of a QLoRA run.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nf4  # noqa: E402
from config import script, parse_cli  # noqa: E402
from eval import language_model_loss, text_examples, val_examples  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIFORM_CODE = torch.linspace(-1, 1, 16)  # 16 evenly spaced values: plain 4-bit absmax quantization


def uniform_4bit_round_trip(weight, blocksize=64):
    """W -> each block of 64 scaled by its absmax, rounded to the nearest of 16 evenly spaced values
    in [-1, 1], scaled back. The same storage as NF4 (4 bits + absmax), another code book."""
    flat = weight.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    codes = torch.bucketize(blocks / absmax, (UNIFORM_CODE[:-1] + UNIFORM_CODE[1:]) / 2)
    return (UNIFORM_CODE[codes] * absmax).view(-1)[:flat.numel()].view(weight.shape)


def block_linears(model):
    """The linears QLoRA stores in 4 bits: every nn.Linear of the blocks (not the embeddings or lm_head)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.startswith("lm_head")]


def one_block(weight, n=8):
    """The first n weights of the first block: value, code, dequantized value."""
    state = nf4.quantize_nf4(weight, double_quant=False)
    flat = weight.reshape(-1).float()
    codes = torch.stack([state.packed >> 4, state.packed & 15], 1).view(-1)[:n].long()
    absmax = state.absmax[0].item()
    return dict(absmax=absmax, rows=[dict(weight=flat[k].item(), scaled=flat[k].item() / absmax,
                                          code=int(codes[k]), nf4_value=nf4.NF4_CODE[codes[k]].item(),
                                          dequantized=nf4.NF4_CODE[codes[k]].item() * absmax)
                                     for k in range(n)])


def storage_and_error(model):
    numel = bytes_dq = bytes_plain = 0
    sq_w = sq_nf4 = sq_uniform = 0.0
    worst = (0.0, "")
    for name, linear in block_linears(model):
        w = linear.weight.detach().float()
        dq, plain = nf4.quantize_nf4(w), nf4.quantize_nf4(w, double_quant=False)
        numel, bytes_dq, bytes_plain = numel + w.numel(), bytes_dq + dq.nbytes, bytes_plain + plain.nbytes
        err_nf4 = (w - nf4.dequantize_nf4(dq)).pow(2).sum().item()
        sq_w += w.pow(2).sum().item()
        sq_nf4 += err_nf4
        sq_uniform += (w - uniform_4bit_round_trip(w)).pow(2).sum().item()
        worst = max(worst, (math.sqrt(err_nf4 / w.pow(2).sum().item()), name))
    return dict(linears=len(block_linears(model)), weights=numel,
                bf16_bytes=2 * numel, nf4_bytes=bytes_plain, nf4_dq_bytes=bytes_dq,
                bits_bf16=16.0, bits_nf4=8 * bytes_plain / numel, bits_nf4_dq=8 * bytes_dq / numel,
                rel_error_nf4=math.sqrt(sq_nf4 / sq_w), rel_error_uniform4=math.sqrt(sq_uniform / sq_w),
                worst_layer=worst[1], worst_rel_error_nf4=worst[0])


@torch.no_grad()
def quantize_in_place(model):
    """Replace every block linear's weight by dequant(quant_nf4(W)): the weights a QLoRA run computes with."""
    for _, linear in block_linears(model):
        linear.weight.copy_(nf4.dequantize_nf4(nf4.quantize_nf4(linear.weight)).to(linear.weight.dtype))


def losses(model, tokenizer, val, general):
    v = language_model_loss(model, tokenizer, val, desc="val")
    g = language_model_loss(model, tokenizer, general, desc="general text")
    return dict(val_loss=v["loss"], general_ppl=g["ppl"])


@script
def main(argv=None):
    cfg, flags = parse_cli(sys.argv[1:] if argv is None else argv, {"limit": 100, "json_out": "",
                           "general_text": os.path.join(ROOT, "data", "eval", "general.txt")})
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=torch.float32).eval()
    val = val_examples(cfg, tokenizer, "val_data", flags["limit"])  # rendered as eval.py renders them
    with open(flags["general_text"], encoding="utf-8") as f:
        general = text_examples(tokenizer, f.read(), cfg.seq_len)

    name, linear = block_linears(model)[0]
    result = dict(model=cfg.model, example_layer=name, example_block=one_block(linear.weight),
                  nf4_code=nf4.NF4_CODE.tolist(), **storage_and_error(model))
    result["original"] = losses(model, tokenizer, val, general)
    quantize_in_place(model)
    result["nf4"] = losses(model, tokenizer, val, general)
    result["val_examples"] = len(val)

    print(f"NF4 values: {', '.join(f'{v:.4f}' for v in result['nf4_code'])}")
    print(f"first weights of {name} (absmax of the block {result['example_block']['absmax']:.5f}):")
    for r in result["example_block"]["rows"]:
        print(f"  {r['weight']:+.5f} -> /absmax {r['scaled']:+.4f} -> code {r['code']:2d} "
              f"({r['nf4_value']:+.4f}) -> {r['dequantized']:+.5f}")
    print(f"{result['linears']} block linears, {result['weights']:,} weights: bf16 {result['bf16_bytes'] / 2**20:.1f} MiB, "
          f"NF4 {result['nf4_bytes'] / 2**20:.1f} MiB ({result['bits_nf4']:.3f} bits/weight), NF4 + double "
          f"quantization {result['nf4_dq_bytes'] / 2**20:.1f} MiB ({result['bits_nf4_dq']:.3f} bits/weight)")
    print(f"relative error: NF4 {result['rel_error_nf4']:.4f}, uniform 4-bit {result['rel_error_uniform4']:.4f} "
          f"(worst NF4 layer {result['worst_layer']}: {result['worst_rel_error_nf4']:.4f})")
    for key in ("original", "nf4"):
        print(f"{key:>8}: val loss {result[key]['val_loss']:.4f} ({len(val)} examples), "
              f"general-text perplexity {result[key]['general_ppl']:.3f}")
    if flags["json_out"]:
        with open(flags["json_out"], "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
