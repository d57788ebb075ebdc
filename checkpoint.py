"""What a run folder holds, and how it is written so that a kill at any moment loses nothing:

    config.json    the settings the run started with (never rewritten; see config.MATH_KEYS)
    changes.jsonl  what a `--resume --allow_changes` changed, and at which step
    ckpt/step_N/   trainable.safetensors, optimizer.safetensors, rng.safetensors, state.json
    ckpt/latest    the name of the newest complete step_N folder; the one before it is kept too
    metrics.jsonl  one JSON record per logged step
    loss.svg       the training and validation loss curves
    best/, adapter/, model/, merged/   exports, each written whole under a temporary name, then renamed
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from config import KEYS, MATH_KEYS, ConfigError, UserError, config_differences, describe_os_error, naming
from plot import write_svg_chart

# ---------------------------------------------------------------------------------------------
# Writing files and folders whole: a temporary name, then an atomic rename


def write_atomic(path, text):
    """Write text to path through path.tmp and os.replace: a kill leaves the old file or the new one."""
    with naming(path), open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


@contextlib.contextmanager
def atomic_folder(folder):
    """Yield a temporary folder next to `folder` to write into; when the block ends, its files are
    fsynced and it is renamed to `folder` (an older one moved aside first, then removed). A kill at
    any moment leaves `folder` absent, old or new, never with a truncated file under its name. A full
    disk or any other OSError is one line naming `folder`, and the temporary folder is removed."""
    parent, name = os.path.split(os.path.abspath(folder))
    tmp, old = os.path.join(parent, f".tmp_{name}"), os.path.join(parent, f".old_{name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        yield tmp
        for where, _, files in os.walk(tmp):
            for file in files:
                with open(os.path.join(where, file), "rb") as f:
                    os.fsync(f.fileno())
    except BaseException as e:  # Ctrl-C included: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            reason = describe_os_error(e) if isinstance(e, OSError) else str(e)
            raise UserError(f"{folder}: could not be written ({reason})") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The run's settings: config.json (how it started) and changes.jsonl (what a resume changed)


def save_config(cfg, path):
    write_atomic(path, json.dumps(dataclasses.asdict(cfg), indent=2))


def check_resume(cfg, allow_changes):
    """The settings of a resumed run against its config.json (how it started): a difference in what
    the weights mean (config.MATH_KEYS) is a ConfigError naming each one, unless allow_changes.
    dtype auto takes the run's. Returns every difference, for changes.jsonl (record_changes)."""
    path = os.path.join(cfg.out_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        reason = (f"--resume: {path} cannot be read ({getattr(e, 'strerror', None) or e}), "
                  f"so the settings cannot be checked")
        if not allow_changes:
            raise ConfigError(f"{reason}; add --allow_changes to continue anyway") from None
        print(f"warning: {reason}; going on (--allow_changes)", file=sys.stderr)
        return {}
    if cfg.dtype == "auto":
        cfg.dtype = saved.get("dtype", "auto")
    changes = config_differences(saved, cfg, [key for key in KEYS if key != "out_dir"])
    math_changes = [f"{key} {json.dumps(a)} -> {json.dumps(b)}" for key, (a, b) in changes.items()
                    if key in MATH_KEYS]
    if math_changes and not allow_changes:
        raise ConfigError(f"--resume: {', '.join(math_changes)} differ{'s' * (len(math_changes) == 1)} from {path}; "
                          f"add --allow_changes to continue anyway")
    return changes


def record_changes(out_dir, step, changes):
    """Append what a resumed run changed ({key: (before, now)}) to out_dir/changes.jsonl."""
    path = os.path.join(out_dir, "changes.jsonl")
    with naming(path), open(path, "a") as f:
        f.write(json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}}) + "\n")


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a new folder, then published by an atomic rename of a pointer file


def step_folder(step):
    return f"step_{step:07d}"


def rng_state():
    """The random number generators' states (dropout draws from them)."""
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(ckpt_dir, trainable, opt_state, progress, keep=None, shards=None, rngs=None):
    """ckpt_dir/step_N/{trainable,optimizer,rng}.safetensors + state.json, then ckpt_dir/latest -> step_N.
    With FSDP, `shards` is the folder the ranks wrote their pieces of the weights and moments into
    (parallel.save_sharded); it becomes step_N/sharded/ instead of the two safetensors files.
    rngs: every rank's rng_state() under torchrun (each draws its own dropout masks): rank r's
    as "torch_rng.rank{r}", rank 0's under the plain names.

    A kill at any moment leaves `latest` naming a complete folder: the new folder is fully written
    (and fsynced) under a temporary name before it is renamed, and `latest` changes by os.replace,
    which is atomic. Then every other step folder is removed but `keep` (the checkpoint before this
    one: if this one is damaged later, a resume falls back to it). Returns the new folder's name.
    """
    name = step_folder(progress["step"])
    with atomic_folder(os.path.join(ckpt_dir, name)) as tmp:
        if shards:
            os.replace(shards, os.path.join(tmp, "sharded"))
        else:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                      os.path.join(tmp, "trainable.safetensors"))
            moments = {f"{kind}.{i}": t.cpu() for kind in ("m", "v") for i, t in enumerate(opt_state[kind])}
            save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
        rngs = rngs or [rng_state()]
        rng = {**rngs[0], **{f"{k}.rank{r}": t for r, other in enumerate(rngs[1:], 1) for k, t in other.items()}}
        save_file(rng, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(progress, f, indent=2)
    write_atomic(os.path.join(ckpt_dir, "latest"), name)
    for old in os.listdir(ckpt_dir):
        if old.startswith(("step_", ".tmp_", ".old_")) and old not in (name, keep):
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    return name


class DamagedCheckpoint(Exception):
    """A checkpoint file that is missing or cannot be read; the message names it."""


def read_checkpoint(folder):
    """(trainable tensors, optimizer moments, progress dict, rng tensors) of one step folder, or
    DamagedCheckpoint naming the first file that is missing, truncated or not what it should be.
    A sharded checkpoint (FSDP) gives the path of its sharded/ folder for the first, None for the second."""
    def tensors(name):
        path = os.path.join(folder, name)
        try:
            return load_file(path)
        except OSError as e:
            raise DamagedCheckpoint(f"{path}: {e.strerror}") from None
        except SafetensorError as e:  # "incomplete metadata, file not fully covered": truncated
            raise DamagedCheckpoint(f"{path}: not a whole safetensors file ({e})") from None
    path = os.path.join(folder, "state.json")
    try:
        with open(path) as f:
            progress = json.load(f)
    except OSError as e:
        raise DamagedCheckpoint(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise DamagedCheckpoint(f"{path}: not valid JSON ({e})") from None
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        raise DamagedCheckpoint(f"{path}: no step number in it")
    rng = tensors("rng.safetensors")
    if "torch_rng" not in rng:
        raise DamagedCheckpoint(f"{os.path.join(folder, 'rng.safetensors')}: no torch_rng in it")
    sharded = os.path.join(folder, "sharded")
    if os.path.isdir(sharded):  # read by each rank in place (parallel.load_sharded)
        if not os.path.isfile(os.path.join(sharded, ".metadata")):
            raise DamagedCheckpoint(f"{sharded}: no .metadata in it")
        return sharded, None, progress, rng
    trainable, moments = tensors("trainable.safetensors"), tensors("optimizer.safetensors")
    n = len(moments) // 2
    if set(moments) != {f"{kind}.{i}" for kind in ("m", "v") for i in range(n)} or n != len(trainable):
        raise DamagedCheckpoint(f"{os.path.join(folder, 'optimizer.safetensors')}: {len(moments)} moments "
                                f"for {len(trainable)} trainable tensors")
    opt_state = {kind: [moments[f"{kind}.{i}"] for i in range(n)] for kind in ("m", "v")}
    return trainable, opt_state, progress, rng


def load_checkpoint(ckpt_dir, log=print):
    """read_checkpoint() of the folder ckpt_dir/latest names. When that one is damaged (any file, or
    `latest` itself), of the newest complete one (the one before it), said in one line; when none is
    complete, a UserError naming the damaged file."""
    def step_of(name):
        return int(name[len("step_"):]) if re.fullmatch(r"step_\d+", name) else -1
    names = sorted((n for n in os.listdir(ckpt_dir) if step_of(n) >= 0), key=step_of, reverse=True)
    latest, problems = os.path.join(ckpt_dir, "latest"), []
    try:
        with open(latest) as f:
            name = f.read().strip()
        if name in names:
            names.insert(0, names.pop(names.index(name)))  # the newest complete one: try it first
        else:
            problems.append(f"{latest}: names {name!r}, which is no step folder of {ckpt_dir}")
    except OSError as e:
        problems.append(f"{latest}: {e.strerror}")
    for name in names:
        try:
            loaded = read_checkpoint(os.path.join(ckpt_dir, name))
        except DamagedCheckpoint as e:
            problems.append(str(e))
            continue
        if problems:
            log(f"warning: damaged checkpoint: {problems[0]}; resuming from the newest complete one, "
                f"{os.path.join(ckpt_dir, name)}", file=sys.stderr)
        return loaded
    raise UserError(f"--resume: no complete checkpoint in {ckpt_dir}" + (f": {problems[0]}" if problems else ""))


# ---------------------------------------------------------------------------------------------
# Metrics and the loss curve


def read_metrics(out_dir, up_to_step=None, log=print):
    """The records of out_dir/metrics.jsonl. A line that is not a whole record (a kill or a full disk
    during an append leaves half a line) is dropped with a warning; the next rewrite removes it."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                log(f"warning: {path}:{number}: not a whole record (an interrupted write?); dropped", file=sys.stderr)
                continue
            records.append(record)
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def write_metrics(out_dir, records, mode="w"):
    """Append records (mode "a"), or write the whole file anew (mode "w", atomically)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    path = os.path.join(out_dir, "metrics.jsonl")
    if mode == "w":
        write_atomic(path, text)
    else:
        with naming(path), open(path, mode) as f:
            f.write(text)


def write_loss_curve(out_dir):
    records = read_metrics(out_dir)
    write_svg_chart(os.path.join(out_dir, "loss.svg"),
                    {"train": [(r["step"], r["train_loss"]) for r in records],
                     "val": [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]},
                    title=f"loss: {out_dir}", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
