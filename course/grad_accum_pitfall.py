"""Gradient accumulation done right and done wrong, measured on the gradient (course lesson 6).

    python course/grad_accum_pitfall.py --config configs/course/baseline.py [--json_out FILE]

Eight validation examples make one optimizer step, and its gradient (of the LoRA weights) is
computed three ways:

  one batch       all eight in one forward/backward: loss = (sum of token losses) / (trained tokens)
  token-weighted  micro-batches of 1, 3 and 4 examples (gradient accumulation), each micro-batch's
                  SUM of token losses divided by the trained tokens of the WHOLE step: train.py's way
  mean of means   each micro-batch's MEAN token loss, averaged over the micro-batches: the way of
                  the transformers Trainer before its 2024 fix, and of many small training loops

The first two are the same gradient (up to float rounding). The third gives each token of the
1-example micro-batch the weight of four tokens of the 4-example one: another gradient, another
loss value, and the more the micro-batches differ in trained tokens, the further off.
LoRA's B matrices start at zero, so they are given small random values first (else the gradient
of A is zero and only B's would be compared).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import lora  # noqa: E402
from config import script, parse_cli  # noqa: E402
from eval import val_examples  # noqa: E402
from loss import masked_cross_entropy  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

MICRO_BATCHES = [[0], [1, 2, 3], [4, 5, 6, 7]]  # example indices: 1, 3 and 4 examples


def loss_sum(model, examples, rows, pad_id):
    """(sum of the token losses, trained tokens) of one collated micro-batch (one example per row)."""
    batch = data.collate(examples, [[i] for i in rows], max(len(examples[i]["input_ids"]) for i in rows), pad_id)
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"])             # (B, T, C)
    return masked_cross_entropy(hidden, model.lm_head.weight, batch["targets"]), batch["n_trained"]


def gradient(params):
    g = torch.cat([p.grad.reshape(-1).clone() for p in params])
    for p in params:
        p.grad = None
    return g


def compare(g, reference):
    return dict(relative_error=((g - reference).norm() / reference.norm()).item(),
                cosine=torch.nn.functional.cosine_similarity(g, reference, dim=0).item())


@script
def main(argv=None):
    cfg, flags = parse_cli(sys.argv[1:] if argv is None else argv, {"json_out": ""})
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    examples = val_examples(cfg, tokenizer, "val_data", 8)
    if len(examples) < 8:
        raise SystemExit(f"error: {cfg.val_data}: need 8 validation examples, found {len(examples)}")
    model = load_model(cfg.model, dtype=torch.float64)  # float64: rounding cannot hide a difference
    lora.prepare_model(model, "lora", lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.normal_(0, 1e-3)
    model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    pad = tokenizer.pad_id

    # 1. one batch of eight
    total, n_step = loss_sum(model, examples, sum(MICRO_BATCHES, []), pad)
    (total / n_step).backward()
    reference, loss_one_batch = gradient(params), (total / n_step).item()

    # 2. token-weighted accumulation (train.py): the divisor is the step's trained tokens
    counts = [data.count_trained(examples, [[i] for i in rows]) for rows in MICRO_BATCHES]
    loss_ours = 0.0
    for rows in MICRO_BATCHES:
        total, _ = loss_sum(model, examples, rows, pad)
        (total / sum(counts)).backward()
        loss_ours += (total / sum(counts)).item()
    ours = gradient(params)

    # 3. mean of per-micro-batch means
    loss_naive = 0.0
    for rows, n in zip(MICRO_BATCHES, counts):
        total, _ = loss_sum(model, examples, rows, pad)
        (total / n / len(MICRO_BATCHES)).backward()
        loss_naive += (total / n / len(MICRO_BATCHES)).item()
    naive = gradient(params)

    result = dict(model=cfg.model, micro_batch_examples=[len(r) for r in MICRO_BATCHES],
                  micro_batch_trained_tokens=counts,
                  one_batch=dict(loss=loss_one_batch, relative_error=0.0, cosine=1.0),
                  token_weighted=dict(loss=loss_ours, **compare(ours, reference)),
                  mean_of_means=dict(loss=loss_naive, **compare(naive, reference)))
    print(f"micro-batches of {result['micro_batch_examples']} examples, {counts} trained tokens")
    for key in ("one_batch", "token_weighted", "mean_of_means"):
        r = result[key]
        print(f"{key:>15}: loss {r['loss']:.6f}, gradient relative error {r['relative_error']:.2e}, "
              f"cosine {r['cosine']:.6f}")
    if flags["json_out"]:
        with open(flags["json_out"], "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
