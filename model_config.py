"""What a Hugging Face config.json says about the architecture, read into a ModelConfig for model.py;
a value that changes the math and that model.py does not compute is refused, one line naming the key.

    cfg = read_config("models/SmolLM2-135M-Instruct")   # ModelConfig(model_type="llama", hidden_size=576, ...)

Keys a file leaves out get transformers' defaults (its config classes), so a folder reads as
transformers reads it.
"""
import json
import os
from dataclasses import dataclass, field

from config import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


class ModelLoadError(UserError):
    """A problem with a model folder; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------
# Configuration: the few numbers in config.json that define the architecture


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int               # C
    intermediate_size: int         # width of the MLP
    num_hidden_layers: int
    num_attention_heads: int       # query heads
    num_key_value_heads: int       # key/value heads; fewer than query heads = grouped-query attention
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None      # {"rope_type": "llama3" | "linear", "factor": ..., ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False         # qwen2, or llama / qwen3 / gemma3 with attention_bias
    o_bias: bool = False           # llama / qwen3 / gemma3 with attention_bias
    mlp_bias: bool = False         # llama with mlp_bias
    qk_norm: bool = False          # qwen3, gemma3
    sliding_window: int = None     # a sliding layer's token sees only the last `sliding_window` tokens
    layer_types: list = None       # per layer: "full_attention" or "sliding_attention"
    bos_token_id: int = None
    eos_token_id: object = None    # an id or a list of ids
    gemma: bool = False            # gemma3: GeGLU, (1 + w) norms, sqrt(C) embedding scale, norms after attention / MLP
    local_rope: tuple = None       # gemma3: (theta, scaling) of the sliding layers' RoPE
    query_pre_attn_scalar: float = None    # gemma3: scores scaled by its ** -0.5 instead of head_dim ** -0.5
    final_logit_softcapping: float = None  # logits -> cap * tanh(logits / cap)
    prefix: str = "model."         # where our parameters sit in transformers' model (gemma3 folder: model.language_model.)
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, written back on save


# transformers' defaults (its config classes) for keys a config.json may leave out, where they differ
# from Llama's: a gemma3 folder's text_config lists only what differs from Gemma3TextConfig's.
DEFAULTS = {
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096, "max_position_embeddings": 131072},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                        sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4, bos_token_id=2,
                        eos_token_id=1)}
ROPE_TYPES = ("default", "llama3", "linear")


def read_config(path):
    """Read config.json of a model folder into a ModelConfig.

    A `gemma3` folder (Gemma 3 4B and up: text and vision) is read as its text model, text_config;
    load_model leaves its vision tower out and save_model copies it back unchanged. A value that
    changes the math and that this model does not compute is refused (ModelLoadError naming the
    key): a folder never loads as a silently different model. (attention_dropout is not applied.)"""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: not a folder")
    if not os.path.isfile(file):
        raise ModelLoadError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{file}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    c, where = (raw.get("text_config") or {}, "text_config.") if model_type == "gemma3" else (raw, "")
    family = c.get("model_type", "gemma3_text") if model_type == "gemma3" else model_type
    c = dict(DEFAULTS.get(family, {}), **c)  # the file's values, transformers' defaults for the rest
    check_supported(c, family, model_type, file, where)
    gemma, n_heads = family == "gemma3_text", c["num_attention_heads"]
    bias = bool(c.get("attention_bias")) and family in ("llama", "qwen3", "gemma3_text")
    (theta, scaling), local_rope = rope_settings(c, family, file, where)
    layer_types = read_layer_types(c, family, file, where)
    return ModelConfig(
        model_type=model_type,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", True) if model_type == "gemma3"
        else c.get("tie_word_embeddings", False),
        qkv_bias=family == "qwen2" or bias,
        o_bias=bias,
        mlp_bias=family == "llama" and bool(c.get("mlp_bias")),
        qk_norm=family in ("qwen3", "gemma3_text"),
        sliding_window=c.get("sliding_window") if "sliding_attention" in layer_types else None,
        layer_types=layer_types,
        bos_token_id=raw.get("bos_token_id", c.get("bos_token_id")),
        eos_token_id=raw.get("eos_token_id", c.get("eos_token_id")),
        gemma=gemma,
        local_rope=local_rope,
        query_pre_attn_scalar=c["query_pre_attn_scalar"] if gemma else None,
        final_logit_softcapping=c.get("final_logit_softcapping") if gemma else None,
        prefix="model.language_model." if model_type == "gemma3" else "model.",
        raw=raw,
    )


def refuse(file, key, value, why):
    raise ModelLoadError(f"{file}: {key} = {json.dumps(value)} is not supported ({why})")


def check_supported(c, family, model_type, file, where):
    """Refuse the config values that change the math and that this model does not compute."""
    gemma = family == "gemma3_text"
    act_key, acts = ("hidden_activation", ("gelu_pytorch_tanh",)) if gemma else ("hidden_act", ("silu", "swish"))
    for key, bad, why in [
        ("model_type", model_type == "gemma3" and not gemma, "a gemma3 text_config is gemma3_text"),
        (act_key, c.get(act_key, acts[0]) not in acts, f"{family} computes {acts[0]} here"),  # swish: nn.SiLU
        ("use_sliding_window", family in ("qwen2", "qwen3") and c.get("use_sliding_window"),
         "qwen's window on the layers from max_window_layers on is not implemented"),
        ("attn_logit_softcapping", gemma and c.get("attn_logit_softcapping") is not None,
         "transformers' Gemma 3 ignores it"),  # Gemma 3 normalises q and k instead
        ("use_bidirectional_attention", gemma and c.get("use_bidirectional_attention"), "attention is causal here"),
        ("final_logit_softcapping", model_type == "gemma3" and c.get("final_logit_softcapping") is not None,
         "Gemma3ForConditionalGeneration ignores it, Gemma3ForCausalLM applies it")]:
        if bad:
            refuse(file, where + key, c.get(key), why)


def rope_settings(c, family, file, where):
    """(theta, scaling or None) of the RoPE of the full-attention layers, and of gemma3's sliding
    layers (None for other families). transformers >= 5 writes "rope_parameters" (for gemma3 a dict
    per layer type); older files "rope_theta" plus "rope_scaling" (gemma3: for the global layers,
    and "rope_local_base_freq" for the local ones)."""
    if family == "gemma3_text":  # as Gemma3TextConfig.convert_rope_params_to_dict
        params = c.get("rope_parameters") or {}
        kinds = {"full_attention": dict({"rope_theta": c["rope_theta"]}, **params.get("full_attention") or {},
                                        **c.get("rope_scaling") or {}),
                 "sliding_attention": dict({"rope_theta": c["rope_local_base_freq"]},
                                           **params.get("sliding_attention") or {})}
    else:
        kinds = {"full_attention": dict({"rope_theta": c.get("rope_theta", 10000.0)},
                                        **c.get("rope_parameters") or c.get("rope_scaling") or {})}
    out = {}
    for kind, rope in kinds.items():
        rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type" in older files
        if rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"{file}: {where}rope_parameters: rope type {rope_type!r} of the {kind} layers "
                                 f"is not supported (supported: {', '.join(ROPE_TYPES)})")
        partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            refuse(file, where + "partial_rotary_factor", partial, "RoPE turns every dimension here")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", c.get("max_position_embeddings", 2048))
        out[kind] = float(rope["rope_theta"]), None if rope_type == "default" else dict(rope, rope_type=rope_type)
    return out["full_attention"], out.get("sliding_attention")


def read_layer_types(c, family, file, where):
    """Each layer's type: gemma3 alternates sliding-window and full attention (layer_types, or in
    older files every sliding_window_pattern-th layer full); mistral's window covers every layer;
    llama and qwen have none (transformers ignores a llama's sliding_window)."""
    n = c["num_hidden_layers"]
    if family == "gemma3_text":
        pattern = c["sliding_window_pattern"]
        types = c.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                         for i in range(n)]
        if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            refuse(file, where + "layer_types", types, f"expected {n} of sliding_attention, full_attention")
        return list(types)
    return ["sliding_attention" if family == "mistral" and c.get("sliding_window") else "full_attention"] * n
