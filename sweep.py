"""Hyperparameter search: run train.py once per point of a grid and rank the runs by validation loss.

    python sweep.py --config configs/course/06_hparams.py --grid "lr=1e-4,3e-4 lora_rank=8,16"
    python sweep.py --config configs/tiny.py --grid "lr=1e-3,3e-3" --max_steps=20   # --key=value: every run

The grid is the product of the listed values (here 2 x 2 = 4 runs), run one after the other, each
in its own folder under the config's out_dir: runs/x/lr=1e-4,lora_rank=8/ holds that run's
config.json, metrics.jsonl, checkpoints, adapter and train.log (everything train.py prints).
Every point is checked as a config (unknown key, wrong type, missing data file) before any run starts.

Resumable: run the same command again and finished runs are skipped (their folder has run.json),
an interrupted run continues from its checkpoint (train.py --resume), the rest start. Ctrl-C stops
the current run cleanly (train.py saves a checkpoint) and then the sweep. To redo a run, delete its
folder. A run that fails or diverges (NaN loss) is recorded as such and not run again.

At the end (and after every run) out_dir gets results.md, a table sorted by the best validation
loss of each run (lowest first), results.json (the same rows), and val_loss.svg (every run's
validation curve). Validation loss is the thing to compare: training loss rewards memorising.

Grid syntax: space-separated KEY=V1,V2,... with the types of config.py (a value that holds a comma,
like a tuple, goes in brackets: "betas=(0.9,0.95),(0.9,0.999)").
"""
from config import quiet_ctrl_c

quiet_ctrl_c(__name__)  # first: Ctrl-C while torch loads (seconds) exits 130, no traceback

import datetime
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import data
from checkpoint import read_metrics, write_atomic
from config import (EXIT_NON_FINITE, EXIT_OK, KEYS, ConfigError, UserError, check_out_folder, fetch_model, load_config,
                    script, split_cli, unknown_key_error)
from plot import write_svg_chart

ROOT = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------
# The grid


def split_values(text):
    """'1e-4,3e-4' -> ['1e-4', '3e-4']; commas inside (), [] or quotes do not split."""
    values, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += ch
    values.append(current)
    return [v.strip() for v in values]


def parse_grid(grid):
    """'lr=1e-4,3e-4 lora_rank=8,16' -> [("lr", ["1e-4", "3e-4"]), ("lora_rank", ["8", "16"])]."""
    axes = []
    for item in grid.split():
        key, sep, values = item.partition("=")
        if not sep:
            raise ConfigError(f"--grid: {item!r} should be KEY=VALUE1,VALUE2,...")
        if key not in KEYS:
            raise unknown_key_error(key, "--grid")
        if key == "out_dir":
            raise ConfigError("--grid: out_dir is set by the sweep (one folder per run)")
        if key in dict(axes):
            raise ConfigError(f"--grid: {key} is given twice")
        values = split_values(values)
        if not all(values):
            raise ConfigError(f"--grid: {key} has an empty value in {item!r}")
        axes.append((key, values))
    if not axes:
        raise ConfigError("--grid is empty: give at least one KEY=VALUE1,VALUE2,...")
    return axes


def grid_points(axes):
    """Every combination, the last key varying fastest: [[("lr", "1e-4"), ("lora_rank", "8")], ...]."""
    keys = [key for key, _ in axes]
    return [list(zip(keys, combo)) for combo in itertools.product(*[values for _, values in axes])]


def run_name(point):
    """The folder of one grid point: 'lr=1e-4,lora_rank=8'. A path value shows as its file name
    (train_data=data/course/clean_200.jsonl -> train_data=clean_200); other characters that do not
    belong in a folder name become '-'."""
    parts = []
    for key, value in point:
        if "/" in value or os.sep in value:
            value = os.path.splitext(os.path.basename(value.strip("[]'\"")))[0]
        value = "".join(c if c.isalnum() or c in "._+-" else "-" for c in value)
        parts.append(f"{key}={value}")
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# One run: skip it when finished, resume it when it has a checkpoint, else start it


def finished_export(out_dir):
    """train.py writes adapter/ or model/ only when a run completes (or stops early)."""
    return any(os.path.isfile(os.path.join(out_dir, *f)) for f in
               [("adapter", "adapter_config.json"), ("model", "config.json")])


def run_train(config, overrides, out_dir, log=print):
    """Run `python train.py --config CONFIG OVERRIDES --out_dir=OUT_DIR` to the end, its output in
    OUT_DIR/train.log, and record the outcome in OUT_DIR/run.json:
    {"status": "done" | "diverged" | "failed", "seconds", "returncode", "command", "error"}.
    A folder with run.json is not run again (its record is returned, with "skipped": True); one with a
    checkpoint is resumed. Returns None when the run was interrupted (Ctrl-C): run again to resume."""
    record_path = os.path.join(out_dir, "run.json")
    if os.path.exists(record_path):
        return dict(read_record(record_path), skipped=True)
    resume = os.path.exists(os.path.join(out_dir, "ckpt", "latest"))
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, *overrides,
               f"--out_dir={out_dir}"] + (["--resume"] if resume else [])
    os.makedirs(out_dir, exist_ok=True)
    log(("resuming: " if resume else "$ ") + " ".join(["python", "train.py"] + command[2:]))
    interrupted = []
    start = time.time()
    with open(os.path.join(out_dir, "train.log"), "a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        # Ctrl-C reaches train.py too (same terminal): it finishes its step, saves and exits. Wait for that.
        previous = signal.signal(signal.SIGINT, lambda *a: interrupted.append(1))
        try:
            returncode = proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    seconds = time.time() - start
    with open(os.path.join(out_dir, "train.log"), errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    if interrupted or returncode < 0 or returncode == 130 or (returncode == 0 and not finished_export(out_dir)):
        log(f"interrupted after {seconds:.0f} s; run the same command again to resume")
        return None
    status = {EXIT_OK: "done", EXIT_NON_FINITE: "diverged"}.get(returncode, "failed")  # train.py's exit codes
    record = dict(status=status, seconds=round(seconds, 1), returncode=returncode,
                  command=" ".join(["python", "train.py"] + command[2:]),
                  error=next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
                  if status == "failed" else "")
    write_atomic(record_path, json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------------------------------
# Reading a finished run folder


def read_jsonl(path):
    """The records of a JSONL file ([] when there is none yet)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_record(path):
    """A run's run.json (written whole by run_train: damaged only from outside)."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it to run that point again") from None


def summarize_run(out_dir):
    """The numbers of one run folder: best and final validation loss (and the step of the best),
    final training loss, median tokens/s (step 1, the warm-up, left out), peak RSS, wall time, status."""
    metrics = read_metrics(out_dir)  # a half-written last line (a killed run) is dropped with a warning
    record = read_record(os.path.join(out_dir, "run.json")) if os.path.exists(os.path.join(out_dir, "run.json")) else {}
    vals = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    best = min(vals, key=lambda sv: sv[1]) if vals else (None, None)
    speeds = [m["tokens_per_s"] for m in metrics if m["step"] > 1] or [m["tokens_per_s"] for m in metrics]
    return dict(
        status=record.get("status", "done" if finished_export(out_dir) else "unfinished"),
        steps=metrics[-1]["step"] if metrics else 0,
        best_val_loss=best[1], best_step=best[0],
        final_val_loss=vals[-1][1] if vals else None,
        final_train_loss=metrics[-1]["train_loss"] if metrics else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        peak_mib=max(m["mem_bytes"] for m in metrics) / 2**20 if metrics else None,
        minutes=record["seconds"] / 60 if "seconds" in record else None,
        val_curve=vals, train_curve=[(m["step"], m["train_loss"]) for m in metrics])


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def by_val_loss(rows):
    """Lowest best validation loss first; runs without one (diverged, failed) last."""
    return sorted(rows, key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0.0))


def results_table(rows, keys):
    """Markdown: one line per run, in the order given."""
    head = ["#", *keys, "best val loss", "at step", "final val loss", "final train loss",
            "tokens/s", "peak RSS (MiB)", "minutes", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, r in enumerate(rows, start=1):
        cells = [str(k), *[r["point"][key] for key in keys], fmt(r["best_val_loss"], ".4f"),
                 fmt(r["best_step"], "d"), fmt(r["final_val_loss"], ".4f"), fmt(r["final_train_loss"], ".4f"),
                 fmt(r["tokens_per_s"], ".0f"), fmt(r["peak_mib"], ".0f"), fmt(r["minutes"], ".1f"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(sweep_dir, command, axes, names):
    """results.md, results.json and val_loss.svg for the runs of the grid that have a folder."""
    keys = [key for key, _ in axes]
    rows = []
    for name, point in names:
        folder = os.path.join(sweep_dir, name)
        if os.path.exists(os.path.join(folder, "metrics.jsonl")):
            rows.append(dict(summarize_run(folder), name=name, point=dict(point)))
    rows = by_val_loss(rows)
    write_atomic(os.path.join(sweep_dir, "results.json"),
                 json.dumps([{k: v for k, v in r.items() if not k.endswith("_curve")} for r in rows], indent=2))
    write_svg_chart(os.path.join(sweep_dir, "val_loss.svg"),
                    {r["name"]: r["val_curve"] for r in rows}, title=f"validation loss: {sweep_dir}",
                    xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    table = results_table(rows, keys)
    write_atomic(os.path.join(sweep_dir, "results.md"),
                 f"# Sweep: {sweep_dir}\n\nCommand: `{command}`\n\n"
                 f"Updated {datetime.datetime.now():%Y-%m-%d %H:%M}; {len(rows)} of {len(names)} runs have "
                 f"results. Sorted by best validation loss. Curves: val_loss.svg\n\n{table}\n")
    return table


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    """-> (config path, grid string, limit_runs, [--key=value overrides for every run])."""
    config, overrides, flags = split_cli(argv, {"grid": "", "limit_runs": 0}, {"limit_runs": "[0, inf)"})
    if not config or not flags["grid"]:
        raise ConfigError("usage: python sweep.py --config FILE --grid \"key=v1,v2 key2=v3,v4\" [--key=value ...]")
    return config, flags["grid"], flags["limit_runs"], overrides


@script
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config, grid, limit, overrides = parse_args(argv)
    axes = parse_grid(grid)
    points = grid_points(axes)
    sweep_dir = load_config(config, overrides).out_dir
    check_out_folder(sweep_dir)
    names = [(run_name(p), p) for p in points]
    if len({n for n, _ in names}) != len(names):
        raise ConfigError("--grid: two grid points give the same folder name; use distinct values")
    for name, point in names:  # every point must be a valid config before anything runs
        cfg = load_config(config, overrides + [f"{key}={value}" for key, value in point])
        data.check_data_files(cfg)
        fetch_model(cfg.model)  # as train.py would first: a missing model fails here, not in every run
    command = " ".join(["python sweep.py"] + [f'"{a}"' if " " in a else a for a in argv])
    print(f"sweep: {len(points)} runs in {sweep_dir}" + (f" (running the first {limit})" if limit else ""))
    overrides = [o for o in overrides if not o.startswith("--out_dir=")]  # each run gets its own
    for k, (name, point) in enumerate(names[:limit or None], start=1):
        run_dir = os.path.join(sweep_dir, name)
        record = run_train(config, overrides + [f"--{key}={value}" for key, value in point], run_dir,
                           log=lambda line: print(f"[{k}/{len(points)}] {line}", flush=True))
        if record is None:
            write_results(sweep_dir, command, axes, names)
            return 130
        summary = summarize_run(run_dir)
        print(f"[{k}/{len(points)}] {name}: {record['status']}" + (" (finished earlier)" if record.get("skipped") else
              f" in {record['seconds'] / 60:.1f} min") + f", best val loss {fmt(summary['best_val_loss'], '.4f')}"
              + (f"; {record['error']} (see {run_dir}/train.log)" if record["status"] == "failed" else ""), flush=True)
        write_results(sweep_dir, command, axes, names)
    print(write_results(sweep_dir, command, axes, names))
    print(f"table: {os.path.join(sweep_dir, 'results.md')}, curves: {os.path.join(sweep_dir, 'val_loss.svg')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
