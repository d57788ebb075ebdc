"""Packing, measured: the padding it saves, and what a plain causal mask leaks (course lesson 7).

    python course/packing_contamination.py --config configs/course/baseline.py [--examples 24] [--json_out FILE]

1. Contamination. The first N validation examples are packed into rows of seq_len tokens (as
   data.plan_batches packs training data), and the loss of every example (the mean over its trained
   tokens) is computed four ways:
     alone                         the example in a row by itself: the reference
     block mask                    packed; block-diagonal causal mask, positions restarting at every
                                   example (data.collate): what train.py does
     causal mask                   packed; plain causal mask, positions restarting: each example also
                                   attends to the examples before it in its row
     causal mask, running positions  packed the naive way (concatenate and cut): as above, and the
                                   positions run on across examples
   Only an example that is not first in its row can be contaminated; the table counts how many
   changed their loss by more than 0.001 nats.
2. Padding. The share of padding tokens in the training set's batches (batch_size rows): one example
   per row in random order, one per row grouped by length (train.py's packing = "none"), and packed.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from config import script, parse_cli  # noqa: E402
from eval import val_examples  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

IGNORE = data.IGNORE


@torch.no_grad()
def token_losses(model, batch, attn_mask, position_ids):
    """Per-position cross-entropy (B, T), 0 where the target is -100."""
    logits = model(batch["input_ids"], position_ids=position_ids, attn_mask=attn_mask).float()   # (B, T, V)
    targets = batch["targets"]
    losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")   # (B, T)
    return losses * (targets != IGNORE)


def per_example_losses(model, examples, row, seq_len, pad_id, variant):
    """[mean trained-token loss of each example of a packed row] under one attention variant."""
    batch = data.collate(examples, [row], seq_len, pad_id)
    T = batch["input_ids"].shape[1]
    if variant == "block mask":
        mask, positions = batch["attn_mask"], batch["position_ids"]
    elif variant == "causal mask":
        mask, positions = None, batch["position_ids"]
    else:  # "causal mask, running positions"
        mask, positions = None, torch.arange(T)[None]
    losses = token_losses(model, batch, mask, positions)[0]
    trained = (batch["targets"][0] != IGNORE)
    out, start = [], 0
    for i in row:
        n = len(examples[i]["input_ids"])
        out.append((losses[start:start + n].sum() / trained[start:start + n].sum()).item())
        start += n
    return out


def padding_share(lengths, batches):
    """Padding tokens / all tokens, for batches of rows (each row a list of example lengths)."""
    pad = real = 0
    for rows in batches:
        row_lengths = [sum(lengths[i] for i in row) for row in rows]
        pad += len(rows) * max(row_lengths) - sum(row_lengths)
        real += sum(row_lengths)
    return pad / (pad + real)


@script
def main(argv=None):
    cfg, flags = parse_cli(sys.argv[1:] if argv is None else argv, {"examples": 24, "json_out": ""})
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=torch.float32).eval()
    examples = val_examples(cfg, tokenizer, "val_data", flags["examples"])
    rows = [row for batch in data.plan_batches(examples, 1, cfg.seq_len, "packed", cfg.seed, 0) for row in batch]

    variants = ["block mask", "causal mask", "causal mask, running positions"]
    alone = {i: per_example_losses(model, examples, [i], cfg.seq_len, tokenizer.pad_id, "block mask")[0]
             for row in rows for i in row}
    not_first = [i for row in rows for i in row[1:]]
    contamination = {}
    for variant in variants:
        packed = {}
        for row in rows:
            packed.update(zip(row, per_example_losses(model, examples, row, cfg.seq_len, tokenizer.pad_id, variant)))
        diffs = np.array([packed[i] - alone[i] for i in alone])
        contamination[variant] = dict(
            mean_loss=float(np.mean(list(packed.values()))), max_abs_change=float(np.abs(diffs).max()),
            changed=int((np.abs(diffs) > 1e-3).sum()),
            mean_change_not_first=float(np.mean([packed[i] - alone[i] for i in not_first])) if not_first else 0.0)

    train, _, _ = data.load_datasets(cfg, tokenizer, log=lambda line: None)
    lengths = [len(ex["input_ids"]) for ex in train]
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    random_batches = [[[int(i)] for i in order[s:s + cfg.batch_size]] for s in range(0, len(order), cfg.batch_size)]
    padding = {"one per row, random order": padding_share(lengths, random_batches)}
    rows_per_epoch = {"one per row, random order": len(train)}
    for packing, label in (("none", "one per row, grouped by length"), ("packed", "packed")):
        plan = data.plan_batches(train, cfg.batch_size, cfg.seq_len, packing, cfg.seed, 0)
        padding[label] = padding_share(lengths, plan)
        rows_per_epoch[label] = sum(len(b) for b in plan)

    result = dict(model=cfg.model, examples=len(examples), rows=len(rows), seq_len=cfg.seq_len,
                  examples_not_first=len(not_first), alone_mean_loss=float(np.mean(list(alone.values()))),
                  contamination=contamination, padding=padding, rows_per_epoch=rows_per_epoch, train_examples=len(train),
                  batch_size=cfg.batch_size)
    print(f"{len(examples)} examples packed into {len(rows)} rows of <= {cfg.seq_len} tokens "
          f"({len(not_first)} not first in their row); alone: mean loss {result['alone_mean_loss']:.4f}")
    for variant, r in contamination.items():
        print(f"  {variant:<32} mean loss {r['mean_loss']:.4f}, max |change| {r['max_abs_change']:.4f}, "
              f"changed > 0.001: {r['changed']}")
    for label, share in padding.items():
        print(f"  {label}: {rows_per_epoch[label]} rows of {cfg.batch_size}-row batches an epoch, {share:.1%} padding")
    if flags["json_out"]:
        with open(flags["json_out"], "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
