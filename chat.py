"""Talk to a model: a base model folder, optionally with a LoRA adapter from a run.

    python chat.py --model models/SmolLM2-135M-Instruct
    python chat.py --model models/SmolLM2-135M-Instruct --adapter runs/demo/adapter --temperature 0
    python chat.py --config configs/demo.py --adapter runs/demo/adapter     # model and template of a run
    printf 'Hi!\\nAnd in French?\\n' | python chat.py --model DIR --temperature 0   # no terminal needed

One line of input is one user turn. The conversation so far is rendered with the same template code
as training (data.format_chat, template auto or the config's), so the model sees exactly the format
it was fine-tuned on; the answer is streamed token by token and joins the history. Commands:
    /reset            forget the conversation (the system prompt stays)
    /system TEXT      set the system prompt (an empty TEXT removes it) and start over
    /quit             leave (end of input does too)
When the conversation no longer fits the model's context, the oldest turns are dropped.
"""
from config import quiet_ctrl_c

quiet_ctrl_c(__name__)  # first: Ctrl-C while torch loads (seconds) exits 130, no traceback

import sys

import torch

import data
import lora
from config import UserError, fetch_model, parse_cli, resolve_hardware, script
from model import generate, load_model
from tokenizer import load_tokenizer, utf8_complete_length

HELP = "commands: /reset, /system TEXT, /quit"


def answer(model, tokenizer, messages, template, max_new_tokens, temperature, top_k, top_p, out, generator=None):
    """Stream the model's answer to `messages` to `out`; return the answer text.
    Tokens come one at a time from generate()'s on_token callback. A token may end inside a UTF-8
    character (an emoji is 4 bytes, often 2 tokens): bytes are held back until the character is whole."""
    prompt = tokenizer.encode(data.format_chat(messages, template, add_generation_prompt=True, tokenizer=tokenizer))
    stops = set(data.stop_ids(tokenizer, template))
    state = {"pending": b"", "text": b""}

    def on_token(_, token_id):
        if token_id in stops:
            return
        state["pending"] += tokenizer.decode_bytes([token_id])
        n = utf8_complete_length(state["pending"])
        if n:
            out.write(state["pending"][:n].decode("utf-8", errors="replace"))
            out.flush()
            state["text"] += state["pending"][:n]
            state["pending"] = state["pending"][n:]

    generate(model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             stop_ids=stops, generator=generator, on_token=on_token)
    text = (state["text"] + state["pending"]).decode("utf-8", errors="replace")
    out.write(state["pending"].decode("utf-8", errors="replace") + "\n")
    out.flush()
    return text


def fit_context(messages, tokenizer, template, budget):
    """Drop the oldest user/assistant turns (never the system prompt or the newest message) until
    the rendered prompt has at most `budget` tokens."""
    def length(msgs):
        return len(tokenizer.encode(data.format_chat(msgs, template, add_generation_prompt=True, tokenizer=tokenizer)))
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and length(system + turns) > budget:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return system + turns


@script
def main(argv=None):
    cfg, flags = parse_cli(sys.argv[1:] if argv is None else argv, {
        "adapter": "", "temperature": 0.7, "top_k": 0, "top_p": 0.9, "max_new_tokens": 256, "system": ""},
        ranges={"temperature": "[0, inf)", "top_k": "[0, inf)", "top_p": "(0, 1]", "max_new_tokens": "[1, inf)"})
    interactive = sys.stdin.isatty()
    cfg.model = fetch_model(cfg.model)
    device, cfg.dtype = resolve_hardware(cfg, log=lambda line: print(line, file=sys.stderr))
    try:
        tokenizer = load_tokenizer(cfg.model)
        data.resolve_template(cfg.template, tokenizer)  # an unknown template fails here, not mid-chat
        model = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=device)
        if flags["adapter"]:
            lora.load_adapter(model, flags["adapter"])
    except (OSError, ValueError) as e:  # a file that cannot be read, an adapter that does not fit
        raise UserError(str(e)) from None
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    budget = model.config.max_position_embeddings - flags["max_new_tokens"]
    system = [{"role": "system", "content": flags["system"]}] if flags["system"] else []
    messages = list(system)
    if interactive:
        print(f"chatting with {cfg.model}" + (f" + {flags['adapter']}" if flags["adapter"] else "") + f"; {HELP}")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            messages = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            system = [{"role": "system", "content": text}] if text else []
            messages = list(system)
            print(f"(system prompt {'set' if text else 'removed'}; conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"(unknown command; {HELP})", file=sys.stderr)
            continue
        messages = fit_context(messages + [{"role": "user", "content": line}], tokenizer, cfg.template, budget)
        reply = answer(model, tokenizer, messages, cfg.template, flags["max_new_tokens"], flags["temperature"],
                       flags["top_k"], flags["top_p"], sys.stdout, generator)
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
