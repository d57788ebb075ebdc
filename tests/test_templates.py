"""Chat templates: our Python functions write exactly what each family's published Jinja template writes
(transformers' apply_chat_template is the oracle), the ids of render() are the tokenization of that
text as a whole, and auto picks the right family or refuses a template it cannot reproduce."""
import copy
import io
import json

import pytest
import sentencepiece
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
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
}

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


def cases():
    for name, (_, family, *_) in FAMILIES.items():
        for conv_name, conv in CONVERSATIONS.items():
            if family == "mistral" and conv[0]["role"] == "system":
                continue  # the Mistral template raises on a system message (tested below)
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


@pytest.mark.parametrize("name, system", [("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
                                          ("qwen2", "You are a helpful assistant."),
                                          ("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
                                          ("chatml", None), ("llama3", None), ("llama2", None), ("mistral", None),
                                          ("alpaca", None)])
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
    (LLAMA32_EXCERPT, "Llama 3.1\\+ chat templates"),
    (MISTRAL_V03_LIKE, "looks like mistral but is a variant"),
    (CHATML.replace("message['content'] + '<|im_end|>'", "message['content'] | trim + '<|im_end|>'"),
     "looks like chatml but is a variant"),
    ("{% set default = 'You are X.' %}{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n' + default + "
     "'<|im_end|>\n' }}{% endif %}" + CHATML, "a default system prompt we cannot read"),
    ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}", "unknown chat template"),
    ("{%- if enable_thinking %}<think>\n\n</think>{% endif %}<|im_start|>", "<think>"),
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
    assert data.detect_template(ours.chat_template)[0] == "chatml"
    for messages in CONVERSATIONS.values():
        if messages[-1]["role"] == "assistant":
            text = hf.apply_chat_template(messages, tokenize=False)
            assert data.format_chat(messages, "auto", tokenizer=ours) == text
            assert data.render(messages, ours)[0] == hf(text, add_special_tokens=False)["input_ids"]


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
    trained_runs, run = [], b""
    for i, label in zip(ids, labels):
        if label != -100:
            run += tok.decode_bytes([i])
        elif run:
            trained_runs, run = trained_runs + [run], b""
    trained_runs += [run] if run else []
    assert [r.decode() for r in trained_runs] == answers
