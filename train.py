"""Supervised fine-tuning, every step in sight.

    python train.py --config configs/demo.py [--key=value ...] [--resume [--allow_changes]] [--stop_after=N]
    torchrun --nproc_per_node=2 train.py --config configs/demo.py        # data parallel

The path from a config file to trained weights, in the order this file runs it:

    main()         setup -> fit -> finish
    setup()        the config's data, the model with its method (lora.prepare_model) and kernels
                   (fast.accelerate), AdamW's state; with --resume, all of it as the checkpoint left it,
                   after checking that the settings that change the math are those the run started with
    fit()          one train_step() per optimizer step; validate() every eval_every steps; checkpoints
    train_step()   grad_accum micro-batches (per rank), each:
                       step_loss() -> a sum over its trained tokens
                               / the trained tokens of the WHOLE step (all micro-batches, all ranks)
                               -> backward (gradients add up)
                   then: clip the global gradient norm, AdamW update (written out below), next learning rate
    step_loss()    the objective: masked cross-entropy on the answer tokens (+ distillation), or DPO /
                   ORPO on preference pairs (objective = ...); a new objective replaces this one function
    finish()       the final export; the exit code says how the run ended (0 done, 1 non-finite loss,
                   2 user error, 130 interrupted)

The run folder (out_dir) gets: config.json, metrics.jsonl, loss.svg, ckpt/ (resumable),
best/ (the weights with the lowest validation loss), and at the end adapter/ (LoRA, QLoRA:
a PEFT folder) or model/ (other methods: an HF folder), plus merged/ when merge = True.
"""
from config import quiet_ctrl_c

quiet_ctrl_c(__name__)  # first: Ctrl-C while torch loads (seconds) exits 130, no traceback

import enum
import math
import os
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
import fast
import lora
import memory
import parallel
from checkpoint import (atomic_folder, check_resume, load_checkpoint, read_metrics, record_changes, rng_state,
                        save_checkpoint, save_config, step_folder, write_loss_curve, write_metrics)
from config import ConfigError, check_out_folder, fetch_model, parse_cli, resolve_hardware, script
from loss import (distillation_loss, dpo_loss, fused_cross_entropy, fused_distillation_loss, masked_cross_entropy,
                  orpo_loss, sequence_logps)
from model import check_logits_are_lm_head, generate, load_model, save_model
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
        p, g, m, v = (parallel.local(t) for t in (p, p.grad.float(), m, v))  # FSDP: this rank's pieces
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
    norm = parallel.grad_norm_squared(grads).sqrt()  # FSDP: each rank's pieces, summed over ranks
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            parallel.local(g).mul_(max_norm / (norm + 1e-6))
    return norm.item()


# ---------------------------------------------------------------------------------------------
# Setup: everything the loop reads and updates


@dataclass
class Run:
    """What setup() makes and the loop uses. `net` is the model as the loop calls it (wrapped by
    DDP under torchrun); `progress` is what a checkpoint saves besides the tensors."""
    cfg: object
    rank: int
    world: int
    device: torch.device
    log: object
    tokenizer: object
    train_set: list
    val_set: list
    stats: object
    model: torch.nn.Module
    net: torch.nn.Module
    names: list
    params: list
    teacher: object
    autocast: object
    ckpt_dir: str
    opt_state: dict = None
    progress: dict = None
    plan: list = None
    total_steps: int = 0
    val_batches: list = None
    samples: list = None
    last_ckpt: str = None  # the step folder saved or resumed from last: the next save keeps it
    memory: dict = None  # the memory estimate's parts (memory.py)

    @property
    def is_main(self):
        return self.rank == 0

    def save(self):
        shards = None
        if parallel.is_sharded(self.net):  # every rank writes its pieces; save_checkpoint moves them in
            shards = os.path.join(self.ckpt_dir, ".shards")
            parallel.save_sharded(shards, self.names, self.params, self.opt_state)
        rngs = parallel.gather_to_all(rng_state(), self.world)  # each rank's: each draws its own dropout
        if self.is_main:
            self.last_ckpt = save_checkpoint(self.ckpt_dir, dict(zip(self.names, self.params)), self.opt_state,
                                             self.progress, keep=self.last_ckpt, shards=shards, rngs=rngs)
        if shards:
            parallel.barrier()  # no rank reads or writes the next checkpoint before this one is in place


def setup(cfg, resume=False, allow_changes=False):
    """The data, the model and the optimizer state; with resume, all as the latest checkpoint left
    them. A mistake in the config, data or model stops here, before anything is written."""
    data.check_data_files(cfg)
    check_out_folder(cfg.out_dir)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    if os.path.exists(os.path.join(ckpt_dir, "latest")) != resume:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}" if resume else
                          f"{cfg.out_dir} holds a checkpoint: add --resume, or choose another out_dir")
    if allow_changes and not resume:
        raise ConfigError("--allow_changes goes with --resume")
    cfg.model = fetch_model(cfg.model)  # a Hub id becomes models/NAME, downloaded if absent
    changes = check_resume(cfg, allow_changes) if resume else {}
    rank, world = parallel.setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    if cfg.min_lr > cfg.lr:  # allowed, and almost always a mistake (an lr lowered, its min_lr not)
        log(f"warning: min_lr {cfg.min_lr:g} is above lr {cfg.lr:g}: after the warmup the learning rate "
            f"rises from lr to min_lr", file=sys.stderr)
    device = setup_hardware(cfg, world, log)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_set, val_set, stats = data.load_datasets(cfg, tokenizer, log=log)
    check_objective(cfg, train_set + val_set)
    baseline = memory.rss_bytes() if device.type == "cpu" else 0  # python, torch, the data: before the model
    model = build_model(cfg, device)
    log(lora.describe_trainable(model, cfg.method))
    longest = cfg.seq_len if cfg.packing == "packed" else int(data.example_lengths(train_set).max())
    estimate = memory.estimate_memory(model, cfg, baseline, longest, stats.trained_tokens["train"]
                                      / max(stats.tokens["train"], 1), device.type)
    sharded = world > 1 and cfg.parallel == "fsdp"  # the estimate is one process's: FSDP's held-by line follows
    log(f"memory estimate{' of one whole process' if sharded else ''}: " + memory.describe(estimate))
    teacher = make_teacher(model, cfg, device, world) if cfg.distill_weight > 0 or cfg.objective == "dpo" else None
    net = parallel.wrap(model, cfg, world)  # FSDP replaces the parameters by their sharded pieces
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    model.train()
    run = Run(cfg, rank, world, device, log, tokenizer, train_set, val_set, stats, model, net=net, names=names,
              params=params, teacher=teacher, ckpt_dir=ckpt_dir, opt_state=adamw_init(params), memory=estimate,
              autocast=torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext(),
              progress=dict(step=0, epoch=0, batch=0, best_val=None, evals_since_best=0))
    held = parallel.state_bytes(model, params, run.opt_state)
    log(("held by this process: " if world == 1 else f"{cfg.parallel} over {world} ranks; held by each: ")
        + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in held.items()) + f"; total {sum(held.values()):,} bytes")
    plan_training(run)
    if resume:
        restore_checkpoint(run)
    if run.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        if not resume:  # config.json says how the run started; a resume records its changes apart
            save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
        elif changes:
            record_changes(cfg.out_dir, run.progress["step"], changes)
        write_metrics(cfg.out_dir, read_metrics(cfg.out_dir, up_to_step=run.progress["step"], log=log))
    return run


def check_objective(cfg, examples):
    """DPO and ORPO train on preference pairs, one pair per row."""
    if cfg.objective == "sft":
        return
    if cfg.packing != "none" or cfg.distill_weight > 0:
        raise ConfigError(f"objective = {cfg.objective!r} takes packing = 'none' and distill_weight = 0")
    if any("rejected" not in ex for ex in examples):
        source = next(ex["source"] for ex in examples if "rejected" not in ex)
        raise ConfigError(f"objective = {cfg.objective!r} needs preference data (prompt, chosen, rejected); "
                          f"{source} is not a preference record")


def setup_hardware(cfg, world, log):
    """The device; cfg.dtype "auto" resolved (a resumed run keeps the dtype it started with: see
    check_resume; every rank takes rank 0's choice)."""
    device, cfg.dtype = resolve_hardware(cfg, log)
    if world > 1:
        cfg.dtype = parallel.gather_to_all(cfg.dtype, world)[0]
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def build_model(cfg, device):
    """Load the base model, set up the method and the kernels, keep trainable parameters in fp32.

    bf16 runs hold the frozen base in bf16 (half the memory, no per-step casts) and compute
    under autocast; the weights the optimizer updates stay fp32, since bf16's 8-bit mantissa
    would round most small updates away.
    """
    bf16 = cfg.dtype == "bfloat16"
    model = load_model(cfg.model, dtype=torch.bfloat16 if bf16 and cfg.method != "full" else torch.float32,
                       device=device)
    check_logits_are_lm_head(model)
    try:
        lora.prepare_model(model, cfg.method, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets,
                           rslora=cfg.rslora, train_layers=cfg.train_layers, train_head=cfg.train_head)
    except ValueError as e:  # a setting this model does not have: a LoRA target, train_layers, ...
        raise ConfigError(str(e)) from None
    model.to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.kernels == "fast":
        fast.accelerate(model)  # the same model, with less memory kept for backward (fast.py)
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        model.compile()
    if cfg.neftune_alpha > 0:
        add_neftune_noise(model, cfg.neftune_alpha)
    return model


def make_teacher(model, cfg, device, world=1):
    """For the distillation loss: a function batch -> (hidden, output weight) of the model as it
    was before fine-tuning. With LoRA that is the same model with its adapters switched off
    (no extra memory); otherwise a second, frozen copy of the base model (sharded too with FSDP)."""
    if cfg.method in ("lora", "qlora"):
        frozen = model
    else:
        frozen = load_model(cfg.model, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
                            device=device).requires_grad_(False)
        if cfg.kernels == "fast":
            fast.accelerate(frozen)
        if cfg.parallel == "fsdp":
            parallel.wrap(frozen, cfg, world)

    @torch.no_grad()
    def teacher(batch):
        was_training = frozen.training
        frozen.eval()  # no dropout, no NEFTune noise in the teacher
        with lora.adapters_disabled(frozen):
            hidden = frozen(batch["input_ids"], position_ids=batch["position_ids"],
                            attn_mask=batch["attn_mask"], return_hidden=True)
        frozen.train(was_training)
        return hidden, frozen.lm_head.weight
    return teacher


def plan_epoch(run, epoch):
    """The micro-batches of one epoch, as lists of rows. Each global batch has batch_size * world
    rows; rank r trains on its slice, so N ranks of batch b see exactly what one process of batch
    N*b sees. A last, incomplete batch is left out (every rank needs rows); the next epoch's
    shuffle includes it again."""
    cfg, rows = run.cfg, run.cfg.batch_size * run.world
    return [b for b in data.plan_batches(run.train_set, rows, cfg.seq_len, cfg.packing, cfg.seed, epoch)
            if len(b) == rows]


def plan_training(run):
    """The first epoch's plan, the number of steps, the validation batches, the sample prompts."""
    cfg = run.cfg
    run.plan = plan_epoch(run, 0)
    steps_per_epoch = len(run.plan) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(run.train_set)} training examples fill less than one optimizer step "
                          f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {run.world} ranks)")
    run.total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    val_plan = data.plan_batches(run.val_set, cfg.batch_size, cfg.seq_len, cfg.packing, cfg.seed, 0)
    run.val_batches = [collate(run, run.val_set, rows) for rows in val_plan[:cfg.eval_batches or None]]
    run.samples = sample_prompts(cfg, run.tokenizer, run.stats.template, run.val_set)


def restore_checkpoint(run):
    """Weights, optimizer moments, schedule and data position, RNG: all of it, so the run goes on
    exactly as if it had never stopped."""
    weights, opt_state, run.progress, rng = load_checkpoint(run.ckpt_dir, run.log)
    run.last_ckpt = step_folder(run.progress["step"])
    if isinstance(weights, str) != parallel.is_sharded(run.net):
        raise ConfigError(f"--resume: the checkpoint in {run.ckpt_dir} was written "
                          f"{'by FSDP' if isinstance(weights, str) else 'without FSDP'}; resume it as it ran "
                          f"(parallel = 'fsdp' under torchrun, or not)")
    ours = {n: tuple(p.shape) for n, p in zip(run.names, run.params)}
    sharded = isinstance(weights, str)  # FSDP: the path of the pieces, read below by every rank in place
    saved = parallel.sharded_shapes(weights) if sharded else {n: tuple(t.shape) for n, t in weights.items()}
    if ours != saved:  # method, lora_rank or lora_targets changed with --allow_changes
        name = (sorted(ours.keys() ^ saved.keys()) or sorted(n for n in ours if ours[n] != saved[n]))[0]
        raise ConfigError(f"--resume: the checkpoint's {len(saved)} tensors do not fit the {len(ours)} this run trains "
                          f"({name}: {saved.get(name, 'absent')} in {run.ckpt_dir}, {ours.get(name, 'absent')} here); "
                          f"method, lora_rank and lora_targets must be those the run started with")
    if sharded:
        parallel.load_sharded(weights, run.names, run.params, run.opt_state)
    else:
        with torch.no_grad():
            for n, p in zip(run.names, run.params):
                p.copy_(weights[n])
        run.opt_state = {k: [t.to(run.device) for t in v] for k, v in opt_state.items()}
    mine = lambda key: rng.get(f"{key}.rank{run.rank}", rng.get(key))  # noqa: E731  (each rank its own)
    torch.set_rng_state(mine("torch_rng"))
    if "cuda_rng" in rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(mine("cuda_rng"))
    run.plan = plan_epoch(run, run.progress["epoch"])
    run.log(f"resumed from {run.ckpt_dir} at step {run.progress['step']}")


# ---------------------------------------------------------------------------------------------
# Helpers: processes, devices, logging, export


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


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


def print_samples(model, tokenizer, prompts, template, show=True, max_new_tokens=48):
    """Greedy answers to the fixed prompts, to see what training does to the model. With FSDP every
    rank generates (each forward pass gathers weights from all of them), rank 0 shows."""
    if not prompts:
        return
    answers = generate(model, prompts, max_new_tokens, stop_ids=data.stop_ids(tokenizer, template))
    for prompt, answer in zip(prompts, answers):
        if show:
            tqdm.write(f"  ...{tokenizer.decode(prompt)[-60:]!r} -> {tokenizer.decode(answer)!r}")


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return memory.peak_rss_bytes()


def add_neftune_noise(model, alpha):
    """NEFTune (Jain et al. 2023): during training, add uniform noise of scale alpha / sqrt(T d)
    to the input embeddings (B, T, d). A forward hook on embed_tokens; inactive in eval()."""
    def hook(module, inputs, out):
        if module.training:
            scale = alpha / math.sqrt(out.shape[1] * out.shape[2])
            return out + torch.empty_like(out).uniform_(-scale, scale)
    return model.embed_tokens.register_forward_hook(hook)


def whole_state_dict(run):
    """None (the model's own state_dict) unless FSDP has sharded it: then its whole weights,
    inside parallel.gathered."""
    return parallel.whole_state_dict(run.model) if parallel.is_sharded(run.net) else None


def export(model, cfg, folder, state_dict=None):
    """The weights as users load them: a PEFT adapter folder (lora, qlora) or an HF folder, written
    under a temporary name and renamed (a kill mid-export leaves no truncated file in `folder`).
    state_dict: the model's, when given (FSDP: parallel.whole_state_dict inside parallel.gathered)."""
    with atomic_folder(folder) as tmp:
        if cfg.method in ("lora", "qlora"):
            lora.save_adapter(model, tmp, base_model_path=os.path.abspath(cfg.model))
        else:
            save_model(model, tmp, state_dict, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)


# ---------------------------------------------------------------------------------------------
# The objective of one micro-batch, and one optimizer step


def step_loss(model, batch, cfg, counts, teacher=None):
    """The objective of one micro-batch -> (its share of the step's loss, {metric: its share}).

    counts: the trained tokens ("tokens") and preference pairs ("pairs") of the whole optimizer step,
    over all its micro-batches and ranks. Dividing by them here makes the shares add up to the step's
    mean, every token weighing the same however the step is cut into micro-batches (per-micro-batch
    means would weight the tokens of short batches more: the gradient-accumulation bug of 2024).

    A new objective replaces this function: model(ids) gives the logits (B, T, V) as an ordinary
    autograd tensor (loss.py). `model` may be wrapped for data parallelism (DDP's .module)."""
    if cfg.objective != "sft":
        return preference_loss(model, batch, cfg, counts, teacher)
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"],
                   return_hidden=True)                                              # (B, T, C)
    head = parallel.unwrap(model).lm_head.weight  # (V, C); after the forward: FSDP has gathered it then
    fused = cfg.kernels == "fast"  # the same sums, with no (N, V) logits kept for backward (loss.py)
    ce = (fused_cross_entropy if fused else masked_cross_entropy)(hidden, head, batch["targets"])
    ce = ce / max(counts["tokens"], 1)
    if teacher is None:
        return ce, {"train_loss": ce.detach()}
    # Pull toward the base model's next-token predictions: on the prompt tokens, where the SFT loss
    # leaves the model free to drift (forgetting shows there first), or on the answer tokens.
    answer = batch["targets"] != data.IGNORE
    where = answer if cfg.distill_on == "answer" else ~answer & batch["is_token"]
    kl = (fused_distillation_loss if fused else distillation_loss)(hidden, head, *teacher(batch), where)
    return ce + cfg.distill_weight * kl / max(counts["tokens"], 1), {"train_loss": ce.detach()}


def preference_loss(model, batch, cfg, counts, reference):
    """DPO or ORPO on a batch of pairs (data.collate_pairs: P chosen rows, then P rejected rows), both
    sides in one forward pass. DPO's reference is the model before this run (train.make_teacher)."""
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"],
                   return_hidden=True)                                              # (2P, T, C)
    head = parallel.unwrap(model).lm_head.weight  # (V, C); after the forward: FSDP has gathered it then
    logps, n = sequence_logps(hidden, head, batch["targets"])                      # (2P,), (2P,)
    P = batch["n_pairs"]
    sft = -logps[:P].sum() / max(counts["tokens"], 1)         # the chosen answers' SFT loss, per token
    if cfg.objective == "dpo":
        ref = sequence_logps(*reference(batch), batch["targets"])[0]               # no gradient
        losses, chosen, rejected = dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], cfg.dpo_beta)
        loss = losses.sum() / counts["pairs"]
    else:
        losses, chosen, rejected = orpo_loss(logps[:P], logps[P:], n[:P], n[P:])
        loss = sft + cfg.orpo_lambda * losses.sum() / counts["pairs"]
    share = lambda x: x.detach().sum() / counts["pairs"]  # noqa: E731  (a mean over the step's pairs)
    return loss, {"train_loss": loss.detach(), "sft_loss": sft.detach(),
                  "reward_accuracy": share((chosen > rejected).float()), "reward_margin": share(chosen - rejected),
                  "logp_chosen": share(logps[:P]), "logp_rejected": share(logps[P:])}


def step_counts(run, step_rows):
    """The trained tokens (of the chosen side, for pairs) and the pairs of a step's micro-batches,
    counted from the plan: every rank knows it, so no message is needed."""
    return {"tokens": sum(data.count_trained(run.train_set, rows) for rows in step_rows),
            "pairs": sum(len(rows) for rows in step_rows)}


def collate(run, examples, rows):
    pairs = run.cfg.objective != "sft"
    return (data.collate_pairs if pairs else data.collate)(examples, rows, run.cfg.seq_len, run.tokenizer.pad_id)


def train_step(run, step_rows):
    """One optimizer step over the micro-batches of step_rows. Returns its metrics record, or None
    when the loss or the gradient norm is not finite (then nothing is applied)."""
    cfg, progress, world = run.cfg, run.progress, run.world
    step, t0 = progress["step"], time.perf_counter()
    lr = lr_at(step, cfg, run.total_steps)
    counts, metrics, tokens = step_counts(run, step_rows), Counter(), 0
    for i, rows in enumerate(step_rows):
        my_rows = rows[run.rank * cfg.batch_size:(run.rank + 1) * cfg.batch_size]
        batch = to_device(collate(run, run.train_set, my_rows), run.device)
        sync = i == len(step_rows) - 1  # DDP, FSDP: exchange gradients after the last only
        with parallel.gradient_sync(run.net, sync), run.autocast:
            loss, shares = step_loss(run.net, batch, cfg, counts, run.teacher)
        (loss * world).backward()  # DDP averages gradients over ranks; times world makes that a sum
        metrics.update({k: v.item() for k, v in shares.items()})
        tokens += batch["n_tokens"]
    names = sorted(metrics)
    *values, tokens = parallel.all_reduce_sum([metrics[k] for k in names] + [tokens], world)
    metrics = dict(zip(names, values))
    grad_norm = clip_grad_norm(run.params, cfg.grad_clip)
    if not (math.isfinite(metrics["train_loss"]) and math.isfinite(grad_norm)):  # never apply such a step
        tqdm.write(f"loss is {metrics['train_loss']} (gradient norm {grad_norm}) at step {step + 1}; "
                   f"the last good checkpoint is {run.ckpt_dir}")
        return None
    adamw_step(run.params, run.opt_state, step + 1, lr, cfg.betas, cfg.eps, cfg.weight_decay)
    for p in run.params:
        p.grad = None
    progress.update(step=step + 1, batch=progress["batch"] + cfg.grad_accum)
    dt = time.perf_counter() - t0
    return dict(step=step + 1, **metrics, lr=lr, grad_norm=grad_norm, trained_tokens=counts["tokens"],
                tokens_per_s=tokens / dt, mem_bytes=peak_memory_bytes(run.device))


@torch.no_grad()
def validate(run):
    """The validation loss, the objective's (for SFT without the distillation term) over the whole
    set and all ranks: token-weighted, (sum of every trained token's loss) / (number of trained
    tokens), never a mean of per-batch means (biased toward short batches); per pair for DPO."""
    run.model.eval()
    counts = {"tokens": sum(b["n_trained"] for b in run.val_batches),
              "pairs": sum(b.get("n_pairs", 0) for b in run.val_batches)}
    total, mine = 0.0, run.val_batches[run.rank::run.world]
    if parallel.is_sharded(run.model):  # (FSDP turns the model itself into its sharded module)  # every rank must run as many forward passes (each gathers weights)
        mine += [None] * (-(-len(run.val_batches) // run.world) - len(mine))
    for batch in mine:
        with run.autocast:
            reference = run.teacher if run.cfg.objective == "dpo" else None
            share = step_loss(run.model, to_device(batch or run.val_batches[0], run.device), run.cfg, counts, reference)
            total += share[1]["train_loss"].item() if batch else 0.0
    run.model.train()
    return parallel.all_reduce_sum([total], run.world)[0]


# ---------------------------------------------------------------------------------------------
# The loop


class Stop(enum.Enum):
    """Why fit() ended."""
    DONE = "done"
    EARLY_STOP = "early stop"
    NON_FINITE = "non-finite loss"
    INTERRUPT = "interrupted"
    STOP_AFTER = "stop_after"


EXIT_CODES = {Stop.DONE: 0, Stop.EARLY_STOP: 0, Stop.STOP_AFTER: 0, Stop.NON_FINITE: 1, Stop.INTERRUPT: 130}


def next_step_rows(run):
    """The rows of the next optimizer step's micro-batches; a new shuffle when the epoch is done."""
    progress, accum = run.progress, run.cfg.grad_accum
    if progress["batch"] + accum > len(run.plan):
        progress["epoch"], progress["batch"] = progress["epoch"] + 1, 0
        run.plan = plan_epoch(run, progress["epoch"])
    return run.plan[progress["batch"]:progress["batch"] + accum]


def fit(run, stop_after=0):
    """Optimizer steps until total_steps, or until a reason to stop; a checkpoint every save_every
    steps and at the end. Ctrl-C finishes the step, saves and stops; a second Ctrl-C quits at once."""
    cfg, progress = run.cfg, run.progress
    interrupted = []
    signal.signal(signal.SIGINT, lambda *a: sys.exit(130) if interrupted else interrupted.append(1))
    stop, steps_run = Stop.DONE if progress["step"] >= run.total_steps else None, 0
    bar = tqdm(total=run.total_steps, initial=progress["step"], disable=not run.is_main, desc="train")
    with bar:  # closed on an error too: the error's line starts a line of its own
        while stop is None:
            record = train_step(run, next_step_rows(run))
            if record is None:
                stop = Stop.NON_FINITE
                break
            steps_run += 1
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            done = progress["step"] == run.total_steps
            if run.val_batches and (done or (cfg.eval_every and progress["step"] % cfg.eval_every == 0)):
                evaluate_and_keep_best(run, record)
            elif run.is_main and (progress["step"] % cfg.log_every == 0 or done):
                write_metrics(cfg.out_dir, [record], mode="a")
            patience = cfg.early_stopping_patience
            ctrl_c = parallel.all_reduce_sum([len(interrupted)], run.world)[0] > 0  # on any rank: all stop
            stop = (Stop.DONE if done else
                    Stop.EARLY_STOP if patience and progress["evals_since_best"] >= patience else
                    Stop.INTERRUPT if ctrl_c else
                    Stop.STOP_AFTER if steps_run == stop_after else None)
            if stop or progress["step"] % cfg.save_every == 0:
                run.save()
    return stop


def evaluate_and_keep_best(run, record):
    """Validation loss into the record; best/ gets the weights when it is the lowest so far."""
    progress, sharded = run.progress, parallel.is_sharded(run.net)
    val = record["val_loss"] = validate(run)
    if progress["best_val"] is None or val < progress["best_val"]:
        progress.update(best_val=val, evals_since_best=0)
        with parallel.gathered(run.net) if sharded else nullcontext():  # FSDP: the whole weights, for rank 0
            if run.is_main:
                export(run.model, run.cfg, os.path.join(run.cfg.out_dir, "best"), whole_state_dict(run))
    else:
        progress["evals_since_best"] += 1
    if run.is_main:
        tqdm.write(f"step {record['step']}: train loss {record['train_loss']:.4f}  val loss {val:.4f}"
                   f"  (best {progress['best_val']:.4f})")
    if run.is_main or sharded:  # FSDP: every rank generates (each forward gathers weights from all), in
        run.model.train(not sharded)  # eval mode: no dropout, so all draw the same tokens, the same passes
        print_samples(run.model, run.tokenizer, run.samples, run.stats.template, show=run.is_main)
        run.model.train()
    if run.is_main:
        write_metrics(run.cfg.out_dir, [record], mode="a")
        write_loss_curve(run.cfg.out_dir)


def finish(run, stop):
    """The final export (when the run is done or stopped early) and the exit code."""
    cfg, log = run.cfg, run.log
    if run.is_main:
        write_loss_curve(cfg.out_dir)
        peak, estimate, baseline = peak_memory_bytes(run.device), sum(run.memory.values()), run.memory["baseline"]
        log(f"peak memory: {peak / 2**20:.0f} MiB ({'max allocated' if run.device.type == 'cuda' else 'peak RSS'}), "
            f"estimated {estimate / 2**20:.0f} MiB" + (f"; above the baseline of {baseline / 2**20:.0f} MiB: "
            f"{(peak - baseline) / 2**20:.0f} MiB, estimated {(estimate - baseline) / 2**20:.0f}" if baseline else ""))
        if stop is not Stop.DONE:
            resumable = stop in (Stop.INTERRUPT, Stop.STOP_AFTER)
            log(f"stopped at step {run.progress['step']} of {run.total_steps}: {stop.value}"
                + ("; continue with --resume" if resumable else ""))
    if stop in (Stop.DONE, Stop.EARLY_STOP):
        with parallel.gathered(run.net) if parallel.is_sharded(run.net) else nullcontext():  # every rank
            if run.is_main:
                final = os.path.join(cfg.out_dir, "adapter" if cfg.method in ("lora", "qlora") else "model")
                export(run.model, cfg, final, whole_state_dict(run))
                if cfg.merge and cfg.method in ("lora", "qlora"):
                    with atomic_folder(os.path.join(cfg.out_dir, "merged")) as tmp:
                        lora.save_merged(run.model, tmp, state_dict=whole_state_dict(run))
                log(f"wrote {final}")
    if run.world > 1:
        parallel.finish()
    return EXIT_CODES[stop]


@script
def main(argv):
    cfg, flags = parse_cli(argv, {"resume": False, "allow_changes": False, "stop_after": 0}, {"stop_after": "[0, inf)"})
    run = setup(cfg, resume=flags["resume"], allow_changes=flags["allow_changes"])
    stop = fit(run, stop_after=flags["stop_after"])
    return finish(run, stop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
