"""Chat templates in Python, and exact loss masks: a conversation -> text -> (input_ids, labels).

    format_chat(messages, "chatml")                    # the text, as the model's Jinja template writes it
    render(messages, tokenizer, train_on="assistant")  # ids of that whole text + labels, -100 = no loss

One small function per template family (chatml, llama3, llama2, mistral, alpaca, plain), no Jinja. Each
returns the text as pieces [(text, k)], k the index of the assistant message the piece answers (trained)
or None (prompt). The rendered text must be exactly what the model's own chat template writes, because
that is what inference engines feed the model; tests/test_templates.py checks each family against its
published Jinja template with transformers' apply_chat_template.

Masks. The ids are the tokenization of the WHOLE text, as an engine sees it. Computing the mask from
len(tokenize(prompt)) breaks when BPE merges across the prompt/answer boundary (a prompt ending in a
space, an answer starting with a word: " Paris" is one token that neither side's tokenization has).
Instead we follow the ids' bytes along the text (decode_bytes is concatenative) and train a token when
any of its bytes belong to a trained piece. Special tokens are cut out of the text before BPE runs, so
no token ever spans <|im_end|> and its neighbours.
"""
import re

import numpy as np

from config import UserError

IGNORE = -100  # label of a position where no loss is taken (PyTorch's cross-entropy ignore_index)
ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """Bad input data. str(e) is one line naming the place ('file:line: reason') once data.py adds
    it; kind is the short reason under which a skipped example is counted ('unknown role', ...)."""

    def __init__(self, message, kind=None):
        super().__init__(message)
        self.kind = kind or message


class TemplateError(DataError):
    """A conversation the template cannot render, or a chat template we cannot reproduce."""


def check_messages(messages):
    """Raise DataError unless messages is a non-empty list of {"role": system|user|assistant,
    "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation should be a non-empty list of messages", "bad messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"message {k} should be an object with 'role' and 'content'", "missing field")
        if m["role"] not in ROLES:
            raise DataError(f"message {k}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})",
                            "unknown role")
        if not isinstance(m["content"], str):
            raise DataError(f"message {k}: content is {type(m['content']).__name__}, expected a string",
                            "non-string content")


# ---------------------------------------------------------------------------------------------------
# 1. The families. Arguments: the messages, add_generation_prompt, and the strings of the special
# tokens {"bos", "eos", "system" (chatml's default system prompt or None)}.


def chatml(messages, add_generation_prompt, special):
    """SmolLM2, Qwen2, Qwen2.5 (their default system prompt when the first message is not a system one):
    <|im_start|>{role}\\n{content}<|im_end|>\\n. The answer and its <|im_end|> are trained, not the \\n
    after it (an engine stops at <|im_end|> and writes the \\n itself)."""
    pieces = []
    if special.get("system") is not None and messages and messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{special['system']}<|im_end|>\n", None))
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            pieces += [("<|im_start|>assistant\n", None), (m["content"] + "<|im_end|>", k), ("\n", None)]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", None))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", None))
    return pieces


def llama3(messages, add_generation_prompt, special):
    """Llama 3 / 3.0 Instruct: BOS, then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}
    <|eot_id|> per message (note the trim). No default system prompt."""
    pieces = [(special["bos"], None)] if messages else []
    for k, m in enumerate(messages):
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"
        pieces += [(header, None), (body, k)] if m["role"] == "assistant" else [(header + body, None)]
    if add_generation_prompt:
        pieces.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", None))
    return pieces


def alternating(messages):
    """llama2 / mistral / alpaca templates raise unless the roles go user, assistant, user, ..."""
    for k, m in enumerate(messages):
        if m["role"] != ("user" if k % 2 == 0 else "assistant"):
            raise TemplateError("roles must alternate user/assistant/user/assistant/... "
                                "(after an optional first system message)", "roles do not alternate")


def llama2(messages, add_generation_prompt, special):
    """Llama 2 Chat: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] ...
    Contents are strip()ped. The answer's leading space is trained (the model writes "▁Answer"). No
    generation prompt: the text already ends with [/INST]."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    alternating(turns)
    pieces = []
    for k, m in enumerate(turns, start=len(messages) - len(turns)):
        content = m["content"]
        if k == len(messages) - len(turns) and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            pieces.append((f"{special['bos']}[INST] {content.strip()} [/INST]", None))
        else:
            pieces.append((f" {content.strip()} {special['eos']}", k))
    return pieces


def mistral(messages, add_generation_prompt, special):
    """Mistral-7B-Instruct v0.1/v0.2, Mixtral-8x7B-Instruct v0.1: <s>[INST] {user} [/INST]{answer}</s>
    [INST] ... No system role (the template raises), no strip, no generation prompt."""
    if any(m["role"] == "system" for m in messages):
        raise TemplateError("the mistral template has no system role", "system role not supported")
    alternating(messages)
    pieces = [(special["bos"], None)]
    for k, m in enumerate(messages):
        if m["role"] == "user":
            pieces.append((f"[INST] {m['content']} [/INST]", None))
        else:
            pieces.append((m["content"] + special["eos"], k))
    return pieces


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


def alpaca(messages, add_generation_prompt, special):
    """Stanford Alpaca's prompt (tatsu-lab/stanford_alpaca), multi-turn as in Unsloth's alpaca template:
    {system or preamble}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{answer}</s>\\n\\n..."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    alternating(turns)
    pieces = [((ALPACA_PREAMBLE if system is None else system) + "\n\n", None)]
    for k, m in enumerate(turns, start=len(messages) - len(turns)):
        if m["role"] == "user":
            pieces.append((f"### Instruction:\n{m['content']}\n\n", None))
        else:
            pieces += [("### Response:\n", None), (m["content"] + special["eos"], k), ("\n\n", None)]
    if add_generation_prompt:
        pieces.append(("### Response:\n", None))
    return pieces


def plain(messages, add_generation_prompt, special):
    """Base models and continued pre-training: the contents back to back, EOS after each answer.
    prompt/completion data reads prompt + completion + EOS; a text record is text + EOS."""
    pieces = []
    for k, m in enumerate(messages):
        pieces += [(m["content"] + special["eos"], k)] if m["role"] == "assistant" else [(m["content"], None)]
    return pieces


TEMPLATES = {"chatml": chatml, "llama3": llama3, "llama2": llama2, "mistral": mistral,
             "alpaca": alpaca, "plain": plain}
# BOS/EOS strings when no tokenizer is given (with one, the tokenizer's own are used, as in Jinja).
DEFAULT_SPECIAL = {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "llama2": ("<s>", "</s>"),
                   "mistral": ("<s>", "</s>")}


# ---------------------------------------------------------------------------------------------------
# 2. Which family: auto-detection from the tokenizer's Jinja chat_template


def squeeze(template):
    """One spelling of a Jinja template for comparing expressions: whitespace removed inside {{ }} and
    {% %} (string literals kept, "\\n" escapes made newlines, "..." made '...'), whitespace-control
    dashes dropped, message.role / message.content written message['role'] / message['content']."""
    literal = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\""""

    def tag(match):
        parts = re.split(f"({literal})", match.group(0))
        out = "".join(p.replace("\\n", "\n") if k % 2 else re.sub(r"\s+", "", p) for k, p in enumerate(parts))
        out = re.sub(r'"([^"\']*)"', r"'\1'", out)
        return re.sub(r"^(\{[{%])-|-([}%]\})$", r"\1\2", out)

    out = re.sub(r"\{\{.*?\}\}|\{%.*?%\}", tag, template, flags=re.S)
    return re.sub(r"message\.(role|content)\b", r"message['\1']", out)


# What each family's template must contain (in squeezed form) for our function to render it exactly;
# anything else is an unknown variant, and auto stops rather than guess.
FINGERPRINTS = {
    "chatml": ["'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>'+'\n'"],
    "llama3": ["'<|start_header_id|>'+message['role']+'<|end_header_id|>\n\n'+message['content']|trim+'<|eot_id|>'",
               "{%ifloop.index0==0%}{%setcontent=bos_token+content%}"],
    "llama2": ["{{bos_token+'[INST] '+content.strip()+' [/INST]'}}", "{{' '+content.strip()+' '+eos_token}}"],
    "mistral": ["{{bos_token}}", "{{'[INST] '+message['content']+' [/INST]'}}", "{{message['content']+eos_token}}"],
    "alpaca": ["'### Instruction:\n'+message['content']+'\n\n'", "'### Response:\n'+message['content']+eos_token+'\n\n'"],
}


def detect_template(chat_template):
    """(family, default system prompt or None) of a tokenizer's Jinja chat_template; TemplateError for
    a template we cannot reproduce exactly (set template= explicitly to take responsibility)."""
    if not chat_template:
        raise TemplateError("the tokenizer has no chat_template: set template (plain for a base model)")
    t = squeeze(chat_template)
    if "<think>" in t:
        raise TemplateError("chat templates with <think> reasoning blocks (Qwen3, SmolLM3, ...) are not supported")
    if "Cutting Knowledge Date" in t:
        raise TemplateError("Llama 3.1+ chat templates (with the 'Cutting Knowledge Date' system header and "
                            "today's date) are not supported; template=llama3 is Llama 3.0's")
    markers = [("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<<SYS>>", "llama2"),
               ("[INST]", "mistral"), ("### Instruction:", "alpaca")]
    family = next((name for marker, name in markers if marker in t), None)
    if family is None:
        raise TemplateError("unknown chat template (not chatml, llama3, llama2, mistral or alpaca); "
                            "set template explicitly")
    problems = [f"no {f!r}" for f in FINGERPRINTS[family] if f not in t]
    system = default_system_prompt(t) if family == "chatml" else None
    if family == "llama2" and "true==true" in t:
        problems.append("Llama 2's long default system prompt")
    if "messages[0]['role']" in t and system is None and family in ("chatml", "llama3", "mistral"):
        problems.append("a default system prompt we cannot read")  # a first-message test: a default?
    if problems:
        raise TemplateError(f"the chat template looks like {family} but is a variant we do not reproduce "
                            f"exactly ({problems[0]}); set template explicitly if it renders alike")
    return family, system


def default_system_prompt(squeezed):
    """ChatML templates write their default system prompt as one literal:
    '<|im_start|>system\\n...<|im_end|>\\n' (SmolLM2, Qwen2, Qwen2.5). None when there is none."""
    found = re.search(r"'<\|im_start\|>system\n((?:[^'\\]|\\.)*?)<\|im_end\|>\n'", squeezed)
    return re.sub(r"\\(.)", r"\1", found.group(1)) if found else None


def resolve_template(template, tokenizer=None):
    """(family, special strings {"bos", "eos", "system"}, a line saying what was picked) for a
    template name or "auto". BOS/EOS come from the tokenizer, as bos_token/eos_token do in Jinja."""
    chat_template = getattr(tokenizer, "chat_template", None)
    if template == "auto":
        if tokenizer is None:
            raise TemplateError("template='auto' needs a tokenizer (tokenizer=...)")
        family, system = detect_template(chat_template)
    elif template in TEMPLATES:
        family = template
        system = default_system_prompt(squeeze(chat_template)) if family == "chatml" and chat_template else None
    else:
        raise TemplateError(f"unknown template {template!r} (expected auto or one of {', '.join(TEMPLATES)})")
    line = f"template: {'auto -> ' if template == 'auto' else ''}{family}"
    line += f" (default system prompt {system!r})" if system else ""
    bos, eos = DEFAULT_SPECIAL.get(family, (None, "</s>"))
    if tokenizer is not None:
        bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else bos
        eos = tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else eos
    return family, {"bos": bos, "eos": eos, "system": system}, line


def format_chat(messages, template, add_generation_prompt=False, tokenizer=None):
    """The rendered text of a conversation, exactly as the family's Jinja chat template writes it.
    template: a family name, or "auto" with tokenizer= given (the tokenizer also gives the BOS/EOS
    strings and ChatML's default system prompt)."""
    check_messages(messages)
    family, special, _ = resolve_template(template, tokenizer)
    return "".join(text for text, _ in TEMPLATES[family](messages, add_generation_prompt, special))


def stop_ids(tokenizer, template="auto"):
    """The token ids that end an answer in generation: the tokenizer's EOS ids and the template's
    end-of-turn token (<|im_end|>, <|eot_id|>, or EOS)."""
    family, special, _ = resolve_template(template, tokenizer)
    end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(family, special["eos"])
    ids = set(getattr(tokenizer, "stop_ids", None) or {tokenizer.eos_id}) | {tokenizer.token_to_id(end_of_turn)}
    return sorted(ids - {None})


# ---------------------------------------------------------------------------------------------------
# 3. Exact masks


def token_spans(ids, text, tokenizer):
    """(starts, ends): the byte span in text.encode() of each token of ids = tokenizer.encode(text).
    decode_bytes is concatenative, so the spans tile the text, except where SentencePiece writes a
    word-start space that the text does not have ("<s>[INST]" -> "<s>", "▁[", ...): that space is
    given no byte of the text."""
    data, starts, ends, pos = text.encode("utf-8"), [], [], 0
    for k, i in enumerate(ids):
        piece = tokenizer.decode_bytes([i])
        if data.startswith(piece, pos):
            end = pos + len(piece)
        elif piece.startswith(b" ") and data.startswith(piece[1:], pos):
            end = pos + len(piece) - 1
        else:
            raise TemplateError(f"token {k} ({tokenizer.id_to_token(i)!r}) does not match the text at byte "
                                f"{pos}: the tokenizer does not round-trip this text", "tokenizer mismatch")
        starts.append(pos)
        ends.append(end)
        pos = end
    if pos != len(data):
        raise TemplateError(f"the tokens cover {pos} of the text's {len(data)} bytes", "tokenizer mismatch")
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


def render(messages, tokenizer, template="auto", train_on="assistant", resolved=None):
    """(input_ids, labels), two equal-length lists: input_ids = tokenizer.encode(rendered text), and
    labels[i] = input_ids[i] where the model is trained to write token i, -100 elsewhere (aligned with
    the ids; the shift happens in data.collate). train_on: "assistant" (every answer with its
    end-of-turn token), "last" (the last answer), "all" (every token). resolved: resolve_template's
    result, to skip resolving the template for every example."""
    if train_on not in ("assistant", "last", "all"):
        raise ValueError(f"train_on={train_on!r}: expected assistant, last or all")
    check_messages(messages)
    family, special, _ = resolved or resolve_template(template, tokenizer)
    pieces = TEMPLATES[family](messages, False, special)
    last = max((k for _, k in pieces if k is not None), default=None)
    text = "".join(piece for piece, _ in pieces)
    trained = np.zeros(len(text.encode("utf-8")), dtype=np.int64)  # 1 for each byte that is trained
    pos = 0
    for piece, k in pieces:
        n = len(piece.encode("utf-8"))
        trained[pos:pos + n] = train_on == "all" or (k is not None and (train_on == "assistant" or k == last))
        pos += n
    ids = tokenizer.encode(text)
    starts, ends = token_spans(ids, text, tokenizer)
    # A token is trained when any of its bytes is (prefix sums count the trained bytes in each span).
    # A merged boundary token (" Paris" after a prompt ending in a space) holds answer bytes: the model
    # must learn to write it. A zero-width token (SentencePiece's "▁") goes with the byte after it.
    cumulative = np.concatenate([[0], np.cumsum(trained)])
    ends = np.minimum(np.maximum(ends, starts + 1), len(trained))
    labels = np.where(cumulative[ends] > cumulative[starts], ids, IGNORE).tolist()
    if labels:
        labels[0] = IGNORE  # nothing comes before the first token, so no position predicts it
    return ids, labels
