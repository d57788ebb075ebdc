"""The SFT losses: masked token-level cross-entropy, and a distillation KL, both chunked and lean.

How a training step uses them (train.py):

    n_step = sum(batch["n_trained"] for batch in micro_batches)   # all-reduce it over ranks too
    for batch in micro_batches:
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["attn_mask"])
        loss = masked_cross_entropy(hidden, model.lm_head.weight, batch["targets"]) / max(n_step, 1)
        loss.backward()

The loss returned is a SUM over the trained tokens; the caller divides once by the trained tokens of
the whole optimizer step. Dividing each micro-batch by its own count and averaging the micro-batches
weighs a token of a short micro-batch more than one of a long one: the gradient then differs from the
big-batch gradient (the gradient-accumulation bug fixed in transformers in 2024). A micro-batch with no
trained token adds exactly 0 (never 0/0 = NaN).

Why hidden states and not logits: a (B, T, V) fp32 logits tensor is huge (4 x 2048 x 49152 x 4 bytes =
1.6 GB for SmolLM2, and its gradient as much again), yet most positions are masked prompt tokens.
We take the hidden states (B, T, C) and the output weight (V, C), keep only the trained positions
(N, C), and compute their logits a chunk of rows at a time. The gradient is computed in the same pass:
for cross-entropy, d loss / d logits = softmax(logits) - onehot(target), so with logits z = h W^T
    d loss / d h = (softmax(z) - onehot) W        (n, C)
    d loss / d W = (softmax(z) - onehot)^T h      (V, C)
and each chunk's (n, V) logits are freed before the next chunk: no (N, V) tensor is ever kept for
backward. This is the trick of Liger Kernel's fused linear cross-entropy (Hsu et al. 2024) and of
"Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al. 2024).
"""
import torch

import ops

IGNORE = -100
# Rows of logits computed at a time: a (128, V) fp32 chunk is 24 MiB for SmolLM2's V = 49152. On
# the SmolLM2 LoRA bench (512 trained rows), 256 instead of 512 rows lowered the peak by ~75 MiB,
# 128 instead of 256 by ~40 MiB, each at the same speed (the loss alone: 0.25-0.27 s either way).
CHUNK_ROWS = 128
W_SLICE = 8192  # rows of the output weight cast to fp32 at a time (see chunked_linear_loss)


def compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16/fp16 -> fp32


def chunked_linear_loss(h, weight, chunk_size, chunk_loss, want_grad_h, want_grad_w):
    """Sum over chunks of chunk_loss(logits, start) for logits = h W^T, one (n, V) chunk at a time.
    chunk_loss returns (loss sum, d loss / d logits); the gradients w.r.t. h (N, C) and W (V, C) are
    accumulated chunk by chunk when asked for. Runs with autocast off, in fp32 (fp64 for fp64 inputs)."""
    dtype = compute_dtype(h)
    # The matmuls take bf16 values when the hidden states arrive in bf16 (autocast training: what
    # the lm_head would do there, at twice fp32's speed on a GPU); softmax, loss and gradients stay fp32.
    mm_dtype = h.dtype if h.dtype in (torch.bfloat16, torch.float16) else dtype
    w = weight.to(mm_dtype)                                                    # (V, C)
    # bf16 values on the fp32 kernel where that is faster (ops.py). A whole fp32 copy of W would
    # cost V*C*4 bytes (113 MiB for SmolLM2), so there W is cast and multiplied a slice at a time,
    # each slice's fp32 copy in ops.workspace, each product written straight into its destination.
    slow = mm_dtype == torch.bfloat16 and ops.bf16_gemm_is_slow(h.device)
    slices = [slice(v, v + W_SLICE) for v in range(0, len(w), W_SLICE)]

    def fp32_slice(s):                                                         # (W_SLICE, C) fp32
        return ops.fp32_copy(w[s], ops.workspace(h.device, w[s].numel()))

    def times_w_t(hc):                                                         # (n, C) -> (n, V) logits
        if not slow:
            return (hc @ w.t()).to(dtype)
        logits, hf = torch.empty(len(hc), len(w), dtype=dtype, device=h.device), hc.to(dtype)
        for s in slices:
            torch.mm(hf, fp32_slice(s).t(), out=logits[:, s])
        return logits

    def times_w(d):                                                            # (n, V) -> (n, C)
        if not slow:
            return d.to(mm_dtype) @ w
        out = torch.zeros(len(d), w.shape[1], dtype=dtype, device=h.device)
        for s in slices:
            out.addmm_(d[:, s], fp32_slice(s))
        return out

    with torch.autocast(h.device.type, enabled=False):
        total = torch.zeros((), dtype=dtype, device=h.device)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if want_grad_h else None
        grad_w = torch.zeros(w.shape, dtype=dtype, device=h.device) if want_grad_w else None
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size].to(mm_dtype)                      # (n, C)
            logits = times_w_t(hc)                                             # (n, V)
            loss, dlogits = chunk_loss(logits, start)
            total += loss
            if want_grad_h:
                grad_h[start:start + chunk_size] = times_w(dlogits)            # (n, C)
            if want_grad_w:
                grad_w.addmm_(dlogits.t(), hc.to(dtype))                       # (V, C) += (V, n) @ (n, C)
            del logits, dlogits  # free this chunk before the next one is allocated
    return total, grad_h, grad_w


class ChunkedLinearLoss(torch.autograd.Function):
    """loss(h W^T) with the gradients computed during the forward pass (see chunked_linear_loss), so
    backward only scales them by the incoming gradient. W gets a gradient only if it requires one
    (with LoRA the output layer is frozen and that (V, C) matmul is skipped)."""

    @staticmethod
    def forward(ctx, h, weight, chunk_size, chunk_loss):
        total, grad_h, grad_w = chunked_linear_loss(h, weight, chunk_size, chunk_loss,
                                                    ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = (grad_h * grad_output).to(h_dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_output).to(w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None


def linear_loss(h, weight, chunk_size, chunk_loss):
    """Apply ChunkedLinearLoss when a gradient is wanted, else just the chunked forward (evaluation)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return ChunkedLinearLoss.apply(h, weight, chunk_size, chunk_loss)
    return chunked_linear_loss(h, weight, chunk_size, chunk_loss, False, False)[0]


def trained_rows(hidden, targets, vocab_size):
    """The hidden states (N, C) and targets (N,) of the positions with targets != -100."""
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} differ in (B, T)")
    mask = targets != IGNORE                                                    # (B, T)
    picked = targets[mask]                                                      # (N,)
    if picked.numel() and (picked.min() < 0 or picked.max() >= vocab_size):
        bad = picked[(picked < 0) | (picked >= vocab_size)][0].item()
        raise ValueError(f"targets holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return hidden[mask], picked                                                 # (N, C), (N,)


def masked_cross_entropy(hidden, weight, targets, chunk_size=CHUNK_ROWS):
    """Sum of the cross-entropy losses -log p(target) over the positions where targets != -100.

    hidden: (B, T, C) final-normed hidden states (model.hidden_states), any float dtype (bf16 under
    autocast is fine: the logits are computed in fp32). weight: (V, C) output weight (lm_head.weight).
    targets: (B, T) long, the token each position must predict, -100 where no loss is taken.
    Returns a scalar (fp32, fp64 for fp64 input): divide it by the trained tokens of the whole step."""
    h, t = trained_rows(hidden, targets, weight.shape[0])

    def chunk_loss(logits, start):                                             # logits z (n, V)
        target = t[start:start + logits.shape[0]]                             # (n,)
        target_logit = logits.gather(1, target[:, None]).squeeze(1)           # (n,)
        # Everything below works in the logits buffer itself, so a chunk costs one (n, V) tensor:
        # logsumexp(z) = m + log sum exp(z - m) with m = max z (no overflow), and
        # d loss / d z = softmax(z) - onehot(target).
        m = logits.max(dim=-1).values                                          # (n,)
        probs = logits.sub_(m[:, None]).exp_()                                 # exp(z - m)
        total = probs.sum(dim=-1)                                              # (n,)
        loss = (m + total.log() - target_logit).sum()                          # sum of -log softmax(z)[target]
        dlogits = probs.div_(total[:, None])                                   # softmax(z)
        dlogits[torch.arange(len(target), device=target.device), target] -= 1
        return loss, dlogits

    return linear_loss(h, weight, chunk_size, chunk_loss)


def distillation_loss(hidden, weight, teacher_hidden, teacher_weight, positions, chunk_size=CHUNK_ROWS, temperature=1.0):
    """Sum over the chosen positions of KL(teacher || student) between the softmaxes of the logits
    divided by `temperature`, times temperature^2 (Hinton et al. 2015, so the gradient scale does not
    depend on the temperature). Used against catastrophic forgetting: the teacher is the frozen base
    model, and the student is pulled toward its next-token predictions where `positions` is True.

    hidden (B, T, C), weight (V, C): the student's, as in masked_cross_entropy. teacher_hidden
    (B, T, Ct), teacher_weight (V, Ct): the teacher's (computed under torch.no_grad; no gradient).
    positions (B, T) bool: where to compare (train.py: the answer tokens, or the prompt tokens).
    With p = softmax(z_teacher / T) and q = softmax(z_student / T):
        KL = sum_v p_v (log p_v - log q_v),  d (T^2 KL) / d z_student = T (q - p)."""
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher vocabulary {teacher_weight.shape[0]} != student vocabulary {weight.shape[0]}")
    if hidden.shape[:2] != positions.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and positions {tuple(positions.shape)} differ in (B, T)")
    h = hidden[positions]                                                      # (N, C)
    th = teacher_hidden[positions].detach()                                    # (N, Ct)
    tw = teacher_weight.detach().to(compute_dtype(h))

    def chunk_loss(logits, start):                                             # student logits (n, V)
        with torch.no_grad():
            teacher = th[start:start + logits.shape[0]].to(tw.dtype) @ tw.t()  # (n, V)
            log_p = torch.log_softmax(teacher / temperature, dim=-1)
        log_q = torch.log_softmax(logits / temperature, dim=-1)
        p = log_p.exp()
        loss = (p * (log_p - log_q)).sum() * temperature ** 2
        return loss, log_q.exp_().sub_(p).mul_(temperature)                    # T (q - p)

    return linear_loss(h, weight, chunk_size, chunk_loss)


@torch.no_grad()
def validation_loss(model, batches, chunk_size=CHUNK_ROWS):
    """(mean loss per trained token, trained tokens) over a whole set of collated batches: the sum of
    all token losses divided by the number of trained tokens. Not the mean of per-batch means, which
    weighs a token in a batch with few trained tokens more than one in a batch with many."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        mask = batch["attn_mask"].to(device) if batch["attn_mask"] is not None else None
        hidden = model.hidden_states(batch["input_ids"].to(device), batch["position_ids"].to(device), mask)
        total += masked_cross_entropy(hidden, model.lm_head.weight, batch["targets"].to(device), chunk_size).item()
        count += batch["n_trained"]
    return total / max(count, 1), count
