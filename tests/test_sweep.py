"""sweep.py: a grid of train.py runs, each in its own folder, resumable, ranked by validation loss."""
import json
import os
import subprocess
import sys

import pytest

from config import ConfigError
from sweep import grid_points, parse_grid, run_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--max_steps=2", "--eval_every=0", "--save_every=100"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: a second thread only adds contention
GRID = "lr=1e-4,3e-3 lora_rank=2,4"
POINTS = [("1e-4", 2), ("1e-4", 4), ("3e-3", 2), ("3e-3", 4)]


def run_sweep(out_dir, grid=GRID, extra=(), check=True):
    proc = subprocess.run([sys.executable, "sweep.py", "--config", "configs/tiny.py", "--grid", grid, *COMMON,
                           *extra, f"--out_dir={out_dir}"], cwd=ROOT, capture_output=True, text=True,
                          env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def finished_sweep(tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "grid")
    run_sweep(out)
    return out


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_grid_is_the_product_of_the_values_with_the_last_key_varying_fastest():
    assert grid_points(parse_grid("lr=1e-4,3e-4 lora_rank=8,16")) == [
        [("lr", "1e-4"), ("lora_rank", "8")], [("lr", "1e-4"), ("lora_rank", "16")],
        [("lr", "3e-4"), ("lora_rank", "8")], [("lr", "3e-4"), ("lora_rank", "16")]]


def test_values_in_brackets_keep_their_commas():
    assert parse_grid("betas=(0.9,0.95),(0.9,0.999)") == [("betas", ["(0.9,0.95)", "(0.9,0.999)"])]


@pytest.mark.parametrize("grid, message", [
    ("lora_rnk=8,16", "unknown config key 'lora_rnk'; did you mean 'lora_rank'"),
    ("lr", "KEY=VALUE1,VALUE2"),
    ("lr=1e-4 lr=3e-4", "lr is given twice"),
    ("out_dir=a,b", "out_dir is set by the sweep"),
    ("lr=1e-4,", "empty value"),
    ("", "--grid is empty"),
])
def test_a_bad_grid_is_a_config_error_naming_the_problem(grid, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(grid)


def test_run_folder_names_are_key_value_pairs_and_a_path_shows_as_its_file_name():
    assert run_name([("lr", "1e-4"), ("lora_rank", "8")]) == "lr=1e-4,lora_rank=8"
    assert run_name([("train_data", "data/course/clean_200.jsonl")]) == "train_data=clean_200"
    assert run_name([("betas", "(0.9, 0.95)")]) == "betas=-0.9--0.95-"


def test_a_value_of_the_wrong_type_stops_the_sweep_before_any_run(tiny_model, tmp_path):
    out = tmp_path / "never"
    proc = run_sweep(str(out), "lr=1e-4,fast", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "lr = 'fast' should be float" in proc.stderr
    assert not out.exists()


def test_every_grid_point_runs_to_the_end_in_its_own_folder(finished_sweep):
    for lr, rank in POINTS:
        folder = os.path.join(finished_sweep, f"lr={lr},lora_rank={rank}")
        config = read_json(folder, "config.json")
        assert config["lr"] == float(lr) and config["lora_rank"] == rank and config["out_dir"] == folder
        assert read_json(folder, "run.json")["status"] == "done"
        assert os.path.isfile(os.path.join(folder, "adapter", "adapter_config.json"))
        assert "wrote" in open(os.path.join(folder, "train.log")).read()


def test_results_table_is_sorted_by_validation_loss(finished_sweep):
    rows = read_json(finished_sweep, "results.json")
    losses = [r["best_val_loss"] for r in rows]
    assert len(rows) == 4 and None not in losses and losses == sorted(losses)
    table = [line for line in open(os.path.join(finished_sweep, "results.md")) if line.startswith("| ")][1:]
    assert [line.split("|")[2:4] for line in table] == [
        [f" {r['point']['lr']} ", f" {r['point']['lora_rank']} "] for r in rows]
    assert open(os.path.join(finished_sweep, "val_loss.svg")).read().startswith("<svg")


def test_a_second_invocation_skips_the_finished_runs(finished_sweep):
    logs = {p: os.path.getmtime(os.path.join(finished_sweep, f"lr={p[0]},lora_rank={p[1]}", "metrics.jsonl"))
            for p in POINTS}
    proc = run_sweep(finished_sweep)
    assert proc.stdout.count("(finished earlier)") == 4 and "$ python train.py" not in proc.stdout
    assert all(os.path.getmtime(os.path.join(finished_sweep, f"lr={p[0]},lora_rank={p[1]}", "metrics.jsonl"))
               == mtime for p, mtime in logs.items())


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "sweep"
    # the first step of the run, as if the sweep had been stopped there
    subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", *COMMON, "--lr=1e-3",
                    f"--out_dir={out / 'lr=1e-3'}", "--stop_after=1"], cwd=ROOT, check=True, capture_output=True, env=ENV)
    proc = run_sweep(str(out), "lr=1e-3")
    assert "resuming: python train.py" in proc.stdout
    assert "resumed from" in open(out / "lr=1e-3" / "train.log").read()
    steps = [json.loads(line)["step"] for line in open(out / "lr=1e-3" / "metrics.jsonl")]
    assert steps == [1, 2]


def test_a_diverged_run_is_recorded_ranked_last_and_not_run_again(tiny_model, tmp_path):
    out = str(tmp_path / "sweep")
    extra = ["--max_steps=4", "--warmup_steps=0", "--grad_clip=0"]  # lr 1e38 overflows fp32 at once
    proc = run_sweep(out, "lr=1e-3,1e38", extra=extra)
    assert read_json(out, "lr=1e38", "run.json")["status"] == "diverged"
    assert [r["status"] for r in read_json(out, "results.json")] == ["done", "diverged"]
    assert "lr=1e38: diverged" in proc.stdout
    again = run_sweep(out, "lr=1e-3,1e38", extra=extra)
    assert again.stdout.count("(finished earlier)") == 2
