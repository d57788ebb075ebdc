"""Chat templates in Python, and exact loss masks: a conversation -> text -> (input_ids, labels).

    format_chat(messages, "chatml")                    # the text, as the model's Jinja template writes it
    render(messages, tokenizer, train_on="assistant")  # ids of that whole text + labels, -100 = no loss

One small function per template family, no Jinja: chatml (SmolLM2, Qwen2, Qwen2.5), qwen3, llama3 (3.0),
llama3.1 (3.1, 3.2, 3.3), llama2, mistral (v0.1), mistral-v3 (v0.3), mistral-v7 (Small 3, tekken), gemma
(Gemma 3), alpaca, plain. Each returns the text as pieces [(text, k)], k the index of the assistant message
the piece answers (trained) or None (prompt). The rendered text must be exactly what the model's own
chat template writes, because that is what inference engines feed the model; tests/test_templates.py
checks each family against its published Jinja template with transformers' apply_chat_template.
Any other model: template = "jinja" renders its own chat_template with jinja2 (optional) and finds the
answers in the text.

Masks. The ids are the tokenization of the WHOLE text, as an engine sees it. Computing the mask from
len(tokenize(prompt)) breaks when BPE merges across the prompt/answer boundary (a prompt ending in a
space, an answer starting with a word: " Paris" is one token that neither side's tokenization has).
Instead we follow the ids' bytes along the text (decode_bytes is concatenative) and train a token when
any of its bytes belong to a trained piece. Special tokens are cut out of the text before BPE runs, so
no token ever spans <|im_end|> and its neighbours.
"""
import ast
import datetime
import functools
import json
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


# The date Llama 3.1+ templates write when none is given ("Today Date: 26 Jul 2024"); the Jinja
# rendering (template = "jinja") gets it from strftime_now too, so the training text never depends on
# the day it was made (token cache, exact resume).
TEMPLATE_DATE = datetime.date(2024, 7, 26)


def llama31(messages, add_generation_prompt, special):
    """Llama 3.1, 3.2, 3.3 Instruct: llama3, after a system block that is always written:
    'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' + the system message (trimmed,
    or empty)."""
    system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    block = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
             f"Today Date: {TEMPLATE_DATE.strftime('%d %b %Y')}\n\n{system}<|eot_id|>")
    pieces = [(special["bos"] + block, None)] + llama3(rest, add_generation_prompt, special)[1 if rest else 0:]
    shift = len(messages) - len(rest)                           # message indices as in `messages`
    return [(text, None if k is None else k + shift) for text, k in pieces]


def qwen3(messages, add_generation_prompt, special):
    """Qwen3: chatml without a default system prompt, and the reasoning block. The answer after the
    last user message is written '<think>\\n{reasoning}\\n</think>\\n\\n{answer}' (an empty block when the
    answer has none): the model writes it after '<|im_start|>assistant\\n', so it is trained. Earlier
    answers lose their '<think>...</think>' (the template keeps only what follows it)."""
    last_query = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    pieces = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", None))
            continue
        content, reasoning = m["content"], ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        if k > last_query and (k == len(messages) - 1 or reasoning):
            content = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        pieces += [("<|im_start|>assistant\n", None), (content + "<|im_end|>", k), ("\n", None)]
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", None))
    return pieces


def gemma(messages, add_generation_prompt, special):
    """Gemma 2 and 3: <start_of_turn>user|model\\n{content|trim}<end_of_turn>\\n, no system role: the system
    message opens the first user turn, followed by a blank line. The answer and <end_of_turn> are trained."""
    system = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    alternating(turns)
    pieces = [(special["bos"], None)]
    for k, m in enumerate(turns, start=len(messages) - len(turns)):
        if m["role"] == "user":
            prefix = system if k == len(messages) - len(turns) else ""
            pieces.append((f"<start_of_turn>user\n{prefix}{m['content'].strip()}<end_of_turn>\n", None))
        else:
            pieces += [("<start_of_turn>model\n", None), (m["content"].strip() + "<end_of_turn>", k), ("\n", None)]
    if add_generation_prompt:
        pieces.append(("<start_of_turn>model\n", None))
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


def mistral_v3(messages, add_generation_prompt, special):
    """Mistral-7B-Instruct v0.3 (and v0.2's tokenizer v3): <s>[INST] {user}[/INST] {answer|trim}</s>... The
    system message goes before the LAST user message ('[INST] {system}\\n\\n{user}[/INST]'), as
    mistral-common writes it and as the Jinja template writes every prompt that ends with a user turn
    (for a conversation that ends with an answer, the template drops it). No generation prompt."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    alternating(turns)
    last_user = max((k for k, m in enumerate(turns) if m["role"] == "user"), default=None)
    pieces = [(special["bos"], None)]
    for k, m in enumerate(turns):
        if m["role"] == "user":
            prefix = f"{system}\n\n" if system is not None and k == last_user else ""
            pieces.append((f"[INST] {prefix}{m['content']}[/INST]", None))
        else:
            pieces.append((" " + m["content"].strip() + special["eos"], k + len(messages) - len(turns)))
    return pieces


def mistral_v7(messages, add_generation_prompt, special):
    """Mistral Small 3 and later (v7, tekken): <s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{user}[/INST]
    {answer}</s>... always with a system prompt (the template's default when the conversation has none),
    no spaces added, no generation prompt."""
    if messages and messages[0]["role"] == "system":
        system, rest, first = messages[0]["content"], messages[1:], 1
    elif special.get("system") is not None:
        system, rest, first = special["system"], messages, 0
    else:
        raise TemplateError("this mistral-v7 template's default system prompt could not be read: give the "
                            "conversation a system message", "no system prompt")
    pieces = [(f"{special['bos']}[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT]", None)]
    for k, m in enumerate(rest, start=first):
        if m["role"] == "assistant":
            pieces.append((m["content"] + special["eos"], k))
        else:
            tag = "INST" if m["role"] == "user" else "SYSTEM_PROMPT"
            pieces.append((f"[{tag}]{m['content']}[/{tag}]", None))
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


def jinja(messages, add_generation_prompt, special):
    """Any other model: its own chat_template rendered with jinja2 (as transformers' apply_chat_template
    does), the answers found in the rendering. Answer k is trained from the end of the prompt an engine
    sends for it (the rendering of messages[:k] with the generation prompt, when the text starts with
    it; else from the answer's first byte) through its content as written (as given, stripped, or after
    a '</think>') and the added token that closes it ('<|end|>', '</s>', ...). A template that leaves a
    message out or rewrites an answer stops with a TemplateError: no mask is guessed."""
    text = render_jinja(special, messages, add_generation_prompt)
    if add_generation_prompt:
        return [(text, None)]
    closers = sorted(special["added"], key=len, reverse=True)
    pieces, done, cursor = [], 0, 0   # text[:done] is in pieces; the search goes on from cursor
    for k, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "system" or not content.strip():
            if content.strip() and content.strip() not in text:
                raise TemplateError(f"the chat template leaves out message {k} ({m['role']})", "template drops a message")
            continue
        written = [w for w in (content, content.strip(), content.split("</think>")[-1].strip()) if w]
        found = [(text.find(w, cursor), -len(w), w) for w in written if text.find(w, cursor) >= 0]
        if not found:
            raise TemplateError(f"the chat template leaves out or rewrites message {k} ({m['role']})",
                                "template drops a message")
        at, _, w = min(found)
        cursor = at + len(w)
        if m["role"] != "assistant":
            continue
        prompt = render_jinja(special, messages[:k], True)   # what an engine sends before answer k
        start = len(prompt) if text.startswith(prompt) and done <= len(prompt) <= at else at
        spaces = len(text[cursor:]) - len(text[cursor:].lstrip(" "))
        closer = next((c for c in closers if text.startswith(c, cursor + spaces)), None)
        cursor += spaces + len(closer) if closer else 0
        pieces += [(text[done:start], None), (text[start:cursor], k)]
        done = cursor
    return pieces + [(text[done:], None)]


def render_jinja(special, messages, add_generation_prompt):
    """The text of special["chat_template"] for messages, rendered as transformers renders it (a sandbox,
    trim_blocks/lstrip_blocks, raise_exception, strftime_now), with TEMPLATE_DATE as today."""
    template = compile_jinja(special["chat_template"])
    import jinja2  # compile_jinja has checked that it is installed
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=special["bos"] or "", eos_token=special["eos"] or "")
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not render: {e}", "template error") from None


@functools.lru_cache(maxsize=4)
def compile_jinja(chat_template):
    try:
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise TemplateError("template = 'jinja' needs the jinja2 package (pip install jinja2)") from None
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=TEMPLATE_DATE.strftime)
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template is not valid Jinja: {e}", "template error") from None


def raise_exception(message):
    raise TemplateError(f"the chat template refuses this conversation: {message}", message)


TEMPLATES = {"chatml": chatml, "qwen3": qwen3, "llama3": llama3, "llama3.1": llama31, "llama2": llama2,
             "mistral": mistral, "mistral-v3": mistral_v3, "mistral-v7": mistral_v7, "gemma": gemma,
             "alpaca": alpaca, "plain": plain, "jinja": jinja}
# BOS/EOS strings when no tokenizer is given (with one, the tokenizer's own are used, as in Jinja).
DEFAULT_SPECIAL = {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
                   "llama2": ("<s>", "</s>"), "mistral": ("<s>", "</s>"), "mistral-v3": ("<s>", "</s>"),
                   "mistral-v7": ("<s>", "</s>"), "gemma": ("<bos>", "<eos>")}
# The token that ends an answer, when it is not EOS (generation stops there too).
END_OF_TURN = {"chatml": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>",
               "gemma": "<end_of_turn>"}


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
# anything else is an unknown variant, and auto stops rather than guess. A tuple: one of its spellings.
FINGERPRINTS = {
    "qwen3": ["'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>'+'\n'",
              "{%setcontent=message['content'].split('</think>')[-1].lstrip('\n')%}",
              "{%ifloop.index0>ns.last_query_index%}", "{%ifloop.lastor(notloop.lastandreasoning_content)%}",
              "'<|im_start|>'+message['role']+'\n<think>\n'+reasoning_content.strip('\n')+'\n</think>\n\n'"
              "+content.lstrip('\n')"],
    "chatml": ["'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>'+'\n'"],
    "llama3.1": ["'<|start_header_id|>'+message['role']+'<|end_header_id|>\n\n'+message['content']|trim+'<|eot_id|>'",
                 "{%setdate_string='26 Jul 2024'%}", "{{'Cutting Knowledge Date: December 2023\n'}}",
                 "{{'Today Date: '+date_string+'\n\n'}}", "{%setsystem_message=messages[0]['content']|trim%}",
                 "{{system_message}}"],
    "llama3": ["'<|start_header_id|>'+message['role']+'<|end_header_id|>\n\n'+message['content']|trim+'<|eot_id|>'",
               "{%ifloop.index0==0%}{%setcontent=bos_token+content%}"],
    "gemma": ["{{bos_token}}", "{%setfirst_user_prefix=messages[0]['content']+'\n\n'%}", "{%setrole='model'%}",
              "{{'<start_of_turn>'+role+'\n'+(first_user_prefixifloop.firstelse'')}}",
              "{{message['content']|trim}}", "{{'<end_of_turn>\n'}}"],
    "llama2": ["{{bos_token+'[INST] '+content.strip()+' [/INST]'}}", "{{' '+content.strip()+' '+eos_token}}"],
    "mistral-v7": ["{{bos_token}}", "'[SYSTEM_PROMPT]'+system_message+'[/SYSTEM_PROMPT]'",
                   "{{'[INST]'+message['content']+'[/INST]'}}", "{{message['content']+eos_token}}"],
    "mistral-v3": ["{{bos_token}}", "{{'[INST] '+system_message+'\n\n'+message['content']+'[/INST]'}}",
                   "{{'[INST] '+message['content']+'[/INST]'}}", "{{' '+message['content']|trim+eos_token}}",
                   ("{%ifloop.lastandsystem_messageisdefined%}",
                    "{%if(message==user_messages[-1])andsystem_messageisdefined%}")],
    "mistral": ["{{bos_token}}", "{{'[INST] '+message['content']+' [/INST]'}}", "{{message['content']+eos_token}}"],
    "alpaca": ["'### Instruction:\n'+message['content']+'\n\n'", "'### Response:\n'+message['content']+eos_token+'\n\n'"],
}
# How auto tells the families apart: the first marker found in the template decides.
MARKERS = [("<think>", "qwen3"), ("Cutting Knowledge Date", "llama3.1"), ("<|im_start|>", "chatml"),
           ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"), ("<<SYS>>", "llama2"),
           ("[SYSTEM_PROMPT]", "mistral-v7"), ("'[INST] '+system_message+'\n\n'", "mistral-v3"),
           ("[INST]", "mistral"), ("### Instruction:", "alpaca")]


def detect_template(chat_template):
    """(family, default system prompt or None) of a tokenizer's Jinja chat_template; TemplateError for
    a template we cannot reproduce exactly (set template= explicitly to take responsibility, or
    template = "jinja" to render the model's own template)."""
    if not chat_template:
        raise TemplateError("the tokenizer has no chat_template: set template (plain for a base model)")
    t = squeeze(chat_template)
    family = next((name for marker, name in MARKERS if marker in t), None)
    if family is None:
        raise TemplateError(f"unknown chat template (not one of {', '.join(FINGERPRINTS)}); set template "
                            "explicitly, or template = 'jinja' to render the model's own")
    problems = [f"no {f!r}" for f in FINGERPRINTS[family]
                if not any(spelling in t for spelling in (f if isinstance(f, tuple) else (f,)))]
    system = default_system_prompt(family, chat_template)
    if family == "llama2" and "true==true" in t:
        problems.append("Llama 2's long default system prompt")
    if "messages[0]['role']" in t and system is None and family in ("chatml", "llama3", "mistral", "mistral-v7"):
        problems.append("a default system prompt we cannot read")  # a first-message test: a default?
    if problems:
        raise TemplateError(f"the chat template looks like {family} but is a variant we do not reproduce "
                            f"exactly ({problems[0]}); set template explicitly if it renders alike, or "
                            "template = 'jinja'")
    return family, system


def default_system_prompt(family, chat_template):
    """The system prompt a template writes when the conversation has none, or None. ChatML templates
    write it as one literal '<|im_start|>system\\n...<|im_end|>\\n' (SmolLM2, Qwen2, Qwen2.5); Mistral v7
    ones set default_system_message to literals and today's date (TEMPLATE_DATE here)."""
    if family == "chatml":
        found = re.search(r"'<\|im_start\|>system\n((?:[^'\\]|\\.)*?)<\|im_end\|>\n'", squeeze(chat_template))
        return re.sub(r"\\(.)", r"\1", found.group(1)) if found else None
    found = re.search(r"set default_system_message\s*=\s*(.*?)\s*-?%\}", chat_template, flags=re.S)
    if family != "mistral-v7" or not found:
        return None
    today = TEMPLATE_DATE.strftime("%Y-%m-%d") if re.search(r"set today\s*=\s*strftime_now\(['\"]%Y-%m-%d['\"]\)",
                                                            chat_template) else None
    out = []
    for part in re.findall(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s+]+""", found.group(1)):
        if part[0] in "'\"":
            out.append(ast.literal_eval(part))
        elif part == "today" and today:
            out.append(today)
        else:
            return None  # an expression we do not evaluate
    return "".join(out)


def resolve_template(template, tokenizer=None):
    """(family, special strings {"bos", "eos", "system"}, a line saying what was picked) for a
    template name, "auto" or "jinja". BOS/EOS come from the tokenizer, as bos_token/eos_token do in
    Jinja; "jinja" also carries the tokenizer's chat_template and its added tokens."""
    chat_template = getattr(tokenizer, "chat_template", None)
    if template == "auto":
        if tokenizer is None:
            raise TemplateError("template='auto' needs a tokenizer (tokenizer=...)")
        family, system = detect_template(chat_template)
    elif template == "jinja":
        if not chat_template:
            raise TemplateError("template = 'jinja' needs a tokenizer with a chat_template")
        family, system = template, None
    elif template in TEMPLATES:
        family = template
        system = default_system_prompt(family, chat_template) if chat_template else None
    else:
        raise TemplateError(f"unknown template {template!r} (expected auto, jinja or one of {', '.join(TEMPLATES)})")
    line = f"template: {'auto -> ' if template == 'auto' else ''}{family}"
    line += f" (default system prompt {system!r})" if system else ""
    bos, eos = DEFAULT_SPECIAL.get(family, (None, "</s>"))
    if tokenizer is not None:
        bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else bos
        eos = tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else eos
    special = {"bos": bos, "eos": eos, "system": system}
    if family == "jinja":
        special.update(chat_template=chat_template, added=tuple(getattr(tokenizer, "added_id", {})))
    return family, special, line


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
    end_of_turn = END_OF_TURN.get(family, special["eos"])
    if family == "jinja":  # the added token that closes an answer in the model's own template
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        answer = next(text for text, k in jinja(probe, False, special) if k == 1)
        end_of_turn = answer[answer.rindex("Hello") + 5:].strip() or end_of_turn
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
    table = getattr(tokenizer, "token_bytes", None)  # ByteLevelBPE's id -> bytes: the usual case, fast
    if table is not None:
        try:
            pieces = [table[i] for i in ids]
        except KeyError:  # an unknown id: the loop below says which
            pieces = None
        if pieces is not None and b"".join(pieces) == data:  # they tile the text, each where the last ended
            lengths = np.array([len(p) for p in pieces], dtype=np.int64)
            ends = np.cumsum(lengths)
            return ends - lengths, ends
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
