"""Time our byte-level BPE (tokenizer.py) against Hugging Face `tokenizers` on 1 MB of English.

    python bench/bench_tokenizer.py [models/SmolLM2-135M-Instruct] [--mb 1]

The text is reproducible offline and license-clean: the docstrings of the Python standard library
(PSF license), read from its .py files with `ast` (nothing is imported), in sorted file order, cut into
documents of one docstring each until the size is reached. Both tokenizers encode the same documents
one at a time, starting with an empty cache; `tokenizers` runs single-threaded (RAYON_NUM_THREADS=1),
as our Python does (a single encode() does not use threads anyway; RAYON_NUM_THREADS=1 makes sure).
A second pass shows the warm-cache speed. The ids of both must be identical.
"""
import argparse
import ast
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # must be set before `tokenizers` starts its thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizer import ByteLevelBPE, load_tokenizer  # noqa: E402


def stdlib_docstrings(size_bytes):
    """Docstrings of the standard library's modules, classes and functions, up to size_bytes of UTF-8."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents, total, files = [], 0, 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately broken (lib2to3 test data and such)
        files += 1
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    doc = doc.encode("utf-8")[:size_bytes - total].decode("utf-8", errors="ignore")
                    documents.append(doc)
                    total += len(doc.encode("utf-8"))
                    if total >= size_bytes:
                        return documents, stdlib, files
    return documents, stdlib, files


def time_encode(encode, documents):
    start = time.perf_counter()
    ids = [encode(doc) for doc in documents]
    return time.perf_counter() - start, ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--mb", type=float, default=1.0, help="megabytes of text (10^6 bytes)")
    args = parser.parse_args()
    from tokenizers import Tokenizer  # the reference; only this tool and the tests use it

    documents, stdlib, files = stdlib_docstrings(int(args.mb * 1e6))
    size = sum(len(d.encode("utf-8")) for d in documents)
    print(f"text: {len(documents)} docstrings from {files} files of the Python {sys.version.split()[0]} "
          f"standard library ({stdlib}), {size:,} bytes UTF-8, {sum(map(len, documents)):,} characters")

    ours = load_tokenizer(args.model)
    assert isinstance(ours, ByteLevelBPE), f"{args.model}: not a byte-level BPE tokenizer"
    reference = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))

    ours_cold, our_ids = time_encode(ours.encode, documents)
    ours_warm, _ = time_encode(ours.encode, documents)
    encode_reference = lambda doc: reference.encode(doc, add_special_tokens=False).ids  # noqa: E731
    reference_cold, reference_ids = time_encode(encode_reference, documents)
    reference_warm, _ = time_encode(encode_reference, documents)
    n_tokens = sum(map(len, our_ids))
    print(f"tokens: {n_tokens:,}; ids identical: {our_ids == reference_ids}")
    print(f"tokenizer.py (Python, 1 thread):     {ours_cold:6.2f} s cold cache, {ours_warm:6.2f} s warm "
          f"({size / 1e6 / ours_cold:.2f} MB/s cold)")
    print(f"tokenizers {__import__('tokenizers').__version__} (Rust, 1 thread):   "
          f"{reference_cold:6.2f} s cold cache, {reference_warm:6.2f} s warm "
          f"({size / 1e6 / reference_cold:.2f} MB/s cold)")
    print(f"ratio ours / tokenizers: {ours_cold / reference_cold:.1f}x cold, "
          f"{ours_warm / reference_warm:.1f}x warm")


if __name__ == "__main__":
    main()
