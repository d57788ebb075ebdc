"""Time model.load_model on a folder and measure the process's peak memory.

    python bench/bench_load.py models/SmolLM2-135M-Instruct [--dtype bfloat16] [--repeat 3]

Each load runs in a fresh Python process (so the page cache is warm but the process is new);
peak RSS is the process's high-water mark, torch's own import (~200 MB) included, and is also
given above the level measured just before loading.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch, model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
m = model.load_model({path!r}, dtype={dtype!r})
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(seconds=seconds, peak_rss=peak, rss_before=before)))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    files = [f for f in os.listdir(args.path) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(args.path, f)) for f in files)
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, path=args.path, dtype=args.dtype)],
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    mb = lambda b: f"{b / 2**20:.0f} MiB"
    print(f"{args.path}: {mb(size)} of safetensors, loaded as {args.dtype}")
    times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
    print(f"  load time: best {best['seconds']:.2f} s of {args.repeat} runs ({times})")
    print(f"  peak RSS: {mb(best['peak_rss'])} = {best['peak_rss'] / size:.2f}x the file size "
          f"({mb(best['peak_rss'] - best['rss_before'])} above the {mb(best['rss_before'])} of "
          f"python + torch before loading = {(best['peak_rss'] - best['rss_before']) / size:.2f}x)")


if __name__ == "__main__":
    main()
