"""The SFT losses: masked token-level cross-entropy, and a distillation KL against forgetting; the
preference losses that follow SFT: DPO and ORPO.

Any new objective can start from the logits: `logits = model(ids)` (B, T, V) is an ordinary autograd
tensor, so a loss written with torch functions needs no gradient by hand. The objective of a training
step is computed in one place, train.step_loss; a new objective replaces that function. The two losses
below are written that way, in a few lines each; their fused twins at the end of this file compute the
same numbers with far less memory (kernels = "fast", the default; tests/test_loss.py checks they agree).

How a training step uses them (train.py):

    n_step = sum(batch["n_trained"] for batch in micro_batches)   # all-reduce it over ranks too
    for batch in micro_batches:
        hidden = model(batch["input_ids"], batch["position_ids"], batch["attn_mask"], return_hidden=True)
        loss = masked_cross_entropy(hidden, model.lm_head.weight, batch["targets"]) / max(n_step, 1)
        loss.backward()

The loss returned is a SUM over the trained tokens; the caller divides once by the trained tokens of
the whole optimizer step. Dividing each micro-batch by its own count and averaging the micro-batches
weighs a token of a short micro-batch more than one of a long one: the gradient then differs from the
big-batch gradient (the gradient-accumulation bug fixed in transformers in 2024). A micro-batch with no
trained token adds exactly 0 (never 0/0 = NaN).

Why hidden states and not logits: most positions are masked prompt tokens, so the output layer runs only
on the N trained positions: (N, C) hidden states times the (V, C) output weight. The logits are fp32
(fp64 for fp64 inputs) whatever the model's dtype, so that the softmax over 49k+ classes is not rounded.
"""
import torch
import torch.nn.functional as F

IGNORE = -100


def at_least_fp32(x):
    """bf16/fp16 -> fp32 for the softmax and the loss; fp32 and fp64 stay as they are."""
    return x if x.dtype == torch.float64 else x.float()


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


def masked_cross_entropy(hidden, weight, targets):
    """Sum of the cross-entropy losses -log p(target) over the positions where targets != -100.

    hidden: (B, T, C) final-normed hidden states (model(..., return_hidden=True)). weight: (V, C), the
    output layer's (lm_head.weight). targets: (B, T) long, the token each position must predict, -100
    where no loss is taken. Returns a scalar: divide it by the trained tokens of the whole step."""
    h, t = trained_rows(hidden, targets, weight.shape[0])                       # (N, C), (N,)
    logits = at_least_fp32(F.linear(h, weight))                                 # (N, V)
    return F.cross_entropy(logits, t, reduction="sum")


def distillation_loss(hidden, weight, teacher_hidden, teacher_weight, positions, temperature=1.0):
    """Sum over the chosen positions of KL(teacher || student) between the softmaxes of the logits
    divided by `temperature`, times temperature^2 (Hinton et al. 2015, so the gradient scale does not
    depend on the temperature). Used against catastrophic forgetting: the teacher is the frozen base
    model, and the student is pulled toward its next-token predictions where `positions` is True.

    hidden (B, T, C), weight (V, C): the student's, as in masked_cross_entropy. teacher_hidden
    (B, T, Ct), teacher_weight (V, Ct): the teacher's (no gradient flows to them). positions (B, T)
    bool: where to compare (train.py: the prompt tokens, or the answer tokens).
        KL = sum_v p_v (log p_v - log q_v),   p = softmax(z_teacher / T),  q = softmax(z_student / T)"""
    check_distillation_shapes(hidden, weight, teacher_weight, positions)
    log_q = F.log_softmax(at_least_fp32(F.linear(hidden[positions], weight)) / temperature, dim=-1)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden[positions], teacher_weight)    # (N, V)
        log_p = F.log_softmax(at_least_fp32(teacher_logits) / temperature, dim=-1).to(log_q.dtype)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) * temperature ** 2


def check_distillation_shapes(hidden, weight, teacher_weight, positions):
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher vocabulary {teacher_weight.shape[0]} != student vocabulary {weight.shape[0]}")
    if hidden.shape[:2] != positions.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and positions {tuple(positions.shape)} differ in (B, T)")


# ---------------------------------------------------------------------------------------------
# Preference losses: a prompt, a chosen and a rejected answer. The batch holds the P chosen rows, then
# the P rejected ones (data.collate_pairs); an answer's log-probability is the sum over its trained
# tokens, log π(y|x) = Σ_t log p(y_t | x, y_<t).


def sequence_logps(hidden, weight, targets):
    """(B,) sum of log p(target) over each row's trained positions, and (B,) the number of them.
    hidden (B, T, C), weight (V, C), targets (B, T) as in masked_cross_entropy."""
    h, t = trained_rows(hidden, targets, weight.shape[0])                       # (N, C), (N,)
    token_logps = -F.cross_entropy(at_least_fp32(F.linear(h, weight)), t, reduction="none")  # (N,)
    row = (targets != IGNORE).nonzero()[:, 0]                                   # (N,) the row of each
    sums = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=h.device).index_add(0, row, token_logps)
    return sums, (targets != IGNORE).sum(dim=1)                                 # (B,), (B,)


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), per pair:
        loss = -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])
    The rewards are r(y) = β (log π(y) - log π_ref(y)); at the start, π = π_ref and loss = log 2.
    All arguments (P,); returns (losses, chosen rewards, rejected rewards), each (P,)."""
    chosen, rejected = beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def orpo_loss(logp_chosen, logp_rejected, n_chosen, n_rejected):
    """The odds-ratio term of ORPO (Hong et al. 2024, eq. 4-7), per pair, without a reference model:
        loss = -log σ(log odds(c) - log odds(r)),   odds(y) = P(y) / (1 - P(y)),
    with P(y) = exp(mean token log-prob) (length-normalized), so log odds = m - log(1 - e^m). The SFT
    loss on the chosen answer is added by the caller. Returns (losses, m chosen, m rejected), (P,)."""
    m_chosen, m_rejected = logp_chosen / n_chosen, logp_rejected / n_rejected
    log_odds = (m_chosen - m_rejected) - (torch.log(-torch.expm1(m_chosen)) - torch.log(-torch.expm1(m_rejected)))
    return -F.logsigmoid(log_odds), m_chosen.detach(), m_rejected.detach()


# ---------------------------------------------------------------------------------------------
# The fused twins: the same two losses, without the (N, V) logits kept for backward
#
# A (N, V) fp32 logits tensor is large (512 trained tokens x 49152 = 96 MiB for SmolLM2), and autograd
# keeps it, or its softmax, until backward, plus a gradient as large. The twins compute the logits a
# chunk of rows at a time and the gradient in the same pass: for cross-entropy, with logits z = h W^T,
#     d loss / d z = softmax(z) - onehot(target)
#     d loss / d h = (softmax(z) - onehot) W        (n, C)
#     d loss / d W = (softmax(z) - onehot)^T h      (V, C)
# and each chunk's (n, V) logits are freed before the next chunk. This is the trick of Liger Kernel's
# fused linear cross-entropy (Hsu et al. 2024) and of "Cut Your Losses in Large-Vocabulary Language
# Models" (Wijmans et al. 2024).

CHUNK_ROWS = 128  # rows of logits at a time: a (128, V) fp32 chunk is 24 MiB for V = 49152


def chunked_linear_loss(h, weight, chunk_size, chunk_loss, want_grad_h, want_grad_w):
    """Sum over chunks of chunk_loss(logits, start) for logits = h W^T, one (n, V) chunk at a time.
    chunk_loss returns (loss sum, d loss / d logits); the gradients w.r.t. h (N, C) and W (V, C) are
    accumulated chunk by chunk when asked for. Runs with autocast off, in fp32 (fp64 for fp64 inputs);
    the products take bf16 operands when h arrives in bf16 (autocast training), as the plain loss's."""
    dtype = at_least_fp32(h).dtype
    mm_dtype = h.dtype if h.dtype in (torch.bfloat16, torch.float16) else dtype
    w = weight.to(mm_dtype)                                                    # (V, C)
    with torch.autocast(h.device.type, enabled=False):
        total = torch.zeros((), dtype=dtype, device=h.device)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if want_grad_h else None
        grad_w = torch.zeros(w.shape, dtype=dtype, device=h.device) if want_grad_w else None
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size].to(mm_dtype)                      # (n, C)
            logits = (hc @ w.t()).to(dtype)                                    # (n, V)
            loss, dlogits = chunk_loss(logits, start)
            total += loss
            if want_grad_h:
                grad_h[start:start + chunk_size] = dlogits.to(mm_dtype) @ w    # (n, C)
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


def fused_cross_entropy(hidden, weight, targets, chunk_size=CHUNK_ROWS):
    """masked_cross_entropy, fused: the same sum, a chunk of chunk_size rows at a time, the logits'
    gradient d loss / d z = softmax(z) - onehot(target) computed in the same pass."""
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


def fused_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, positions, temperature=1.0,
                            chunk_size=CHUNK_ROWS):
    """distillation_loss, fused: the same sum, a chunk of rows at a time, with the student logits'
    gradient d (T^2 KL) / d z_student = T (q - p) computed in the same pass."""
    check_distillation_shapes(hidden, weight, teacher_weight, positions)
    h = hidden[positions]                                                      # (N, C)
    th = teacher_hidden[positions].detach()                                    # (N, Ct)
    tw = at_least_fp32(teacher_weight.detach())

    def chunk_loss(logits, start):                                             # student logits (n, V)
        with torch.no_grad():
            teacher = th[start:start + logits.shape[0]].to(tw.dtype) @ tw.t()  # (n, V)
            log_p = torch.log_softmax(teacher / temperature, dim=-1)
        log_q = torch.log_softmax(logits / temperature, dim=-1)
        p = log_p.exp()
        loss = (p * (log_p - log_q)).sum() * temperature ** 2
        return loss, log_q.exp_().sub_(p).mul_(temperature)                    # T (q - p)

    return linear_loss(h, weight, chunk_size, chunk_loss)
