"""FSDP2 under torchrun on CPU (gloo, 2 ranks) against one process with the same global batch: the
same loss curve, the same exports, exact resume from sharded checkpoints, half the state per rank."""
import json
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--config", "configs/tiny.py", "--dtype=float32", "--eval_every=0", "--save_every=100"]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks on two cores


def run_train(args, out_dir, ranks=1, check=True):
    launcher = TORCHRUN if ranks == 2 else (sys.executable,)
    extra = ["--parallel=fsdp", "--batch_size=1"] if ranks == 2 else ["--batch_size=2"]
    proc = subprocess.run([*launcher, "train.py", *TINY_ARGS, f"--out_dir={out_dir}", *extra, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def curve(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["train_loss"] for line in f]


def held_bytes(stdout):
    """The bytes of weights, gradients and optimizer state one rank holds, from train.py's log."""
    return int(re.search(r"held by (?:this process|each): .*; total ([\d,]+) bytes", stdout).group(1).replace(",", ""))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("method, steps, export", [("full", 10, "model/model.safetensors"),
                                                   ("lora", 4, "adapter/adapter_model.safetensors"),
                                                   ("qlora", 4, "merged/model.safetensors")])
def test_fsdp_on_two_ranks_gives_the_loss_curve_and_weights_of_one_process(tiny_model, tmp_path, method, steps,
                                                                          export):
    args = [f"--method={method}", f"--max_steps={steps}", "--grad_accum=2", "--merge=True"]
    one = run_train(args, str(tmp_path / "one"))
    two = run_train(args, str(tmp_path / "two"), ranks=2)
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == steps and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    # the export gathered on rank 0 holds the same weights (sums in another order: fp32 rounding)
    assert max_diff(load_file(tmp_path / "one" / export), load_file(tmp_path / "two" / export)) <= 1e-4
    # each rank holds half of the weights, gradients and AdamW moments (up to the pieces' rounding)
    ratio = held_bytes(two.stdout) / held_bytes(one.stdout)
    assert 0.45 <= ratio <= 0.55, ratio


def test_fsdp_resume_from_a_sharded_checkpoint_is_exact(tiny_model, tmp_path):
    # dropout draws each rank's own random numbers: every rank's generator is saved and restored
    common = ["--max_steps=6", "--grad_accum=2", "--lora_dropout=0.1", "--packing=packed", "--seq_len=96",
              "--save_every=2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_train(common, straight, ranks=2)
    run_train(common + ["--stop_after=3"], split, ranks=2)
    assert os.path.isfile(os.path.join(split, "ckpt", "step_0000003", "sharded", ".metadata"))
    assert set(load_file(os.path.join(split, "ckpt", "step_0000003", "rng.safetensors"))) == {"torch_rng",
                                                                                             "torch_rng.rank1"}
    # resumed without torchrun, the sharded checkpoint is refused in one line
    proc = run_train(common + ["--resume", "--batch_size=1"], split, check=False)
    assert proc.returncode == 2 and "written by FSDP" in proc.stderr and proc.stderr.strip().count("\n") == 0
    run_train(common + ["--resume"], split, ranks=2)
    assert curve(straight) == curve(split)
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(load_file(os.path.join(straight, adapter)), load_file(os.path.join(split, adapter))) == 0
