"""Supervised fine-tuning, every step in sight.

    python train.py --config configs/demo.py [--key=value ...] [--resume] [--stop_after=N]
    torchrun --nproc_per_node=2 train.py --config configs/demo.py        # data parallel

One optimizer step = grad_accum micro-batches (per rank), each:
    forward -> hidden states (B, T, C) -> masked cross-entropy summed over trained tokens
            -> divided by the trained tokens of the WHOLE step (all micro-batches, all ranks)
            -> backward (gradients add up)
then: clip the global gradient norm, AdamW update (written out below), next learning rate.

The run folder (out_dir) gets: config.json, metrics.jsonl, loss.svg, ckpt/ (resumable),
best/ (the weights with the lowest validation loss), and at the end adapter/ (LoRA, QLoRA:
a PEFT folder) or model/ (other methods: an HF folder), plus merged/ when merge = True.
"""
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import lora
from config import ConfigError, parse_cli, resolve_hardware, save_config
from loss import masked_cross_entropy, distillation_loss
from model import ModelLoadError, generate, load_model, save_model
from plot import write_svg_chart
from tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------
# The optimizer and the schedule, written out


def lr_at(step, cfg, total_steps):
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def adamw_init(params):
    """AdamW's state: two running moments per trainable parameter, in fp32."""
    return {"m": [torch.zeros_like(p, dtype=torch.float32) for p in params],
            "v": [torch.zeros_like(p, dtype=torch.float32) for p in params]}


@torch.no_grad()
def adamw_step(params, state, step, lr, betas, eps, weight_decay):
    """One AdamW update (Loshchilov & Hutter 2019), `step` counting from 1:

        m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2     (moment estimates)
        m_hat = m / (1 - b1^step)             v_hat = v / (1 - b2^step)   (bias correction)
        p = p - lr * weight_decay * p         (decoupled decay; not on norms and biases)
        p = p - lr * m_hat / (sqrt(v_hat) + eps)
    """
    b1, b2 = betas
    for p, m, v in zip(params, state["m"], state["v"]):
        if p.grad is None:
            continue
        g = p.grad.float()
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = m / (1 - b1 ** step)
        v_hat = v / (1 - b2 ** step)
        if weight_decay and p.ndim >= 2:  # 1-d parameters are norm gains and biases: no decay
            p.mul_(1 - lr * weight_decay)
        p.add_((-lr * m_hat / (v_hat.sqrt() + eps)).to(p.dtype))


def clip_grad_norm(params, max_norm):
    """Scale all gradients together so that their global L2 norm is at most max_norm."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads)) if grads else torch.tensor(0.0)
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm.item()


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a new folder, then published by an atomic rename of a pointer file


def save_checkpoint(ckpt_dir, trainable, opt_state, progress):
    """ckpt_dir/step_N/{trainable,optimizer}.safetensors + state.json, then ckpt_dir/latest -> step_N.

    A kill at any moment leaves `latest` naming a complete folder: the new folder is fully
    written (and fsynced) under a temporary name before it is renamed, and `latest` changes by
    os.replace, which is atomic. Older step folders are removed only after that.
    """
    name = f"step_{progress['step']:07d}"
    tmp = os.path.join(ckpt_dir, f".tmp_{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
              os.path.join(tmp, "trainable.safetensors"))
    moments = {f"{kind}.{i}": t.cpu() for kind in ("m", "v") for i, t in enumerate(opt_state[kind])}
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(progress, f, indent=2)
    for file in os.listdir(tmp):
        with open(os.path.join(tmp, file), "rb") as f:
            os.fsync(f.fileno())
    final = os.path.join(ckpt_dir, name)
    if os.path.exists(final):  # left by a run killed before it updated `latest`: stale
        shutil.rmtree(final)
    os.replace(tmp, final)
    with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
    for old in os.listdir(ckpt_dir):
        if old.startswith(("step_", ".tmp_")) and old != name:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def load_checkpoint(ckpt_dir):
    """-> (trainable tensors, optimizer moments, progress dict, rng tensors) of ckpt_dir/latest."""
    with open(os.path.join(ckpt_dir, "latest")) as f:
        folder = os.path.join(ckpt_dir, f.read().strip())
    with open(os.path.join(folder, "state.json")) as f:
        progress = json.load(f)
    moments = load_file(os.path.join(folder, "optimizer.safetensors"))
    n = len(moments) // 2
    opt_state = {kind: [moments[f"{kind}.{i}"] for i in range(n)] for kind in ("m", "v")}
    return (load_file(os.path.join(folder, "trainable.safetensors")), opt_state, progress,
            load_file(os.path.join(folder, "rng.safetensors")))


# ---------------------------------------------------------------------------------------------
# Pieces of the loop


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE; plain `python` runs one process (rank 0 of 1)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(values, world):
    """Sum a list of floats over ranks (identity in a single process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def hidden_of(model, batch):
    return model(batch["input_ids"], position_ids=batch["position_ids"],
                 attn_mask=batch["attn_mask"], return_hidden=True)


@torch.no_grad()
def validation_loss(model, val_batches, autocast, device, rank, world):
    """Token-weighted: (sum of every trained token's loss) / (number of trained tokens), over
    the whole set and all ranks; never a mean of per-batch means (biased toward short batches)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in val_batches[rank::world]:
        batch = to_device(batch, device)
        with autocast:
            total += masked_cross_entropy(hidden_of(model, batch), model.lm_head.weight,
                                          batch["targets"]).item()
        tokens += batch["n_trained"]
    model.train(was_training)
    total, tokens = all_reduce_sum([total, tokens], world)
    return total / max(tokens, 1)


def sample_prompts(cfg, tokenizer, template, val_set, n=2):
    """Fixed prompts to watch during training: cfg.sample_prompts rendered as user turns, or
    else the first validation examples cut where their first trained token starts."""
    if cfg.sample_prompts:
        return [tokenizer.encode(data.format_chat([{"role": "user", "content": p}], template,
                                                  add_generation_prompt=True, tokenizer=tokenizer))
                for p in cfg.sample_prompts]
    prompts = []
    for ex in val_set[:n]:
        first_trained = next(i for i, label in enumerate(ex["labels"]) if label != data.IGNORE)
        prompts.append([int(t) for t in ex["input_ids"][:first_trained]])
    return prompts


def print_samples(model, tokenizer, prompts, template, max_new_tokens=48):
    """Greedy answers to the fixed prompts, to see what training does to the model."""
    if not prompts:
        return
    answers = generate(model, prompts, max_new_tokens, stop_ids=data.stop_ids(tokenizer, template))
    for prompt, answer in zip(prompts, answers):
        tqdm.write(f"  ...{tokenizer.decode(prompt)[-60:]!r} -> {tokenizer.decode(answer)!r}")


def estimate_memory(model, cfg):
    """Bytes of weights, gradients, AdamW state and (roughly) activations, before any step."""
    c = lora.count_trainable(model)
    mc = model.config
    act_bytes = 2 if cfg.dtype == "bfloat16" else 4
    tokens = cfg.batch_size * cfg.seq_len
    # per token and block, backward keeps roughly: the block input and the residual after
    # attention (2C), q, k, v and the attention output (2C + 2 kv), the MLP's gate and up (2I);
    # the norm outputs and silu(gate) * up are recomputed (ops.recompute_in_backward).
    kv = mc.num_key_value_heads * mc.head_dim
    per_layer = mc.hidden_size if cfg.grad_checkpointing else 4 * mc.hidden_size + 2 * kv + 2 * mc.intermediate_size
    activations = tokens * mc.num_hidden_layers * per_layer * act_bytes
    return dict(weights=c["weight_bytes"], gradients=c["trainable"] * 4,
                optimizer=c["trainable"] * 8, activations=activations)


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_neftune_noise(model, alpha):
    """NEFTune (Jain et al. 2023): during training, add uniform noise of scale alpha / sqrt(T d)
    to the input embeddings (B, T, d). A forward hook on embed_tokens; inactive in eval()."""
    def hook(module, inputs, out):
        if module.training:
            scale = alpha / math.sqrt(out.shape[1] * out.shape[2])
            return out + torch.empty_like(out).uniform_(-scale, scale)
    return model.embed_tokens.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------


def make_teacher(model, cfg, device):
    """For the distillation loss: a function batch -> (hidden, output weight) of the model as it
    was before fine-tuning. With LoRA that is the same model with its adapters switched off
    (no extra memory); otherwise a second, frozen copy of the base model."""
    if cfg.method in ("lora", "qlora"):
        frozen = model
    else:
        frozen = load_model(cfg.model, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
                            device=device).requires_grad_(False)

    @torch.no_grad()
    def teacher(batch):
        was_training = frozen.training
        frozen.eval()  # no dropout, no NEFTune noise in the teacher
        with lora.adapters_disabled(frozen):
            hidden = hidden_of(frozen, batch)
        frozen.train(was_training)
        return hidden, frozen.lm_head.weight
    return teacher


def build_model(cfg, device):
    """Load the base model, set up the method, and keep trainable parameters in fp32.

    bf16 runs hold the frozen base in bf16 (half the memory, no per-step casts) and compute
    under autocast; the weights the optimizer updates stay fp32, since bf16's 8-bit mantissa
    would round most small updates away.
    """
    bf16 = cfg.dtype == "bfloat16"
    model = load_model(cfg.model, dtype=torch.bfloat16 if bf16 and cfg.method != "full" else torch.float32,
                       device=device)
    lora.prepare_model(model, cfg.method, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                       lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets,
                       rslora=cfg.rslora, train_layers=cfg.train_layers, train_head=cfg.train_head)
    model.to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.neftune_alpha > 0:
        add_neftune_noise(model, cfg.neftune_alpha)
    return model


def export(model, cfg, folder):
    """The weights as users load them: a PEFT adapter folder (lora, qlora) or an HF folder."""
    if cfg.method in ("lora", "qlora"):
        lora.save_adapter(model, folder, base_model_path=os.path.abspath(cfg.model))
    else:
        save_model(model, folder, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)


def read_metrics(out_dir, up_to_step=None):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def write_metrics(out_dir, records, mode="w"):
    with open(os.path.join(out_dir, "metrics.jsonl"), mode) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_loss_curve(out_dir):
    records = read_metrics(out_dir)
    write_svg_chart(os.path.join(out_dir, "loss.svg"),
                    {"train": [(r["step"], r["train_loss"]) for r in records],
                     "val": [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]},
                    title=f"loss: {out_dir}", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")


def main(argv):
    cfg, flags = parse_cli(argv, {"resume": False, "stop_after": 0})
    data.check_data_files(cfg)  # a missing file is a ConfigError, before anything is written
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    has_ckpt = os.path.exists(os.path.join(ckpt_dir, "latest"))
    if has_ckpt != flags["resume"]:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}" if flags["resume"] else
                          f"{cfg.out_dir} holds a checkpoint: add --resume, or choose another out_dir")
    rank, world = setup_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if flags["resume"] and cfg.dtype == "auto":  # resume exactly as the run started
        with open(os.path.join(cfg.out_dir, "config.json")) as f:
            cfg.dtype = json.load(f)["dtype"]
    device, cfg.dtype = resolve_hardware(cfg, log)  # "auto" becomes what it means here
    if world > 1:  # every rank must compute in the same dtype: rank 0's choice
        choice = [cfg.dtype]
        dist.broadcast_object_list(choice, src=0)
        cfg.dtype = choice[0]
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    train_set, val_set, stats = data.load_datasets(cfg, tokenizer, log=log)
    model = build_model(cfg, device)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    teacher = make_teacher(model, cfg, device) if cfg.distill_weight > 0 else None
    log(lora.describe_trainable(model, cfg.method))
    estimate = estimate_memory(model, cfg)
    log("memory estimate: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in estimate.items())
        + f"; total {sum(estimate.values()) / 2**20:.0f} MiB")
    model.train()
    net = torch.compile(model) if cfg.compile else model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()

    # The plan: each global batch has batch_size * world rows; rank r trains on its slice, so
    # N ranks of batch b see exactly what one process of batch N*b sees. A last, incomplete
    # batch is left out (every rank needs rows); the next epoch's shuffle includes it again.
    global_rows = cfg.batch_size * world
    plan_of = lambda epoch: [b for b in data.plan_batches(train_set, global_rows, cfg.seq_len,
                                                          cfg.packing, cfg.seed, epoch) if len(b) == global_rows]
    plan = plan_of(0)
    steps_per_epoch = len(plan) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training examples fill less than one optimizer step "
                          f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} ranks)")
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    my_rows = lambda rows: rows[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
    samples = sample_prompts(cfg, tokenizer, stats.template, val_set)
    val_plan = data.plan_batches(val_set, cfg.batch_size, cfg.seq_len, cfg.packing, cfg.seed, 0)
    val_batches = [data.collate(val_set, rows, cfg.seq_len, tokenizer.pad_id)
                   for rows in val_plan[:cfg.eval_batches or None]]  # the same batches at every eval

    opt_state = adamw_init(params)
    progress = dict(step=0, epoch=0, batch=0, best_val=None, evals_since_best=0)
    if flags["resume"]:  # weights, optimizer moments, schedule, data position, RNG: all of it
        weights, opt_state, progress, rng = load_checkpoint(ckpt_dir)
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(weights[n])
        opt_state = {k: [t.to(device) for t in v] for k, v in opt_state.items()}
        torch.set_rng_state(rng["torch_rng"])
        if "cuda_rng" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"])
        plan = plan_of(progress["epoch"])
        log(f"resumed from {ckpt_dir} at step {progress['step']}")
    if is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
        write_metrics(cfg.out_dir, read_metrics(cfg.out_dir, up_to_step=progress["step"]))
    save = lambda: is_main and save_checkpoint(ckpt_dir, dict(zip(names, params)), opt_state, progress)
    interrupted = []  # Ctrl-C: finish this step, save, exit; a second Ctrl-C quits at once
    signal.signal(signal.SIGINT, lambda *a: sys.exit(130) if interrupted else interrupted.append(1))

    bar = tqdm(total=total_steps, initial=progress["step"], disable=not is_main, desc="train")
    steps_run, stop = 0, None
    while progress["step"] < total_steps and stop is None:
        step, t0 = progress["step"], time.perf_counter()
        lr = lr_at(step, cfg, total_steps)
        if progress["batch"] + cfg.grad_accum > len(plan):  # epoch done: a new shuffle
            progress["epoch"], progress["batch"] = progress["epoch"] + 1, 0
            plan = plan_of(progress["epoch"])
        step_rows = plan[progress["batch"]:progress["batch"] + cfg.grad_accum]
        # The divisor: trained tokens of the whole step, all micro-batches and all ranks (every
        # rank knows the plan, so no message is needed). Per-micro-batch means would weight
        # the tokens of short batches more (the gradient-accumulation bug of 2024).
        n_trained = sum(data.count_trained(train_set, rows) for rows in step_rows)
        loss_sum = tokens = 0.0
        for i, rows in enumerate(step_rows):
            batch = to_device(data.collate(train_set, my_rows(rows), cfg.seq_len, tokenizer.pad_id), device)
            last_micro = i == len(step_rows) - 1
            with (net.no_sync() if world > 1 and not last_micro else nullcontext()), autocast:
                hidden = hidden_of(net, batch)                                    # (B, T, C)
                loss = ce = masked_cross_entropy(hidden, model.lm_head.weight, batch["targets"])  # sum
                if teacher is not None:  # pull toward the base model's next-token predictions
                    answer = batch["targets"] != data.IGNORE
                    # "prompt": where the SFT loss leaves the model free to drift (forgetting shows
                    # there first); "answer": where it trains (a tug of war with the SFT loss)
                    where = answer if cfg.distill_on == "answer" else ~answer & batch["is_token"]
                    loss = loss + cfg.distill_weight * distillation_loss(
                        hidden, model.lm_head.weight, *teacher(batch), where)
            # DDP averages gradients over ranks; times world makes that a sum over ranks
            (loss * world / max(n_trained, 1)).backward()
            loss_sum, tokens = loss_sum + ce.item(), tokens + batch["n_tokens"]  # logged: the SFT loss alone
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens], world)
        train_loss = loss_sum / max(n_trained, 1)
        grad_norm = clip_grad_norm(params, cfg.grad_clip)
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):  # never apply such a step
            stop = (f"loss is {train_loss} (gradient norm {grad_norm}) at step {step + 1}; "
                    f"the last good checkpoint is {ckpt_dir}")
            break
        adamw_step(params, opt_state, step + 1, lr, cfg.betas, cfg.eps, cfg.weight_decay)
        for p in params:
            p.grad = None
        progress.update(step=step + 1, batch=progress["batch"] + cfg.grad_accum)
        steps_run += 1
        dt = time.perf_counter() - t0
        record = dict(step=step + 1, train_loss=train_loss, lr=lr, grad_norm=grad_norm,
                      trained_tokens=n_trained, tokens_per_s=tokens / dt, mem_bytes=peak_memory_bytes(device))
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
        bar.update(1)

        done = progress["step"] == total_steps
        if val_batches and (done or (cfg.eval_every and progress["step"] % cfg.eval_every == 0)):
            val = record["val_loss"] = validation_loss(model, val_batches, autocast, device, rank, world)
            if progress["best_val"] is None or val < progress["best_val"]:
                progress.update(best_val=val, evals_since_best=0)
                if is_main:
                    export(model, cfg, os.path.join(cfg.out_dir, "best"))
            else:
                progress["evals_since_best"] += 1
            if is_main:
                tqdm.write(f"step {step + 1}: train loss {train_loss:.4f}  val loss {val:.4f}"
                           f"  (best {progress['best_val']:.4f})")
                print_samples(model, tokenizer, samples, stats.template)
                write_metrics(cfg.out_dir, [record], mode="a")
                write_loss_curve(cfg.out_dir)
        elif is_main and (progress["step"] % cfg.log_every == 0 or done):
            write_metrics(cfg.out_dir, [record], mode="a")
        patience = cfg.early_stopping_patience
        if patience and progress["evals_since_best"] >= patience:
            stop = f"early stopping: validation loss did not improve in {patience} evaluations"
        if interrupted:
            stop = "interrupted"
        elif steps_run == flags["stop_after"]:
            stop = f"--stop_after={steps_run}"
        if done or stop or progress["step"] % cfg.save_every == 0:
            save()
    bar.close()

    if is_main:
        write_loss_curve(cfg.out_dir)
        log(f"peak memory: {peak_memory_bytes(device) / 2**20:.0f} MiB "
            f"({'max allocated' if device.type == 'cuda' else 'peak RSS'})")
        if stop:
            log(f"stopped at step {progress['step']} of {total_steps}: {stop}"
                + ("" if stop.startswith(("early", "loss")) else "; continue with --resume"))
        if progress["step"] == total_steps or (stop or "").startswith("early"):
            final = "adapter" if cfg.method in ("lora", "qlora") else "model"
            export(model, cfg, os.path.join(cfg.out_dir, final))
            if cfg.merge and cfg.method in ("lora", "qlora"):
                lora.save_merged(model, os.path.join(cfg.out_dir, "merged"))
            log(f"wrote {os.path.join(cfg.out_dir, final)}")
    if world > 1:
        dist.destroy_process_group()
    return 1 if stop and stop.startswith("loss") else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, data.DataError, ModelLoadError) as e:  # the user's mistake: one line
        sys.exit(f"error: {e}")
