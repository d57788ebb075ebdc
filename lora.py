"""Which weights train, and how: full fine-tuning, LoRA, QLoRA, layer freezing, head only.

    LoRA (Hu et al. 2021, arXiv 2106.09685): keep a pretrained linear W (out, in) frozen and learn
    a low-rank correction beside it:
        y = W x + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), r << in
    A starts Kaiming-uniform and B at zero (as PEFT does), so training starts from exactly the
    pretrained model. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by alpha / sqrt(r).
    QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the same, with W stored in 4 bits (NF4) and
    dequantized on the fly, so a frozen weight costs ~4.13 bits instead of 16 (nf4.py).

prepare_model(model, method) sets up one of: full | lora | qlora | freeze | head.
save_adapter / load_adapter speak PEFT's folder format; save_merged writes a plain HF folder.
"""
import contextlib
import json
import math
import os
import sys

import torch
import torch.nn as nn

import model as model_lib
from nf4 import NF4Linear, dequantize_nf4

# ---------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))), base frozen (an nn.Linear or an NF4Linear).

    Submodule names follow PEFT (base_layer, lora_A, lora_B), so our parameter
    "layers.0.self_attn.q_proj.lora_A.weight" is PEFT's key with "base_model.model.model." in front.
    A and B are fp32 whatever the base dtype: they are the weights the optimizer updates, and
    bf16 would round small updates away (PEFT's autocast_adapter_dtype does the same).
    """

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        device = base.nf4.packed.device if isinstance(base, NF4Linear) else base.weight.device
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init for A ...
        nn.init.zeros_(self.lora_B.weight)                             # ... and B = 0: B A = 0 at start
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.dropout_p, self.rslora = rank, alpha, dropout, rslora
        # alpha / r (Hu et al.) lets r change without retuning the learning rate; rsLoRA shows it
        # shrinks the update too much at large r, and alpha / sqrt(r) keeps it stable.
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.merged = False    # only merge() / unmerge() change this; eval() does not
        self.disabled = False  # set by adapters_disabled(): compute base(x) only

    def forward(self, x):                                                  # (..., in)
        y = self.base_layer(x)                                             # (..., out)
        if self.merged or self.disabled:
            return y
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # A, B are fp32; autocast casts for itself
            h = h.to(self.lora_A.weight.dtype)
        return y + (self.scaling * self.lora_B(self.lora_A(h))).to(y.dtype)

    def delta_weight(self):
        """scaling * B A: (out, in), fp32, what merging adds to W."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def base_weight(self):
        """The frozen W (out, in) in fp32; for an NF4 base the dequantized 4-bit weight."""
        if isinstance(self.base_layer, NF4Linear):
            return dequantize_nf4(self.base_layer.nf4, torch.float32)
        return self.base_layer.weight.float()

    @torch.no_grad()
    def merge(self):
        """W += scaling B A, so inference runs one matmul. Never called implicitly (not by eval())."""
        if isinstance(self.base_layer, NF4Linear):
            raise ValueError("merge(): the base weight is 4-bit; re-quantizing W + B A would round the "
                             "update away. Use save_merged(), which writes dequant(W) + B A.")
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= scaling B A: undoes merge() up to rounding in W's dtype."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
            self.merged = False

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def parse_targets(targets):
    """"all-linear" | "q_proj,v_proj" | ["q_proj", "layers.0.mlp.up_proj", ...] -> list or "all-linear"."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return targets
        targets = targets.split(",")
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("LoRA targets are empty: give 'all-linear' or names like q_proj,v_proj")
    return targets


def set_submodule(root, name, module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def apply_lora(model, rank, alpha, dropout=0.0, targets="all-linear", rslora=False, quantize_base=False):
    """Freeze every parameter, then wrap the targeted linears of the blocks in LoRALinear, in place.

    targets: "all-linear" (every linear but lm_head, like PEFT), short names (q_proj, ...), or
    full module names (layers.3.mlp.up_proj). quantize_base=True (QLoRA) stores every block
    linear in NF4, targeted or not; embeddings, norms and lm_head stay as they are.
    """
    targets = parse_targets(targets)
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not name.startswith("lm_head")]
    if targets != "all-linear":
        known = {name.rpartition(".")[2] for name, _ in linears} | {name for name, _ in linears}
        for t in targets:
            if t not in known:
                hint = " (lm_head is not supported)" if t == "lm_head" else ""
                raise ValueError(f"LoRA target {t!r} matches no linear layer{hint}; the model has: "
                                 f"{', '.join(sorted({n.rpartition('.')[2] for n, _ in linears}))}")
    for name, linear in linears:
        hit = targets == "all-linear" or name in targets or name.rpartition(".")[2] in targets
        base = NF4Linear(linear) if quantize_base else linear
        if hit:
            set_submodule(model, name, LoRALinear(base, rank, alpha, dropout, rslora))
        elif quantize_base:
            set_submodule(model, name, base)
    return model


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model):
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_layers(model).values():
        m.unmerge()
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside this block every LoRA layer computes base(x) alone: the model before fine-tuning,
    at no extra memory (the teacher of a distillation loss). A model without LoRA is unchanged."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise ValueError("adapters_disabled: the LoRA layers are merged into W; unmerge_lora first")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


# ---------------------------------------------------------------------------------------------
# The five methods, and what each costs


METHODS = ("full", "lora", "qlora", "freeze", "head")


def untie_lm_head(model):
    """Give lm_head its own copy of a tied embedding matrix.

    With tied embeddings lm_head.weight IS embed_tokens.weight: one tensor, one requires_grad
    flag. Training the head would also move the input embeddings, and freezing the embeddings
    would freeze the head. To train the head alone we must untie: the copy starts equal, the
    model computes the same logits, and the saved model says tie_word_embeddings = false and
    stores both matrices.
    """
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
        model.config.raw["tie_word_embeddings"] = False
    return model


def prepare_model(model, method, *, lora_rank=16, lora_alpha=32.0, lora_dropout=0.0,
                  lora_targets="all-linear", rslora=False, train_layers=2, train_head=True):
    """Set which parameters train (in place) and return the model.

    full    every parameter.
    lora    LoRA on lora_targets; everything else frozen.
    qlora   lora, with every block linear stored in NF4 (embeddings, norms, lm_head untouched).
    freeze  only the top `train_layers` blocks, plus the final norm and lm_head if train_head
            (a tied lm_head is untied first, so the input embeddings stay frozen).
    head    everything frozen but lm_head (untied first if tied): a linear probe on the
            frozen model's features.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("lora", "qlora"):
        return apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, rslora,
                          quantize_base=method == "qlora")
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method == "freeze":
        n_layers = len(model.layers)
        if not 0 <= train_layers <= n_layers:
            raise ValueError(f"train_layers={train_layers}: the model has {n_layers} blocks")
        for block in model.layers[n_layers - train_layers:]:
            block.requires_grad_(True)
        if train_head:
            untie_lm_head(model)
            model.norm.requires_grad_(True)
            model.lm_head.requires_grad_(True)
    elif method == "head":
        untie_lm_head(model)
        model.lm_head.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method {method!r} with train_layers={train_layers}, "
                         f"train_head={train_head}: nothing to train")
    return model


def count_trainable(model):
    """Parameter counts and the bytes training will hold: weights (4-bit ones included),
    gradients (one per trainable parameter, its dtype) and AdamW's two moments (same dtype)."""
    trainable = frozen = weight_bytes = grad_bytes = 0
    for p in model.parameters():  # a tied weight is listed once
        size = p.numel() * p.element_size()
        weight_bytes += size
        if p.requires_grad:
            trainable += p.numel()
            grad_bytes += size
        else:
            frozen += p.numel()
    nf4_bytes = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            frozen += m.nf4.shape.numel()
            nf4_bytes += m.nf4.nbytes
    return dict(trainable=trainable, frozen=frozen, weight_bytes=weight_bytes + nf4_bytes,
                nf4_bytes=nf4_bytes, grad_bytes=grad_bytes, optimizer_bytes=2 * grad_bytes)


def describe_trainable(model, method=""):
    """count_trainable(model) as a small table, printed at the start of a run."""
    c = count_trainable(model)
    share = 100 * c["trainable"] / max(c["trainable"] + c["frozen"], 1)
    rows = [("weights", c["weight_bytes"]), ("  of which NF4", c["nf4_bytes"]),
            ("gradients", c["grad_bytes"]), ("AdamW state (m, v)", c["optimizer_bytes"]),
            ("total before activations", c["weight_bytes"] + c["grad_bytes"] + c["optimizer_bytes"])]
    lines = [f"method {method}: {c['trainable']:,} trainable parameters ({share:.2f}%), "
             f"{c['frozen']:,} frozen"]
    lines += [f"  {name:<26}{size / 2**20:10.2f} MiB" for name, size in rows if size or "NF4" not in name]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Export: PEFT adapter folders, and merged HF folders

ADAPTER_PREFIX = "base_model.model."  # PEFT's PeftModel wraps the HF model: base_model.model.<hf name>


def save_adapter(model, folder, base_model_path=None):
    """Write a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) that
    PeftModel.from_pretrained loads onto the transformers model of the same base."""
    from safetensors.torch import save_file
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (apply_lora first)")
    first = next(iter(layers.values()))
    if len({(m.rank, m.alpha, m.rslora, m.dropout_p) for m in layers.values()}) > 1:
        raise ValueError("save_adapter: LoRA layers with different settings; "
                         "one adapter_config.json cannot describe them")
    prefix = model.config.prefix  # where transformers' model holds ours: model. (model.language_model. for gemma3)
    tensors = {}
    for name, m in layers.items():
        key = ADAPTER_PREFIX + model_lib.hf_name(name, prefix)
        tensors[key + ".lora_A.weight"] = m.lora_A.weight.detach().to("cpu").contiguous()  # (r, in)
        tensors[key + ".lora_B.weight"] = m.lora_B.weight.detach().to("cpu").contiguous()  # (out, r)
    # target_modules: a short name (q_proj) when every module of that name is adapted, else the
    # full names of those that are; PEFT matches each entry against the end of module names. In a
    # gemma3 model a short name would also match the vision tower's q_proj: full names there.
    targets = []
    for short in sorted({n.rpartition(".")[2] for n in layers}):
        same_name = [n for n, _ in model.named_modules() if n.rpartition(".")[2] == short]
        if set(same_name) <= set(layers) and prefix == "model.":
            targets.append(short)
        else:
            targets += [model_lib.hf_name(n, prefix) for n in same_name if n in layers]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path or getattr(model, "source_dir", None),
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout_p,
        "use_rslora": first.rslora, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def read_adapter(model, folder):
    """(adapter_config.json as a dict, {our module name: {"lora_A": A, "lora_B": B}}) of a PEFT LoRA
    folder, checked against the model without changing it: every adapted module must be a linear
    layer of the model with the adapter's in and out sizes, so an adapter of another base model
    fails here (ValueError naming the layer) before any work is done with it."""
    from safetensors.torch import load_file
    config_file = os.path.join(folder, "adapter_config.json")
    weights_file = os.path.join(folder, "adapter_model.safetensors")
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: missing (a PEFT adapter folder has adapter_config.json "
                                    f"and adapter_model.safetensors)")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        raise ValueError(f"{config_file}: peft_type {config.get('peft_type')!r}, "
                         f"bias {config.get('bias')!r}: only LORA with bias 'none' is supported")
    for key in ("use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                "modules_to_save"):
        if config.get(key):  # False, None and {} all mean "not used"
            raise ValueError(f"{config_file}: {key} = {config[key]!r} is not supported (plain LoRA only)")
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora", False))
    pairs, prefix, vision = {}, model.config.prefix, 0  # pairs: our module name -> {"lora_A": A, "lora_B": B}
    for key, tensor in load_file(weights_file).items():
        stem, _, tail = key.rpartition(".lora_")
        if not key.startswith(ADAPTER_PREFIX) or tail not in ("A.weight", "B.weight"):
            raise ValueError(f"{weights_file}: unexpected tensor {key!r} "
                             f"(expected {ADAPTER_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        module = stem[len(ADAPTER_PREFIX):]
        if model.config.model_type == "gemma3" and not module.startswith(prefix):
            vision += 1  # the vision tower: not part of the text model
            continue
        pairs.setdefault(module.removeprefix(prefix), {})["lora_" + tail[0]] = tensor
    if vision:
        print(f"{weights_file}: {vision} vision tower tensors left out (the text model has no vision tower)",
              file=sys.stderr)
    modules = dict(model.named_modules())
    for name, pair in pairs.items():
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                raise ValueError(f"{weights_file}: {name} has no {part}.weight")
        layer = getattr(modules.get(name), "base_layer", modules.get(name))  # under a LoRA layer: its base
        sizes = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
        if (tuple(pair["lora_A"].shape), tuple(pair["lora_B"].shape)) != ((r, sizes[0]), (sizes[1], r)):
            here = f"a linear layer of {sizes[0]} -> {sizes[1]}" if sizes[0] else "not a linear layer"
            raise ValueError(f"{weights_file}: does not fit this model: {name} is {here} here, the adapter's "
                             f"A and B are {tuple(pair['lora_A'].shape)} and {tuple(pair['lora_B'].shape)} "
                             f"(trained on {config.get('base_model_name_or_path')}?)")
    return config, pairs


def load_adapter(model, folder, quantize_base=False):
    """Load a PEFT LoRA folder (ours or PEFT's) into the model; return the model.

    The adapted modules are read off the tensor names, so any target_modules form works. A model
    without LoRA layers gets them (NF4 bases if quantize_base); one that has them must have
    exactly these, with the same rank and scaling. For a gemma3 model (the text part of a multimodal
    one) an adapter's vision tower tensors are left out, with a line on stderr.
    """
    config, pairs = read_adapter(model, folder)
    config_file = os.path.join(folder, "adapter_config.json")
    weights_file = os.path.join(folder, "adapter_model.safetensors")
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora", False))
    if not lora_layers(model):
        apply_lora(model, r, alpha, config.get("lora_dropout", 0.0), list(pairs), rslora, quantize_base)
    layers = lora_layers(model)
    if set(layers) != set(pairs):
        extra, missing = sorted(set(pairs) - set(layers)), sorted(set(layers) - set(pairs))
        raise ValueError(f"{weights_file}: adapter modules do not match the model's LoRA layers "
                         f"(only in the file: {extra[:3]}, only in the model: {missing[:3]})")
    with torch.no_grad():
        for name, m in layers.items():
            for part in ("lora_A", "lora_B"):
                if part not in pairs[name]:
                    raise ValueError(f"{weights_file}: {name} has no {part}.weight")
                tensor, param = pairs[name][part], getattr(m, part).weight
                if tensor.shape != param.shape:
                    raise ValueError(f"{weights_file}: {name}.{part}.weight has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(param.shape)} (r={m.rank})")
                param.copy_(tensor)
            if (m.rank, m.scaling) != (r, alpha / math.sqrt(r) if rslora else alpha / r):
                raise ValueError(f"{config_file}: r={r}, lora_alpha={alpha}, use_rslora={rslora} differ "
                                 f"from the model's LoRA layer {name} (r={m.rank}, scaling={m.scaling})")
    return model


def merged_state_dict(model, state_dict=None):
    """Our parameter names -> plain tensors, with every LoRA update folded in and every NF4 weight
    dequantized. For QLoRA the update goes into dequant(W_nf4), not into the original bf16 W:
    the adapter was trained to correct the 4-bit weight, and the original differs from it by
    the quantization error, which the update has partly learnt to compensate. `state_dict`: the
    model's, when given (parallel.whole_state_dict under FSDP)."""
    state = {}
    for name, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[name + ".weight"] = m.base_layer.weight if m.merged else m.base_weight() + m.delta_weight()
        elif isinstance(m, NF4Linear) and not name.endswith(".base_layer"):
            state[name + ".weight"] = dequantize_nf4(m.nf4)
    return state


@torch.no_grad()
def save_merged(model, folder, dtype=None, state_dict=None):
    """Write a plain HF folder (config.json, model.safetensors, tokenizer files) that transformers
    and model.load_model read; dtype defaults to the embeddings' dtype. The model is not changed."""
    dtype = dtype or model.embed_tokens.weight.dtype
    return model_lib.save_model(model, folder, state_dict=merged_state_dict(model, state_dict), dtype=dtype)
