"""The course's experiments (course/): one command per lesson, each a few minutes on a laptop CPU.

    python course/course.py 3          # lesson 3's runs and evaluations -> course/results/03_methods.md
    python course/course.py all        # every lesson, in order
    python course/course.py 3 --quick --runs_dir /tmp/runs --results_dir /tmp/results   # what the tests run

Each lesson below is a function that runs the repository's own commands (train.py, eval.py,
sweep.py, data.py, course/...) one after the other, printing each one, then writes its results file:
the command, the machine, the date, every command it ran, and the tables (and SVG curves) that the
lesson quotes. Runs go to runs/course/NAME. A finished run is reused (lessons share runs: the
baseline LoRA run appears in six of them), an interrupted one resumes, so rerunning is cheap.

--quick runs the same commands on the tiny random model (models/tiny, made by
tools/make_tiny_model.py), 2 optimizer steps, 2 examples per evaluation set: the numbers mean
nothing, but every config key, flag, file and function a lesson uses is exercised, so the course
cannot rot without a test failing (tests/test_course.py).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sweep  # noqa: E402
from plot import write_svg_chart  # noqa: E402

TINY = os.path.join(ROOT, "models", "tiny")
BASELINE = "configs/course/baseline.py"
EVAL_LIMIT = 50   # examples of each evaluation set (val, test, multiple choice; general text has 27)
QUICK_TRAIN = ["--max_steps=2", "--eval_every=0", "--save_every=1000"]
QUICK_EVAL = ["--limit", "2", "--max_new_tokens", "8"]


def machine():
    """'2-core Intel(R) Xeon(R) ..., AVX-512, no AMX, no GPU, torch 2.13.0': AMX (Intel's matrix tiles)
    makes bf16 several times faster, and changes which of two set-ups is faster."""
    import torch
    cpu, avx512, amx = platform.processor() or platform.machine(), False, None
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
        avx512, amx = "avx512f" in info, " amx_tile" in info
    except (OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core {cpu}{', AVX-512' if avx512 else ''}"
            f"{'' if amx is None else ', AMX' if amx else ', no AMX'}, {gpu}, torch {torch.__version__}")


def table(head, rows):
    """A markdown table; a | inside a cell (as in <|im_end|>) is escaped."""
    cell = lambda c: str(c).replace("|", "\\|")
    return "\n".join(["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)] +
                      ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def rel(path):
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


class Course:
    """Runs one lesson's commands, remembers them, and writes its results file."""

    def __init__(self, runs_dir, results_dir, quick):
        self.runs_dir, self.results_dir, self.quick = runs_dir, results_dir, quick
        self.commands = []  # (command, minutes, reused?)

    def config(self, path):
        """The config to use: the course's own, or with --quick a copy that swaps in the tiny model
        and 32 examples (a lesson's own --train_data=... on the command line still wins)."""
        if not self.quick:
            return path
        copy = os.path.join(self.runs_dir, "quick_configs", os.path.basename(path))
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        with open(copy, "w") as f:
            f.write(text + f'\n# --quick (course/course.py): the tiny random model, 32 examples\nmodel = "{TINY}"\n'
                    'dtype = "float32"\ntrain_data = ["data/course/train_32.jsonl"]\nval_data = "data/course/train_32.jsonl"\n')
        return rel(copy)

    def python(self, *args, capture=False):
        """Run `python ARGS` in the repository root; stop the lesson if it fails."""
        command = "python " + " ".join(shlex.quote(str(a)) for a in args)
        print(f"$ {command}", flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, text=True,
                              capture_output=capture)
        if proc.returncode != 0:
            raise SystemExit(f"error: `{command}` failed (exit {proc.returncode})"
                             + (f":\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}" if capture else ""))
        self.commands.append((command, (time.time() - start) / 60, False))
        return proc

    def run_dir(self, name):
        return os.path.join(self.runs_dir, name)

    def train(self, name, *overrides, config=BASELINE):
        """train.py into runs_dir/NAME (skipped when finished, resumed when interrupted) -> its summary."""
        out_dir = self.run_dir(name)
        record = sweep.run_train(self.config(config), [*overrides, *(QUICK_TRAIN if self.quick else [])],
                                 rel(out_dir))
        if record is None:
            raise SystemExit(130)
        if record["status"] != "done":
            raise SystemExit(f"error: {rel(out_dir)}: {record['status']} ({record['error']}); "
                             f"see {rel(out_dir)}/train.log")
        self.commands.append((record["command"], record["seconds"] / 60, record.get("skipped", False)))
        return dict(sweep.summarize_run(out_dir), dir=out_dir)

    def evaluate(self, name, *flags, weights=None, out="eval", config=BASELINE, limit=EVAL_LIMIT):
        """eval.py on run NAME's adapter (or model folder, or weights=best) -> eval.json's metrics.
        Skipped when NAME/OUT/eval.json exists."""
        run = self.run_dir(name)
        folder = os.path.join(run, weights or ("adapter" if os.path.isdir(os.path.join(run, "adapter")) else "model"))
        result = os.path.join(run, out, "eval.json")
        command = ["eval.py", "--config", self.config(config),
                   "--adapter" if os.path.isfile(os.path.join(folder, "adapter_config.json")) else "--model",
                   rel(folder), *flags, "--out", rel(os.path.join(run, out)), "--show", "3",
                   "--base_cache", rel(os.path.join(self.runs_dir, "base_cache")),  # the base model once
                   *(QUICK_EVAL if self.quick else ["--limit", str(limit)])]
        if not os.path.exists(result):
            self.python(*command)
            with open(result) as f:
                return json.load(f)
        with open(result) as f:
            metrics = json.load(f)
        seconds = metrics["base"]["seconds"] + metrics["tuned"]["seconds"]  # without loading the models
        self.commands.append(("python " + " ".join(shlex.quote(a) for a in command), seconds / 60, True))
        return metrics

    def sweep(self, name, grid, *overrides, config):
        """sweep.py into runs_dir/NAME -> the summary of each run, in grid order."""
        sweep_dir = self.run_dir(name)
        self.python("sweep.py", "--config", self.config(config), "--grid", grid, *overrides,
                    f"--out_dir={rel(sweep_dir)}", *(QUICK_TRAIN + ["--limit_runs", "1"] if self.quick else []))
        axes = sweep.parse_grid(grid)
        rows = []
        for point in sweep.grid_points(axes):
            folder = os.path.join(sweep_dir, sweep.run_name(point))
            if os.path.exists(os.path.join(folder, "run.json")):
                rows.append(dict(sweep.summarize_run(folder), point=dict(point), dir=folder))
        return rows

    def tool(self, script, *args, config=BASELINE):
        """A lesson's measuring script (course/...) with --json_out -> its JSON."""
        out = os.path.join(self.runs_dir, "tools", os.path.basename(script).replace(".py", ".json"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.python(script, "--config", self.config(config), *args, "--json_out", rel(out))
        with open(out) as f:
            return json.load(f)

    def svg(self, filename, title, series, ylabel="validation loss (nats/token)"):
        """results_dir/FILENAME, a line chart of series {name: [(step, y)]} -> the markdown that shows it."""
        os.makedirs(self.results_dir, exist_ok=True)
        write_svg_chart(os.path.join(self.results_dir, filename), series, title=title,
                        xlabel="optimizer step", ylabel=ylabel)
        return f"![{title}]({filename})"

    def write(self, number, slug, title, body):
        """results_dir/NN_SLUG.md: the header (command, machine, date, the commands run), then body."""
        os.makedirs(self.results_dir, exist_ok=True)
        stem = os.path.join(self.results_dir, f"{number:02d}_{slug}")
        lines = [f"# Lesson {number} results: {title}", ""]
        if self.quick:
            lines += ["**--quick: the tiny random model and 2 steps; these numbers mean nothing.**", ""]
        lines += [f"Produced by `python course/course.py {number}` on {machine()}, "
                  f"{datetime.date.today().isoformat()}.", "",
                  f"The commands below took {sum(m for _, m, _ in self.commands):.1f} minutes in all, "
                  f"{sum(m for _, m, reused in self.commands if reused):.1f} of them in runs and evaluations "
                  "reused from an earlier invocation or another lesson (marked *earlier*).", "", "```"]
        for command, minutes, reused in self.commands:
            lines.append(f"{command}    # {'earlier, ' if reused else ''}{minutes:.1f} min")
        lines += ["```", ""]
        with open(stem + ".md", "w", encoding="utf-8") as f:
            f.write("\n".join(lines + body).rstrip() + "\n")
        print(f"wrote {rel(stem)}.md")
        return stem + ".md"


def trainable(run_dir):
    """lora.count_trainable of the model as train.py builds it for this run (its config.json)."""
    import torch
    import lora
    import train
    from config import Config
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = Config(**json.load(f))
    return lora.count_trainable(train.build_model(cfg, torch.device("cpu")))


def eval_section(run_dir, out="eval"):
    """The test-answers table of an eval.md (base and fine-tuned answers side by side)."""
    with open(os.path.join(run_dir, out, "eval.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.find("## The first")
    return text[start:].strip().replace("## The first", "### The first") if start >= 0 else ""


# ---------------------------------------------------------------------------------------------
# The lessons


def lesson_1(c):
    """What SFT changes: tokens, labels and the loss mask; the loss and the answers before and after."""
    show = c.python("data.py", "--config", c.config(BASELINE), "--show", "2", capture=True).stdout
    run = c.train("baseline")
    ev = c.evaluate("baseline")
    base, tuned = ev["base"], ev["tuned"]
    rows = [[label, fmt(base.get(key)), fmt(tuned.get(key))] for label, key, fmt in [
        ("validation loss on the answer tokens (nats/token)", "val_loss", num),
        ("exact match (test)", "exact_match", pct), ("valid JSON (test)", "valid_json", pct),
        ("JSON field accuracy (test)", "field_accuracy", pct)]]
    body = ["## `python data.py --config configs/course/baseline.py --show 2`", "",
            "Trained tokens are wrapped in «» (on a terminal they are green).", "", "```",
            show.strip(), "```", "", "## One example at the start of its answer, token by token", "",
            shift_table(c.config(BASELINE)), "",
            f"## Before and after {run['steps']} steps of LoRA ({EVAL_LIMIT if not c.quick else 2} examples each)", "",
            table(["", "base model", "fine-tuned"], rows), "",
            c.svg("01_baseline.svg", "the baseline LoRA run", {"train": run["train_curve"], "validation": run["val_curve"]},
                  ylabel="loss on answer tokens (nats/token)"), "", eval_section(run["dir"])]
    c.write(1, "what_sft_changes", "what SFT changes", body)


def shift_table(config):
    """Position, token, label and target of the tokens around the first trained token of an example."""
    from config import load_config
    from data import collate
    from eval import val_examples
    from tokenizer import load_tokenizer
    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model)
    ex = val_examples(cfg, tokenizer, "val_data", 1)[0]
    targets = collate([ex], [[0]], len(ex["input_ids"]), tokenizer.pad_id)["targets"][0].tolist()
    first = next(k for k, label in enumerate(ex["labels"]) if label != -100)
    show = lambda i: "`" + tokenizer.decode_bytes([int(i)]).decode("utf-8", "replace").replace("\n", "↵") + "`"
    rows = []
    for t in list(range(first - 4, first + 5)) + list(range(len(ex["input_ids"]) - 3, len(ex["input_ids"]))):
        label = ex["labels"][t]
        rows.append([t, show(ex["input_ids"][t]), "-100 (no loss)" if label == -100 else f"{label} (trained)",
                     "-100" if targets[t] == -100 else f"{targets[t]} = {show(targets[t])}"])
    return table(["position t", "input token", "label (data.render)", "target at t (data.collate: label t+1)"], rows)


def lesson_2(c):
    """Chat templates: the prompt at inference must be rendered exactly as in training."""
    import data
    from config import load_config
    from tokenizer import load_tokenizer
    c.train("baseline")
    c.train("02_alpaca", "--template=alpaca")
    cases = [("chatml (the model's own)", "chatml", c.evaluate("baseline")),
             ("chatml", "alpaca", c.evaluate("baseline", "--template=alpaca", out="eval_alpaca")),
             ("chatml", "chatml, without the system message",
              c.evaluate("baseline", "--test_data", "data/course/test_no_system.jsonl", out="eval_no_system")),
             ("alpaca", "alpaca", c.evaluate("02_alpaca", "--template=alpaca")),
             ("alpaca", "chatml (what a chat server sends)", c.evaluate("02_alpaca", "--template=chatml", out="eval_chatml"))]
    rows = [[trained, inference, pct(e["tuned"]["exact_match"]), pct(e["tuned"]["valid_json"]),
             pct(e["tuned"]["field_accuracy"])] for trained, inference, e in cases]
    tokenizer = load_tokenizer(load_config(c.config(BASELINE)).model)
    conversation = data.load_conversations("data/demo/test.jsonl")[0][:2]
    rendered = []
    for name, messages in [("chatml", conversation), ("alpaca", conversation), ("chatml", conversation[1:])]:
        text = data.format_chat(messages, name, add_generation_prompt=True, tokenizer=tokenizer)
        rendered += [f"**{name}**" + (", without the system message" if len(messages) == 1 else "") + ":", "",
                     "```", text, "```", ""]
    body = ["## What the model sees: one test prompt, three renderings", ""] + rendered + [
        "## Test answers when inference renders the prompt like training, and when it does not", "",
        table(["trained with", "prompt rendered at inference with", "exact match", "valid JSON", "field accuracy"], rows)]
    c.write(2, "chat_templates", "chat templates", body)


METHODS = [  # (run, label, overrides of configs/course/baseline.py)
    ("03_full", "full fine-tuning", ["--method=full", "--lr=1e-4", "--min_lr=1e-5"]),
    ("03_freeze", "freeze: top 2 blocks + norm + head", ["--method=freeze", "--train_layers=2", "--lr=3e-4", "--min_lr=3e-5"]),
    ("03_head", "feature-based: output layer only", ["--method=head", "--lr=3e-4", "--min_lr=3e-5"]),
    ("baseline", "LoRA r=16 on all linears", []),
    ("03_qlora", "QLoRA r=16 (NF4 base)", ["--method=qlora"]),
]


def lesson_3(c):
    """Full fine-tuning, freezing, feature-based, LoRA, QLoRA: what trains, memory, speed, result."""
    rows, curves = [], {}
    for name, label, overrides in METHODS:
        run = c.train(name, *overrides)
        ev = c.evaluate(name)
        counts = trainable(run["dir"])
        share = counts["trainable"] / (counts["trainable"] + counts["frozen"])
        state = counts["weight_bytes"] + counts["grad_bytes"] + counts["optimizer_bytes"]
        rows.append([label, f"{counts['trainable']:,}", pct(share), f"{state / 2**20:.0f}", num(run["peak_mib"], ".0f"),
                     num(run["tokens_per_s"], ".0f"), num(run["minutes"], ".1f"), num(run["best_val_loss"]),
                     pct(ev["tuned"]["exact_match"]), pct(ev["tuned"]["field_accuracy"])])
        curves[label] = run["val_curve"]
    body = ["## Five ways to fine-tune, the same 40 steps of the same data", "",
            table(["method", "trainable parameters", "of all", "weights + gradients + AdamW (MiB)",
                   "peak RSS (MiB)", "tokens/s", "minutes", "best val loss", "exact match", "field accuracy"], rows),
            "", "Overrides of configs/course/baseline.py per method: " +
            "; ".join(f"{label}: `{' '.join(o) or '(none)'}`" for _, label, o in METHODS) + ".", "",
            c.svg("03_methods.svg", "validation loss by method", curves)]
    c.write(3, "methods", "full fine-tuning, freezing, feature-based, LoRA, QLoRA", body)


def lesson_4(c):
    """LoRA rank and alpha: the update is scaled by alpha / rank."""
    runs = c.sweep("04_lora_rank", "lora_rank=4,16,64 lora_alpha=16,64", config=BASELINE)
    counts = {}
    rows = []
    for r in sorted(runs, key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0.0)):
        rank, alpha = int(r["point"]["lora_rank"]), float(r["point"]["lora_alpha"])
        if rank not in counts:
            counts[rank] = trainable(r["dir"])["trainable"]
        rows.append([rank, f"{alpha:g}", f"{alpha / rank:g}", f"{counts[rank]:,}", num(r["best_val_loss"]),
                     num(r["final_train_loss"]), num(r["tokens_per_s"], ".0f"), num(r["minutes"], ".1f")])
    body = ["## `python sweep.py --config configs/course/baseline.py --grid \"lora_rank=4,16,64 lora_alpha=16,64\" "
            "--out_dir=runs/course/04_lora_rank`",
            "", "Sorted by validation loss (lowest first).", "",
            table(["rank r", "alpha", "scaling alpha/r", "trainable parameters", "best val loss",
                   "final train loss", "tokens/s", "minutes"], rows), "",
            c.svg("04_lora_rank_alpha.svg", "validation loss by rank and alpha",
                  {f"r={r['point']['lora_rank']}, alpha={r['point']['lora_alpha']}": r["val_curve"] for r in runs})]
    c.write(4, "lora_rank_alpha", "LoRA rank and alpha", body)


def lesson_5(c):
    """QLoRA: what NF4 stores, bits per weight, the quantization error, the cost in speed."""
    q = c.tool("course/nf4_report.py", "--limit", "2" if c.quick else str(EVAL_LIMIT))
    lora_run, qlora_run = c.train("baseline"), c.train("03_qlora", "--method=qlora")
    lora_ev, qlora_ev = c.evaluate("baseline"), c.evaluate("03_qlora")
    block = [[f"{r['weight']:+.5f}", f"{r['scaled']:+.4f}", r["code"], f"{r['nf4_value']:+.4f}",
              f"{r['dequantized']:+.5f}", f"{r['dequantized'] - r['weight']:+.5f}"] for r in q["example_block"]["rows"]]
    storage = [["bf16", "16", f"{q['bf16_bytes'] / 2**20:.1f}"],
               ["NF4, fp32 absmax per 64 weights", f"{q['bits_nf4']:.3f}", f"{q['nf4_bytes'] / 2**20:.1f}"],
               ["NF4 + double quantization (QLoRA)", f"{q['bits_nf4_dq']:.3f}", f"{q['nf4_dq_bytes'] / 2**20:.1f}"]]
    error = [["relative error ‖W − Q(W)‖ / ‖W‖, all block linears", "0", f"{q['rel_error_nf4']:.4f}",
              f"{q['rel_error_uniform4']:.4f}"],
             [f"validation loss of the base model ({q['val_examples']} examples)", num(q["original"]["val_loss"]),
              num(q["nf4"]["val_loss"]), "-"],
             ["general-text perplexity of the base model", num(q["original"]["general_ppl"], ".3f"),
              num(q["nf4"]["general_ppl"], ".3f"), "-"]]
    training = [[label, num(r["peak_mib"], ".0f"), num(r["tokens_per_s"], ".0f"), num(r["minutes"], ".1f"),
                 num(r["best_val_loss"]), pct(e["tuned"]["exact_match"]), pct(e["tuned"]["field_accuracy"])]
                for label, r, e in [("LoRA (base in the compute dtype)", lora_run, lora_ev),
                                    ("QLoRA (base in NF4)", qlora_run, qlora_ev)]]
    body = [f"## What one block stores: the first 8 of 64 weights of `{q['example_layer']}`", "",
            f"The block's absmax is {q['example_block']['absmax']:.5f}; each weight is stored as a 4-bit code.", "",
            table(["weight", "weight / absmax", "code", "NF4 value", "dequantized", "error"], block), "",
            "The 16 NF4 values: " + ", ".join(f"{v:.4f}" for v in q["nf4_code"]), "",
            f"## Storage of the {q['linears']} block linears ({q['weights']:,} weights)", "",
            table(["format", "bits per weight", "MiB"], storage), "",
            "## The error of 4 bits, before any training", "",
            table(["", "original", "NF4", "uniform 4-bit, same blocks"], error), "",
            "## Training: LoRA vs QLoRA, the same 40 steps (runs of lesson 3)", "",
            table(["", "peak RSS (MiB)", "tokens/s", "minutes", "best val loss", "exact match", "field accuracy"], training)]
    c.write(5, "qlora", "QLoRA and NF4", body)


def lesson_6(c):
    """Learning rate, warmup, batch size and gradient accumulation (and its normalization pitfall)."""
    hp = "configs/course/06_hparams.py"
    lr_runs = c.sweep("06_lr", "lr=1e-4,1e-3,1e-2", config=hp)
    warm_runs = c.sweep("06_warmup", "warmup_steps=0,10", "--lr=1e-2", config=hp)
    batch = c.train("06_batch8", "--batch_size=8", "--grad_accum=1", "--max_steps=10", "--eval_every=0", config=hp)
    accum = c.train("06_accum", "--batch_size=2", "--grad_accum=4", "--max_steps=10", "--eval_every=0", config=hp)
    g = c.tool("course/grad_accum_pitfall.py")
    sweep_rows = lambda runs, key: [[r["point"][key], num(r["best_val_loss"]), num(r["best_step"], "d"),
                                     num(r["final_val_loss"]), num(r["final_train_loss"]),
                                     num(max(t for _, t in r["train_curve"]), ".3f"), r["status"]] for r in runs]
    head = ["best val loss", "at step", "final val loss", "final train loss", "highest train loss", "status"]
    accum_rows = [[label, num(r["peak_mib"], ".0f"), num(r["tokens_per_s"], ".0f"), num(r["final_train_loss"]),
                   num(r["final_val_loss"])] for label, r in [("batch_size 8, grad_accum 1", batch),
                                                               ("batch_size 2, grad_accum 4", accum)]]
    grad_rows = [[label, f"{g[key]['loss']:.6f}", f"{g[key]['relative_error']:.1e}", f"{g[key]['cosine']:.6f}"]
                 for label, key in [("one batch of 8 (the reference)", "one_batch"),
                                    ("accumulated, sum / trained tokens of the step (train.py)", "token_weighted"),
                                    ("accumulated, mean of per-micro-batch means", "mean_of_means")]]
    body = ["## Learning rate: `python sweep.py --config configs/course/06_hparams.py --grid \"lr=1e-4,1e-3,1e-2\"`", "",
            table(["lr", *head], sweep_rows(lr_runs, "lr")), "",
            c.svg("06_lr.svg", "validation loss by learning rate", {f"lr={r['point']['lr']}": r["val_curve"] for r in lr_runs}), "",
            "## Warmup at lr 1e-2: `python sweep.py --config configs/course/06_hparams.py --grid \"warmup_steps=0,10\" --lr=1e-2`",
            "", table(["warmup steps", *head], sweep_rows(warm_runs, "warmup_steps")), "",
            c.svg("06_warmup.svg", "training loss at lr 1e-2, with and without warmup",
                  {f"warmup_steps={r['point']['warmup_steps']}": r["train_curve"] for r in warm_runs},
                  ylabel="training loss (nats/token)"), "",
            "## The same effective batch (8 packed rows a step), two ways, 10 steps", "",
            table(["", "peak RSS (MiB)", "tokens/s", "final train loss", "val loss"], accum_rows), "",
            "## Gradient accumulation and the token normalization (`course/grad_accum_pitfall.py`)", "",
            f"Micro-batches of {g['micro_batch_examples']} examples holding {g['micro_batch_trained_tokens']} trained "
            "tokens; gradients of the LoRA weights in float64, compared with one batch of all 8.", "",
            table(["how the step's loss is formed", "loss", "gradient relative error", "cosine"], grad_rows)]
    c.write(6, "hyperparameters", "learning rate, warmup, batch size, gradient accumulation", body)


def lesson_7(c):
    """Packing: padding saved, cross-example contamination under a plain causal mask, speed."""
    p = c.tool("course/packing_contamination.py", "--examples", "8" if c.quick else "24", "--seq_len=512")
    none = c.train("07_none", "--packing=none", "--batch_size=11", "--max_steps=10", "--eval_every=0")
    packed = c.train("07_packed", "--packing=packed", "--batch_size=4", "--max_steps=10", "--eval_every=0")
    contamination = [[variant, num(r["mean_loss"]), num(r["max_abs_change"]), f"{r['changed']} of {p['examples']}"]
                     for variant, r in p["contamination"].items()]
    padding = [[label, f"{p['rows_per_epoch'][label]:,}", pct(share)] for label, share in p["padding"].items()]
    speed = [[label, num(r["tokens_per_s"], ".0f"), num(r["peak_mib"], ".0f"), num(r["final_val_loss"])]
             for label, r in [("one example per row, batch_size 11", none), ("packed rows of 256, batch_size 4", packed)]]
    body = [f"## Contamination: {p['examples']} validation examples packed into {p['rows']} rows of at most "
            f"{p['seq_len']} tokens ({p['examples_not_first']} of them not first in their row)", "",
            f"Mean loss of the examples, each alone: {p['alone_mean_loss']:.4f}.", "",
            table(["attention in the packed row", "mean loss", "largest change of an example's loss",
                   "examples whose loss changed by > 0.001"], contamination), "",
            f"## Padding: the {p['train_examples']:,} training examples in batches of {p['batch_size']} rows", "",
            table(["rows", "rows per epoch", "padding tokens"], padding), "",
            "## Training speed, 10 steps each (tokens/s counts real tokens, not padding)", "",
            table(["", "tokens/s", "peak RSS (MiB)", "val loss after 10 steps"], speed)]
    c.write(7, "packing", "packing and cross-example contamination", body)


def lesson_8(c):
    """Overfitting, validation loss, early stopping (and NEFTune noise as a regularizer)."""
    cfg = "configs/course/08_overfit.py"
    over = c.train("08_overfit", config=cfg)
    # twice the steps, stopped by patience: constant lr, so its first 80 steps are 08_overfit's
    early = c.train("08_early", "--early_stopping_patience=2", "--max_steps=160", config=cfg)
    neft = c.train("08_neftune", "--neftune_alpha=5", config=cfg)
    evals = [("08_overfit", "best/ (lowest val loss)", "best", "eval_best"),
             ("08_overfit", "adapter/ (the last step)", None, "eval"),
             ("08_neftune", "NEFTune alpha 5, best/", "best", "eval_best"),
             ("08_neftune", "NEFTune alpha 5, adapter/ (the last step)", None, "eval")]
    runs = {"08_overfit": over, "08_neftune": neft}
    rows = []
    for name, label, weights, out in evals:
        e = c.evaluate(name, weights=weights, out=out, config=cfg)
        r = runs[name]
        step = r["best_step"] if weights == "best" else r["steps"]
        rows.append([label, step, num(dict(r["val_curve"]).get(step)), num(dict(r["train_curve"]).get(step)),
                     pct(e["tuned"]["exact_match"]), pct(e["tuned"]["field_accuracy"])])
    stop = [[label, r["steps"], num(r["best_val_loss"]), num(r["best_step"], "d"), num(r["minutes"], ".1f")]
            for label, r in [("max_steps 80, patience 0 (run to the end)", over),
                             ("max_steps 160, early_stopping_patience 2", early)]]
    body = ["## 32 training examples, 10 epochs, validated once an epoch", "",
            table(["weights", "step", "val loss", "train loss", "exact match", "field accuracy"], rows), "",
            "## Early stopping", "",
            table(["", "steps run", "best val loss", "at step", "minutes"], stop), "",
            c.svg("08_overfitting.svg", "32 examples, 10 epochs", {
                "train": over["train_curve"], "validation": over["val_curve"],
                "train, NEFTune alpha 5": neft["train_curve"], "validation, NEFTune alpha 5": neft["val_curve"]},
                ylabel="loss (nats/token)")]
    c.write(8, "overfitting", "overfitting, validation loss, early stopping", body)


FORGETTING = [  # (run, label, overrides of configs/course/baseline.py)
    ("03_full", "full fine-tuning", METHODS[0][2]),
    ("09_full_distill", "full fine-tuning + distillation on the prompts (weight 1)",
     METHODS[0][2] + ["--distill_weight=1.0"]),
    ("03_freeze", METHODS[1][1], METHODS[1][2]),
    ("baseline", "LoRA r=16", []),
    ("09_lora_distill", "LoRA r=16 + distillation on the prompts (weight 1)", ["--distill_weight=1.0"]),
    ("09_lora_distill_answer", "LoRA r=16 + distillation on the answers (weight 1)",
     ["--distill_weight=1.0", "--distill_on=answer"]),
]


def lesson_9(c):
    """Catastrophic forgetting on general text, and two mitigations: fewer trainable weights, distillation."""
    rows = []
    for name, label, overrides in FORGETTING:
        c.train(name, *overrides)
        e = c.evaluate(name)
        base, tuned = e["base"], e["tuned"]
        rows.append([label, num(base["forgetting_ppl"], ".3f"), num(tuned["forgetting_ppl"], ".3f"),
                     f"{tuned['forgetting_ppl'] / base['forgetting_ppl'] - 1:+.1%}", pct(base["mc_accuracy"]),
                     pct(tuned["mc_accuracy"]), pct(tuned["exact_match"]), pct(tuned["field_accuracy"])])
    body = ["## General-text perplexity and multiple-choice accuracy before and after the demo fine-tune", "",
            table(["method", "general-text ppl, base", "after", "change", "multiple choice, base", "after",
                   "exact match (task)", "field accuracy (task)"], rows), "",
            "Overrides of configs/course/baseline.py: " +
            "; ".join(f"{label}: `{' '.join(o) or '(none)'}`" for _, label, o in FORGETTING) + "."]
    c.write(9, "forgetting", "catastrophic forgetting", body)


DATASETS = [  # (run, label, overrides of configs/course/baseline.py)
    ("10_clean_200", "200 clean", ["--train_data=data/course/clean_200.jsonl"]),
    ("10_noisy_2400", "2,400, half of them corrupted", ["--train_data=data/course/noisy_2400.jsonl"]),
    ("baseline", "2,400 clean", []),
]


def lesson_10(c):
    """Data quality vs quantity: a small clean set against a larger noisy one (LIMA-style)."""
    from config import load_config
    rows = []
    for name, label, overrides in DATASETS:
        run = c.train(name, *overrides)
        e = c.evaluate(name)
        records = [r for path in load_config(c.config(BASELINE), overrides).train_data for r in sweep.read_jsonl(path)]
        seen = sum(m["trained_tokens"] for m in sweep.read_jsonl(os.path.join(run["dir"], "metrics.jsonl")))
        rows.append([label, f"{len(records):,}", f"{sum('noise' in r for r in records):,}",
                     f"{seen:,}", num(run["best_val_loss"]), pct(e["tuned"]["exact_match"]),
                     pct(e["tuned"]["valid_json"]), pct(e["tuned"]["field_accuracy"])])
    body = ["## The same 40 steps (about 440 examples seen) from three training sets", "",
            table(["training data", "examples", "corrupted", "trained tokens seen", "best val loss (clean val)",
                   "exact match", "valid JSON", "field accuracy"], rows)]
    c.write(10, "data_quality", "data quality vs quantity", body)


PREF_VAL = "data/demo/preference_val.jsonl"  # held-out pairs: validation loss, and eval.py --pref_data
PREFERENCE_DATA = ["--train_data=['data/demo/preference_train.jsonl']", f"--val_data={PREF_VAL}"]


def lesson_11(c):
    """After SFT: DPO from the SFT model, and ORPO (SFT + preference in one loss) from the base model."""
    sft = c.train("11_sft", "--merge=True")  # the baseline, with its merged weights for DPO to start from
    runs = [("SFT (the baseline)", "11_sft", BASELINE, c.evaluate("11_sft", "--pref_data", PREF_VAL, limit=200))]
    merged = rel(os.path.join(sft["dir"], "merged"))
    c.train("11_sft_dpo", f"--model={merged}", *PREFERENCE_DATA, config="configs/course/11_dpo.py")
    runs.append(("SFT, then DPO", "11_sft_dpo", "configs/course/11_dpo.py",
                 c.evaluate("11_sft_dpo", "--pref_data", PREF_VAL, config="configs/course/11_dpo.py", limit=200)))
    c.train("11_orpo", *PREFERENCE_DATA, config="configs/course/11_orpo.py")
    runs.append(("ORPO alone", "11_orpo", "configs/course/11_orpo.py",
                 c.evaluate("11_orpo", "--pref_data", PREF_VAL, limit=200)))
    base = runs[0][3]["base"]
    rows = [["base model", "", pct(base["exact_match"]), pct(base["field_accuracy"]), pct(base["pref_accuracy"]),
             num(base["forgetting_ppl"], ".3f"), ""]]
    for label, name, _, e in runs:
        tuned = e["tuned"]
        minutes = sweep.summarize_run(c.run_dir(name))["minutes"]
        rows.append([label, num(minutes, ".1f"), pct(tuned["exact_match"]), pct(tuned["field_accuracy"]),
                     pct(tuned["pref_accuracy"]), num(tuned["forgetting_ppl"], ".3f"),
                     f"{tuned['forgetting_ppl'] / base['forgetting_ppl'] - 1:+.1%}"])
    dpo = runs[1][3]["tuned"]
    curves = []  # what each preference run logged at its validation steps (metrics.jsonl)
    for label, name in [("SFT, then DPO", "11_sft_dpo"), ("ORPO alone", "11_orpo")]:
        for m in sweep.read_jsonl(os.path.join(c.run_dir(name), "metrics.jsonl")):
            if m["step"] == 1 or "val_loss" in m:
                curves.append([label, m["step"], num(m["train_loss"]), num(m.get("val_loss")),
                               pct(m["reward_accuracy"]), num(m["reward_margin"], ".3f"),
                               num(m["logp_chosen"], ".2f"), num(m["logp_rejected"], ".2f")])
    body = ["## Exact match and field accuracy on the demo's 200 test examples, and the forgetting check", "",
            table(["model", "training minutes", "exact match", "field accuracy",
                   "held-out pairs: chosen more likely", "general-text ppl", "vs base"], rows), "",
            f"DPO against its reference (the SFT model) on the held-out pairs: reward accuracy "
            f"{pct(dpo['reward_accuracy'])}, mean reward margin {num(dpo['reward_margin'], '.3f')}.", "",
            "Field accuracy by field (test set): " + "; ".join(
                f"{label}: " + ", ".join(f"{k} {pct(v)}" for k, v in e["tuned"]["field_accuracy_by_field"].items())
                for label, _, _, e in runs if "field_accuracy_by_field" in e["tuned"]) + ".", "",
            "## The preference runs' training (metrics.jsonl, on the training pairs of each step; val loss on 13 "
            "batches of held-out pairs)", "",
            table(["run", "step", "train loss", "val loss", "reward accuracy", "reward margin",
                   "log p(chosen)", "log p(rejected)"], curves), "",
            "Log-probabilities are summed over each answer's trained tokens and averaged over the step's pairs. "
            "DPO's rewards are β (log π - log π_ref); ORPO's columns compare the answers' mean log-probability "
            "per token (its length normalization) instead."]
    c.write(11, "preference", "preference tuning after SFT: DPO and ORPO", body)


LESSONS = {1: lesson_1, 2: lesson_2, 3: lesson_3, 4: lesson_4, 5: lesson_5,
           6: lesson_6, 7: lesson_7, 8: lesson_8, 9: lesson_9, 10: lesson_10, 11: lesson_11}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lesson", help="a lesson number (1-11) or 'all'")
    p.add_argument("--quick", action="store_true", help="the tiny model and 2 steps: checks, not results")
    p.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "course"))
    p.add_argument("--results_dir", default=os.path.join(ROOT, "course", "results"))
    args = p.parse_args(argv)
    lessons = list(LESSONS) if args.lesson == "all" else [int(args.lesson)] if args.lesson.isdigit() else []
    if not lessons or any(n not in LESSONS for n in lessons):
        p.error(f"lesson {args.lesson!r}: expected 1-{len(LESSONS)} or all")
    runs_dir, results_dir = os.path.abspath(args.runs_dir), os.path.abspath(args.results_dir)
    os.chdir(ROOT)  # the commands name configs and data relative to the repository root
    if args.quick:  # tiny matrices gain nothing from a second thread, and lose a lot on a busy machine
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.quick and not os.path.isfile(os.path.join(TINY, "model.safetensors")):
        p.error(f"--quick needs {rel(TINY)}: python tools/get_model.py tiny")
    if not os.path.isfile(os.path.join(ROOT, "data", "course", "noisy_2400.jsonl")):
        subprocess.run([sys.executable, os.path.join(ROOT, "course", "make_course_data.py")], check=True)
    for n in lessons:
        print(f"=== lesson {n}: {LESSONS[n].__doc__}", flush=True)
        LESSONS[n](Course(runs_dir, results_dir, args.quick))


if __name__ == "__main__":
    main()
