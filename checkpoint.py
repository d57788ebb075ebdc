"""What a run folder holds, and how it is written so that a kill at any moment loses nothing:

    ckpt/step_N/   trainable.safetensors, optimizer.safetensors, rng.safetensors, state.json
    ckpt/latest    the name of the newest complete step_N folder
    metrics.jsonl  one JSON record per logged step
    loss.svg       the training and validation loss curves
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from plot import write_svg_chart

# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a new folder, then published by an atomic rename of a pointer file


def save_checkpoint(ckpt_dir, trainable, opt_state, progress):
    """ckpt_dir/step_N/{trainable,optimizer}.safetensors + state.json, then ckpt_dir/latest -> step_N.

    A kill at any moment leaves `latest` naming a complete folder: the new folder is fully
    written (and fsynced) under a temporary name before it is renamed, and `latest` changes by
    os.replace, which is atomic. Older step folders are removed only after that.
    """
    name = f"step_{progress['step']:07d}"
    tmp = os.path.join(ckpt_dir, f".tmp_{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
              os.path.join(tmp, "trainable.safetensors"))
    moments = {f"{kind}.{i}": t.cpu() for kind in ("m", "v") for i, t in enumerate(opt_state[kind])}
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(progress, f, indent=2)
    for file in os.listdir(tmp):
        with open(os.path.join(tmp, file), "rb") as f:
            os.fsync(f.fileno())
    final = os.path.join(ckpt_dir, name)
    if os.path.exists(final):  # left by a run killed before it updated `latest`: stale
        shutil.rmtree(final)
    os.replace(tmp, final)
    with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
    for old in os.listdir(ckpt_dir):
        if old.startswith(("step_", ".tmp_")) and old != name:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def load_checkpoint(ckpt_dir):
    """-> (trainable tensors, optimizer moments, progress dict, rng tensors) of ckpt_dir/latest."""
    with open(os.path.join(ckpt_dir, "latest")) as f:
        folder = os.path.join(ckpt_dir, f.read().strip())
    with open(os.path.join(folder, "state.json")) as f:
        progress = json.load(f)
    moments = load_file(os.path.join(folder, "optimizer.safetensors"))
    n = len(moments) // 2
    opt_state = {kind: [moments[f"{kind}.{i}"] for i in range(n)] for kind in ("m", "v")}
    return (load_file(os.path.join(folder, "trainable.safetensors")), opt_state, progress,
            load_file(os.path.join(folder, "rng.safetensors")))



# ---------------------------------------------------------------------------------------------
# Metrics and the loss curve


def read_metrics(out_dir, up_to_step=None):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def write_metrics(out_dir, records, mode="w"):
    with open(os.path.join(out_dir, "metrics.jsonl"), mode) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_loss_curve(out_dir):
    records = read_metrics(out_dir)
    write_svg_chart(os.path.join(out_dir, "loss.svg"),
                    {"train": [(r["step"], r["train_loss"]) for r in records],
                     "val": [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]},
                    title=f"loss: {out_dir}", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
