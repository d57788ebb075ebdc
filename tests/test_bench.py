"""bench.py: its interface and what it reports (the numbers themselves are measured, not tested)."""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT

sys.path.insert(0, f"{ROOT}/bench")
import bench  # noqa: E402


def run_bench(model, method, *extra, rounds=1):
    out = subprocess.run([sys.executable, "bench/bench.py", "--model", model, "--method", method, "--batch", "2",
                          "--seq", "32", "--steps", "2", "--warmup", "1", "--rounds", str(rounds), "--json", *extra],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_bench_json_last_line_has_speed_memory_and_mfu(tiny_model, method):
    result = run_bench(tiny_model, method)
    assert result["method"] == method
    assert result["tokens_per_s"] > 0 and result["peak_mem_bytes"] > 0 and 0 < result["mfu"]
    assert result["dtype"] in ("float32", "bfloat16")  # auto, resolved as train.py resolves it
    assert "AMX" in result["machine"]  # the CPU is named, with or without AMX
    assert result["amx"] in (True, False) and result["torch_version"] == torch.__version__
    assert result["dtype_auto"] in ("float32", "bfloat16") and result["rounds"] == 1


@pytest.mark.parametrize("args, kernels, off", [(["--kernels", "plain"], "plain", ""),
                                               (["--off", "block,loss"], "fast", "block,loss")])
def test_bench_runs_plain_or_without_pieces_of_the_fast_layer(tiny_model, args, kernels, off):
    result = run_bench(tiny_model, "qlora", *args)
    assert (result["kernels"], result["off"]) == (kernels, off) and result["tokens_per_s"] > 0


def test_bench_refuses_a_piece_it_does_not_know(tiny_model):
    out = subprocess.run([sys.executable, "bench/bench.py", "--model", tiny_model, "--off", "flash"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--off flash: not a piece of the fast layer" in out.stderr


def test_bench_compare_hf_measures_both_sides_in_their_own_processes_in_rounds(tiny_model):
    result = run_bench(tiny_model, "lora", "--compare-hf", rounds=2)
    assert result["hf_tokens_per_s"] > 0 and result["hf_peak_mem_bytes"] > 0
    assert result["rounds"] == 2 and len(result["per_round"]) == 2
    for r in result["per_round"]:  # each round's ratios are of that round's two sides
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["hf_tokens_per_s"])
        assert r["memory_ratio"] == pytest.approx(r["peak_mem_bytes"] / r["hf_peak_mem_bytes"])
    for key in ("speedup", "memory_ratio", "tokens_per_s", "hf_peak_mem_bytes"):
        values = sorted(r[key] for r in result["per_round"])
        assert result["ranges"][key] == [values[0], values[-1]]
        assert result[key] == pytest.approx(sum(values) / 2)  # the median of two


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


def test_bench_reports_the_median_and_range_of_the_rounds_ratios():
    """Each ratio is taken in its round, then the median and min-max over the rounds; the side that
    starts swaps every round."""
    times = iter([(1.0, 2.0, 100, 200), (1.0, 4.0, 100, 400), (2.0, 2.0, 300, 200)])  # ours s, hf s, ours B, hf B
    orders = []

    def one_round(order):
        orders.append(order)
        ours, hf, ours_mem, hf_mem = next(times)
        return {"ours": dict(step_s=ours, peak_mem_bytes=ours_mem), "hf": dict(step_s=hf, peak_mem_bytes=hf_mem)}

    rounds = bench.run_rounds(one_round, 3, ["ours", "hf"])
    assert orders == [["ours", "hf"], ["hf", "ours"], ["ours", "hf"]]
    per_round, median, ranges = bench.summarize(rounds, tokens=10, flops=100.0, peak_flops=1000.0)
    assert [r["speedup"] for r in per_round] == [2.0, 4.0, 1.0]  # ours tokens/s over theirs, per round
    assert median["speedup"] == 2.0 and ranges["speedup"] == [1.0, 4.0]
    assert median["memory_ratio"] == 0.5 and ranges["memory_ratio"] == [0.25, 1.5]
    assert median["tokens_per_s"] == 10.0 and ranges["tokens_per_s"] == [5.0, 10.0]


def test_bench_profile_lists_our_costliest_operations_by_shape(tiny_model):
    out = subprocess.run([sys.executable, "bench/bench.py", "--model", tiny_model, "--method", "lora", "--batch", "2",
                          "--seq", "32", "--warmup", "1", "--profile"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "Self CPU" in out and "Input Shapes" in out
    assert "aten::mm" in out  # the model's matrix products are among them


def test_llama_1b_shape_has_the_parameter_count_of_llama_3_2_1b():
    sys.path.insert(0, f"{ROOT}/tools")
    from make_tiny_model import SHAPES
    s = SHAPES["llama-3.2-1b"]
    C, I, V, head_dim = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["hidden_size"] // s["heads"]
    block = 2 * C * C + 2 * C * s["kv_heads"] * head_dim + 3 * C * I + 2 * C  # q, o, k, v, MLP, two norms
    assert V * C + s["layers"] * block + C == 1_235_814_400  # tied embeddings; Meta's published count


def test_make_tiny_model_writes_the_shapes_and_dtype_it_is_given(tmp_path, real_model_dir):
    sys.path.insert(0, f"{ROOT}/tools")
    from make_tiny_model import make_tiny_model
    from model import load_model
    folder = make_tiny_model(str(tmp_path / "m"), real_model_dir, hidden_size=32, layers=3, heads=4, kv_heads=1,
                             intermediate_size=48, vocab_size=1000, rope_theta=500000.0, dtype=torch.bfloat16)
    cfg = load_model(folder).config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.rope_theta) == (32, 3, 1, 48, 1000, 500000.0)
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}


def test_bench_data_times_train_py_from_its_start_to_its_first_step(real_model_dir):
    out = subprocess.run([sys.executable, "bench/bench_data.py", "--records", "200", "--first-step", "1"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "AMX" in out  # the CPU is named, with or without AMX
    first = re.search(r"first start \(builds the cache.*\): ([\d.]+) s to the first step", out)
    assert first and 0 < float(first.group(1)) < 300, out
    for packing in ("none", "packed"):
        later = re.search(rf"later start, packing {packing}: ([\d.]+) s to the first step "
                          r"\(([\d.]+)-([\d.]+), 1 rounds\)", out)
        assert later and 0 < float(later.group(2)) == float(later.group(1)) == float(later.group(3)) < 300, out
