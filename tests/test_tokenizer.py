"""tokenizer.py gives the same ids as the reference libraries (`tokenizers`, `sentencepiece`) and
decodes back to the text; bos/eos/pad and the chat template come from the folder's config files."""
import json
import os
import random
import time
from pathlib import Path

import pytest
import sentencepiece
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tokenizer import (load_tokenizer, merge_lowest_rank_first, merge_lowest_rank_first_heap, stream_text,
                       utf8_complete_length)

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst.",
    "contractions": "It's what they're saying: we've, I'm, you'll, he'd, don't. IT'S LOUD, THEY'RE HERE",
    "accents": "Café, naïve, résumé, Zürich, São Paulo, Ångström, Œuvre, İstanbul",
    "cjk": "日本語のテキストと中文文本，한국어 텍스트입니다。",
    "emoji": "Emoji: 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 done",
    "code": "def sq(x):\n    if x > 0:\n        return x ** 2  # positive\n\treturn -x\n\n\nprint(sq(3))",
    "numbers": "In 2024, 1234567 people paid $3.14 each; 0.001% of 10^9 is 1000000. ½ ² ٣ 42nd",
    "whitespace": "a  b   c    d\n\n\nnext\r\nline \t tab\t\t\tend\n \n  \n",
    "trailing_spaces": "trailing spaces   ",
    "special_tokens": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "special_tokens_glued": "x<|im_end|><|im_start|>y <|endoftext|> z<|im_end <|im_start|",
    "long_runs": " " * 2000 + "x" * 2000 + "\n" * 500 + "9" * 300,
    "empty": "",
}


# ----------------------------------------------------------------------------------------------------
# SmolLM2 (the real tokenizer: Digits(individual) + ByteLevel pre-tokenizer)


@pytest.fixture(scope="module")
def smollm2(real_model_dir):
    return load_tokenizer(real_model_dir), Tokenizer.from_file(f"{real_model_dir}/tokenizer.json")


@pytest.mark.parametrize("name", TEXTS)
def test_smollm2_ids_match_tokenizers_library(smollm2, name):
    ours, reference = smollm2
    assert ours.encode(TEXTS[name]) == reference.encode(TEXTS[name], add_special_tokens=False).ids


@pytest.mark.parametrize("name", TEXTS)
def test_smollm2_decode_round_trips(smollm2, name):
    ours, _ = smollm2
    assert ours.decode(ours.encode(TEXTS[name])) == TEXTS[name]


def test_smollm2_special_tokens_in_text_become_single_ids(smollm2):
    ours, _ = smollm2
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert ours.encode("<|im_end|>") == [2]


def test_smollm2_bos_eos_pad_and_special_token_lookup(smollm2):
    ours, _ = smollm2
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert ours.token_to_id("<|im_start|>") == 1 and ours.token_to_id("<|endoftext|>") == 0
    assert ours.token_to_id("<|no such token|>") is None
    assert ours.id_to_token(2) == "<|im_end|>"
    assert ours.vocab_size == 49152
    assert ours.stop_ids == {2}


def test_smollm2_chat_template_is_read_from_tokenizer_config(smollm2, real_model_dir):
    ours, _ = smollm2
    with open(f"{real_model_dir}/tokenizer_config.json") as f:
        assert ours.chat_template == json.load(f)["chat_template"]
    assert "<|im_start|>" in ours.chat_template


def test_smollm2_decode_skips_special_tokens_on_request(smollm2):
    ours, _ = smollm2
    ids = ours.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "assistant\nHi!"


def test_bytes_without_a_token_are_dropped_like_tokenizers_with_a_warning(smollm2):
    ours, reference = smollm2  # SmolLM2's vocabulary has no token for byte 0x1d
    with pytest.warns(UserWarning, match="0x1d"):
        assert ours.encode("a\x1db c") == reference.encode("a\x1db c", add_special_tokens=False).ids


def test_heap_bpe_merges_like_the_simple_loop(smollm2):
    ours, _ = smollm2  # long words take the heap version; it must give the same tokens
    rng = random.Random(0)
    for _ in range(200):
        word = "".join(rng.choice("aeinrstĠĊ0") for _ in range(rng.randint(1, 60)))
        assert merge_lowest_rank_first(list(word), ours.merge_rank) == \
            merge_lowest_rank_first_heap(list(word), ours.merge_rank)


def test_a_100k_character_word_encodes_in_well_under_a_minute(smollm2):
    ours, reference = smollm2  # the simple O(n^2) loop would take ~80 s here
    text = " " * 100_000 + "x"
    start = time.perf_counter()
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert time.perf_counter() - start < 10


def test_unknown_id_is_a_clear_error(smollm2):
    ours, _ = smollm2
    with pytest.raises(ValueError, match="token id 49152 is not in the vocabulary"):
        ours.decode([1, 49152])
    with pytest.raises(ValueError, match="token id -100"):
        ours.decode([-100])


def test_streaming_holds_back_incomplete_utf8_characters(smollm2):
    ours, _ = smollm2
    text = "Emoji 😀👍🏽 and 日本語"
    chunks = list(stream_text(ours, ours.encode(text)))
    assert "".join(chunks) == text
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert len(chunks) > 1


def test_utf8_complete_length_cuts_before_a_partial_character():
    smile = "😀".encode()  # 4 bytes
    assert utf8_complete_length(b"ab" + smile) == 6
    for cut in (1, 2, 3):
        assert utf8_complete_length(b"ab" + smile[:cut]) == 2
    assert utf8_complete_length(b"") == 0


# ----------------------------------------------------------------------------------------------------
# Other byte-level BPE families, as small tokenizers trained here with `tokenizers`

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = list(TEXTS.values()) * 3 + ["Tokenizers split text into words, then merge the bytes of each word."] * 5


def train_byte_level_bpe(folder, style):
    """Train a 400-token BPE the way the family's tokenizer.json is built; save it in folder."""
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT), behavior="isolated")
    tokenizer = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "gpt2":  # the original: ByteLevel does the regex split itself, with a prefix space
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["llama3", "qwen2", "gpt2"])
def trained_bpe(request, tmp_path_factory):
    folder = train_byte_level_bpe(tmp_path_factory.mktemp("bpe") / request.param, request.param)
    return load_tokenizer(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("name", TEXTS)
def test_trained_byte_level_bpe_ids_match_tokenizers_library(trained_bpe, name):
    ours, reference = trained_bpe
    text = TEXTS[name] + " e\u0301te\u0301"  # decomposed accents: NFC (Qwen2) composes them
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_llama3_ignore_merges_emits_a_vocabulary_word_as_one_token(tmp_path):
    folder = train_byte_level_bpe(tmp_path / "llama3", "llama3")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    assert len(load_tokenizer(folder).encode(" jumps")) > 1  # the merges split it...
    vocab["Ġjumps"] = len(vocab) + len(SPECIALS)  # ...but the word itself is in the vocabulary
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "The fox jumps; it jumps again."
    assert load_tokenizer(folder).encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert load_tokenizer(folder).encode(" jumps") == [vocab["Ġjumps"]]


def test_merges_may_be_strings_or_pairs(tmp_path):
    folder = train_byte_level_bpe(tmp_path / "qwen2", "qwen2")
    as_pairs = load_tokenizer(folder).encode(TEXTS["english"])
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    assert isinstance(tokenizer_json["model"]["merges"][0], list)
    tokenizer_json["model"]["merges"] = [" ".join(pair) for pair in tokenizer_json["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    assert load_tokenizer(folder).encode(TEXTS["english"]) == as_pairs


def test_added_tokens_longest_match_and_lstrip_rstrip_match_tokenizers(tmp_path):
    folder = train_byte_level_bpe(tmp_path / "llama3", "llama3")
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.add_special_tokens([AddedToken("<|im", special=True),
                                  AddedToken("<mask>", lstrip=True, special=True),
                                  AddedToken("<sep>", rstrip=True, special=True),
                                  AddedToken("<w>", single_word=True, special=True)])
    reference.save(str(folder / "tokenizer.json"))
    text = "a <|im_start|> b <|im c  <mask> d <sep>  e<mask><sep> in<w>side <w> alone"
    ids = load_tokenizer(folder).encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert reference.token_to_id("<|im_start|>") in ids and reference.token_to_id("<|im") in ids
    assert ids.count(reference.token_to_id("<w>")) == 1


def test_eos_falls_back_to_generation_config_and_all_its_eos_ids_stop(tmp_path):
    folder = train_byte_level_bpe(tmp_path / "llama3", "llama3")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<|im_start|>"}}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.stop_ids == {2, 0}


def test_explicit_null_bos_in_tokenizer_config_means_no_bos(tmp_path):
    folder = train_byte_level_bpe(tmp_path / "qwen2", "qwen2")  # as Qwen2's files have it
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id) == (None, 2)


def test_chat_template_list_uses_the_default_one(tmp_path):
    folder = train_byte_level_bpe(tmp_path / "llama3", "llama3")
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    tok = load_tokenizer(folder)
    assert tok.chat_template == "DEFAULT" and tok.chat_templates["tool_use"] == "TOOLS"


# ----------------------------------------------------------------------------------------------------
# SentencePiece (Llama 2, Mistral, TinyLlama)

SP_VOCAB = 500  # 256 byte-fallback pieces, 3 control pieces, the characters, and some merges
SP_EXTRA = "<|im_start|>"  # an added token beyond the SentencePiece vocabulary (id SP_VOCAB), as fine-tunes add


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    """A Llama-2-like tokenizer.model: BPE, byte fallback, no normalization, <unk>=0 <s>=1 </s>=2."""
    folder = tmp_path_factory.mktemp("spm")
    lines = [line for text in TEXTS.values() for line in text.splitlines() if line.strip()] * 5
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.9995, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages }}",
        "added_tokens_decoder": {str(SP_VOCAB): {"content": SP_EXTRA, "special": True}}}))
    return folder


SP_TEXTS = {name: text for name, text in TEXTS.items() if "special" not in name}


@pytest.mark.parametrize("name", SP_TEXTS)
def test_sentencepiece_ids_match_sentencepiece(sentencepiece_folder, name):
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    assert load_tokenizer(sentencepiece_folder).encode(SP_TEXTS[name]) == reference.encode(SP_TEXTS[name])


@pytest.mark.parametrize("name", TEXTS)
def test_sentencepiece_decode_round_trips(sentencepiece_folder, name):
    tok = load_tokenizer(sentencepiece_folder)
    assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]


def test_sentencepiece_special_tokens_in_text_become_their_ids(sentencepiece_folder):
    tok = load_tokenizer(sentencepiece_folder)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    expected = [1, *reference.encode("hi"), SP_VOCAB, *reference.encode("there"), 2]
    assert tok.encode(f"<s>hi{SP_EXTRA}there</s>") == expected
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, SP_VOCAB + 1)
    assert tok.token_to_id(SP_EXTRA) == SP_VOCAB and tok.token_to_id("</s>") == 2
    assert tok.token_to_id("not a piece") is None
    assert tok.chat_template == "{{ messages }}"


def test_sentencepiece_text_after_an_added_token_gets_no_extra_word_start_piece(sentencepiece_folder):
    """sentencepiece starts each text with a word-start "▁"; the text's own space after an added token is
    that "▁" (not a second one), as in mistral-common and transformers. Without a space, the default
    (legacy, no "legacy" key in tokenizer_config.json) still starts a word there."""
    tok = load_tokenizer(sentencepiece_folder)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    for text in ["there", "there  x", "\nthere"]:
        assert tok.encode(f"{SP_EXTRA} {text}") == [SP_VOCAB, *reference.encode(text)]
        assert tok.encode(f"</s>{SP_EXTRA}{text}</s>") == [2, SP_VOCAB, *reference.encode(text), 2]
    assert tok.encode(f"{SP_EXTRA}  there") == [SP_VOCAB, *reference.encode(" there")]
    assert tok.encode(f" {SP_EXTRA} hi") == [*reference.encode(" "), SP_VOCAB, *reference.encode("hi")]


def test_sentencepiece_streaming_joins_to_the_text(sentencepiece_folder):
    tok = load_tokenizer(sentencepiece_folder)
    text = "Emoji 😀👍🏽 and 日本語"  # byte-fallback pieces carry the emoji a byte at a time
    assert "".join(stream_text(tok, tok.encode(text))) == " " + text  # the word-start "▁" shows as a space


# ----------------------------------------------------------------------------------------------------
# Folder choice


def test_folder_without_tokenizer_files_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "tokenizer.model" in message and "\n" not in message


def test_byte_level_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path, sentencepiece_folder):
    folder = train_byte_level_bpe(tmp_path / "both", "qwen2")
    (folder / "tokenizer.model").write_bytes((sentencepiece_folder / "tokenizer.model").read_bytes())
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert load_tokenizer(folder).encode(TEXTS["english"]) == reference.encode(TEXTS["english"]).ids


# ----------------------------------------------------------------------------------------------------
# SentencePiece with control tokens: Mistral's real vocabularies (v1: Mistral 7B v0.1/v0.2; v3: v0.3, with
# [INST], [/INST], [TOOL_CALLS], ... as control pieces), from mistral-common's wheel (conftest.py).
#
# The references: mistral-common encodes each message on its own with sentencepiece and puts the control
# ids between them, so the text after "[INST] " starts with one word-start "▁" (the space). transformers 5
# (LlamaTokenizer, as Mistral-7B-Instruct-v0.3's tokenizer.json: Metaspace, prepend_scheme "first" for
# "legacy": false, "always" for true) gives the same ids, except (1) a text that starts with a space
# (Metaspace never doubles the "▁": " Hi" -> "▁Hi", sentencepiece gives "▁", "▁Hi") and (2) runs of
# spaces before a word ("a  b": sentencepiece splits words first, "▁", "▁b"; transformers' BPE may merge
# "▁▁", "b"). There we match sentencepiece, i.e. mistral-common, what the models were trained on.

# text -> the ids of mistral-common 1.13.1's encode_chat_completion (users "Hello", "How?"; assistant
# "Hi there"; then " Hello", "Hi  there ", "\nHow?"; then system "Be brief." with "a\n\nb", "x", "y"),
# written the way each tokenizer's chat template writes the conversation (v3 drops an answer's trailing
# spaces; v1 keeps them).
MISTRAL_COMMON_IDS = {
    "v1": {
        "<s>[INST] Hello [/INST] Hi there</s>[INST] How? [/INST]":
            [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 15359, 736, 2, 733, 16289, 28793, 1602, 28804,
             733, 28748, 16289, 28793],
        "<s>[INST]  Hello [/INST] Hi  there </s>[INST] \nHow? [/INST]":
            [1, 733, 16289, 28793, 28705, 22557, 733, 28748, 16289, 28793, 15359, 28705, 736, 28705, 2, 733, 16289,
             28793, 28705, 13, 5660, 28804, 733, 28748, 16289, 28793],
        "<s>[INST] Be brief.\n\na\n\nb [/INST] x</s>[INST] y [/INST]":
            [1, 733, 16289, 28793, 1739, 6817, 28723, 13, 13, 28708, 13, 13, 28726, 733, 28748, 16289, 28793, 1318,
             2, 733, 16289, 28793, 337, 733, 28748, 16289, 28793],
    },
    "v3": {
        "<s>[INST] Hello[/INST] Hi there</s>[INST] How?[/INST]":
            [1, 3, 23325, 4, 16127, 1504, 2, 3, 2370, 29572, 4],
        "<s>[INST]  Hello[/INST] Hi  there</s>[INST] \nHow?[/INST]":
            [1, 3, 29473, 23325, 4, 16127, 29473, 1504, 2, 3, 29473, 781, 6428, 29572, 4],
        "<s>[INST] a\n\nb[/INST] x</s>[INST] Be brief.\n\ny[/INST]":
            [1, 3, 1032, 781, 781, 29494, 4, 2086, 2, 3, 2507, 7585, 29491, 781, 781, 29492, 4],
    },
}

CONTROL_TEXTS = {
    "turns": "[INST] Hello [/INST] Hi there</s>[INST] How? [/INST]",
    "v3 template": "<s>[INST] Hello[/INST] Hi there</s>[INST] How?[/INST]",
    "system": "<s>[INST] a\n\nb[/INST] x",
    "newline after control": "[INST]\nHow[/INST]\n\nfine</s>\n",
    "space and newline": "[INST] \nHow [/INST] \n x </s> \n",
    "no space after control": "[INST]Hello[/INST]Hi</s>[INST]?",
    "back to back": "<s>[INST][/INST]</s></s> x</s><s>",
    "trailing spaces": "[INST] Hi [/INST] ok </s> ",
    "unicode": "[INST] Écris « bonjour » 🇯🇵\n[/INST] こんにちは 😀, naïve</s>",
    "tools": '[AVAILABLE_TOOLS] [{"name": "f"}][/AVAILABLE_TOOLS][INST] Go[/INST][TOOL_CALLS] [{"name": "f"}]</s>'
             '[TOOL_RESULTS] {"content": 4}[/TOOL_RESULTS]',
    "text first": "Hello [INST] x [/INST]",
}


def with_transformers(vocabs, root):
    """(name, legacy) -> (our tokenizer, transformers' tokenizer, sentencepiece) for each tokenizer.model in
    vocabs ({name: path}), in an HF folder as Mistral and Meta ship it: tokenizer_config.json with "legacy"."""
    import transformers
    out = {}
    for name, vocab in vocabs.items():
        for legacy in (True, False):
            folder = root / f"{name}-legacy-{legacy}"
            folder.mkdir()
            (folder / "tokenizer.model").write_bytes(open(vocab, "rb").read())
            (folder / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>"}))
            out[name, legacy] = (load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder),
                                 sentencepiece.SentencePieceProcessor(model_file=str(vocab)))
    return out


@pytest.fixture(scope="module")
def mistral(mistral_vocabs, tmp_path_factory):
    return with_transformers(mistral_vocabs, tmp_path_factory.mktemp("mistral"))


DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """Llama 2's vocabulary (tests/data/README.md), keyed by legacy."""
    both = with_transformers({"llama2": DATA / "llama2-tokenizer.model"}, tmp_path_factory.mktemp("llama2"))
    return {legacy: both["llama2", legacy] for legacy in (True, False)}


def test_mistral_v3_text_after_a_control_token_gets_no_extra_word_start_piece(mistral):
    ours, _, sp = mistral["v3", False]
    assert ours.encode("[INST] Hello") == [3, sp.piece_to_id("▁Hello")]
    assert ours.encode("[/INST] Hi there</s>") == [4, *sp.encode("Hi there"), 2]
    assert sp.piece_to_id("▁") not in ours.encode(CONTROL_TEXTS["v3 template"])  # no lone "▁" anywhere


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_mistral_chat_ids_equal_mistral_common(mistral, version):
    """v1 with legacy (its tokenizer starts a word after <s>: "<s>", "▁[", "INST", "]"), v3 with both."""
    for legacy in ((True,) if version == "v1" else (True, False)):
        ours = mistral[version, legacy][0]
        for text, ids in MISTRAL_COMMON_IDS[version].items():
            assert ours.encode(text) == ids, (legacy, text)


@pytest.mark.parametrize("legacy", [True, False])
def test_mistral_v3_encodes_each_message_as_mistral_common_does(mistral, legacy):
    """mistral-common's rule for v3, [INST] + sp.encode(user) + [/INST] + sp.encode(answer) + </s>, on
    contents with leading, trailing and double spaces and newlines (checked against mistral-common 1.13.1
    itself on 300 random conversations)."""
    ours, _, sp = mistral["v3", legacy]
    contents = ["Hello", " Hello", "  two", "\nnew line", " \n x", "end ", "a  b   c", "tab\there", "😀 ok",
                "x\n\n"]
    for user in contents:
        for answer in contents:
            text = f"<s>[INST] {user}[/INST] {answer}</s>[INST] {answer}[/INST]"
            expected = [1, 3, *sp.encode(user), 4, *sp.encode(answer), 2, 3, *sp.encode(answer), 4]
            assert ours.encode(text) == expected, text


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name", CONTROL_TEXTS)
def test_mistral_ids_match_transformers(mistral, version, legacy, name):
    ours, hf, _ = mistral[version, legacy]
    text = CONTROL_TEXTS[name]
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name", CONTROL_TEXTS)
def test_llama2_ids_match_transformers(llama2, legacy, name):
    ours, hf, _ = llama2[legacy]
    text = CONTROL_TEXTS[name]
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


def test_llama2_vocabulary_gives_hugging_faces_ids_on_llama_cpps_test_texts(llama2):
    """The rebuilt tokenizer.model is Llama 2's: the ids Hugging Face's Llama 2 tokenizer gave llama.cpp."""
    ours = llama2[True][0]
    texts = (DATA / "llama2-vectors.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    lines = (DATA / "llama2-vectors.out").read_text().split("\n")
    assert len(texts) == len(lines) == 47
    for text, line in zip(texts, lines):
        assert ours.encode(text) == [int(i) for i in line.split()], text
    assert ours.encode("<s>[INST] Hello") == [1, 518, 25580, 29962, 15043]  # "▁[", "INST", "]", "▁Hello"


def test_llama2_chat_ids_equal_metas_reference_encoding(llama2):
    """Meta's llama code encodes each exchange as bos + sp.encode(f"[INST] {user} [/INST] {answer} ") + eos,
    which the Llama 2 chat template writes as "<s>[INST] {user} [/INST] {answer} </s>" (legacy: a word
    starts after <s>)."""
    ours, _, sp = llama2[True]
    turns = [("<<SYS>>\nBe brief.\n<</SYS>>\n\nHello", "Hi there"), ("a\n\nb", "x")]
    text = "".join(f"<s>[INST] {user} [/INST] {answer} </s>" for user, answer in turns) + "<s>[INST] How? [/INST]"
    expected = [i for user, answer in turns for i in [1, *sp.encode(f"[INST] {user} [/INST] {answer} "), 2]]
    assert ours.encode(text) == expected + [1, *sp.encode("[INST] How? [/INST]")]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_mistral_legacy_false_decodes_back_to_the_text(mistral, version):
    ours = mistral[version, False][0]
    for text in [*CONTROL_TEXTS.values(), *MISTRAL_COMMON_IDS[version]]:
        assert ours.decode(ours.encode(text)) == text


def test_mistral_legacy_one_space_after_a_control_token_is_the_word_start(mistral):
    """With legacy, "[INST] Hi" and "[INST]Hi" are the same ids (as in mistral-common and transformers), so
    decode gives the form without the space; texts without a space there decode back exactly."""
    ours = mistral["v3", True][0]
    assert ours.encode("[INST] Hi</s> x") == ours.encode("[INST]Hi</s>x")
    assert ours.decode(ours.encode("[INST] Hi</s>  x")) == "[INST]Hi</s> x"
    for text in [CONTROL_TEXTS["no space after control"], CONTROL_TEXTS["newline after control"], TEXTS["code"]]:
        assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("version, legacy", [("v1", True), ("v3", False), ("v3", True)])
def test_mistral_token_spans_tile_the_chat_text(mistral, version, legacy):
    """Loss masks need each token's bytes in the text (templates.token_spans allows a word-start "▁" that
    has no space in the text, as after "<s>" in v1)."""
    from templates import token_spans
    ours = mistral[version, legacy][0]
    for text in [*CONTROL_TEXTS.values(), *MISTRAL_COMMON_IDS[version]]:
        starts, ends = token_spans(ours.encode(text), text, ours)
        assert ends[-1] == len(text.encode()) and (starts[1:] == ends[:-1]).all()


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_control_and_user_defined_symbols_match_transformers(tmp_path, legacy):
    """A trained model with both kinds of special pieces: control symbols (never matched in text by
    sentencepiece, so we cut them out) and user-defined ones (listed as added tokens in
    tokenizer_config.json, as transformers saves them)."""
    import transformers
    lines = [line for text in TEXTS.values() for line in text.splitlines() if line.strip()] * 5
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"), vocab_size=SP_VOCAB,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        control_symbols=["[INST]", "[/INST]"], user_defined_symbols=["<tool>", "</tool>"], minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    user_defined = {str(sp.piece_to_id(t)): {"content": t, "special": False} for t in ["<tool>", "</tool>"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "added_tokens_decoder": user_defined}))
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [*CONTROL_TEXTS.values(), "<tool> hi</tool> x", "[INST] Hello <tool>a</tool>[/INST] ok",
                 "x <tool>", "<tool>x", "<tool>\n</tool>\tb", "[INST]<tool>[/INST] <tool> "]:
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text


def test_whitespace_pieces_listed_as_added_tokens_decode_as_spaces(gemma_dir, tmp_path):
    """A Gemma folder from the Hub lists its whitespace pieces ("▁▁" ... 31 of them) among the added
    tokens of tokenizer_config.json; they are the model's own pieces, and decode as the spaces they are."""
    import shutil
    config = json.loads(open(os.path.join(gemma_dir, "tokenizer_config.json")).read())
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(gemma_dir, "tokenizer.model"))
    for n in range(2, 32):
        i = sp.piece_to_id("▁" * n)
        config["added_tokens_decoder"][str(i)] = {"content": "▁" * n, "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": False}
    shutil.copy(os.path.join(gemma_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hub, ours = load_tokenizer(tmp_path), load_tokenizer(gemma_dir)
    text = "def f(x):\n    return  x   # three spaces"
    assert hub.encode(text) == ours.encode(text)
    assert hub.decode(hub.encode(text)) == text
