"""Shared fixtures: tiny random checkpoints saved by transformers, and the real SmolLM2 folder."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# How far a resumed run may end from the uninterrupted one (max abs difference of the trained weights
# and of each step's loss). Two uninterrupted runs agree bit for bit on all but rare process starts,
# where a CPU kernel rounds a sum differently; a state that resume failed to restore (the random
# state, AdamW's moments, the schedule's step) moves the weights far more. docs/pitfalls.md (10)
# has both measured.
RESUMED = 5e-5

REAL_MODEL_DIR = os.environ.get("SFT_REAL_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as an HF folder (made by `python tools/get_model.py`).

    Missing model: a skip on a developer's machine, a failure in CI (CI=true), so real-model
    tests are never skipped silently there.
    """
    if not os.path.isfile(os.path.join(REAL_MODEL_DIR, "model.safetensors")):
        missing_real_data(f"real model not found at {REAL_MODEL_DIR}; "
                          f"run `python tools/get_model.py` (or set SFT_REAL_MODEL)")
    return REAL_MODEL_DIR


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory):
    """The data caches that tests build (data_cache.py) go to a temporary folder, not the repository's
    .cache/data; the scripts that tests run inherit it."""
    folder = str(tmp_path_factory.mktemp("data-cache"))
    os.environ["SFT_DATA_CACHE_DIR"] = folder
    return folder


def missing_real_data(message):
    """A skip on a developer's machine, a failure in CI (CI=true): never a silent skip there."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


GEMMA_DIR = os.environ.get("SFT_GEMMA_MODEL", os.path.join(ROOT, "models", "gemma-3-270m"))


@pytest.fixture(scope="session")
def gemma_dir():
    """Gemma 3 270M (base) as an HF folder, made offline by `python tools/get_model.py google/gemma-3-270m
    --source gguf` (.ci/run does). Missing: a skip here, a failure in CI."""
    if not os.path.isfile(os.path.join(GEMMA_DIR, "model.safetensors")):
        missing_real_data(f"{GEMMA_DIR} not found; run `python tools/get_model.py google/gemma-3-270m --source gguf`")
    return GEMMA_DIR


MISTRAL_COMMON = "mistral-common==1.13.1"
MISTRAL_VOCABS = {"v1": "mistral_common/data/tokenizer.model.v1",  # Mistral 7B (Instruct) v0.1/v0.2, Mixtral 8x7B
                  "v3": "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"}  # Mistral 7B v0.3


@pytest.fixture(scope="session")
def mistral_vocabs():
    """{"v1": path, "v3": path}: Mistral's real SentencePiece tokenizer.model files, as the PyPI wheel of
    mistral-common ships them (fetched once with `pip download` into .cache/, ~7 MB). v3 has [INST],
    [/INST], [TOOL_CALLS], ... as control pieces. No network: a skip here, a failure in CI."""
    import tempfile
    import zipfile
    folder = os.path.join(ROOT, ".cache", MISTRAL_COMMON.replace("==", "-"))
    paths = {v: os.path.join(folder, os.path.basename(member)) for v, member in MISTRAL_VOCABS.items()}
    if not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as download:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary",
                                  ":all:", MISTRAL_COMMON, "-d", download], capture_output=True, text=True)
            wheels = [os.path.join(download, f) for f in os.listdir(download) if f.endswith(".whl")]
            if got.returncode != 0 or not wheels:
                missing_real_data(f"could not `pip download {MISTRAL_COMMON}` for its tokenizer.model files: "
                                  f"{got.stderr.strip()[-300:]}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                for v, member in MISTRAL_VOCABS.items():
                    with open(paths[v] + ".part", "wb") as f:
                        f.write(wheel.read(member))
                    os.replace(paths[v] + ".part", paths[v])  # whole files only, if two runs race
    return paths


@pytest.fixture(scope="session")
def tiny_model(real_model_dir):
    """models/tiny: a tiny random Llama with SmolLM2's tokenizer (what configs/tiny.py and the
    course's --quick runs name), made once by tools/make_tiny_model.py."""
    folder = os.path.join(ROOT, "models", "tiny")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        subprocess.run([sys.executable, "tools/make_tiny_model.py", "--out", folder,
                        "--tokenizer", real_model_dir], cwd=ROOT, check=True, capture_output=True)
    return folder


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


# Gemma 3: 5 layers with every 2nd one global (layers 1 and 3), a window of 8 tokens, head_dim apart
# from hidden / heads, and a vision tower of one layer for the multimodal `gemma3` folder.
TINY_GEMMA3 = dict(head_dim=24, sliding_window=8, sliding_window_pattern=2, num_hidden_layers=5,
                   query_pre_attn_scalar=20, rope_theta=5000.0, rope_local_base_freq=100.0)
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                   image_size=16, patch_size=4)


def save_tiny_model(folder, family="llama", seed=0, max_shard_size=None, **overrides):
    """Save a tiny random transformers model of `family` into `folder`; return the HF model.
    Gemma 3 (gemma3_text, or gemma3: text and vision) gets every weight drawn at random, so each norm
    weight is a nonzero offset from 1 and the logits are of order 1."""
    import torch
    import transformers
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
               "gemma3": (transformers.Gemma3Config, transformers.Gemma3ForConditionalGeneration)}
    config_cls, model_cls = classes[family]
    kwargs = dict(TINY, **overrides)
    if family == "qwen3":
        kwargs.setdefault("head_dim", 16)
    if family.startswith("gemma3"):
        kwargs = {**TINY, **TINY_GEMMA3, **overrides}
    if family == "gemma3":
        tie = kwargs.pop("tie_word_embeddings", True)
        kwargs = dict(text_config=kwargs, vision_config=TINY_VISION, mm_tokens_per_image=4, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # random norm weights and biases, so that a mix-up would show
        for name, p in hf.named_parameters():
            if family.startswith("gemma3"):
                p.normal_(0.0, 0.1 if "norm" in name or name.endswith(".bias") else 2.0 / p.shape[-1] ** 0.5)
            elif "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(folder, **save)
    return hf


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama checkpoint folder (2 layers, GQA, untied embeddings)."""
    folder = str(tmp_path / "tiny-llama")
    save_tiny_model(folder)
    return folder


class NewTensors(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an operation allocates: outputs of operations that
    neither write into a given tensor (copy_, mm.out, ...) nor return a view of an input."""

    def __init__(self):
        super().__init__()
        self.allocated = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocated.append((tuple(t.shape), t.dtype))
        return out
