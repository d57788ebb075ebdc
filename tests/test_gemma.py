"""The second demo's model, Gemma 3 270M (base), through every script as SmolLM2 goes through them:
data.py --show, train.py (configs/assistant.py, one short step), eval.py on its adapter, chat.py."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
SHORT = ["--max_steps=1", "--batch_size=1", "--seq_len=96", "--truncation=drop", "--eval_every=0", "--save_every=100",
         "--warmup_steps=0"]


def run(*args, stdin=None):
    return subprocess.run([sys.executable, *args], input=stdin, cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=ENV)


def test_data_show_marks_the_answer_and_the_end_of_turn_of_the_gemma_format(gemma_dir):
    out = run("data.py", "--config", "configs/assistant.py", f"--model={gemma_dir}", "--data_cache=False",
              "--show", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "<start_of_turn>user↵\n" in out.stdout and "<start_of_turn>model↵\n«" in out.stdout  # ↵: a newline
    assert "<end_of_turn>»" in out.stdout  # the turn's end is trained: the model learns to stop
    assert "train: 1,416 examples" in out.stdout and out.stdout.count("--- ") == 2


@pytest.fixture(scope="module")
def gemma_run(gemma_dir, tmp_path_factory):
    """configs/assistant.py for one short step: a LoRA adapter of the real model."""
    out = str(tmp_path_factory.mktemp("assistant") / "run")
    proc = run("train.py", "--config", "configs/assistant.py", f"--model={gemma_dir}", f"--out_dir={out}", *SHORT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_train_and_eval_run_on_gemma_and_report_the_stop_rate(gemma_dir, gemma_run):
    adapter_config = json.load(open(os.path.join(gemma_run, "adapter", "adapter_config.json")))
    assert adapter_config["base_model_name_or_path"].endswith("gemma-3-270m")
    out = str(os.path.join(gemma_run, "eval"))
    # the config's model is models/gemma-3-270m (eval.py's --model names a whole fine-tuned model instead)
    proc = run("eval.py", "--config", "configs/assistant.py", "--adapter", os.path.join(gemma_run, "adapter"),
               "--limit", "2", "--max_new_tokens", "8", "--general_text=", "--mc_data=", "--json", "--out", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for side in ("base", "tuned"):
        assert 0 <= result[side]["stop_rate"] <= 1 and result[side]["val_loss"] > 0
    assert "end their turn" in open(os.path.join(out, "eval.md")).read()


def test_chat_with_gemma_through_a_pipe(gemma_dir, gemma_run):
    proc = run("chat.py", f"--model={gemma_dir}", "--adapter", os.path.join(gemma_run, "adapter"), "--template=gemma",
               "--temperature", "0", "--max_new_tokens", "6", stdin="What is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1
