"""Write a tiny random Llama model folder for smoke tests and mechanical experiments.

    python tools/make_tiny_model.py --out models/tiny --tokenizer models/SmolLM2-135M-Instruct
    python tools/make_tiny_model.py --out models/llama-1b-random --shape llama-3.2-1b   # for bench.py

The second writes a random model with the real shapes of Llama-3.2-1B (1.24 B parameters, bf16,
2.5 GB): the ~1B model of the GPU comparison in bench.py, with no download. It borrows the tokenizer files of a real model folder (so it reads the same data and chat
template as the real model) and gets random weights: N(0, 0.02) matrices, unit norm gains, as
in GPT-2 / Llama initialisation. Written by our own model.save_model, nothing else needed.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402

config.quiet_ctrl_c(__name__)  # before torch: Ctrl-C while it loads (seconds) exits 130, no traceback

import torch  # noqa: E402

from model import Transformer, read_config, save_model  # noqa: E402


# Real models' shapes (their config.json files), for speed and memory measurements.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, layers=16, heads=32, kv_heads=8, intermediate_size=8192,
                         vocab_size=128256, rope_theta=500000.0),
}


def make_tiny_model(out, tokenizer_dir, hidden_size=64, layers=2, heads=4, kv_heads=2,
                    intermediate_size=128, seed=0, vocab_size=None, rope_theta=10000.0, dtype=None):
    """A random Llama folder; vocab_size defaults to the tokenizer's (a larger one is fine for
    random token ids, as bench.py uses). dtype: the weights' dtype in the file (None: fp32)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(tokenizer_dir, "config.json")) as f:
        base = json.load(f)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size or base["vocab_size"], "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
        "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": base.get("bos_token_id"), "eos_token_id": base.get("eos_token_id"),
        "pad_token_id": base.get("pad_token_id"), "torch_dtype": "float32",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    torch.manual_seed(seed)
    # the draws nn.Embedding's own init would make (Transformer skips it), so a seed keeps its weights
    torch.empty(config["vocab_size"], hidden_size).normal_()
    model = Transformer(read_config(out))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02)
    model.source_dir = tokenizer_dir  # save_model copies the tokenizer files from here
    save_model(model, out, dtype=dtype)
    return out


@config.script
def main(argv=None):
    p = config.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/tiny")
    p.add_argument("--tokenizer", default="models/SmolLM2-135M-Instruct",
                   help="a model folder whose tokenizer files are copied")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a real model's shapes, weights in bf16")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.tokenizer, "config.json")):
        p.error(f"--tokenizer {args.tokenizer}: not a model folder (no config.json in it)")
    config.check_out_folder(args.out, "--out")
    shape = dict(SHAPES[args.shape], dtype=torch.bfloat16) if args.shape else {}
    print(make_tiny_model(args.out, args.tokenizer, seed=args.seed, **shape))


if __name__ == "__main__":
    main()
