"""train.py end to end on the tiny model: exact resume, DDP, interruptions, config errors."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import RESUMED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--config", "configs/tiny.py", "--dtype=float32", "--eval_every=0", "--save_every=100"]


def run_train(args, out_dir, check=True, launcher=(sys.executable,)):
    proc = subprocess.run([*launcher, "train.py", *TINY_ARGS, f"--out_dir={out_dir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_python(code, args, out_dir):
    """train.main(args) in a new process, after `code` (which patches something to fail on purpose)."""
    program = f"import sys\nsys.path.insert(0, {ROOT!r})\n{code}\nimport train\nsys.exit(train.main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", program, ], cwd=ROOT, capture_output=True, text=True, timeout=600)


def final_weights(out_dir):
    with open(os.path.join(out_dir, "ckpt", "latest")) as f:
        return load_file(os.path.join(out_dir, "ckpt", f.read().strip(), "trainable.safetensors"))


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_model, tmp_path):
    # dropout draws random numbers and 8 steps cross epoch boundaries: RNG and data position
    # must both be restored for the weights to come out identical
    common = ["--max_steps=8", "--lora_dropout=0.1", "--packing=packed", "--seq_len=96"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_train(common, straight)
    run_train(common + ["--stop_after=4"], split)
    assert json.load(open(os.path.join(split, "ckpt", "step_0000004", "state.json")))["step"] == 4
    assert not os.path.exists(os.path.join(split, "adapter"))  # not finished yet
    forgetful = shutil.copytree(split, str(tmp_path / "forgetful"))
    run_train(common + ["--resume"], split)
    a, b = final_weights(straight), final_weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= RESUMED, k
    assert [m["train_loss"] for m in metrics(straight)] == pytest.approx(
        [m["train_loss"] for m in metrics(split)], abs=RESUMED)
    # the bound tells a resume that forgets one piece of state: here the random state
    proc = run_python("import torch\ntorch.set_rng_state = lambda state: None",
                      [*TINY_ARGS, f"--out_dir={forgetful}", *common, "--resume"], forgetful)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = final_weights(forgetful)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 10 * RESUMED


def test_two_process_ddp_gives_the_loss_curve_of_one_process_with_twice_the_batch(tiny_model, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--max_steps=4", "--grad_accum=2"]
    run_train(common + ["--batch_size=2"], one)
    run_train(common + ["--batch_size=1"], two, launcher=(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"))
    curve_one = [m["train_loss"] for m in metrics(one)]
    curve_two = [m["train_loss"] for m in metrics(two)]
    assert len(curve_one) == 4 and curve_two == pytest.approx(curve_one, abs=1e-5)
    a, b = final_weights(one), final_weights(two)
    assert all((a[k] - b[k]).abs().max().item() <= 1e-5 for k in a)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    out = str(tmp_path / "nan")
    # AdamW moves each weight by about lr per step: at lr 1e38 fp32 overflows within a few steps
    proc = run_train(["--max_steps=30", "--lr=1e38", "--warmup_steps=0", "--grad_clip=0",
                      "--save_every=1"], out, check=False)
    assert proc.returncode == 1
    assert "loss is nan" in proc.stdout or "loss is inf" in proc.stdout or "gradient norm nan" in proc.stdout
    weights = final_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not os.path.exists(os.path.join(out, "adapter"))  # no final export of a broken run


def test_ctrl_c_saves_a_checkpoint_and_exits_with_130(tiny_model, tmp_path):
    out = str(tmp_path / "interrupted")
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_ARGS, f"--out_dir={out}",
                             "--max_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (os.path.exists(os.path.join(out, "metrics.jsonl")) and metrics(out)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; continue with --resume" in stdout
    step = json.load(open(os.path.join(out, "ckpt", open(os.path.join(out, "ckpt", "latest")).read(),
                                       "state.json")))["step"]
    assert step == metrics(out)[-1]["step"] >= 1


@pytest.mark.parametrize("args, message", [
    (["--lerning_rate=1e-4"], "unknown config key 'lerning_rate'"),
    (["--lr=fast"], "lr = 'fast' should be float"),
    (["--train_data=data/nope.jsonl"], "data/nope.jsonl: file not found"),
    (["--method=prompt_tuning"], "method"),
])
def test_config_errors_are_one_line_exit_2_and_write_nothing(tiny_model, tmp_path, args, message):
    out = str(tmp_path / "never")
    proc = run_train(args, out, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not os.path.exists(out)


def test_unknown_key_error_suggests_the_closest_key(tiny_model, tmp_path):
    proc = run_train(["--lora_rnk=8"], str(tmp_path / "never"), check=False)
    assert "did you mean 'lora_rank'" in proc.stderr


def test_run_folder_has_config_metrics_curve_checkpoint_and_adapter(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    run_train(["--max_steps=3", "--eval_every=2"], out)
    assert json.load(open(os.path.join(out, "config.json")))["max_steps"] == 3
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes"} <= lines[0].keys()
    assert "val_loss" in lines[1] and "val_loss" in lines[2]
    assert open(os.path.join(out, "loss.svg")).read().startswith("<svg")
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "best", "adapter_config.json"))


def test_a_second_run_into_a_folder_with_a_checkpoint_is_refused(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    run_train(["--max_steps=1"], out)
    proc = run_train(["--max_steps=1"], out, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_demo_config_runs_end_to_end_on_the_real_model_and_its_adapter_loads(real_model_dir, tmp_path):
    """configs/demo.py as the README runs it, cut to 2 steps of 1 row: the real SmolLM2,
    the bundled demo data, and an adapter folder that our loader reads back."""
    import lora
    from model import load_model
    out = str(tmp_path / "demo")
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.py", f"--out_dir={out}",
                           "--max_steps=2", "--batch_size=1", "--seq_len=256", "--eval_every=0", "--eval_batches=1",
                           f"--model={real_model_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_model(real_model_dir)
    lora.load_adapter(model, os.path.join(out, "adapter"))
    assert len(lora.lora_layers(model)) == 30 * 7  # every linear of the 30 blocks
    assert any(m.lora_B.weight.abs().sum() > 0 for m in lora.lora_layers(model).values())


@pytest.mark.parametrize("where", ["prompt", "answer"])
def test_distillation_changes_the_update_but_not_the_logged_sft_loss(tiny_model, tmp_path, where):
    """A fresh adapter is the base model, so the KL is 0 at step 1 and the first logged losses agree;
    after that the KL term pulls the weights elsewhere. The logged train loss is the SFT loss alone."""
    plain, distilled = str(tmp_path / "plain"), str(tmp_path / where)
    run_train(["--max_steps=3", "--lr=1e-2"], plain)
    run_train(["--max_steps=3", "--lr=1e-2", "--distill_weight=10", f"--distill_on={where}"], distilled)
    assert metrics(plain)[0]["train_loss"] == pytest.approx(metrics(distilled)[0]["train_loss"], abs=1e-6)
    a, b = final_weights(plain), final_weights(distilled)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


def preference_file(tmp_path, n=24):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {k} plus {k}?", "chosen": f"{2 * k}.",
                                        "rejected": f"I think it is {2 * k + 1}, or so."}) + "\n"
                            for k in range(n)))
    return str(path)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_log_2_and_learns_to_prefer_the_chosen_answers(tiny_model, tmp_path, method):
    """At step 1 the policy is the reference (a fresh adapter, or the frozen copy of the full model), so
    the DPO loss is log 2 and the reward margin 0; then the chosen answers gain on the rejected ones."""
    out = str(tmp_path / "dpo")
    run_train([f"--train_data=['{preference_file(tmp_path)}']", "--objective=dpo", "--dpo_beta=0.5",
               f"--method={method}", "--max_steps=8", "--lr=3e-3" if method == "lora" else "--lr=3e-4",
               "--val_fraction=0.25", "--eval_every=8"], out)
    records = metrics(out)
    assert records[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert {"reward_accuracy", "logp_chosen", "logp_rejected", "sft_loss"} <= records[0].keys()
    assert records[-1]["reward_margin"] > 0.1 and records[-1]["train_loss"] < math.log(2) - 0.05
    assert records[-1]["val_loss"] < math.log(2)  # the DPO loss on held-out pairs


def test_orpo_adds_the_odds_ratio_term_to_the_sft_loss_of_the_chosen_answers(tiny_model, tmp_path):
    sft, orpo = str(tmp_path / "sft"), str(tmp_path / "orpo")
    prefs = preference_file(tmp_path)
    run_train([f"--train_data=['{prefs}']", "--max_steps=4", "--lr=3e-3", "--val_fraction=0"], sft)
    run_train([f"--train_data=['{prefs}']", "--objective=orpo", "--orpo_lambda=0.5", "--max_steps=4",
               "--lr=3e-3", "--val_fraction=0"], orpo)
    first_sft, first_orpo = metrics(sft)[0], metrics(orpo)[0]
    assert first_orpo["sft_loss"] == pytest.approx(first_sft["train_loss"], abs=1e-5)  # SFT on the chosen sides
    assert first_orpo["train_loss"] > first_orpo["sft_loss"]  # + λ · -log σ(log odds ratio) > 0
    assert metrics(orpo)[-1]["reward_margin"] > first_orpo["reward_margin"]


def test_dpo_on_sft_data_is_a_one_line_error(tiny_model, tmp_path):
    proc = run_train(["--objective=dpo"], str(tmp_path / "x"), check=False)
    assert proc.returncode == 2
    assert "error: objective = 'dpo' needs preference data (prompt, chosen, rejected)" in proc.stderr


# ---------------------------------------------------------------------------------------------
# When things go wrong: resume checks, damaged files, kills, a full disk, Ctrl-C


RUN4 = ["--max_steps=4", "--save_every=2", "--eval_every=2"]


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """4 steps, a checkpoint and an evaluation every 2: ckpt/step_0000002 and step_0000004, best/, adapter/."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    run_train(RUN4, out)
    return out


def copy_run(run, tmp_path):
    return shutil.copytree(run, str(tmp_path / "run"))


def test_the_last_two_checkpoints_are_kept(finished_run):
    assert sorted(os.listdir(os.path.join(finished_run, "ckpt"))) == ["latest", "step_0000002", "step_0000004"]
    assert open(os.path.join(finished_run, "ckpt", "latest")).read() == "step_0000004"


def test_resume_with_a_different_batch_size_stops_with_the_differences_in_one_line(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    proc = run_train(RUN4 + ["--resume", "--batch_size=1", "--lr=0.01"], out, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (f"error: --resume: batch_size 2 -> 1, lr 0.001 -> 0.01 differ from {out}/config.json; "
                           f"add --allow_changes to continue anyway\n")


def test_resume_with_allow_changes_goes_on_and_records_the_change_never_rewriting_config_json(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    started = open(os.path.join(out, "config.json")).read()
    run_train(RUN4[1:] + ["--max_steps=5", "--resume", "--allow_changes"], out)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    assert open(os.path.join(out, "config.json")).read() == started
    assert [json.loads(line) for line in open(os.path.join(out, "changes.jsonl"))] == [
        {"step": 4, "changes": {"max_steps": [4, 5]}}]


@pytest.mark.parametrize("change", ["--lora_rank=8", "--method=full"])
def test_a_different_lora_rank_or_method_on_resume_is_one_line_even_with_allow_changes(finished_run, tmp_path, change):
    proc = run_train(RUN4 + ["--resume", "--allow_changes", change], copy_run(finished_run, tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the checkpoint's 28 tensors do not fit" in errors[0], proc.stderr


def test_a_damaged_latest_checkpoint_and_a_half_written_metrics_line_resume_from_the_checkpoint_before(
        finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    damaged = os.path.join(out, "ckpt", "step_0000004", "trainable.safetensors")
    os.truncate(damaged, os.path.getsize(damaged) // 2)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "train_l')  # what a kill during an append leaves
    proc = run_train(RUN4 + ["--resume"], out)
    assert f"warning: damaged checkpoint: {damaged}: not a whole safetensors file" in proc.stdout + proc.stderr
    assert f"warning: {out}/metrics.jsonl:5: not a whole record" in proc.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]  # steps 3 and 4 again, every line whole
    a, b = final_weights(finished_run), final_weights(out)
    assert all((a[k] - b[k]).abs().max().item() <= RESUMED for k in a)  # as if nothing had happened


KILL_DURING_EXPORT = """
import os, signal, lora
real, calls = lora.save_adapter, []
def save_adapter(model, folder, **kw):  # the {n}th export into {target}/: half written, then SIGKILL
    real(model, folder, **kw)
    calls.append(folder)
    if os.path.basename(folder) == ".tmp_{target}" and len([c for c in calls if c == folder]) == {n}:
        os.truncate(os.path.join(folder, "adapter_model.safetensors"), 1000)
        os.kill(os.getpid(), signal.SIGKILL)
lora.save_adapter = save_adapter
"""


@pytest.mark.parametrize("target, n", [("best", 2), ("adapter", 1)])
def test_a_kill_during_an_export_leaves_the_folder_old_or_absent_never_truncated(tiny_model, tmp_path, target, n):
    """best/ is written at steps 2 and 4 (a kill in the second leaves the first), adapter/ at the end
    (a kill leaves none, and --resume writes it)."""
    from safetensors.torch import load_file
    out = str(tmp_path / "run")
    args = [*TINY_ARGS, f"--out_dir={out}", *RUN4]
    proc = run_python(KILL_DURING_EXPORT.format(target=target, n=n), args, out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    final = os.path.join(out, target)
    if target == "best":  # the step-2 export, whole: its weights are the step-2 checkpoint's
        best = {k.removeprefix("base_model.model.model."): v
                for k, v in load_file(os.path.join(final, "adapter_model.safetensors")).items()}
        step2 = load_file(os.path.join(out, "ckpt", "step_0000002", "trainable.safetensors"))
        assert best.keys() == step2.keys() and all(torch.equal(best[k], step2[k]) for k in best)
    else:
        assert not os.path.exists(final)
        run_train(RUN4 + ["--resume"], out)
        assert len(load_file(os.path.join(final, "adapter_model.safetensors"))) == 28


FULL_DISK = """
import errno, os, checkpoint
real, calls = checkpoint.save_file, []
def save_file(tensors, path, *a, **k):  # the second checkpoint's first file: the disk is full
    calls.append(path)
    if len(calls) == 4:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no file name, as write() gives it
    real(tensors, path, *a, **k)
checkpoint.save_file = save_file
"""


def test_a_full_disk_at_checkpoint_time_is_one_line_naming_the_folder_exit_2_and_the_previous_checkpoint_stays(
        tiny_model, tmp_path):
    out = str(tmp_path / "run")
    proc = run_python(FULL_DISK, [*TINY_ARGS, f"--out_dir={out}", "--max_steps=4", "--save_every=1"], out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: {out}/ckpt/step_0000002: could not be written ([Errno 28] No space left on device)"]
    assert sorted(os.listdir(os.path.join(out, "ckpt"))) == ["latest", "step_0000001"]
    assert json.load(open(os.path.join(out, "ckpt", "step_0000001", "state.json")))["step"] == 1
    assert final_weights(out).keys()  # latest names a whole checkpoint


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tiny_model, tmp_path):
    # Ctrl-C's default action in the child, however the tests were started (a shell's background job
    # inherits SIGINT ignored, and python keeps an ignored SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_ARGS, f"--out_dir={tmp_path / 'run'}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)  # python is still importing torch (or, on a fast machine, setting up)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr and "interrupted" in stdout + stderr


def test_min_lr_above_lr_is_warned_about(tiny_model, tmp_path):
    # an lr lowered on the command line and the config's min_lr left above it: the cosine would rise
    proc = run_train(["--max_steps=1", "--lr=5e-5", "--min_lr=1e-4"], str(tmp_path / "run"))
    assert "warning: min_lr 0.0001 is above lr 5e-05" in proc.stderr
    assert "warning: min_lr" not in run_train(["--max_steps=1"], str(tmp_path / "run2")).stderr
