"""LoRA / QLoRA / freeze / head (lora.py), and the PEFT adapter and merged-model formats.

peft, transformers and bitsandbytes are the oracles: an adapter must mean the same thing here
and there, checked by logits (a wrong key prefix "loads" in some tools and leaves B at zero).
Every test that compares adapted models first gives B random values: with B = 0 an adapter is
a no-op and such a test could not fail.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

import lora
import nf4
import model as model_lib
from conftest import save_tiny_model

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 3], [2, 4, 8, 16, 32, 64, 127, 0]])


def randomize_lora_B(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def hf_model(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_model(folder, adapter):
    from peft import PeftModel
    return PeftModel.from_pretrained(hf_model(folder), adapter).eval()


def grads_by_name(model):
    """Run a forward/backward pass; names of the parameters that received a gradient."""
    model(IDS).float().square().mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def tiny(tiny_model_dir):
    return model_lib.load_model(tiny_model_dir)


@pytest.fixture
def tied_tiny_dir(tmp_path):
    folder = str(tmp_path / "tiny-tied")
    save_tiny_model(folder, tie_word_embeddings=True)
    return folder


# --- LoRALinear ------------------------------------------------------------------------------


def test_fresh_adapter_leaves_the_model_output_unchanged(tiny):
    before = tiny(IDS)
    lora.apply_lora(tiny, rank=4, alpha=8)
    assert len(lora.lora_layers(tiny)) == 2 * 7
    assert torch.equal(tiny(IDS), before)


def test_A_is_kaiming_uniform_and_B_is_zero():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(256, 128), rank=64, alpha=16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    bound = 1 / 256 ** 0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert abs(A.std().item() - bound / 3 ** 0.5) < 0.05 * bound
    assert A.dtype == B.dtype == torch.float32 and torch.count_nonzero(B) == 0


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_and_output_match_peft_on_the_same_A_and_B(rslora):
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 48)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    base = One()
    ours = lora.LoRALinear(nn.Linear(32, 48), rank=4, alpha=12, rslora=rslora)
    ours.base_layer.load_state_dict(base.proj.state_dict())
    theirs = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=["proj"], use_rslora=rslora))
    with torch.no_grad():
        theirs.base_model.model.proj.lora_B["default"].weight.normal_()
        ours.lora_A.weight.copy_(theirs.base_model.model.proj.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.base_model.model.proj.lora_B["default"].weight)
    assert ours.scaling == (12 / 2 if rslora else 12 / 4)
    assert ours.scaling == theirs.base_model.model.proj.scaling["default"]
    x = torch.randn(5, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)  # same math, rounding may differ
    assert not torch.allclose(ours(x), ours.base_layer(x))  # the update is really there


def test_without_autocast_a_bf16_base_gets_the_lora_term_in_fp32_rounded_once():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 48, bias=False).bfloat16(), rank=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    y = layer(x)
    term = layer.scaling * layer.lora_B(layer.lora_A(x.float()))  # fp32 A and B on fp32 input
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer.base_layer(x) + term.to(torch.bfloat16))


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(64, 64), rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(8, 64)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: dropout must not touch base(x)
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # random masks on the adapter path
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_merge_then_unmerge_restores_the_weights(tiny):
    lora.apply_lora(tiny, rank=4, alpha=8)
    randomize_lora_B(tiny)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    lora.merge_lora(tiny)
    q = "layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.allclose(dict(tiny.named_parameters())[q], before[q])
    lora.unmerge_lora(tiny)
    for n, p in tiny.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_merged_model_gives_the_adapter_models_logits(tiny):
    lora.apply_lora(tiny, rank=4, alpha=8, rslora=True)
    randomize_lora_B(tiny)
    adapted = tiny(IDS)
    lora.merge_lora(tiny)
    assert all(m.merged for m in lora.lora_layers(tiny).values())
    torch.testing.assert_close(tiny(IDS), adapted, rtol=0, atol=1e-4)


def test_eval_and_train_never_merge(tiny):
    lora.apply_lora(tiny, rank=4, alpha=8)
    randomize_lora_B(tiny)
    weight = tiny.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    tiny.eval()
    tiny.train()
    tiny.eval()
    assert not any(m.merged for m in lora.lora_layers(tiny).values())
    assert torch.equal(tiny.layers[0].self_attn.q_proj.base_layer.weight, weight)


def test_adapters_disabled_gives_the_base_model_then_restores_the_adapter(tiny):
    base = tiny(IDS)
    lora.apply_lora(tiny, rank=4, alpha=8)
    randomize_lora_B(tiny)
    adapted = tiny(IDS)
    with lora.adapters_disabled(tiny):
        assert torch.equal(tiny(IDS), base)
    assert torch.equal(tiny(IDS), adapted) and not torch.equal(adapted, base)


def test_targets_by_name_wrap_only_those_linears(tiny):
    lora.apply_lora(tiny, rank=4, alpha=8, targets="q_proj,v_proj")
    expected = [f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert sorted(lora.lora_layers(tiny)) == expected
    assert not isinstance(tiny.layers[0].mlp.up_proj, lora.LoRALinear)


def test_unknown_target_is_an_error_naming_it(tiny):
    with pytest.raises(ValueError, match="'qproj' matches no linear layer"):
        lora.apply_lora(tiny, rank=4, alpha=8, targets=["qproj"])


def test_lora_trains_only_A_and_B(tiny):
    lora.prepare_model(tiny, "lora", lora_rank=4, lora_alpha=8)
    randomize_lora_B(tiny)
    got = grads_by_name(tiny)
    assert got == {n for n, _ in tiny.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(got) == 2 * 2 * 7


# --- QLoRA -----------------------------------------------------------------------------------


def test_qlora_stores_every_block_linear_in_nf4_and_nothing_else(tiny):
    lora.prepare_model(tiny, "qlora", lora_rank=4, lora_alpha=8, lora_targets="q_proj")
    for block in tiny.layers:
        assert isinstance(block.self_attn.q_proj.base_layer, nf4.NF4Linear)
        for name in ("k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(block.self_attn, name), nf4.NF4Linear)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(getattr(block.mlp, name), nf4.NF4Linear)
    assert type(tiny.lm_head) is nn.Linear and tiny.embed_tokens.weight.dtype == torch.float32
    expected = {f"layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}
    assert grads_by_name(tiny) == expected


def test_qlora_logits_equal_transformers_bitsandbytes_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    # MLP width 128, not 96: bitsandbytes 0.50.2's CPU dequantize is wrong for rows whose
    # length is not a multiple of 64 (see test_nf4.py)
    tiny_model_dir = str(tmp_path / "tiny")
    save_tiny_model(tiny_model_dir, intermediate_size=128)
    ours = model_lib.load_model(tiny_model_dir)
    lora.prepare_model(ours, "qlora", lora_rank=4, lora_alpha=8)
    randomize_lora_B(ours)
    lora.save_adapter(ours, str(tmp_path / "adapter"))
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant,
                                                           dtype=torch.float32, device_map="cpu")
    theirs = PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    # bnb's training path (train mode, grad on): dequantize, then matmul. Its CPU inference
    # kernel (eval, no grad) is a different computation and differs by ~1e-2.
    theirs.train()
    torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=0, atol=1e-5)


def test_adapter_loads_into_a_prepared_qlora_model(tmp_path, tiny_model_dir):
    a = model_lib.load_model(tiny_model_dir)
    lora.prepare_model(a, "qlora", lora_rank=4, lora_alpha=8)
    randomize_lora_B(a)
    lora.save_adapter(a, str(tmp_path / "adapter"))
    b = model_lib.load_model(tiny_model_dir)
    lora.prepare_model(b, "qlora", lora_rank=4, lora_alpha=8)
    lora.load_adapter(b, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(b(IDS), a(IDS))


def test_qlora_merge_in_memory_is_refused(tiny):
    lora.prepare_model(tiny, "qlora", lora_rank=4, lora_alpha=8)
    with pytest.raises(ValueError, match="save_merged"):
        lora.merge_lora(tiny)


def test_qlora_merged_folder_holds_dequantized_weights_plus_update(tmp_path, tiny_model_dir):
    ours = model_lib.load_model(tiny_model_dir)
    lora.prepare_model(ours, "qlora", lora_rank=4, lora_alpha=8)
    randomize_lora_B(ours)
    lora.save_merged(ours, str(tmp_path / "merged"))
    merged = model_lib.load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), ours(IDS), rtol=0, atol=1e-4)
        hf_logits = hf_model(str(tmp_path / "merged"))(IDS).logits
        torch.testing.assert_close(hf_logits, ours(IDS), rtol=0, atol=1e-4)
    # and not the original full-precision weights plus the update
    original = model_lib.load_model(tiny_model_dir).layers[0].mlp.down_proj.weight
    q = ours.layers[0].mlp.down_proj
    assert torch.equal(merged.layers[0].mlp.down_proj.weight, q.base_weight() + q.delta_weight())
    assert not torch.allclose(merged.layers[0].mlp.down_proj.weight, original + q.delta_weight())


# --- freeze / head / full --------------------------------------------------------------------


def test_freeze_trains_only_the_top_blocks_final_norm_and_an_untied_head(tied_tiny_dir):
    m = model_lib.load_model(tied_tiny_dir)
    before = m(IDS)
    lora.prepare_model(m, "freeze", train_layers=1, train_head=True)
    assert m.lm_head.weight is not m.embed_tokens.weight and m.config.tie_word_embeddings is False
    assert torch.equal(m(IDS), before)  # untying copies: same model
    expected = {n for n, _ in m.named_parameters() if n.startswith(("layers.1.", "norm.", "lm_head."))}
    assert grads_by_name(m) == expected and "embed_tokens.weight" not in expected


def test_freeze_without_head_leaves_the_tie_alone(tied_tiny_dir):
    m = model_lib.load_model(tied_tiny_dir)
    lora.prepare_model(m, "freeze", train_layers=2, train_head=False)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert grads_by_name(m) == {n for n, _ in m.named_parameters() if n.startswith("layers.")}


def test_head_trains_only_lm_head_and_never_the_tied_embeddings(tied_tiny_dir):
    m = model_lib.load_model(tied_tiny_dir)
    embed = m.embed_tokens.weight.detach().clone()
    lora.prepare_model(m, "head")
    assert grads_by_name(m) == {"lm_head.weight"}
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(m.embed_tokens.weight, embed)
    assert not torch.equal(m.lm_head.weight, embed)


def test_full_trains_every_parameter(tiny):
    lora.prepare_model(tiny, "full")
    assert grads_by_name(tiny) == {n for n, _ in tiny.named_parameters()}


def test_freeze_with_nothing_to_train_is_an_error(tiny):
    with pytest.raises(ValueError, match="nothing to train"):
        lora.prepare_model(tiny, "freeze", train_layers=0, train_head=False)


def test_unknown_method_is_an_error(tiny):
    with pytest.raises(ValueError, match="unknown method 'qlor'"):
        lora.prepare_model(tiny, "qlor")


def test_describe_trainable_counts_parameters_and_bytes(tiny):
    total = sum(p.numel() for p in tiny.parameters())
    lora.prepare_model(tiny, "lora", lora_rank=4, lora_alpha=8)
    c = lora.count_trainable(tiny)
    r, C, H, kv = 4, 64, 96, 32  # tiny: hidden 64, MLP 96, 2 kv heads of 16
    per_block = r * ((C + C) * 2 + (C + kv) * 2 + (C + H) * 2 + (H + C))
    assert c["trainable"] == 2 * per_block and c["frozen"] == total
    assert c["grad_bytes"] == 4 * c["trainable"] and c["optimizer_bytes"] == 8 * c["trainable"]
    assert f"{2 * per_block:,} trainable" in lora.describe_trainable(tiny, "lora")


def test_qlora_weights_take_fewer_bytes_than_lora(tiny_model_dir):
    a, b = model_lib.load_model(tiny_model_dir), model_lib.load_model(tiny_model_dir)
    lora.prepare_model(a, "lora", lora_rank=4, lora_alpha=8)
    lora.prepare_model(b, "qlora", lora_rank=4, lora_alpha=8)
    ca, cb = lora.count_trainable(a), lora.count_trainable(b)
    assert ca["trainable"] == cb["trainable"] and ca["frozen"] == cb["frozen"]
    linear_numel = sum(m.nf4.shape.numel() for m in b.modules() if isinstance(m, nf4.NF4Linear))
    assert ca["weight_bytes"] - cb["weight_bytes"] == 4 * linear_numel - cb["nf4_bytes"]


# --- PEFT adapter folders and merged HF folders ----------------------------------------------


def check_ours_to_peft(folder, adapter, rank=4, atol=1e-5):
    ours = model_lib.load_model(folder)
    with torch.no_grad():
        base_logits = ours(IDS)
    lora.apply_lora(ours, rank=rank, alpha=2 * rank, rslora=True)
    randomize_lora_B(ours, std=0.05)
    lora.save_adapter(ours, adapter, base_model_path=folder)
    with torch.no_grad():
        logits = ours(IDS)
        assert (logits - base_logits).abs().max() > 100 * atol  # the adapter matters
        theirs = peft_model(folder, adapter)(IDS).logits
        torch.testing.assert_close(theirs, logits, rtol=0, atol=atol)


def check_peft_to_ours(folder, adapter, rank=4, atol=1e-5):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=3 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    theirs = get_peft_model(hf_model(folder), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    theirs.save_pretrained(adapter)
    ours = lora.load_adapter(model_lib.load_model(folder), adapter)
    assert len(lora.lora_layers(ours)) == 7 * len(ours.layers)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs.eval()(IDS).logits, rtol=0, atol=atol)


def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, tiny_model_dir):
    adapter = str(tmp_path / "adapter")
    check_ours_to_peft(tiny_model_dir, adapter)
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(config["target_modules"]) == sorted(linears)
    from safetensors import safe_open
    prefix = "base_model.model.model.layers.0."
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice(prefix + "self_attn.q_proj.lora_A.weight").get_shape() == [4, 64]  # [r, in]
        assert f.get_slice(prefix + "mlp.down_proj.lora_B.weight").get_shape() == [64, 4]     # [out, r]


def test_peft_adapter_loads_into_ours_with_the_same_logits(tmp_path, tiny_model_dir):
    check_peft_to_ours(tiny_model_dir, str(tmp_path / "adapter"))


def test_real_model_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, real_model_dir):
    check_ours_to_peft(real_model_dir, str(tmp_path / "adapter"), rank=8, atol=1e-3)


def test_real_model_peft_adapter_loads_into_ours_with_the_same_logits(tmp_path, real_model_dir):
    check_peft_to_ours(real_model_dir, str(tmp_path / "adapter"), rank=8, atol=1e-3)


def test_partial_targets_round_trip_through_peft(tmp_path, tiny_model_dir):
    ours = model_lib.load_model(tiny_model_dir)
    lora.apply_lora(ours, rank=2, alpha=4, targets=["layers.1.self_attn.v_proj", "up_proj"])
    randomize_lora_B(ours)
    lora.save_adapter(ours, str(tmp_path / "adapter"))
    again = lora.load_adapter(model_lib.load_model(tiny_model_dir), str(tmp_path / "adapter"))
    expected = ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj", "layers.1.self_attn.v_proj"]
    assert sorted(lora.lora_layers(again)) == expected
    with torch.no_grad():
        theirs = peft_model(tiny_model_dir, str(tmp_path / "adapter"))(IDS).logits
        torch.testing.assert_close(theirs, ours(IDS), rtol=0, atol=1e-5)
        assert torch.equal(again(IDS), ours(IDS))


def test_adapter_with_a_wrong_key_prefix_is_rejected(tmp_path, tiny):
    from safetensors.torch import load_file, save_file
    lora.apply_lora(tiny, rank=4, alpha=8)
    adapter = str(tmp_path / "adapter")
    lora.save_adapter(tiny, adapter)
    file = os.path.join(adapter, "adapter_model.safetensors")
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(file).items()}
    save_file(tensors, file)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers"):
        lora.load_adapter(tiny, adapter)


def test_adapter_with_a_different_rank_is_rejected(tmp_path, tiny_model_dir):
    a = model_lib.load_model(tiny_model_dir)
    lora.apply_lora(a, rank=4, alpha=8)
    lora.save_adapter(a, str(tmp_path / "adapter"))
    b = model_lib.load_model(tiny_model_dir)
    lora.apply_lora(b, rank=8, alpha=8)
    with pytest.raises(ValueError, match=r"has shape \(4, 64\), expected \(8, 64\)"):
        lora.load_adapter(b, str(tmp_path / "adapter"))


def test_merged_folder_loads_in_transformers_and_ours_with_the_same_logits(tmp_path, tiny_model_dir):
    ours = model_lib.load_model(tiny_model_dir)
    lora.apply_lora(ours, rank=4, alpha=8)
    randomize_lora_B(ours)
    lora.save_merged(ours, str(tmp_path / "merged"))
    assert not any(m.merged for m in lora.lora_layers(ours).values())  # saving does not merge in place
    names = set(os.listdir(tmp_path / "merged"))
    assert {"config.json", "model.safetensors"} <= names
    with torch.no_grad():
        logits = ours(IDS)
        torch.testing.assert_close(hf_model(str(tmp_path / "merged"))(IDS).logits, logits, rtol=0, atol=1e-4)
        ours_again = model_lib.load_model(str(tmp_path / "merged"))(IDS)
        torch.testing.assert_close(ours_again, logits, rtol=0, atol=1e-4)


def test_head_mode_model_saves_untied(tmp_path, tied_tiny_dir):
    m = model_lib.load_model(tied_tiny_dir)
    lora.prepare_model(m, "head")
    with torch.no_grad():
        m.lm_head.weight.add_(0.01)
    lora.save_merged(m, str(tmp_path / "out"))
    again = model_lib.load_model(str(tmp_path / "out"))
    assert again.lm_head.weight is not again.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), m(IDS), rtol=0, atol=1e-5)
        torch.testing.assert_close(hf_model(str(tmp_path / "out"))(IDS).logits, m(IDS), rtol=0, atol=1e-4)


# --- Gemma 3: LoRA, QLoRA and PEFT's formats on the text model, alone or inside a gemma3 folder -----


@pytest.fixture(params=["gemma3_text", "gemma3"])
def gemma3_dir(request, tmp_path):
    folder = str(tmp_path / request.param)
    save_tiny_model(folder, request.param)
    return folder


def test_gemma3_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, gemma3_dir):
    adapter = str(tmp_path / "adapter")
    check_ours_to_peft(gemma3_dir, adapter, atol=1e-4)
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    if "gemma3_text" not in gemma3_dir:  # full names: PEFT would match q_proj in the vision tower too
        assert all(t.startswith("model.language_model.layers.") for t in config["target_modules"])


def test_gemma3_peft_adapter_loads_into_ours_with_the_same_logits(tmp_path, gemma3_dir):
    """PEFT's all-linear on a gemma3 folder adapts the vision tower too: left out by ours, which
    computes the text model (whose logits do not depend on the vision tower)."""
    check_peft_to_ours(gemma3_dir, str(tmp_path / "adapter"), atol=1e-4)


def test_gemma3_merged_folder_loads_in_transformers_and_ours_with_the_same_logits(tmp_path, gemma3_dir):
    ours = model_lib.load_model(gemma3_dir)
    lora.apply_lora(ours, rank=4, alpha=8)
    randomize_lora_B(ours)
    lora.save_merged(ours, str(tmp_path / "merged"))
    with torch.no_grad():
        logits = ours(IDS)
        torch.testing.assert_close(hf_model(str(tmp_path / "merged"))(IDS).logits, logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(model_lib.load_model(str(tmp_path / "merged"))(IDS), logits, rtol=0, atol=1e-4)


def test_gemma3_qlora_logits_equal_transformers_bitsandbytes_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    folder = str(tmp_path / "tiny")  # rows of 64 and 128 values: see test_qlora_logits_equal_transformers_...
    save_tiny_model(folder, "gemma3_text", intermediate_size=128, head_dim=16)
    ours = model_lib.load_model(folder)
    lora.prepare_model(ours, "qlora", lora_rank=4, lora_alpha=8)
    assert len(lora.lora_layers(ours)) == 7 * len(ours.layers)
    randomize_lora_B(ours)
    lora.save_adapter(ours, str(tmp_path / "adapter"))
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                           dtype=torch.float32, device_map="cpu")
    theirs = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).train()  # bnb's dequantize-then-matmul path
    torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=0, atol=1e-4)
    lora.save_merged(ours, str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(str(tmp_path / "merged"))(IDS).logits, ours(IDS), rtol=0, atol=1e-4)
