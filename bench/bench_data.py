"""Time loading a large data set: rendered at every start (data_cache = False), the first start that
builds the cache, and a later start that maps it (data_cache.py); with the RSS each one adds.

    python bench/bench_data.py --records 100000 [--workers 2] [--model models/SmolLM2-135M-Instruct]

The records are alpaca-style ({instruction, input, output}, ~590 bytes each on average), made of
word runs from the docstrings of the Python standard library (as bench_tokenizer.py reads them),
seeded, written once to .cache/bench/alpaca_<N>.jsonl. Each measurement runs in a fresh process:
the seconds of data.load_datasets, then of the first epoch's plan_batches (both packings: what
train.py does with the data before its first step), and the RSS above the process's own before
loading (python, torch, the tokenizer): at its peak and after loading (the examples still held);
the plans' own time and RSS come apart. A build's worker processes are measured apart (their CPU
time, their largest peak RSS, which counts the pages they share with the parent after the fork).
--later-only measures a later start alone, with the cache of an earlier run. --first-step N times
train.py itself on the records (configs/demo.py, `--val_data=`, 5 validation batches) from the start
of the process to its first optimizer step, which it does not run: a start that builds that config's
cache, then N alternated rounds of later starts with each packing (median and min-max).
"""
import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import data
from config import Config
from tokenizer import load_tokenizer
def rss(key="VmRSS"):  # VmHWM: the peak so far
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) * 1024
tok = load_tokenizer({model!r})
before = rss()
cfg = Config(train_data=[{path!r}], data_cache={cache!r}, seq_len={seq_len!r})
t, cpu = time.perf_counter(), time.process_time()
train, val, stats = data.load_datasets(cfg, tok, log=lambda line: None)
seconds, cpu, peak, held = time.perf_counter() - t, time.process_time() - cpu, rss("VmHWM"), rss()
children = resource.getrusage(resource.RUSAGE_CHILDREN)
plan_seconds, plan_added = {{}}, {{}}
for packing in ("none", "packed"):
    t, start = time.perf_counter(), rss()
    plan = data.plan_batches(train, 4, cfg.seq_len, packing, cfg.seed, 0)
    plan_seconds[packing], plan_added[packing] = time.perf_counter() - t, rss() - start
    del plan
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print("BENCH", json.dumps(dict(seconds=seconds, cpu_seconds=cpu,
                               worker_cpu_seconds=children.ru_utime + children.ru_stime, rss_before=before,
                               peak_added=peak - before, held_added=held - before, worker_peak=workers,
                               plan_seconds=plan_seconds, plan_added=plan_added,
                               examples=len(train) + len(val), tokens=stats.tokens["train"] + stats.tokens["val"])))
"""


def make_records(n, path, seed=0):
    """n alpaca records of standard-library prose, seeded: the same file for the same n."""
    from bench_tokenizer import stdlib_docstrings
    documents, _, _ = stdlib_docstrings(3_000_000)
    words = re.findall(r"\S+", " ".join(documents))
    rng = random.Random(seed)

    def run(low, high):  # a run of consecutive words, low to high of them
        k = rng.randint(low, high)
        start = rng.randrange(len(words) - k)
        return " ".join(words[start:start + k])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w", encoding="utf-8") as f:
        for _ in range(n):
            record = {"instruction": run(6, 24), "input": run(0, 40) if rng.random() < 0.5 else "",
                      "output": run(32, 88)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(path + ".part", path)


def measure(args, path, cache, env):
    code = CHILD.format(root=ROOT, model=args.model, path=path, cache=cache, seq_len=args.seq_len)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"bench_data: the child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.split("BENCH ", 1)[1])


FIRST_STEP = """
import os, sys, time
sys.path.insert(0, {root!r})
import train
def first_step(run, rows):  # the first optimizer step is where the start ends
    print(f"FIRST_STEP {{time.time() - {start!r}:.3f}}", flush=True)
    os._exit(0)
train.train_step = first_step
sys.exit(train.main({argv!r}))
"""


def first_step_seconds(path, packing, env):
    """Seconds from a fresh process's start to train.py's first optimizer step on the records."""
    out_dir = os.path.join(ROOT, ".cache", "bench", f"first-step-{os.getpid()}")
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--config", "configs/demo.py", f"--train_data={path}", "--val_data=", "--eval_batches=5",
            f"--packing={packing}", f"--out_dir={out_dir}"]
    code = FIRST_STEP.format(root=ROOT, start=time.time(), argv=argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    shutil.rmtree(out_dir, ignore_errors=True)
    if "FIRST_STEP " not in out.stdout:
        sys.exit(f"bench_data: train.py did not reach its first step:\n{out.stderr[-3000:]}")
    return float(out.stdout.split("FIRST_STEP ", 1)[1].split()[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--workers", type=int, default=0, help="build processes (0: the CPUs this process may use)")
    p.add_argument("--skip-nocache", action="store_true", help="leave out the run without a cache (slow)")
    p.add_argument("--later-only", action="store_true", help="only a later start, mapping the cache left before")
    p.add_argument("--first-step", type=int, default=0, metavar="N",
                   help="instead: train.py to its first step, N alternated rounds of each packing")
    args = p.parse_args()
    path = os.path.join(ROOT, ".cache", "bench", f"alpaca_{args.records}.jsonl")
    if not os.path.isfile(path):
        t = time.perf_counter()
        make_records(args.records, path)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
    cache_dir = os.path.join(ROOT, ".cache", "bench", "data-cache")
    env = dict(os.environ, SFT_DATA_CACHE_DIR=cache_dir)
    if args.workers:
        env["SFT_DATA_WORKERS"] = str(args.workers)
    with open("/proc/cpuinfo") as f:
        info = f.read()
    cpu = re.search(r"model name\s*:\s*(.*)", info).group(1)
    print(f"machine: {cpu}, {len(os.sched_getaffinity(0))} CPUs, {'with' if ' amx_tile' in info else 'without'} AMX; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print(f"data: {path}: {args.records:,} records, {os.path.getsize(path) / 1e6:.1f} MB")
    if args.first_step:
        print(f"first start (builds the cache of configs/demo.py's settings): "
              f"{first_step_seconds(path, 'none', env):.1f} s to the first step")
        times = {"none": [], "packed": []}
        for r in range(args.first_step):
            for packing in (("none", "packed") if r % 2 == 0 else ("packed", "none")):
                times[packing].append(first_step_seconds(path, packing, env))
        for packing, t in times.items():
            print(f"later start, packing {packing}: {statistics.median(t):.2f} s to the first step "
                  f"({min(t):.2f}-{max(t):.2f}, {len(t)} rounds)")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        return
    runs = {}
    if not (args.skip_nocache or args.later_only):
        runs["no cache (data_cache = False)"] = measure(args, path, False, env)
    if not args.later_only:
        shutil.rmtree(cache_dir, ignore_errors=True)
        runs["first start: builds the cache"] = measure(args, path, True, env)
    runs["later start: maps the cache"] = measure(args, path, True, env)
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    first = next(iter(runs.values()))
    print(f"{first['examples']:,} examples, {first['tokens']:,} tokens; RSS before loading "
          f"{mib(first['rss_before'])} (python, torch, tokenizer)")
    for name, r in runs.items():
        print(f"  {name:<32} {r['seconds']:7.2f} s (CPU: {r['cpu_seconds']:.1f} s"
              + (f" + workers {r['worker_cpu_seconds']:.1f} s" if r["worker_peak"] else "") + f"); RSS added: peak "
              f"{mib(r['peak_added'])}, held {mib(r['held_added'])}"
              + (f"; worker peak RSS {mib(r['worker_peak'])}" if r["worker_peak"] else ""))
    plan = runs["later start: maps the cache"]
    print("  then the first epoch's plan (batch 4): " + ", ".join(
        f"{k} {plan['plan_seconds'][k]:.1f} s, +{mib(plan['plan_added'][k])}" for k in ("none", "packed")))
    size = sum(e.stat().st_size for d in os.scandir(cache_dir) if d.is_dir() for e in os.scandir(d.path))
    print(f"load average {os.getloadavg()[0]:.1f} at the end; the cache folder holds {size / 1e6:.0f} MB")
    print(json.dumps({"records": args.records, "cpu": cpu, **runs}))


if __name__ == "__main__":
    main()
