"""train.py's hand-written pieces: AdamW, the schedule, clipping, atomic checkpoints."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from config import load_config
from train import adamw_init, adamw_step, clip_grad_norm, load_checkpoint, lr_at, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 5, generator=g, requires_grad=True),   # a matrix: decayed
            torch.randn(5, generator=g, requires_grad=True)]      # a gain/bias: not decayed


def fake_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_adamw_and_schedule_match_torch_adamw_over_20_steps():
    cfg = load_config(None, ["--lr=1e-2", "--min_lr=1e-3", "--warmup_steps=5", "--weight_decay=0.1",
                             "--betas=(0.9, 0.95)"])
    total = 20
    ours, ref = make_params(), make_params()
    state = adamw_init(ours)
    torch_opt = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": cfg.weight_decay},
                                   {"params": [ref[1]], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: lr_at(s, cfg, total) / cfg.lr)
    for step in range(total):
        fake_grads(ours, step)
        fake_grads(ref, step)
        adamw_step(ours, state, step + 1, lr_at(step, cfg, total), cfg.betas, cfg.eps, cfg.weight_decay)
        torch_opt.step()
        schedule.step()
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() <= 1e-6


def test_schedule_warms_up_linearly_then_decays_to_min_lr():
    cfg = load_config(None, ["--lr=1.0", "--min_lr=0.1", "--warmup_steps=4"])
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then never increases
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)        # reaches min_lr at the end
    assert lr_at(12, cfg, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_grad_clip_scales_the_global_norm_to_the_limit():
    params = make_params()
    fake_grads(params, 0)
    before = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params))
    norm = clip_grad_norm(params, max_norm=0.5)
    after = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params))
    assert norm == pytest.approx(before, rel=1e-6) and after == pytest.approx(0.5, rel=1e-4)


def test_frozen_parameters_without_gradients_are_left_alone():
    params = make_params()
    state = adamw_init(params)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.ones_like(params[0])  # params[1] has no gradient
    adamw_step(params, state, 1, 0.1, (0.9, 0.999), 1e-8, 0.0)
    assert torch.equal(params[1], before[1]) and not torch.equal(params[0], before[0])


def test_checkpoint_round_trip_restores_every_tensor_and_the_progress(tmp_path):
    params = make_params()
    state = adamw_init(params)
    fake_grads(params, 0)
    adamw_step(params, state, 1, 0.1, (0.9, 0.999), 1e-8, 0.0)
    progress = dict(step=7, epoch=1, batch=3, best_val=1.5, evals_since_best=0)
    save_checkpoint(str(tmp_path), {"a": params[0], "b": params[1]}, state, progress)
    weights, opt_state, loaded, rng = load_checkpoint(str(tmp_path))
    assert torch.equal(weights["a"], params[0]) and torch.equal(weights["b"], params[1])
    assert all(torch.equal(x, y) for x, y in zip(opt_state["m"] + opt_state["v"], state["m"] + state["v"]))
    assert loaded == progress and torch.equal(rng["torch_rng"], torch.get_rng_state())


SAVE_FOREVER = """
import sys, torch
sys.path.insert(0, {root!r})
from train import save_checkpoint
big = {{"w": torch.zeros(2_000_000)}}
state = {{"m": [torch.zeros(2_000_000)], "v": [torch.zeros(2_000_000)]}}
step = 0
while True:
    step += 1
    big["w"].fill_(step); state["m"][0].fill_(step); state["v"][0].fill_(step)
    save_checkpoint({ckpt!r}, big, state, dict(step=step))
"""


def test_killing_the_process_while_it_writes_a_checkpoint_leaves_a_loadable_one(tmp_path):
    """SIGKILL at random moments of back-to-back 24 MB checkpoint writes: whatever `latest`
    names is always complete and self-consistent."""
    for i, delay in enumerate((0.05, 0.23, 0.41)):
        ckpt = str(tmp_path / f"ckpt{i}")
        os.makedirs(ckpt)
        proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER.format(root=ROOT, ckpt=ckpt)])
        while not os.path.exists(os.path.join(ckpt, "latest")):
            time.sleep(0.01)  # wait until it is saving (python + torch take a while to start)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        weights, opt_state, progress, _ = load_checkpoint(ckpt)
        step = progress["step"]
        assert step >= 1
        assert torch.all(weights["w"] == step) and torch.all(opt_state["v"][0] == step)


def two_checkpoints(ckpt):
    """ckpt/step_0000001 and step_0000002 (latest), as a run saves them, and their weights."""
    params, kept = make_params(), None
    state = adamw_init(params)
    for step in (1, 2):
        with torch.no_grad():
            params[0].fill_(step)
        kept = save_checkpoint(ckpt, {"a": params[0], "b": params[1]}, state,
                               dict(step=step, epoch=0, batch=step, best_val=None, evals_since_best=0), keep=kept)
    return params


def truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


DAMAGE = {  # what a kill, a full disk or a stray edit can leave; the step resumed from then
    "trainable.safetensors truncated": ("step_0000002/trainable.safetensors", truncate, 1),
    "optimizer.safetensors cut short": ("step_0000002/optimizer.safetensors", lambda p: truncate(p, 0.99), 1),
    "rng.safetensors missing": ("step_0000002/rng.safetensors", os.remove, 1),
    "state.json truncated": ("step_0000002/state.json", truncate, 1),
    "latest naming a missing folder": ("latest", lambda p: open(p, "w").write("step_0000009"), 2),  # the newest
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_names_the_file_and_resumes_from_the_newest_complete_one(tmp_path, damage):
    ckpt = str(tmp_path)
    two_checkpoints(ckpt)
    assert sorted(os.listdir(ckpt)) == ["latest", "step_0000001", "step_0000002"]  # the last two are kept
    file, harm, step = DAMAGE[damage]
    harm(os.path.join(ckpt, file))
    said = []
    weights, _, progress, _ = load_checkpoint(ckpt, log=lambda *a, **k: said.append(" ".join(a)))
    assert progress["step"] == step and torch.all(weights["a"] == step)
    assert len(said) == 1 and os.path.join(ckpt, file) in said[0] and "resuming from" in said[0]


def test_when_no_checkpoint_is_complete_resume_is_one_error_naming_the_file(tmp_path):
    from config import UserError
    two_checkpoints(str(tmp_path))
    truncate(str(tmp_path / "step_0000002" / "state.json"))
    os.remove(tmp_path / "step_0000001" / "trainable.safetensors")
    with pytest.raises(UserError, match=r"no complete checkpoint in .*step_0000002/state\.json: not valid JSON"):
        load_checkpoint(str(tmp_path), log=lambda *a, **k: None)


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_folder_and_keeps_the_previous_one(tmp_path,
                                                                                                   monkeypatch):
    import errno
    import checkpoint
    from config import UserError
    params = two_checkpoints(str(tmp_path))

    def full_disk(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(UserError, match=r"step_0000003: could not be written \(.*: No space left on device\)"):
        save_checkpoint(str(tmp_path), {"a": params[0], "b": params[1]}, adamw_init(params),
                        dict(step=3), keep="step_0000002")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000001", "step_0000002"]  # no half-written folder
    assert load_checkpoint(str(tmp_path))[2]["step"] == 2


def test_a_half_written_last_line_of_metrics_is_dropped_with_a_warning(tmp_path):
    from checkpoint import read_metrics
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.5}\n{"step": 2, "train_lo')
    said = []
    assert read_metrics(str(tmp_path), log=lambda *a, **k: said.append(a[0])) == [{"step": 1, "train_loss": 2.5}]
    assert said == [f"warning: {tmp_path / 'metrics.jsonl'}:2: not a whole record (an interrupted write?); dropped"]


def test_the_loss_curve_of_an_out_dir_with_ampersand_and_angle_bracket_is_valid_xml(tmp_path):
    import xml.dom.minidom
    from checkpoint import write_loss_curve, write_metrics
    out = tmp_path / "a&b<c"
    out.mkdir()
    write_metrics(str(out), [{"step": 1, "train_loss": 2.0, "val_loss": 2.1}, {"step": 2, "train_loss": 1.5}])
    write_loss_curve(str(out))
    title = xml.dom.minidom.parse(str(out / "loss.svg")).getElementsByTagName("text")[0].firstChild.data
    assert title == f"loss: {out}"
