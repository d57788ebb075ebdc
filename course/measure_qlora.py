"""Measure what QLoRA buys and costs: bytes of the 4-bit linears vs bf16, and the time of one
forward+backward pass with LoRA vs QLoRA on the same batch (bf16 compute).

    python course/measure_qlora.py [--model models/SmolLM2-135M-Instruct] [--batch 4] [--seq 256]
                                  [--steps 5] [--bnb]

--bnb also times transformers + bitsandbytes + peft QLoRA on the same batch (test-only libraries,
for comparison). Single runs on a shared machine: compare ratios from one run.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import nf4  # noqa: E402
import model as model_lib  # noqa: E402


def step_time(forward, params, ids, labels):
    """Seconds of one forward + backward (loss = cross-entropy on random labels)."""
    start = time.perf_counter()
    logits = forward(ids)
    F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1)).backward()
    seconds = time.perf_counter() - start
    for p in params:
        p.grad = None
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bnb", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    qlora_model = lora.prepare_model(model_lib.load_model(args.model, torch.bfloat16), "qlora",
                                     lora_rank=args.rank, lora_alpha=2 * args.rank)
    nf4 = [m.nf4 for m in qlora_model.modules() if isinstance(m, nf4.NF4Linear)]
    numel = sum(s.shape.numel() for s in nf4)
    nbytes = sum(s.nbytes for s in nf4)
    print(f"{len(nf4)} linears, {numel:,} weights: bf16 {2 * numel / 2**20:.1f} MiB, "
          f"NF4 {nbytes / 2**20:.1f} MiB = {nbytes / (2 * numel):.4f}x "
          f"({8 * nbytes / numel:.3f} bits/weight)")

    lora_model = lora.prepare_model(model_lib.load_model(args.model, torch.bfloat16), "lora",
                                    lora_rank=args.rank, lora_alpha=2 * args.rank)
    vocab = lora_model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    labels = torch.randint(0, vocab, (args.batch, args.seq))
    runs = {}  # name -> (forward, trainable parameters)
    for name, m in (("lora", lora_model), ("qlora", qlora_model)):
        runs[name] = (m.train(), [p for p in m.parameters() if p.requires_grad])
    if args.bnb:
        import transformers
        from peft import LoraConfig, get_peft_model
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True,
                                                bnb_4bit_compute_dtype=torch.bfloat16)
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant,
                                                               dtype=torch.bfloat16, device_map="cpu")
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
        peft = get_peft_model(hf, config).train()
        runs["bnb+peft qlora"] = (lambda x: peft(x).logits, [p for p in peft.parameters() if p.requires_grad])
    # Interleave the setups step by step, so that load from other processes on a shared machine
    # hits them alike; the first round is warm-up.
    times = {name: [] for name in runs}
    for _ in range(args.steps + 1):
        for name, (forward, params) in runs.items():
            times[name].append(step_time(forward, params, ids, labels))
    results = {name: statistics.median(t[1:]) for name, t in times.items()}
    tokens = args.batch * args.seq
    for name, seconds in results.items():
        ratio = statistics.median(a / b for a, b in zip(times[name][1:], times["lora"][1:]))
        print(f"{name:>15}: {seconds * 1000:8.0f} ms forward+backward, {tokens / seconds:6.0f} tokens/s, "
              f"{ratio:.2f}x LoRA's time (median over rounds)")


if __name__ == "__main__":
    main()
