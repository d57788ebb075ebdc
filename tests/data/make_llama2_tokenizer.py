"""Rebuild tests/data/llama2-tokenizer.model: Llama 2's SentencePiece vocabulary as a tokenizer.model.

Source: vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf in the PyPI sdist of llama-cpp-python 0.3.36
(llama.cpp's copy of meta-llama/Llama-2-7b-hf's vocabulary: 32000 pieces with their scores and types).
The pieces go into a ModelProto with Llama 2's encoding settings (BPE, byte fallback, identity
normalization, a word-start "▁" before each text, spaces kept). Test-only: needs gguf and protobuf.

  pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/lcp
  tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp --wildcards '*/ggml-vocab-llama-spm.gguf*'
  python tests/data/make_llama2_tokenizer.py /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/models
"""
import os
import shutil
import sys

import gguf
from sentencepiece import sentencepiece_model_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))


def strings(field):
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def numbers(field):
    return [field.parts[i][0].item() for i in field.data]


def main(models):
    fields = gguf.GGUFReader(os.path.join(models, "ggml-vocab-llama-spm.gguf")).fields
    model = pb.ModelProto()
    # GGUF token types are sentencepiece's (1 normal, 2 unknown, 3 control, 6 byte, ...)
    pieces = strings(fields["tokenizer.ggml.tokens"])
    scores, kinds = numbers(fields["tokenizer.ggml.scores"]), numbers(fields["tokenizer.ggml.token_type"])
    for piece, score, kind in zip(pieces, scores, kinds):
        model.pieces.add(piece=piece, score=score, type=kind)
    model.trainer_spec.MergeFrom(pb.TrainerSpec(
        model_type=pb.TrainerSpec.BPE, vocab_size=len(model.pieces), byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    model.normalizer_spec.MergeFrom(pb.NormalizerSpec(
        name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False, escape_whitespaces=True))
    with open(os.path.join(HERE, "llama2-tokenizer.model"), "wb") as f:
        f.write(model.SerializeToString())
    # llama.cpp's test texts and the ids Hugging Face's Llama 2 tokenizer gave for them
    for ext in ("inp", "out"):
        shutil.copy(os.path.join(models, f"ggml-vocab-llama-spm.gguf.{ext}"),
                    os.path.join(HERE, f"llama2-vectors.{ext}"))


if __name__ == "__main__":
    main(sys.argv[1])
