"""bench.py: the interface issue 7 names (the numbers themselves are measured, not tested)."""
import json
import subprocess
import sys

import pytest
import torch

import bench
import ops
from conftest import ROOT


def run_bench(model, method, *extra):
    out = subprocess.run([sys.executable, "bench.py", "--model", model, "--method", method, "--batch", "2",
                          "--seq", "32", "--steps", "2", "--warmup", "1", "--json", *extra],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_bench_json_last_line_has_speed_memory_and_mfu(tiny_model, method):
    result = run_bench(tiny_model, method)
    assert result["method"] == method
    assert result["tokens_per_s"] > 0 and result["peak_mem_bytes"] > 0 and 0 < result["mfu"]
    # where our bf16 products run on the fp32 kernel, MFU is also given against that kernel's peak
    assert ("mfu_of_fp32_peak" in result) == ops.bf16_gemm_is_slow(torch.device("cpu"))


def test_bench_compare_hf_measures_both_sides_in_their_own_processes(tiny_model):
    result = run_bench(tiny_model, "lora", "--compare-hf")
    assert result["hf_tokens_per_s"] > 0 and result["hf_peak_mem_bytes"] > 0
    assert result["speedup"] == pytest.approx(result["tokens_per_s"] / result["hf_tokens_per_s"])
    assert result["memory_ratio"] == pytest.approx(result["peak_mem_bytes"] / result["hf_peak_mem_bytes"])


def test_bench_alternates_the_timed_steps_of_the_two_sides():
    order = []

    class FakeSide:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def timed_step(self):
            order.append(self.name)
            return self.seconds

    medians = bench.time_sides({"ours": FakeSide("ours", 1.0), "hf": FakeSide("hf", 2.0)}, steps=3)
    assert order == ["ours", "hf"] * 3
    assert medians == {"ours": 1.0, "hf": 2.0}


def test_bench_profile_lists_our_costliest_operations_by_shape(tiny_model):
    out = subprocess.run([sys.executable, "bench.py", "--model", tiny_model, "--method", "lora", "--batch", "2",
                          "--seq", "32", "--warmup", "1", "--profile"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "Self CPU" in out and "Input Shapes" in out
    assert "aten::mm" in out  # the model's matrix products are among them
