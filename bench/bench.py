"""Training-step speed and memory: ours, and (with --compare-hf) transformers + PEFT (+ bitsandbytes).

    python bench/bench.py --model models/SmolLM2-135M-Instruct --method lora --batch 4 --seq 256 --compare-hf
    python bench/bench.py --method lora --compare-hf --rounds 5                        # more rounds, a tighter median
    python bench/bench.py --model models/SmolLM2-135M-Instruct --method lora --kernels plain   # no fast layer
    python bench/bench.py --model models/SmolLM2-135M-Instruct --method lora --off block       # one piece off
    python bench/bench.py --model models/SmolLM2-135M-Instruct --method lora --profile   # where the time goes

Both sides train on the same random tokens (labels -100 on the first half of each row, so half
the tokens are trained), LoRA r=16 alpha=32 on all linear layers of the blocks, AdamW, in the
dtype train.py's `dtype = "auto"` picks on this machine (or --dtype): fp32, or bf16 compute (frozen
weights in bf16, trainable ones in fp32, autocast). `--kernels plain` runs our model without the
fast layer (fast.py) and with the plain loss; `--off` names pieces of it to leave out (rmsnorm,
mlp, attention, block, lora, nf4, and loss: the fused loss of loss.py). Each side runs in its own
child process so that each one's peak memory is its own: peak RSS on CPU, max_memory_allocated
on CUDA. A step = forward + loss + backward + optimizer step; each side runs `--warmup` steps,
then we time `--steps` steps of each and take the medians. The two sides' timed steps
alternate (ours, theirs, ours, ...; only one runs at a time), so that both run through the same
spells of a shared machine. That narrows the spread of the ratio but does not remove it, as the
two sides do not slow down alike: on this project's 2-core VM, the same LoRA command gave
1.84x to 2.11x in four runs of one afternoon, and on a CPU with AMX 0.90x in one run and 5.2x in
the next. So one run decides nothing: `--rounds N` (default 3) repeats all of it with fresh
processes (the side that starts first swapping each round) and reports, for each metric and each
ratio ours / theirs, the median over the rounds and the range (min-max), with the CPU, whether it
has AMX, the torch version and the dtype `auto` picks on this machine.

FLOPs per step are counted from the shapes (a matmul of (m, k) by (k, n) is 2mkn):
  forward    2 * tokens * (parameters of the block linears) + attention + the head on trained tokens
  backward   the same again for the input gradients, and once more for the weight gradients of
             trained matrices (full fine-tuning: all of them; LoRA: only the tiny A and B)
MFU is achieved FLOP/s over the measured peak of a large matmul in the compute dtype on this
machine (not a datasheet number). The first line printed names the CPU and whether it has AMX
(Intel's matrix tiles, which make bf16 several times faster than fp32 on a CPU).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402

config.quiet_ctrl_c(__name__)  # before torch: Ctrl-C while it loads (seconds) exits 130, no traceback

import torch  # noqa: E402
PIECES = ["rmsnorm", "mlp", "attention", "block", "lora", "nf4", "loss"]  # fast.PIECES and loss.py's fused loss


def matmul_peak_flops(dtype, device, n=2048, repeat=10):
    """FLOP/s of an n x n x n matmul, the best of `repeat` after warm-up."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for i in range(repeat + 2):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def machine_name(device):
    """The GPU's name, or the CPU's model name and whether it has AMX (Linux: /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, amx = cpu_facts()
    if name is None:
        return "CPU (unknown model)"
    return f"{name}, {os.cpu_count()} cores, {'with' if amx else 'without'} AMX"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(cfg, method, batch, seq, n_trained, rank=16):
    """FLOPs of one training step, from the model's shapes (see the module docstring)."""
    C, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or C // heads
    block_params = L * (C * heads * d + 2 * C * kv * d + heads * d * C + 3 * C * I)
    tokens = batch * seq
    attention = L * 2 * 2 * batch * seq * seq * heads * d / 2  # q k^T and p v, causal half
    head = 2 * n_trained * V * C
    forward = 2 * tokens * block_params + attention + head
    input_grads = forward
    if method == "full":
        weight_grads = 2 * tokens * block_params + head
    else:  # LoRA A (r, in) and B (out, r) on the 7 linears of each block
        lora_params = L * rank * (C + heads * d + 2 * (C + kv * d) + heads * d + C + 2 * (C + I) + I + C)
        weight_grads = 2 * tokens * lora_params
    return forward + input_grads + weight_grads


def make_inputs(vocab, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # train on the second half of each row
    return ids, labels


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import memory
    return memory.peak_rss_bytes()  # VmHWM: this process's own peak (see memory.py)


# ---------------------------------------------------------------------------------------------
# The two sides, each run in a child process: `python bench/bench.py --child ours|hf ...`


def run_ours(args, device):
    import fast
    import lora
    import memory
    from config import Config
    from loss import fused_cross_entropy, masked_cross_entropy
    from model import load_model
    from train import adamw_init, adamw_step

    bf16 = args.dtype == "bfloat16"
    baseline = memory.rss_bytes() if device.type == "cpu" else 0  # before the model, as train.py measures it
    model = load_model(args.model, dtype=torch.bfloat16 if bf16 and args.method != "full" else torch.float32,
                       device=device)
    lora.prepare_model(model, args.method, lora_rank=16, lora_alpha=32.0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    off = [piece for piece in args.off.split(",") if piece]
    if args.kernels == "fast":
        fast.accelerate(model, skip=off)
    cross_entropy = fused_cross_entropy if args.kernels == "fast" and "loss" not in off else masked_cross_entropy
    model.grad_checkpointing = args.grad_checkpointing
    net = torch.compile(model) if args.compile else model
    state = adamw_init(params)
    ids, labels = make_inputs(model.config.vocab_size, args.batch, args.seq)
    ids, labels = ids.to(device), labels.to(device)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # next token
    n_trained = int((targets != -100).sum())
    model.train()
    counter = [0]
    settings = Config(method=args.method, dtype=args.dtype, kernels=args.kernels, lora_rank=16, batch_size=args.batch,
                      seq_len=args.seq, grad_checkpointing=args.grad_checkpointing, device=args.device)
    estimate = memory.estimate_memory(model, settings, baseline, args.seq, n_trained / ids.numel(), device.type)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = net(ids, return_hidden=True)
            loss = cross_entropy(hidden, model.lm_head.weight, targets) / n_trained
        loss.backward()
        counter[0] += 1
        adamw_step(params, state, counter[0], 1e-4, (0.9, 0.999), 1e-8, 0.0)
        for p in params:
            p.grad = None

    return step, dict(n_trained=n_trained, baseline_mem_bytes=baseline, estimate_mem_bytes=sum(estimate.values()))


def run_hf(args, device):
    import transformers
    from peft import LoraConfig, get_peft_model

    bf16 = args.dtype == "bfloat16"
    import memory
    baseline = memory.rss_bytes() if device.type == "cpu" else 0
    kwargs = {"dtype": torch.bfloat16 if bf16 and args.method != "full" else torch.float32,
              "device_map": str(device)}
    if args.method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, labels = make_inputs(model.config.vocab_size, args.batch, args.seq)
    ids, labels = ids.to(device), labels.to(device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, dict(n_trained=int((labels[:, 1:] != -100).sum()), baseline_mem_bytes=baseline)


def child(args):
    """One side: build, warm up, then time one step each time the parent writes "step"."""
    device = torch.device(args.device)
    step, info = (run_ours if args.child == "ours" else run_hf)(args, device)
    for _ in range(args.warmup):
        step()
    print("BENCH", json.dumps(info), flush=True)  # ready: the trained tokens, memory before the model, estimate
    for line in sys.stdin:
        if line.strip() != "step":
            break
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        print("BENCH", json.dumps(time.perf_counter() - t), flush=True)
    print("BENCH", json.dumps(peak_memory(device)), flush=True)


def profile_ours(args, rows=25):
    """Where our step's time goes (profile before optimizing): one step after warm-up under
    torch.profiler, the operations by their own time, grouped by input shapes."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    step = run_ours(args, device)[0]
    for _ in range(args.warmup):
        step()
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        step()
        sync(device)
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows,
        max_name_column_width=50, max_shapes_column_width=60))


class Child:
    """A side in its own process (`python bench/bench.py --child ours|hf ...`), talking by lines that
    start with BENCH on its stdout; its stderr goes to a file, shown if it fails."""

    def __init__(self, side, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", side] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "compare_hf", "json") and v is not None and not isinstance(v, bool)]
        cmd += [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                if isinstance(v, bool) and v and k not in ("compare_hf", "json", "profile")]
        self.side, self.stderr = side, tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self.info = self.answer()
        self.n_trained = self.info["n_trained"]

    def answer(self):
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                return json.loads(line[len("BENCH "):])
        self.proc.wait()
        self.stderr.seek(0)
        sys.exit(f"bench: the {self.side} side failed:\n{self.stderr.read()[-3000:]}")

    def timed_step(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.answer()

    def peak_memory(self):
        self.proc.stdin.close()  # end of input: the child reports its peak and exits
        peak = self.answer()
        self.proc.wait()
        return peak


def time_sides(sides, steps):
    """Median step time of each side, their timed steps alternating."""
    times = {side: [] for side in sides}
    for _ in range(steps):
        for side, child in sides.items():
            times[side].append(child.timed_step())
    return {side: statistics.median(t) for side, t in times.items()}


def run_round(args, order):
    """One round: a fresh process for each side (started in `order`), their timed steps alternating;
    per side, the median step time, the peak memory and the trained tokens of a step."""
    sides = {side: Child(side, args) for side in order}
    median = time_sides(sides, args.steps)
    return {side: dict(step_s=median[side], peak_mem_bytes=child.peak_memory(), **child.info)
            for side, child in sides.items()}


def run_rounds(one_round, rounds, order):
    """The results of `rounds` rounds; the sides' starting order swaps every round, so that neither
    side always runs first (one slow spell of a shared machine then weighs on both alike)."""
    return [one_round(order if r % 2 == 0 else order[::-1]) for r in range(rounds)]


def summarize(rounds, tokens, flops, peak_flops):
    """Each round's metrics (speed, memory and, with theirs, the ratios ours / theirs), and over the
    rounds the median and the [min, max] of each: the ratios are medians of each round's ratio."""
    per_round = []
    for r in rounds:
        ours = r["ours"]
        m = dict(tokens_per_s=tokens / ours["step_s"], step_s=ours["step_s"], peak_mem_bytes=ours["peak_mem_bytes"],
                 achieved_flops=flops / ours["step_s"], mfu=flops / ours["step_s"] / peak_flops)
        if "estimate_mem_bytes" in ours:  # train.py's memory estimate against the peak, both above the baseline
            base = ours["baseline_mem_bytes"]
            m.update(baseline_mem_bytes=base, estimate_mem_bytes=ours["estimate_mem_bytes"],
                     estimate_ratio=(ours["estimate_mem_bytes"] - base) / max(ours["peak_mem_bytes"] - base, 1))
        if "hf" in r:
            m.update(hf_tokens_per_s=tokens / r["hf"]["step_s"], hf_step_s=r["hf"]["step_s"],
                     hf_peak_mem_bytes=r["hf"]["peak_mem_bytes"])
            m.update(speedup=m["tokens_per_s"] / m["hf_tokens_per_s"],
                     memory_ratio=m["peak_mem_bytes"] / m["hf_peak_mem_bytes"])
        per_round.append(m)
    median = {k: statistics.median(m[k] for m in per_round) for k in per_round[0]}
    ranges = {k: [min(m[k] for m in per_round), max(m[k] for m in per_round)] for k in per_round[0]}
    return per_round, median, ranges


def cpu_facts():
    """(CPU model name, whether it has AMX) from /proc/cpuinfo (Linux); (None, None) elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None, None
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    return name, " amx_tile" in info


def report(result, args):
    """The human-readable lines of a result (the JSON line, with --json, has it all)."""
    mid, span = result, result["ranges"]
    rng = lambda k, fmt, scale=1: f"{fmt.format(span[k][0] / scale)}-{fmt.format(span[k][1] / scale)}"  # noqa: E731
    print(f"machine: {result['machine']}; torch {result['torch_version']}; dtype auto picks {result['dtype_auto']} "
          f"here; {args.dtype} matmul peak {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s (2048^3)")
    print(f"{args.method}, batch {args.batch} x {args.seq} tokens, {args.dtype} compute, kernels {args.kernels}"
          f"{' without ' + args.off if args.off else ''}: {args.rounds} round{'s' * (args.rounds > 1)} of fresh "
          f"processes, median of {args.steps} steps each{', alternating with theirs' if args.compare_hf else ''}; "
          f"median of the rounds (range)")
    print(f"  ours: {mid['tokens_per_s']:8.1f} tokens/s ({rng('tokens_per_s', '{:.1f}')})  "
          f"{mid['step_s']:6.2f} s/step  "
          f"peak {mid['peak_mem_bytes'] / 2**30:.2f} GiB ({rng('peak_mem_bytes', '{:.2f}', 2**30)})  "
          f"{mid['achieved_flops'] / 1e9:.0f} GFLOP/s = MFU {100 * mid['mfu']:.0f}%")
    if "estimate_mem_bytes" in mid:
        print(f"  memory estimate (train.py's): {mid['estimate_mem_bytes'] / 2**30:.2f} GiB; above the process's "
              f"{mid['baseline_mem_bytes'] / 2**30:.2f} GiB before the model, {mid['estimate_ratio']:.2f}x the "
              f"measured ({rng('estimate_ratio', '{:.2f}')})")
    if args.compare_hf:
        print(f"  hf:   {mid['hf_tokens_per_s']:8.1f} tokens/s ({rng('hf_tokens_per_s', '{:.1f}')})  "
              f"{mid['hf_step_s']:6.2f} s/step  peak {mid['hf_peak_mem_bytes'] / 2**30:.2f} GiB "
              f"({rng('hf_peak_mem_bytes', '{:.2f}', 2**30)})  (transformers + peft"
              f"{' + bitsandbytes' if args.method == 'qlora' else ''})")
        print(f"  ours / hf: {mid['speedup']:.2f}x the speed ({rng('speedup', '{:.2f}')}), "
              f"{mid['memory_ratio']:.2f}x the peak memory ({rng('memory_ratio', '{:.2f}')})")


@config.script
def main(argv=None):
    p = config.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="bfloat16: frozen weights in bf16 + autocast; float32: everything fp32; auto: "
                        "what train.py picks here")
    p.add_argument("--kernels", choices=["fast", "plain"], default="fast", help="our model with or without fast.py")
    p.add_argument("--off", default="", help="pieces of the fast layer to leave out: " + ", ".join(PIECES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="rounds of fresh processes; the median and range "
                                                         "of each metric and ratio over them are reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers + PEFT")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: profile one of our steps, print the costliest operations")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(filter(None, args.off.split(","))) - set(PIECES))
    if unknown:
        p.error(f"--off {','.join(unknown)}: not a piece of the fast layer ({', '.join(PIECES)})")
    if min(args.batch, args.seq, args.steps, args.rounds) < 1 or args.warmup < 0:
        p.error("--batch, --seq, --steps and --rounds should be >= 1, --warmup >= 0")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model}: not a model folder (no config.json in it)")
    if not config.DEVICE.fullmatch(args.device):
        p.error(f"--device {args.device}: should be cpu, cuda or cuda:N")
    # the device checked here, not in a child; dtype auto resolved once, so that both sides run in it
    asked = args.dtype
    device, args.dtype = config.resolve_hardware(config.Config(dtype=args.dtype, device=args.device))
    if args.child:
        return child(args)
    if args.profile:
        return profile_ours(args)
    dtype_auto = args.dtype if asked == "auto" else \
        config.resolve_hardware(config.Config(dtype="auto", device=args.device), log=lambda line: None)[1]

    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    peak = matmul_peak_flops(getattr(torch, args.dtype), device)
    tokens = args.batch * args.seq
    sides = ["ours", "hf"] if args.compare_hf else ["ours"]
    rounds = run_rounds(lambda order: run_round(args, order), args.rounds, sides)
    flops = step_flops(cfg, args.method, args.batch, args.seq, rounds[0]["ours"]["n_trained"])
    per_round, median, ranges = summarize(rounds, tokens, flops, peak)
    cpu, amx = cpu_facts() if device.type == "cpu" else (None, None)
    result = dict(method=args.method, batch=args.batch, seq=args.seq, device=str(device), dtype=args.dtype,
                  dtype_auto=dtype_auto, machine=machine_name(device), cpu=cpu, amx=amx,
                  torch_version=torch.__version__, kernels=args.kernels, off=args.off, rounds=args.rounds,
                  steps=args.steps, **median, flops_per_step=flops, matmul_peak_flops=peak, ranges=ranges,
                  per_round=per_round)
    report(result, args)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
