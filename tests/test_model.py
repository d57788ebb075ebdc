"""model.py: logits parity with transformers for each family, generation, loading errors."""
import json
import os

import pytest
import torch

from conftest import save_tiny_model
from model import ModelLoadError, generate, load_model, save_model


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
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
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
