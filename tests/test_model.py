"""model.py: logits parity with transformers for each family, generation, loading errors."""
import copy
import json
import os

import pytest
import torch

import fast
from conftest import save_tiny_model
from model import ModelLoadError, generate, load_model, read_config, save_model


def hf_logits(hf, ids, **kw):
    with torch.no_grad():
        return hf(ids, **kw).logits


def random_ids(vocab, B=2, T=40, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


FAMILIES = {
    "llama_untied": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope_scaling": ("llama", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "llama_linear_rope_scaling": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama_attention_bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {}),
    "mistral_sliding_window": ("mistral", {"sliding_window": 16}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_attention_bias": ("qwen3", {"attention_bias": True}),    # o_proj gets a bias too
    "mistral_attention_bias_ignored": ("mistral", {"attention_bias": True}),  # as transformers ignores it
    "llama_sliding_window_ignored": ("llama", {"sliding_window": 16}),       # llama has no window
}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_for_each_family(tmp_path, name):
    family, overrides = FAMILIES[name]
    hf = save_tiny_model(str(tmp_path), family, **overrides)
    ours = load_model(str(tmp_path))
    ids = random_ids(ours.config.vocab_size, T=120)  # past 32 positions: rope scaling matters
    assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_tied_model_shares_one_matrix_for_embedding_and_head(tmp_path):
    save_tiny_model(str(tmp_path), tie_word_embeddings=True)
    m = load_model(str(tmp_path))
    assert m.lm_head.weight is m.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_tiny_model(str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ids = random_ids(128)
    assert (load_model(str(tmp_path))(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_load_in_bfloat16_gives_bfloat16_weights(tiny_model_dir):
    m = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m(random_ids(128)).dtype == torch.bfloat16


def test_packed_row_with_block_mask_equals_separate_sequences(tiny_model_dir):
    m = load_model(tiny_model_dir)
    a, b = random_ids(128, B=1, T=7, seed=2), random_ids(128, B=1, T=5, seed=3)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.tensor([list(range(7)) + list(range(5))])
    doc = torch.tensor([0] * 7 + [1] * 5)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    mask = (causal & (doc[:, None] == doc[None, :]))[None, None]  # (1, 1, T, T)
    out = m(packed, position_ids=position_ids, attn_mask=mask)
    assert torch.allclose(out[:, :7], m(a), atol=1e-5)
    assert torch.allclose(out[:, 7:], m(b), atol=1e-5)


def test_generation_with_kv_cache_equals_generation_without(tiny_model_dir):
    m = load_model(tiny_model_dir)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [3]]
    with_cache = generate(m, prompts, max_new_tokens=12)
    without = generate(m, prompts, max_new_tokens=12, use_cache=False)
    assert with_cache == without
    assert all(len(x) == 12 for x in with_cache)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_model_dir):
    m = load_model(tiny_model_dir)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
    batched = generate(m, prompts, max_new_tokens=10)
    assert batched == [generate(m, [p], max_new_tokens=10)[0] for p in prompts]


def test_generation_matches_transformers_greedy(tmp_path):
    hf = save_tiny_model(str(tmp_path))
    m = load_model(str(tmp_path))
    prompt = [5, 6, 7, 8, 9]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert generate(m, [prompt], max_new_tokens=15)[0] == ref


def test_generation_stops_at_a_stop_token_and_includes_it(tiny_model_dir):
    m = load_model(tiny_model_dir)
    free = generate(m, [[5, 6, 7]], max_new_tokens=10)[0]
    stop = free[3]
    out = generate(m, [[5, 6, 7]], max_new_tokens=10, stop_ids=[stop])[0]
    assert out == free[:free.index(stop) + 1]


def test_sampling_with_top_k_1_is_greedy_and_seeded_sampling_repeats(tiny_model_dir):
    m = load_model(tiny_model_dir)
    greedy = generate(m, [[5, 6, 7]], max_new_tokens=8)
    assert generate(m, [[5, 6, 7]], 8, temperature=1.0, top_k=1) == greedy
    assert generate(m, [[5, 6, 7]], 8, temperature=1.0, top_p=1e-6) == greedy
    one = generate(m, [[5, 6, 7]], 8, temperature=1.5, generator=torch.Generator().manual_seed(0))
    two = generate(m, [[5, 6, 7]], 8, temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert one == two


def test_saved_folder_loads_in_transformers_with_same_logits(tiny_model_dir, tmp_path):
    import transformers
    m = load_model(tiny_model_dir)
    out = save_model(m, str(tmp_path / "saved"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = random_ids(128)
    assert (m(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-5


# --- Gemma 3 -------------------------------------------------------------------------------
# conftest's tiny Gemma 3: every weight random (norm weights too, so the (1 + w) gain is tested),
# 5 layers of which 1 and 3 are global, a window of 8 tokens, RoPE bases 100 (local) and 5000 (global).

GEMMA3 = {
    "gemma3_text": ("gemma3_text", {}),
    "gemma3_text_final_logit_softcapping": ("gemma3_text", {"final_logit_softcapping": 2.0}),
    "gemma3_text_linear_rope_scaling_untied": ("gemma3_text", {"rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                                              "tie_word_embeddings": False}),
    "gemma3_multimodal_folder": ("gemma3", {}),
    "gemma3_multimodal_folder_untied": ("gemma3", {"tie_word_embeddings": False}),
}


def max_diff_to_transformers(ours, hf, ids):
    with torch.no_grad():
        return (ours(ids) - hf_logits(hf, ids)).abs().max().item()


@pytest.mark.parametrize("name", GEMMA3)
def test_gemma3_logits_equal_transformers_with_every_weight_randomized(tmp_path, name):
    family, overrides = GEMMA3[name]
    hf = save_tiny_model(str(tmp_path), family, **overrides)
    ours = load_model(str(tmp_path))
    assert set(ours.config.layer_types) == {"sliding_attention", "full_attention"}
    ids = random_ids(128, T=40)  # 5 windows of 8 tokens
    assert hf_logits(hf, ids).std() > 1  # logits of order 1: a wrong detail shows
    assert max_diff_to_transformers(ours, hf, ids) <= 1e-4
    assert max_diff_to_transformers(fast.accelerate(copy.deepcopy(ours)), hf, ids) <= 1e-4


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_gemma3_bf16_logits_equal_transformers_bit_for_bit(tmp_path, family):
    """bf16 shows the order of the casts: the (1 + w) gain applied in fp32 before rounding, and
    sqrt(C) rounded to bf16 before the product (both as transformers does)."""
    import transformers
    save_tiny_model(str(tmp_path), family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    ids = random_ids(128, T=40)
    assert torch.equal(load_model(str(tmp_path), dtype=torch.bfloat16)(ids), hf_logits(hf, ids))


def test_gemma3_final_logit_softcapping_bounds_the_logits(tmp_path):
    save_tiny_model(str(tmp_path), "gemma3_text", final_logit_softcapping=2.0)
    logits = load_model(str(tmp_path))(random_ids(128))
    assert logits.abs().max() < 2.0 and logits.abs().max() > 1.5


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_gemma3_greedy_generation_with_kv_cache_equals_transformers(tmp_path, family):
    hf = save_tiny_model(str(tmp_path), family)
    ours = load_model(str(tmp_path))
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # past the window of 8 before the first new token
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], max_new_tokens=20)[0] == ref
    assert generate(fast.accelerate(ours), [prompt], max_new_tokens=20)[0] == ref


def test_gemma3_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    save_tiny_model(str(tmp_path), "gemma3_text")
    m = load_model(str(tmp_path))
    prompts = [list(range(20, 31)), [12, 13], [14, 15, 16, 17, 18]]
    batched = generate(m, prompts, max_new_tokens=12)
    assert batched == [generate(m, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == generate(m, prompts, max_new_tokens=12, use_cache=False)


def rewrite_config(folder, edit):
    file = os.path.join(folder, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(file, "w") as f:
        json.dump(cfg, f)


def test_gemma3_older_sparse_config_reads_as_transformers_reads_it(tmp_path):
    """The config.json of gemma-3 checkpoints on the Hub: rope_theta, rope_local_base_freq and
    rope_scaling instead of rope_parameters, sliding_window_pattern instead of layer_types, and in a
    gemma3 folder a text_config that leaves out whatever has Gemma3TextConfig's default."""
    import transformers
    save_tiny_model(str(tmp_path), "gemma3", num_hidden_layers=7, query_pre_attn_scalar=256)

    def to_old_format(cfg):
        text = cfg["text_config"]
        for key in ("layer_types", "rope_parameters", "sliding_window_pattern", "_sliding_window_pattern",
                    "query_pre_attn_scalar", "hidden_activation", "rms_norm_eps", "tie_word_embeddings"):
            text.pop(key)
        text.update(rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=100.0)
    rewrite_config(str(tmp_path), to_old_format)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours = load_model(str(tmp_path))
    assert ours.config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert max_diff_to_transformers(ours, hf, random_ids(128, T=40)) <= 1e-4


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_saved_gemma3_folder_loads_in_transformers_with_same_logits(tmp_path, family):
    import transformers
    from safetensors.torch import load_file
    save_tiny_model(str(tmp_path / "src"), family)
    m = load_model(str(tmp_path / "src"))
    out = save_model(m, str(tmp_path / "saved"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_diff_to_transformers(m, hf, random_ids(128)) <= 1e-4
    before, after = (load_file(os.path.join(d, "model.safetensors")) for d in (str(tmp_path / "src"), out))
    assert before.keys() == after.keys()  # the vision tower too, in the names of the source
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gemma3_folder_with_transformers_module_names_loads(tmp_path):
    """Tensors named as transformers' modules (model.language_model.*, model.vision_tower.*, lm_head)
    rather than as in the Hub's files (language_model.model.*, vision_tower.*)."""
    from safetensors.torch import load_file, save_file
    hf = save_tiny_model(str(tmp_path), "gemma3", tie_word_embeddings=False)
    file = os.path.join(tmp_path, "model.safetensors")
    renamed = {}
    for key, tensor in load_file(file).items():
        key = key.replace("language_model.model.", "language_model.").replace("language_model.lm_head.", "lm_head.")
        renamed[key if key.startswith("lm_head.") else "model." + key] = tensor
    save_file(renamed, file)
    assert max_diff_to_transformers(load_model(str(tmp_path)), hf, random_ids(128)) <= 1e-4


def test_keys_left_out_of_config_json_get_transformers_defaults(tmp_path):
    import transformers
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4)
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "gemma3_text": transformers.Gemma3TextConfig}
    for family, config_cls in classes.items():
        (tmp_path / "config.json").write_text(json.dumps(dict(sizes, model_type=family)))
        ours, theirs = read_config(str(tmp_path)), config_cls(**sizes)
        assert ours.num_key_value_heads == theirs.num_key_value_heads, family
        assert ours.head_dim == getattr(theirs, "head_dim", None) or 64 // 4, family
        assert ours.tie_word_embeddings == theirs.tie_word_embeddings, family
        assert ours.rms_norm_eps == theirs.rms_norm_eps, family
        assert ours.max_position_embeddings == theirs.max_position_embeddings, family
        windows = [ours.sliding_window if t == "sliding_attention" else None for t in ours.layer_types]
        their_types = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 7
        their_window = getattr(theirs, "sliding_window", None)  # llama has none
        assert windows == [their_window if t == "sliding_attention" else None for t in their_types], family
        rope = theirs.rope_parameters.get("full_attention", theirs.rope_parameters)
        assert ours.rope_theta == rope["rope_theta"], family
    assert ours.local_rope == (theirs.rope_parameters["sliding_attention"]["rope_theta"], None)
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar


# --- bad input: one-line errors that name the problem ------------------------------------


def one_line_error(fn, *args):
    with pytest.raises(ModelLoadError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_folder_without_config_json_is_a_clear_error(tmp_path):
    assert "no config.json" in one_line_error(load_model, str(tmp_path))


def test_unsupported_model_type_names_it_and_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    msg = one_line_error(load_model, str(tmp_path))
    assert "'gpt2'" in msg and "llama" in msg and "qwen3" in msg


def test_truncated_safetensors_file_is_a_clear_error(tiny_model_dir):
    file = os.path.join(tiny_model_dir, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    assert "model.safetensors" in one_line_error(load_model, tiny_model_dir)


def test_missing_tensor_is_named(tiny_model_dir):
    from safetensors.torch import load_file, save_file
    file = os.path.join(tiny_model_dir, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    assert "model.layers.1.mlp.up_proj.weight" in one_line_error(load_model, tiny_model_dir)


def test_shape_mismatch_names_the_tensor(tiny_model_dir):
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 100
    with open(os.path.join(tiny_model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    msg = one_line_error(load_model, tiny_model_dir)
    assert "has shape" in msg and "mlp." in msg and "_proj.weight" in msg


# --- config values that change the math and are not computed: refused, the key named -------


def refused(folder, edit):
    rewrite_config(folder, edit)
    return one_line_error(load_model, folder)


@pytest.mark.parametrize("family,key,value", [("llama", "hidden_act", "gelu"), ("qwen2", "hidden_act", "relu"),
                                              ("gemma3_text", "hidden_activation", "gelu")])
def test_another_mlp_activation_is_refused(tmp_path, family, key, value):
    save_tiny_model(str(tmp_path), family)
    msg = refused(str(tmp_path), lambda cfg: cfg.update({key: value}))
    assert f'{key} = "{value}"' in msg and "config.json" in msg


def test_swish_loads_as_the_silu_it_is(tmp_path):
    hf = save_tiny_model(str(tmp_path), "llama")
    rewrite_config(str(tmp_path), lambda cfg: cfg.update(hidden_act="swish"))
    assert max_diff_to_transformers(load_model(str(tmp_path)), hf, random_ids(128)) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_use_sliding_window_is_refused(tmp_path, family):
    save_tiny_model(str(tmp_path), family)
    assert "use_sliding_window = true" in refused(str(tmp_path), lambda cfg: cfg.update(use_sliding_window=True))


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"type": "dynamic", "factor": 2.0}])
def test_unknown_rope_type_is_refused(tmp_path, rope):
    save_tiny_model(str(tmp_path))
    msg = refused(str(tmp_path), lambda cfg: cfg.update(rope_parameters=dict(rope, rope_theta=10000.0)))
    assert "rope type" in msg and repr(rope.get("rope_type", rope.get("type"))) in msg


def test_gemma3_unknown_rope_type_of_the_global_layers_is_refused(tmp_path):
    save_tiny_model(str(tmp_path), "gemma3_text")
    msg = refused(str(tmp_path), lambda cfg: cfg["rope_parameters"]["full_attention"].update(rope_type="yarn"))
    assert "rope type 'yarn' of the full_attention layers" in msg


def test_partial_rotary_factor_is_refused(tmp_path):
    save_tiny_model(str(tmp_path))
    msg = refused(str(tmp_path), lambda cfg: cfg["rope_parameters"].update(partial_rotary_factor=0.5))
    assert "partial_rotary_factor = 0.5" in msg


@pytest.mark.parametrize("family,key,value", [
    ("gemma3_text", "attn_logit_softcapping", 50.0),    # transformers' Gemma 3 ignores it: ambiguous
    ("gemma3_text", "use_bidirectional_attention", True),
    ("gemma3_text", "layer_types", ["sliding_attention", "chunked_attention"]),
])
def test_gemma3_value_not_computed_is_refused(tmp_path, family, key, value):
    save_tiny_model(str(tmp_path), family)
    assert f"{key} = {json.dumps(value)}" in refused(str(tmp_path), lambda cfg: cfg.update({key: value}))


def test_gemma3_folder_with_final_logit_softcapping_is_refused(tmp_path):
    """Gemma3ForConditionalGeneration does not apply it where Gemma3ForCausalLM does."""
    save_tiny_model(str(tmp_path), "gemma3")
    msg = refused(str(tmp_path), lambda cfg: cfg["text_config"].update(final_logit_softcapping=30.0))
    assert "text_config.final_logit_softcapping = 30.0" in msg


def test_training_a_model_with_final_logit_softcapping_is_refused(tmp_path):
    import train
    from config import Config
    save_tiny_model(str(tmp_path), "gemma3_text", final_logit_softcapping=30.0)
    msg = one_line_error(train.build_model, Config(model=str(tmp_path), method="lora"), torch.device("cpu"))
    assert "final_logit_softcapping = 30.0" in msg


@pytest.mark.parametrize("source,label,named", [("qwen2", "llama", "_proj.bias"),
                                                ("llama", "gemma3_text", "pre_feedforward_layernorm"),
                                                ("gemma3_text", "qwen3", "feedforward_layernorm")])
def test_relabelled_folder_whose_tensors_do_not_fit_is_refused(tmp_path, source, label, named):
    save_tiny_model(str(tmp_path), source)
    assert named in refused(str(tmp_path), lambda cfg: cfg.update(model_type=label))


# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair(real_model_dir):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    return load_model(real_model_dir), hf


REAL_TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. At 330 metres it was "
             "the tallest structure in the world for 41 years.\n\ndef add(a, b):\n    return a + b\n")


def test_real_model_logits_match_transformers(real_pair):
    import transformers
    ours, hf = real_pair
    tok = transformers.AutoTokenizer.from_pretrained(ours.source_dir)
    ids = torch.tensor([tok.encode(REAL_TEXT)])
    assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-3


def test_real_model_greedy_generation_matches_transformers_token_for_token(real_pair):
    import transformers
    ours, hf = real_pair
    tok = transformers.AutoTokenizer.from_pretrained(ours.source_dir)
    prompt = tok.encode("<|im_start|>user\nTell me a short story about a robot.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = torch.tensor([prompt])  # an explicit mask: HF would mask the prompt's <|im_end|> (= pad)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], max_new_tokens=32)[0] == ref


def test_real_model_answers_paris_in_its_chat_format(real_pair):
    from tokenizer import load_tokenizer
    ours, _ = real_pair
    tok = load_tokenizer(ours.source_dir)
    prompt = tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                        "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                        "<|im_end|>\n<|im_start|>assistant\n")
    answer = tok.decode(generate(ours, [prompt], max_new_tokens=20, stop_ids=[tok.eos_id])[0])
    assert "Paris" in answer


def test_real_gemma3_270m_logits_and_greedy_generation_equal_transformers(gemma_dir):
    """Gemma 3 270M (base), converted from its GGUF: our logits equal transformers' over 530 tokens
    (past the 512-token sliding window of its local layers), plain and fast, and greedy generation
    agrees token for token."""
    import transformers
    import fast
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gemma_dir)
    ids = torch.tensor([tok.encode(REAL_TEXT * 8)[:530]])
    ours = load_model(gemma_dir)
    reference = hf_logits(hf, ids)
    assert (ours(ids) - reference).abs().max().item() <= 1e-3
    prompt = tok.encode("<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n")
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], max_new_tokens=24)[0] == ref
    fast.accelerate(ours)
    assert (ours(ids[:, :64]) - reference[:, :64]).abs().max().item() <= 1e-3
