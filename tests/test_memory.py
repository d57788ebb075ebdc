"""memory.py: the memory estimate printed before training. Its activations are the bytes autograd really
keeps after a forward pass, for each method, kernels, dtype and checkpointing; the whole estimate is
within 25% of the peak RSS a run measures on the tiny config, the demo config and the bench shapes
(more settings: docs/results/memory_estimate.md, measured with bench.py and train.py, which print
both)."""
import json
import re
import subprocess
import sys

import pytest
import torch
from torch.profiler import profile

import fast
import lora
import memory
from config import Config
from conftest import ROOT, save_tiny_model
from model import load_model


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("small") / "llama")
    save_tiny_model(folder, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2)
    return folder


def prepared(folder, cfg):
    bf16 = cfg.dtype == "bfloat16"
    model = load_model(folder, dtype=torch.bfloat16 if bf16 and cfg.method != "full" else torch.float32)
    lora.prepare_model(model, cfg.method, lora_rank=cfg.lora_rank, lora_alpha=16.0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.kernels == "fast":
        fast.accelerate(model)
    model.grad_checkpointing = cfg.grad_checkpointing
    return model.train()


def kept_after_forward(model, ids, attn_mask, bf16):
    """The bytes of the tensors a training forward pass leaves alive (what autograd keeps for backward),
    from the profiler's record of every CPU allocation and free, less the output itself."""
    with profile(profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model(ids, attn_mask=attn_mask, return_hidden=True)
    return sum(e.self_cpu_memory_usage for e in prof.events()) - hidden.numel() * hidden.element_size()


@pytest.mark.parametrize("method, kernels, dtype, checkpointing, packing", [
    ("lora", "fast", "float32", False, "none"), ("lora", "fast", "float32", False, "packed"),
    ("lora", "plain", "bfloat16", False, "none"), ("qlora", "plain", "float32", False, "none"),
    ("qlora", "fast", "bfloat16", False, "none"), ("full", "fast", "bfloat16", False, "none"),
    ("full", "plain", "float32", False, "none"), ("lora", "fast", "float32", True, "none"),
    ("full", "plain", "bfloat16", True, "none")])
def test_activations_are_what_autograd_keeps(small_model_dir, method, kernels, dtype, checkpointing, packing):
    cfg = Config(method=method, kernels=kernels, dtype=dtype, lora_rank=8, grad_checkpointing=checkpointing,
                 packing=packing)
    model = prepared(small_model_dir, cfg)
    B, T = 2, 64
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    mask = None
    if packing == "packed":  # two examples in each row, as data.collate makes it
        segment = torch.tensor([0] * 30 + [1] * 34)
        mask = ((segment[:, None] == segment[None, :]) & torch.ones(T, T, dtype=torch.bool).tril())
        mask = mask[None, None].expand(B, 1, T, T).contiguous()
    kept_after_forward(model, ids, mask, dtype == "bfloat16")  # the first pass also makes one-time tables
    measured = kept_after_forward(model, ids, mask, dtype == "bfloat16")
    estimated = memory.activation_bytes(model, cfg, B, T, rebuilt=False)
    assert 0.85 < estimated / measured < 1.15, (estimated, measured)


def test_the_parts_follow_the_settings(small_model_dir):
    """Plain kernels keep more than fast ones, checkpointing less, bf16 half; QLoRA's weights are smaller
    than LoRA's; full fine-tuning with distillation pays a frozen copy, LoRA none; a tiny batch of full
    fine-tuning peaks in AdamW's update; CUDA has no allocator share."""
    def estimate(**settings):
        cfg = Config(**dict(dict(lora_rank=8, batch_size=2, seq_len=64), **settings))
        return memory.estimate_memory(prepared(small_model_dir, cfg), cfg, 0, cfg.seq_len, 0.5)
    fast_parts, plain_parts = estimate(), estimate(kernels="plain")
    assert plain_parts["activations"] > fast_parts["activations"] > estimate(grad_checkpointing=True)["activations"]
    assert estimate(method="qlora")["weights"] < fast_parts["weights"]
    assert estimate(method="full", distill_weight=0.5)["teacher"] > 0 == estimate(distill_weight=0.5)["teacher"]
    tiny_batch = estimate(method="full", batch_size=1, seq_len=4)
    assert "transients" in tiny_batch and "activations" not in tiny_batch
    assert fast_parts["allocator"] > 0
    cfg = Config(lora_rank=8, batch_size=2, seq_len=64)
    assert memory.estimate_memory(prepared(small_model_dir, cfg), cfg, 0, 64, 0.5, "cuda")["allocator"] == 0


@pytest.mark.parametrize("config, model, steps", [("configs/tiny.py", "tiny_model", 3),
                                                  ("configs/demo.py", "real_model_dir", 2)])
def test_the_estimate_holds_on_the_tiny_and_the_demo_config(config, model, steps, request, tmp_path):
    """train.py prints the estimate before training and the peak at the end, both also above the
    process's baseline (its RSS before the model is loaded): within 25% of each other there. The
    demo config: SmolLM2-135M-Instruct, LoRA, two steps with a validation and its sample answers."""
    request.getfixturevalue(model)
    out = subprocess.run([sys.executable, "train.py", "--config", config, f"--out_dir={tmp_path / 'run'}",
                          f"--max_steps={steps}", f"--eval_every={steps}", f"--save_every={steps}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = re.search(r"peak memory: (\d+) MiB \(peak RSS\), estimated (\d+) MiB; above the baseline of (\d+) MiB: "
                      r"(\d+) MiB, estimated (\d+)", out)
    assert found, out[-2000:]
    peak, estimate, baseline, peak_above, estimate_above = map(int, found.groups())
    assert 0.75 <= estimate_above / peak_above <= 1.25, found.group(0)
    assert 0.75 <= estimate / peak <= 1.25


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_the_estimate_holds_on_the_bench_shapes(real_model_dir, method):
    """bench.py's shapes (SmolLM2-135M-Instruct, batch 4 x 256 tokens) for each method: train.py's
    estimate within 25% of the peak RSS a step measures, both above the process's baseline."""
    out = subprocess.run([sys.executable, "bench/bench.py", "--model", real_model_dir, "--method", method,
                          "--dtype", "float32", "--steps", "1", "--warmup", "1", "--rounds", "1", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.75 <= result["estimate_ratio"] <= 1.25, result
