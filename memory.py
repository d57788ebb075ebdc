"""The memory a training run needs at its peak: the estimate train.py prints before the first step.

Held for the whole run:
    baseline         measured: the process's RSS before the model is loaded (python, torch, the data)
    runtime (CPU)    what torch adds with the first model whatever its size: kernels and thread pools
                     starting
    weights          each parameter in its dtype; QLoRA's block linears as their NF4 bytes
    gradients        fp32, one per trainable parameter
    optimizer        AdamW's m and v: fp32, two per trainable parameter
    teacher          distillation / DPO: nothing for LoRA (the same model, adapters off), else a frozen copy
and the larger of what a step holds during forward and backward:
    activations      what autograd keeps for backward (activation_bytes: per token and block for the
                     kernels and dtype chosen, the packed rows' attention masks, autocast's bf16 copies
                     of trained weights), for a micro-batch of batch_size rows of the longest row
    loss             fused: the hidden states' gradient and one (128, V) chunk of logits at a time; plain:
                     the (N, V) fp32 logits, their softmax and gradient; distillation and DPO alike; a
                     trainable lm_head's (V, C) gradient
    allocator (CPU)  glibc keeps the holes that the forward pass's freed temporaries leave between the kept
                     activations resident: counted as 0.7x the activations, the share measured on the
                     bench shapes (docs/results/memory_estimate.md)
and what comes after backward, when the activations are gone:
    transients       AdamW's update: five tensors the size of the largest trainable parameter (full
                     fine-tuning: the embeddings); an export's copy of the weights
The loading peak (every weight in full precision, before QLoRA quantizes) replaces it all if larger.
Not counted: the sample answers generated at each evaluation (2 prompts, 48 new tokens: a KV cache of
a few MiB, at a moment when the step's activations are gone).

Everything but the runtime and the allocator's share is counted from the shapes, so the estimate holds
for shapes not measured; activation_bytes is checked against what autograd really keeps
(tests/test_memory.py). On CUDA there is no baseline, runtime or allocator share: max_memory_allocated
counts tensors only.
"""
import lora
from nf4 import NF4Linear

ALLOCATOR_HOLES = 0.7  # CPU: RSS kept by heap holes, as a share of the activations (measured, see above)
RUNTIME = 34 * 2**20   # CPU: what torch adds once a model is built and run (docs/results/memory_estimate.md)
LOSS_CHUNK = 128       # loss.CHUNK_ROWS: rows of logits the fused losses hold at a time


def rss_bytes(field="VmRSS"):
    """This process's resident memory now (VmHWM: its peak so far), from Linux /proc; 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split(f"{field}:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return 0


def peak_rss_bytes():
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    over an exec from the process that started this one (pytest, a notebook), so a small run started
    by a big process would report the big one's peak as its own."""
    import resource
    return rss_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (KiB on Linux)


def kept_per_token(mc, cfg):
    """(bytes per token and block, bytes per token besides the blocks, bytes per token of the one block
    that gradient checkpointing rebuilds at a time in backward) that autograd keeps for backward (fast.py
    and model.py say what each piece keeps). kernels = "fast": the block's input and middle residual
    (the norms keep x), q, k, v and the attention output, the MLP's gate and up (SwiGLU keeps both),
    LoRA's (r,) intermediates; the norms' outputs and silu(gate) * up are recomputed. kernels = "plain"
    keeps those too, silu(gate), the normalized x of a trained norm, fp32 copies of bf16 norms' inputs
    (and, with QLoRA, each dequantized weight: activation_bytes).
    Besides the blocks: the final norm's input, RoPE's cos and sin."""
    C, I, r, d = mc.hidden_size, mc.intermediate_size, cfg.lora_rank, mc.head_dim
    kv, H = mc.num_key_value_heads * d, mc.num_attention_heads
    bf16 = cfg.dtype == "bfloat16"
    res = 4 if cfg.method == "full" or not bf16 else 2   # the residual stream: the frozen base's dtype
    mm = 2 if bf16 else 4                                 # what the matmuls give (autocast: bf16)
    lora_r = 7 * r * mm if cfg.method in ("lora", "qlora") else 0
    kept = 2 * C * res + 2 * mm * (C + kv) + 2 * I * mm + 4 * H + lora_r
    if bf16 and cfg.method == "full":  # autocast's bf16 copies of fp32 norm outputs, kept by 5 matmuls
        kept += 5 * C * 2
    besides = C * res + 2 * d * 4 * len(set(mc.layer_types))
    if cfg.kernels == "plain":
        trained_norms, autocast_copies = cfg.method == "full", bf16 and cfg.method == "full"
        kept += 2 * I * mm                           # silu(gate), and silu(gate) * up for down_proj
        kept += 0 if autocast_copies else 2 * C * res  # the norms' outputs, kept by the projections
        kept += 2 * C * res * trained_norms          # x_hat, for the gradient of the norm's weight
        kept += 2 * C * 4 * (res == 2)               # the fp32 copy a bf16 norm computes in
        besides += C * res * trained_norms + C * 4 * (res == 2)  # the same for the final norm
    if cfg.grad_checkpointing:  # each block's input only; one block rebuilt at a time in backward
        return C * res, besides, kept
    return kept, besides, 0


def activation_bytes(model, cfg, rows, row_tokens, rebuilt=True):
    """What autograd keeps for backward over a micro-batch of rows x row_tokens tokens (with rebuilt:
    and the block that gradient checkpointing rebuilds in backward), checked against the bytes it
    holds after a forward pass (tests/test_memory.py)."""
    mc = model.config
    per_block, besides, rebuild = kept_per_token(mc, cfg)
    total = rows * row_tokens * (mc.num_hidden_layers * per_block + besides + rebuild * rebuilt)
    if cfg.packing == "packed":  # each block's attention keeps the mask, made (B, 1, T, T) floats
        total += mc.num_hidden_layers * rows * row_tokens ** 2 * (2 if cfg.dtype == "bfloat16" else 4)
    if cfg.dtype == "bfloat16" and not cfg.grad_checkpointing:  # autocast's bf16 copy of each trained matrix
        total += 2 * sum(p.numel() for p in model.parameters()
                         if p.requires_grad and p.ndim == 2 and p is not model.embed_tokens.weight)
    if cfg.method == "qlora" and cfg.kernels == "plain" and not cfg.grad_checkpointing:
        nf4 = sum(m.nf4.shape.numel() for m in model.modules() if isinstance(m, NF4Linear))
        total += (2 if cfg.dtype == "bfloat16" else 4) * nf4  # F.linear keeps each dequantized weight
    return total


def loss_bytes(mc, cfg, tokens, trained_share, head_trains):
    """Bytes the loss holds at its peak (see the module docstring), for a micro-batch of `tokens`."""
    C, V = mc.hidden_size, mc.vocab_size
    trained = trained_share * tokens                 # rows of logits the loss computes
    fused = cfg.kernels == "fast" and cfg.objective == "sft"  # DPO / ORPO use the plain logits
    total = (trained * C * 4 + 2 * LOSS_CHUNK * V * 4) if fused else 3 * trained * V * 4
    if cfg.distill_weight > 0:                       # teacher and student logits, softmaxes
        positions = (1 - trained_share if cfg.distill_on == "prompt" else trained_share) * tokens
        total += positions * C * 4 + 5 * LOSS_CHUNK * V * 4 if fused else 6 * positions * V * 4
    if cfg.objective == "dpo":                       # the reference's logits, no gradient
        total += trained * V * 4
    if head_trains:                                  # the (V, C) gradient of the output layer
        total += V * C * 4
    return int(total)


def estimate_memory(model, cfg, baseline=0, tokens_per_row=None, trained_share=1.0, device_type="cpu"):
    """{part: bytes} at the run's peak (the module docstring), their sum the estimate. tokens_per_row:
    the longest row of a batch (seq_len when packed; else the longest example); trained_share: the
    share of tokens that are trained (DataStats)."""
    c, mc = lora.count_trainable(model), model.config
    rows = cfg.batch_size * (2 if cfg.objective != "sft" else 1)
    tokens = rows * (tokens_per_row or cfg.seq_len)
    activations = activation_bytes(model, cfg, rows, tokens_per_row or cfg.seq_len)
    head_trains = model.lm_head.weight.requires_grad
    frozen_copy = cfg.method not in ("lora", "qlora") and (cfg.distill_weight > 0 or cfg.objective == "dpo")
    n_params = c["trainable"] + c["frozen"]
    largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
    export = n_params * 4 if cfg.merge else n_params * 2 if cfg.method == "full" and cfg.dtype == "bfloat16" else 0
    held = dict(baseline=baseline, runtime=RUNTIME if device_type == "cpu" else 0, weights=c["weight_bytes"],
                gradients=c["trainable"] * 4, optimizer=c["trainable"] * 8,
                teacher=n_params * (2 if cfg.dtype == "bfloat16" else 4) if frozen_copy else 0)
    step = dict(activations=activations, loss=loss_bytes(mc, cfg, tokens, trained_share, head_trains),
                allocator=int(ALLOCATOR_HOLES * activations) if device_type == "cpu" else 0)
    update = dict(transients=max(5 * largest * 4, export))
    parts = dict(held, **(step if sum(step.values()) >= update["transients"] else update))
    loading = n_params * (2 if cfg.dtype == "bfloat16" and cfg.method != "full" else 4)
    if sum(parts.values()) - baseline - held["runtime"] < loading:  # QLoRA of a big model: the load is the peak
        parts = dict(baseline=baseline, runtime=held["runtime"], loading=loading)
    return parts


def describe(parts):
    """One line: each part in MiB, and the total."""
    return ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in parts.items() if v) + \
        f"; total {sum(parts.values()) / 2**20:,.0f} MiB"
