"""A decoder-only transformer for the Llama family, loaded straight from a Hugging Face folder.

One model covers what ships on the Hub as `llama` (Llama 2/3.x, TinyLlama, SmolLM/SmolLM2),
`mistral`, `qwen2`, `qwen3` and Gemma 3 (`gemma3_text`, and the text model of a `gemma3` folder).
They differ only in small switches, all read from config.json:

    x = embed_tokens(ids)                                   # (B, T, C)
    for each block:
        x = x + o_proj(attention(rope(q), rope(k), v))      # q,k,v = projections of rmsnorm(x)
        x = x + down_proj(silu(gate_proj(h)) * up_proj(h))  # h = rmsnorm(x)      (SwiGLU MLP)
    logits = lm_head(rmsnorm(x))                            # (B, T, V)

    qwen2: bias on the q/k/v projections.   qwen3: RMSNorm on each head of q and k.
    llama 3.1+: "llama3" RoPE frequency scaling.   tied: lm_head.weight is embed_tokens.weight.
    mistral: each token sees the last sliding_window tokens only.
    gemma3: gelu for silu (GeGLU); norms scale by 1 + w; embeddings times sqrt(C); q/k norms; the
            attention and MLP outputs normalised too before the residual sum; scores scaled by
            query_pre_attn_scalar^-1/2; sliding-window layers with their own RoPE base between
            full-attention ones; final_logit_softcapping when set.

config.json is read (and what we do not compute refused) by model_config.py.

Parameter names are the checkpoint's names without the leading "model." (ours:
"layers.0.self_attn.q_proj.weight", file: "model.layers.0.self_attn.q_proj.weight"), so loading
is a loop over the file's tensors, and saving is the same loop backwards.
"""
import json
import math
import os
import shutil
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelLoadError, read_config  # noqa: F401


# ---------------------------------------------------------------------------------------------
# The building blocks


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps)   (Zhang & Sennrich 2019).

    Normalised in fp32 (at least), cast back to x's dtype, then scaled: the Llama recipe, so a
    bf16 model gives the bits transformers gives."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                                  # (..., C)
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_hat.to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """gemma3: x / sqrt(mean(x^2) + eps) * (1 + w), all in fp32 (at least), then cast to x's dtype.
    The stored weights are offsets from 1 (zeros = the identity gain), as transformers' Gemma3RMSNorm."""

    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x):                                                  # (..., C)
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_hat * (1.0 + self.weight.to(xf.dtype))).to(x.dtype)


def make_norm(cfg, dim):
    return (GemmaRMSNorm if cfg.gemma else RMSNorm)(dim, cfg.rms_norm_eps)


class ScaledEmbedding(nn.Embedding):
    """gemma3: embeddings times sqrt(C), the factor first rounded to the weights' dtype as transformers
    does (55.4256 becomes 55.5 in bf16). Inside the module, so a hook on embed_tokens (NEFTune) sees
    the scaled vectors, as a hook on transformers' embedding does."""

    def forward(self, input_ids):
        return super().forward(input_ids) * torch.tensor(self.embedding_dim ** 0.5).to(self.weight.dtype)


def rope_inv_freq(d, theta, scaling=None):
    """Rotation frequencies of RoPE (Su et al. 2021): theta^(-2i/d) for i < d/2, maybe rescaled."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))  # fp32, as HF does
    scaling = scaling or {}
    if scaling.get("rope_type") == "linear":  # position interpolation (Chen et al. 2023)
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        # Llama 3.1: long wavelengths (low frequencies) are slowed by `factor`, short ones kept,
        # and the band between is interpolated smoothly.
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq


def rope_tables(cfg):
    """RoPE frequencies for each layer type: gemma3's sliding layers have their own (cfg.local_rope)."""
    full = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return {"full_attention": full,
            "sliding_attention": rope_inv_freq(cfg.head_dim, *cfg.local_rope) if cfg.local_rope else full}


def rope_cos_sin(inv_freq, position_ids):
    """cos and sin of each position's rotation angles: (B, T) -> two (B, 1, T, head_dim)."""
    angles = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)         # (B, T, d): HF pairs i with i + d/2
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) of x (B, H, T, d) by its angle, in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for fast generation.

    k[i], v[i]: (B, n_kv_heads, max_len, head_dim); positions [0, length) are filled.
    """

    def __init__(self, cfg, batch_size, max_len, dtype, device):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def update(self, layer, k, v):
        """Append k, v (B, n_kv, T, d) of `layer`; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    rope = staticmethod(apply_rope)  # fast.py's twin swaps in one with fewer temporaries

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=cfg.o_bias)
        if cfg.qk_norm:  # qwen3, gemma3: normalise each head's q and k before the rotation
            self.q_norm = make_norm(cfg, self.head_dim)
            self.k_norm = make_norm(cfg, self.head_dim)
        # softmax scale: gemma3 sets it apart from the head size; None = SDPA's 1 / sqrt(head_dim)
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)      # (B, T, H, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)   # (B, T, Hkv, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                          # (B, Hkv, S, d)
        # Grouped-query attention (Ainslie et al. 2023): each k/v head serves H/Hkv query heads.
        # softmax(q k^T / sqrt(d) + mask) v by PyTorch's fused kernel; no mask = causal.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                           scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)); gemma3: GeGLU, gelu (tanh form) for silu."""

    def __init__(self, cfg):
        super().__init__()
        C, H = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, H, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, H, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(H, C, bias=cfg.mlp_bias)
        self.activation = "gelu_pytorch_tanh" if cfg.gemma else "silu"

    def forward(self, x):                                                  # (B, T, C)
        act = ACTIVATIONS[self.activation]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))    # via (B, T, I)


class Block(nn.Module):
    """A pre-norm residual block: attention, then the MLP, each on a normalised copy of x."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):  # (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaBlock(Block):
    """gemma3: each branch's output is normalised too before it joins the residual stream, so
    post_attention_layernorm acts on the attention output, and pre_feedforward_layernorm is the MLP's
    input norm."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pre_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
        self.post_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):  # (B, T, C)
        h = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache, layer)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        # the weights are read from the checkpoint (load_model): no random init. (nn.Embedding's own,
        # normal_ on the "meta" device, would import torch's compiler stack at every start)
        embedding = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = (ScaledEmbedding if cfg.gemma else nn.Embedding)(cfg.vocab_size, cfg.hidden_size,
                                                                             _weight=embedding)
        self.layers = nn.ModuleList((GemmaBlock if cfg.gemma else Block)(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE frequencies: plain fp32 tensors, not buffers, so model.to(bf16) cannot round them.
        with torch.device("cpu"):  # computed even when the model is built on "meta" (load_model)
            self.inv_freq = rope_tables(cfg)
        self.grad_checkpointing = False  # recompute each block in backward to save activations
        self.source_dir = None           # the folder the weights came from (set by load_model)

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, kv_cache=None):
        """Final-normed hidden states (B, T, C): everything but the output projection."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        window = self.config.sliding_window
        per_type = {}  # layer type -> RoPE cos, sin (B, 1, T, d) fp32, and the mask of such layers
        for kind in set(self.config.layer_types):
            cos, sin = rope_cos_sin(self.inv_freq[kind].to(input_ids.device), position_ids)
            mask = attn_mask
            if kind == "sliding_attention" and window and start + T > window:  # the causal mask cut to a band
                mask = sliding_window_mask(T, start, window, input_ids.device, attn_mask)
            per_type[kind] = cos, sin, mask
        x = self.embed_tokens(input_ids)                           # (B, T, C)
        for i, block in enumerate(self.layers):
            cos, sin, mask = per_type[self.config.layer_types[i]]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def forward(self, input_ids, position_ids=None, attn_mask=None, kv_cache=None, return_hidden=False):
        """Logits (B, T, V), or with return_hidden the hidden states (B, T, C): training computes
        logits only at the positions that have a loss (loss.py), not for all B*T of them, and
        without final_logit_softcapping (train.py refuses a model that sets it)."""
        hidden = self.hidden_states(input_ids, position_ids, attn_mask, kv_cache)
        if return_hidden:
            return hidden
        logits, cap = self.lm_head(hidden), self.config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap  # squashed into (-cap, cap)


def check_logits_are_lm_head(model):
    """The losses (loss.py) take the logits as hidden @ lm_head.weight^T: train.py and eval.py refuse
    a model whose logits are more than that, rather than train or score another model."""
    if model.config.final_logit_softcapping:
        raise ModelLoadError(f"{model.source_dir}: final_logit_softcapping = {model.config.final_logit_softcapping} "
                             f"is not supported in training and evaluation (loss.py does not cap the logits)")


def sliding_window_mask(T, start, window, device, attn_mask=None):
    """Causal mask (1, 1, T, start+T) where query i sees keys j with i - window < j <= i."""
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None, :]
    mask = ((k <= q) & (k > q - window))[None, None]
    return mask if attn_mask is None else mask & attn_mask


# ---------------------------------------------------------------------------------------------
# Loading and saving: safetensors files <-> parameters


def checkpoint_files(path):
    """The safetensors file(s) of a folder: one model.safetensors, or the shards of an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    else:
        files = [os.path.join(path, "model.safetensors")]
    for file in files:
        if not os.path.isfile(file):
            raise ModelLoadError(f"{file}: missing (expected model.safetensors or the shards "
                                 f"listed in model.safetensors.index.json)")
    return files


def as_dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(file):
    """A safetensors file is: 8 bytes (little-endian u64) = n, n bytes of JSON header, then raw
    tensor bytes. The header maps each name to {"dtype", "shape", "data_offsets": [begin, end]}
    (offsets counted from the end of the header). Returns (header, where the data starts)."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n < 2 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, info in header.items():
            begin, end = info["data_offsets"]
            if 8 + n + end > size:
                raise ValueError(f"tensor '{key}' ends past the end of the file")
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ModelLoadError(f"{file}: not a readable safetensors file, truncated? ({e})") from None
    return header, 8 + n


def load_model(path, dtype=torch.float32, device="cpu"):
    """Build the model described by path/config.json and fill it from its safetensors files.

    The model is first built on the "meta" device (shapes only, no memory), then given empty
    storage, then each tensor is read from the file straight into its parameter's memory
    (through one temporary when the file's dtype differs), so peak memory is the model's size.
    """
    cfg = read_config(path)
    dtype = as_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    for module in model.modules():  # empty storage for each weight (not to_empty(): it costs seconds of imports)
        for name, p in module.named_parameters(recurse=False):
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device)))
    if cfg.tie_word_embeddings:  # each module got new storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters())  # tied weights appear once, as embed_tokens.weight
    filled, skipped = set(), 0
    for file in checkpoint_files(path):
        header, data_start = read_safetensors_header(file)
        with open(file, "rb") as f:
            for key, info in header.items():
                name = our_name(key, cfg)
                if name is None:  # gemma3: the vision tower and its projector
                    skipped += 1
                    continue
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints store the shared matrix twice
                if name not in params:
                    raise ModelLoadError(f"{file}: unexpected tensor '{key}' for a {cfg.model_type} model")
                param = params[name]
                if tuple(info["shape"]) != tuple(param.shape):
                    raise ModelLoadError(f"{file}: tensor '{key}' has shape {tuple(info['shape'])}, "
                                         f"the config implies {tuple(param.shape)}")
                file_dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if file_dtype is None or not file_dtype.is_floating_point:
                    raise ModelLoadError(f"{file}: tensor '{key}' has dtype {info['dtype']}, not a float")
                begin, end = info["data_offsets"]
                direct = file_dtype == param.dtype and param.device.type == "cpu"
                target = param.data if direct else torch.empty(param.shape, dtype=file_dtype)
                if end - begin != target.numel() * target.element_size():
                    raise ModelLoadError(f"{file}: tensor '{key}' has {end - begin} bytes, "
                                         f"expected {target.numel() * target.element_size()}")
                f.seek(data_start + begin)
                f.readinto(target.view(torch.uint8).reshape(-1).numpy())
                if not direct:
                    with torch.no_grad():
                        param.copy_(target)
                filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ModelLoadError(f"{path}: tensor(s) missing from the checkpoint: "
                             f"{', '.join(hf_name(n, file_prefix(cfg)) for n in missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    if skipped:
        print(f"{path}: loaded the text model; {skipped} vision tensors left out (save_model copies them back)",
              file=sys.stderr)
    model.source_dir = path
    return model.eval()


def hf_name(name, prefix="model."):
    """Our parameter name -> transformers': prefix + name, lm_head.weight as it is. A gemma3 folder's
    text model is "model.language_model." in transformers' model (and PEFT's keys), and in the Hub's
    files "language_model.model.", where an untied head is "language_model.lm_head"."""
    if name.startswith("lm_head."):
        return "language_model." + name if prefix == "language_model.model." else name
    return prefix + name


def file_prefix(cfg, write=True):
    """The text model's prefix in files (the one save_model writes), or all those load_model reads."""
    prefixes = ("language_model.model.", "model.language_model.") if cfg.model_type == "gemma3" else ("model.",)
    return prefixes[0] if write else prefixes


def our_name(key, cfg):
    """A checkpoint's tensor name -> ours; None for a gemma3 tensor outside the text model (vision)."""
    for prefix in file_prefix(cfg, write=False):
        if key.startswith(prefix) or key == hf_name("lm_head.weight", prefix):
            return key.removeprefix(prefix).removeprefix("language_model.")  # language_model.lm_head too
    return None if cfg.model_type == "gemma3" else key


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json")


def save_model(model, folder, state_dict=None, dtype=None):
    """Write an HF folder: config.json, model.safetensors (HF names), tokenizer files copied
    from the folder the model was loaded from. `state_dict` (our names) defaults to the
    model's own; lora.py passes merged weights here."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state_dict = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # safetensors stores no shared tensors; HF re-ties from the config
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        tensors[hf_name(name, file_prefix(model.config))] = tensor
    tensors.update(vision_tensors(model, dtype))
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    raw = dict(model.config.raw)
    raw["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    raw.pop("dtype", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    for name in TOKENIZER_FILES:
        if model.source_dir and os.path.isfile(os.path.join(model.source_dir, name)):
            shutil.copy(os.path.join(model.source_dir, name), os.path.join(folder, name))
    return folder


def vision_tensors(model, dtype=None):
    """gemma3: the tensors of the source folder outside the text model (vision tower, projector),
    unchanged but for dtype, so a saved folder is still the whole multimodal model."""
    from safetensors import safe_open
    out = {}
    if model.config.model_type == "gemma3" and model.source_dir:
        for file in checkpoint_files(model.source_dir):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    if our_name(key, model.config) is None:
                        out[key] = f.get_tensor(key) if dtype is None else f.get_tensor(key).to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Generation with a KV cache


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:  # keep the k most likely tokens
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus sampling (Holtzman et al. 2019): smallest set with mass >= top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, stop_ids=None,
             use_cache=True, generator=None, on_token=None):
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

    Prompts of different lengths are left-padded into one batch: pad positions are masked out
    of attention and the real tokens get positions 0, 1, 2, ... as if alone. Returns the new
    tokens of each prompt, the stop token included when one was hit. `on_token(i, id)` is
    called for each new token of prompt i (for streaming).
    """
    device = model.embed_tokens.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    stop_ids = set(stop_ids or [])
    ids = torch.zeros(B, longest, dtype=torch.long, device=device)
    real = torch.zeros(B, longest, dtype=torch.bool, device=device)  # False on left padding
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        real[i, longest - len(p):] = True
    cache = KVCache(model.config, B, longest + max_new_tokens, model.embed_tokens.weight.dtype,
                    device) if use_cache else None
    out, done = [[] for _ in range(B)], [False] * B
    new_ids = ids
    for _ in range(max_new_tokens):
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        T, S = new_ids.shape[1], real.shape[1]
        # query t (at absolute position S - T + t) sees real keys up to itself; every query
        # also sees itself, so a pad query has one key and softmax never divides by zero.
        q_pos = torch.arange(S - T, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None] & (real[:, None, :] | (k_pos == q_pos)[None])  # (B, T, S)
        logits = model(new_ids, position_ids[:, S - T:], mask[:, None], cache)[:, -1]
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                out[i].append(t)
                if on_token:
                    on_token(i, t)
                done[i] = t in stop_ids
        if all(done):
            break
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        real = torch.cat([real, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        new_ids = next_ids[:, None] if use_cache else ids
    return out
