"""loss.py: the plain losses and their fused twins equal an independent full-logits computation
(values and gradients), normalize per token over the whole optimizer step, never let a masked position
or an empty micro-batch leak in; the fused twins use less memory than materializing the logits."""
import contextlib
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import loss
import model as model_lib
from config import Config
from conftest import ROOT, save_tiny_model


def random_problem(B=3, T=9, C=16, V=50, dtype=torch.float64, seed=0):
    """hidden (B, T, C), weight (V, C), both requiring grad, and targets with a masked prompt per
    row and one row fully masked."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(V, C, dtype=dtype, generator=g).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, :3] = -100
    targets[-1] = -100
    return hidden, weight, targets


def full_logits_loss(hidden, weight, targets):
    """The plain way: every logit in memory, PyTorch's cross-entropy with ignore_index."""
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                           ignore_index=-100)


def grads(loss_value, *tensors):
    return torch.autograd.grad(loss_value, tensors)


# The plain loss and its fused twin (4 rows a chunk, so that the problems below take several chunks)
CROSS_ENTROPY = {"plain": loss.masked_cross_entropy,
                 "fused": functools.partial(loss.fused_cross_entropy, chunk_size=4)}
DISTILLATION = {"plain": loss.distillation_loss,
                "fused": functools.partial(loss.fused_distillation_loss, chunk_size=4)}
both = pytest.mark.parametrize("kind", ["plain", "fused"])


@both
def test_loss_and_gradients_equal_full_logits_cross_entropy(kind):
    hidden, weight, targets = random_problem()
    ours = CROSS_ENTROPY[kind](hidden, weight, targets)
    reference = full_logits_loss(hidden, weight, targets)
    assert torch.allclose(ours, reference, rtol=1e-12)
    for g_ours, g_ref in zip(grads(ours, hidden, weight), grads(reference, hidden, weight)):
        assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_fused_loss_is_the_same_for_any_chunk_size(chunk_size):
    hidden, weight, targets = random_problem()
    ours = loss.fused_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    reference = full_logits_loss(hidden, weight, targets)
    assert torch.allclose(ours, reference, rtol=1e-12)
    for g_ours, g_ref in zip(grads(ours, hidden, weight), grads(reference, hidden, weight)):
        assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@both
def test_loss_is_a_sum_over_trained_tokens_not_a_mean(kind):
    hidden, weight, targets = random_problem()
    per_token = F.cross_entropy((hidden @ weight.t()).reshape(-1, 50), targets.reshape(-1),
                                reduction="none", ignore_index=-100)
    assert torch.allclose(CROSS_ENTROPY[kind](hidden, weight, targets), per_token.sum())


@both
def test_masked_positions_never_contribute_to_loss_or_gradient(kind):
    hidden, weight, targets = random_problem()
    base = CROSS_ENTROPY[kind](hidden, weight, targets)
    g_hidden, = grads(base, hidden)
    masked = targets == -100
    assert masked.any() and (g_hidden[masked] == 0).all()
    changed = hidden.detach().clone()
    changed[masked] = 1e3 * torch.randn_like(changed[masked])  # garbage where nothing is trained
    assert CROSS_ENTROPY[kind](changed, weight, targets).item() == pytest.approx(base.item(), rel=1e-12)


@both
def test_all_masked_micro_batch_gives_zero_loss_and_zero_gradient_not_nan(kind):
    hidden, weight, _ = random_problem()
    targets = torch.full(hidden.shape[:2], -100)
    value = CROSS_ENTROPY[kind](hidden, weight, targets)
    g_hidden, g_weight = grads(value / 7, hidden, weight)  # divided by the step's count, as train.py does
    assert value.item() == 0.0 and torch.isfinite(value)
    assert (g_hidden == 0).all() and (g_weight == 0).all()


@both
def test_frozen_output_weight_gets_no_gradient_and_hidden_gradient_is_unchanged(kind):
    hidden, weight, targets = random_problem()
    frozen = weight.detach()
    value = CROSS_ENTROPY[kind](hidden, frozen, targets)
    value.backward()
    assert frozen.grad is None
    g_ref, = grads(full_logits_loss(hidden, weight, targets), hidden)
    assert torch.allclose(hidden.grad, g_ref, rtol=1e-10, atol=1e-12)


@both
def test_bf16_hidden_states_give_logits_from_bf16_values_and_an_fp32_loss(kind):
    """Under autocast the logits are products of bf16 values, as the lm_head computes them there
    (a bf16 matmul: fp32 sums, rounded to bf16); softmax and the loss are fp32."""
    hidden, weight, targets = random_problem(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16 = hidden.to(torch.bfloat16)
        value = CROSS_ENTROPY[kind](h16, weight, targets)
    assert value.dtype == torch.float32
    w16 = weight.to(torch.bfloat16)
    logits = (h16 @ w16.t()).float()
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                reduction="sum", ignore_index=-100)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    assert value.item() == pytest.approx(full_logits_loss(hidden, weight, targets).item(), rel=1e-2)
    g_h16, = grads(value, h16)
    assert g_h16.dtype == torch.bfloat16


@both
def test_target_outside_the_vocabulary_is_a_clear_error(kind):
    hidden, weight, targets = random_problem()
    targets[0, 5] = 50
    with pytest.raises(ValueError, match="token id 50, outside the vocabulary"):
        CROSS_ENTROPY[kind](hidden, weight, targets)


@both
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_kl_equals_full_logits_kl_at_the_chosen_positions(kind, temperature):
    hidden, weight, targets = random_problem()
    teacher_hidden, teacher_weight = torch.randn(3, 9, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    m = targets == -100  # the prompt positions, as train.py's distill_on = "prompt"
    ours = DISTILLATION[kind](hidden, weight, teacher_hidden, teacher_weight, m, temperature=temperature)
    log_q = F.log_softmax((hidden @ weight.t())[m] / temperature, -1)
    log_p = F.log_softmax((teacher_hidden @ teacher_weight.t())[m] / temperature, -1)
    reference = F.kl_div(log_q, log_p, log_target=True, reduction="sum") * temperature ** 2
    assert torch.allclose(ours, reference, rtol=1e-12)
    for g_ours, g_ref in zip(grads(ours, hidden, weight), grads(reference, hidden, weight)):
        assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@both
def test_distillation_to_itself_is_zero(kind):
    hidden, weight, targets = random_problem()
    value = DISTILLATION[kind](hidden, weight, hidden.detach(), weight.detach(), targets != -100)
    assert abs(value.item()) < 1e-10


# ---------------------------------------------------------------------------------------------------
# With a model: gradient accumulation, validation loss


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny") / "llama")
    save_tiny_model(folder)
    return model_lib.load_model(folder, dtype=torch.float64)


def random_examples(lengths, vocab=128, seed=0):
    """Examples as data.render makes them: labels aligned with the ids, -100 on a random prompt."""
    rng = np.random.default_rng(seed)
    examples = []
    for n in lengths:
        ids = rng.integers(0, vocab, n).astype(np.int32)
        labels = ids.copy()
        labels[:rng.integers(1, n - 1)] = -100
        examples.append({"input_ids": ids, "labels": labels, "source": f"random:{len(examples)}"})
    return examples


def step_gradients(model, examples, micro_batches, normalize="step"):
    """Loss and gradients of one optimizer step over `micro_batches` (lists of example indices).
    normalize="step": each micro-batch's sum / the step's trained tokens (ours); "micro": each
    micro-batch's own mean, averaged over micro-batches (the bug)."""
    model.zero_grad()
    batches = [data.collate(examples, [[i] for i in mb], 64, pad_id=0) for mb in micro_batches]
    n_step = sum(b["n_trained"] for b in batches)
    total = 0.0
    for b in batches:
        hidden = model.hidden_states(b["input_ids"], b["position_ids"], b["attn_mask"])
        value = loss.masked_cross_entropy(hidden, model.lm_head.weight, b["targets"])
        value = value / n_step if normalize == "step" else value / b["n_trained"] / len(batches)
        value.backward()
        total += value.item()
    return total, torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_accumulation_equals_one_big_batch(tiny_model):
    examples = random_examples([5, 17, 9, 30, 12, 6, 24, 19])
    loss_big, grad_big = step_gradients(tiny_model, examples, [list(range(8))])
    loss_acc, grad_acc = step_gradients(tiny_model, examples, [[0, 1], [2, 3], [4, 5], [6, 7]])
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    assert (grad_acc - grad_big).norm() <= 1e-6 * grad_big.norm()
    # the per-micro-batch mean (the 2024 gradient-accumulation bug) would not pass this test:
    loss_bug, grad_bug = step_gradients(tiny_model, examples, [[0, 1], [2, 3], [4, 5], [6, 7]], "micro")
    assert (grad_bug - grad_big).norm() > 1e-3 * grad_big.norm()


def test_micro_batch_without_trained_tokens_leaves_gradients_finite_and_unchanged(tiny_model):
    examples = random_examples([8, 11, 7])
    examples[2]["labels"][:] = -100  # nothing to train in the last micro-batch
    _, without = step_gradients(tiny_model, examples, [[0, 1]])
    _, with_empty = step_gradients(tiny_model, examples, [[0, 1], [2]])
    assert torch.isfinite(with_empty).all()
    assert torch.allclose(with_empty, without, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kernels", ["plain", "fast"])
def test_validation_loss_is_token_weighted_not_a_mean_of_batch_means(tiny_model, kernels):
    import train
    from types import SimpleNamespace
    examples = random_examples([40, 6, 7])
    batches = [data.collate(examples, [[0]], 64, 0), data.collate(examples, [[1], [2]], 64, 0)]
    run = SimpleNamespace(model=tiny_model, val_batches=batches, rank=0, world=1, device=torch.device("cpu"),
                          autocast=contextlib.nullcontext(), cfg=Config(kernels=kernels), teacher=None)
    mean, count = train.validate(run), sum(b["n_trained"] for b in batches)
    per_batch = []
    with torch.no_grad():
        for b in batches:
            logits = tiny_model(b["input_ids"], b["position_ids"], b["attn_mask"])
            per_batch.append(F.cross_entropy(logits.reshape(-1, 128), b["targets"].reshape(-1), reduction="none",
                                             ignore_index=-100).sum().item())
    assert count == sum(b["n_trained"] for b in batches)
    assert mean == pytest.approx(sum(per_batch) / count, rel=1e-10)
    mean_of_means = np.mean([s / b["n_trained"] for s, b in zip(per_batch, batches)])
    assert abs(mean - mean_of_means) > 1e-3


# ---------------------------------------------------------------------------------------------------
# Memory: the fused loss never holds the (N, V) logits


MEMORY_SCRIPT = r"""
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import loss

def status(key):  # from /proc/self/status, in bytes: VmRSS = resident now, VmHWM = peak resident
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

def peak_added(run):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak (VmHWM) to the current resident size
    before = status("VmRSS")
    run()
    return status("VmHWM") - before

N, C, V = 2048, 64, 32768            # full fp32 logits: N * V * 4 bytes = 256 MiB
torch.manual_seed(0)
hidden = torch.randn(1, N, C, requires_grad=True)
weight = torch.randn(V, C, requires_grad=True)
targets = torch.randint(0, V, (1, N))
chunked = peak_added(lambda: loss.fused_cross_entropy(hidden, weight, targets, chunk_size=256).backward())
full = peak_added(lambda: F.cross_entropy(hidden[0] @ weight.t(), targets[0], reduction="sum").backward())
print(json.dumps({"chunked": chunked, "full": full, "logits": N * V * 4}))
"""


def test_fused_loss_peak_memory_is_lower_than_full_logits():
    """Peak resident memory added by forward + backward (Linux VmHWM, reset between the two runs),
    measured in a fresh process; large allocations are mmapped (MALLOC_MMAP_THRESHOLD_) so that freed
    memory leaves the resident set. Prints both numbers (run pytest with -s to see them)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, ROOT], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    mib = {k: v / 2 ** 20 for k, v in result.items()}
    print(f"\npeak memory over the inputs, N=2048 trained tokens, V=32768: chunked (chunk 256) "
          f"{mib['chunked']:.0f} MiB, full logits {mib['full']:.0f} MiB (one fp32 logits tensor: "
          f"{mib['logits']:.0f} MiB)")
    assert result["full"] >= result["logits"]  # the plain way holds at least the logits
    assert result["chunked"] < result["full"] / 4


# ---------------------------------------------------------------------------------------------------
# Preference losses: DPO and ORPO against an independent fp64 computation from the full logits


def preference_inputs(P=3, T=9, C=16, V=50, seed=0):
    """hidden (2P, T, C), weight (V, C), targets (2P, T): P chosen rows then P rejected rows, each with
    a prompt (not trained), an answer (trained) and padding (not trained)."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(2 * P, T, C, generator=g), torch.randn(V, C, generator=g) * 0.3
    targets = torch.randint(0, V, (2 * P, T), generator=g)
    for b in range(2 * P):
        start, end = 2 + b % 3, T - b % 2
        targets[b, :start], targets[b, end:] = -100, -100
    return hidden, weight, targets


def fp64_logps(hidden, weight, targets):
    """Sum of log p(target) per row, and the count, from the full (B, T, V) logits in fp64, one by one."""
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    sums, counts = [], []
    for b in range(targets.shape[0]):
        picked = [logp[b, t, targets[b, t]] for t in range(targets.shape[1]) if targets[b, t] != -100]
        sums.append(torch.stack(picked).sum())
        counts.append(len(picked))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)


def fp64_dpo(hidden, weight, ref_hidden, targets, beta):
    pi, _ = fp64_logps(hidden, weight, targets)
    ref, _ = fp64_logps(ref_hidden, weight, targets)
    P = len(pi) // 2
    margin = beta * ((pi[:P] - ref[:P]) - (pi[P:] - ref[P:]))
    return torch.log1p(torch.exp(-margin))                      # -log σ(x) = log(1 + e^-x)


def fp64_orpo(hidden, weight, targets):
    logps, n = fp64_logps(hidden, weight, targets)
    P = len(logps) // 2
    m = logps / n                                                # mean token log-prob = log P(y)
    log_odds = m - torch.log(1 - torch.exp(m))                   # log(P / (1 - P))
    return torch.log1p(torch.exp(-(log_odds[:P] - log_odds[P:])))


def test_dpo_and_orpo_losses_equal_an_fp64_computation_from_full_logits():
    hidden, weight, targets = preference_inputs()
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    logps, n = loss.sequence_logps(hidden, weight, targets)
    ref, _ = loss.sequence_logps(ref_hidden, weight, targets)
    expected, counts = fp64_logps(hidden, weight, targets)
    assert torch.allclose(logps.double(), expected, atol=1e-5, rtol=0) and torch.equal(n.double(), counts)
    P = len(logps) // 2
    dpo = loss.dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], beta=0.1)[0]
    assert (dpo.double() - fp64_dpo(hidden, weight, ref_hidden, targets, 0.1)).abs().max() <= 1e-6
    orpo = loss.orpo_loss(logps[:P], logps[P:], n[:P], n[P:])[0]
    assert (orpo.double() - fp64_orpo(hidden, weight, targets)).abs().max() <= 1e-6


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logps = torch.tensor([-12.5, -3.0, -40.0])
    losses, chosen, rejected = loss.dpo_loss(logps, logps - 2.0, logps, logps - 2.0, beta=0.5)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)), atol=1e-7)
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_gradient_equals_autograd_of_the_fp64_formula(objective):
    hidden, weight, targets = preference_inputs(seed=2)
    ref_hidden = hidden + 0.2
    ours = hidden.clone().requires_grad_(True)
    logps, n = loss.sequence_logps(ours, weight, targets)
    P = len(logps) // 2
    if objective == "dpo":
        ref = loss.sequence_logps(ref_hidden, weight, targets)[0]
        loss.dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], 0.1)[0].sum().backward()
    else:
        loss.orpo_loss(logps[:P], logps[P:], n[:P], n[P:])[0].sum().backward()
    reference = hidden.double().requires_grad_(True)
    (fp64_dpo(reference, weight, ref_hidden, targets, 0.1) if objective == "dpo"
     else fp64_orpo(reference, weight, targets)).sum().backward()
    assert torch.allclose(ours.grad.double(), reference.grad, rtol=1e-4, atol=1e-7)
