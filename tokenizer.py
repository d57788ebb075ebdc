"""Tokenizers for SFT: text <-> token ids, matching Hugging Face's ids exactly.

    tok = load_tokenizer("models/SmolLM2-135M-Instruct")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")   # no BOS added; special tokens in the text
    text = tok.decode(ids)                                 # are recognised and become their ids
    for piece in stream_text(tok, sampled_ids): print(piece, end="", flush=True)

Two implementations, one interface:
  ByteLevelBPE            tokenizer.json with a byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2/3),
                          written here from scratch: normalizer -> pre-tokenizer -> BPE merges.
  SentencePieceTokenizer  tokenizer.model (Llama 2, Mistral, TinyLlama) through the sentencepiece package.
load_tokenizer(folder) picks the first if tokenizer.json holds a byte-level BPE, else the second if there
is a tokenizer.model, else raises FileNotFoundError naming the folder.

Both have:
  encode(text) -> list[int]            decode(ids, skip_special_tokens=False) -> str
  decode_bytes(ids) -> bytes           raw bytes, for streaming (see stream_text)
  token_to_id(str) -> int | None       None when the string is not a token (never raises)
  id_to_token(id) -> str               ValueError for an id outside the vocabulary
  vocab_size, bos_id, eos_id, pad_id   (any id may be None)
  stop_ids                             eos plus generation_config.json's eos ids (Llama 3 Instruct
                                       ends a turn with <|eot_id|>, not its eos <|end_of_text|>)
  chat_template, chat_templates        the Jinja template (str or None); all templates by name

Added/special tokens ("<|im_start|>", "</s>") are cut out of the raw text first, longest match first,
the way the `tokenizers` library does; the stretches between them are encoded on their own (for
SentencePiece's word-start "▁" after an added token, see SentencePieceTokenizer).
"""
import heapq
import json
import unicodedata
import warnings
from pathlib import Path

import regex  # like `re`, plus the unicode classes \p{L} (letters) and \p{N} (numbers)
import sentencepiece


# ----------------------------------------------------------------------------------------------------
# Shared: added tokens, streaming


def added_tokens_pattern(added_tokens):
    """One regex matching any added token. added_tokens: dicts with content/lstrip/rstrip/single_word,
    as in tokenizer.json's "added_tokens". Alternatives are tried in order, so sorting longest first
    gives the leftmost-longest match of `tokenizers` ("<|im_start|>" before a shorter "<|im").
    lstrip/rstrip: the token also swallows the whitespace on its left/right. Each alternative has one
    capturing group, the token itself, so match.group(match.lastindex) is the token without that space."""
    alternatives = []
    for token in sorted(added_tokens, key=lambda t: -len(t["content"])):
        pattern = "(" + regex.escape(token["content"]) + ")"
        if token.get("single_word"):  # only as a whole word, not inside one
            pattern = r"(?<!\w)" + pattern + r"(?!\w)"
        if token.get("lstrip"):
            pattern = r"\s*" + pattern
        if token.get("rstrip"):
            pattern = pattern + r"\s*"
        alternatives.append(pattern)
    return regex.compile("|".join(alternatives)) if alternatives else None


def split_on_added_tokens(text, pattern, added_id):
    """"a<|im_end|>b" -> ["a", 2, "b"]: the stretches of text between added tokens, and the added
    tokens' ids. pattern: from added_tokens_pattern; added_id: token string -> id."""
    if pattern is None:
        return [text] if text else []
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            pieces.append(text[start:match.start()])
        pieces.append(added_id[match.group(match.lastindex)])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def utf8_complete_length(buf: bytes) -> int:
    """Length of the longest prefix of buf that does not end inside a UTF-8 character.
    A token may end halfway through a character (an emoji is 4 bytes, often 2+ tokens); a streaming
    chat loop prints buf[:n] and keeps the rest until the next token completes it.
    UTF-8: a character is a lead byte 0xxxxxxx / 110xxxxx / 1110xxxx / 11110xxx (1-4 bytes long)
    followed by continuation bytes 10xxxxxx. Find the last lead byte; is its character complete?"""
    for back in range(1, min(4, len(buf)) + 1):
        byte = buf[-back]
        if byte >> 6 == 0b10:  # continuation byte: keep looking left
            continue
        length = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return len(buf) if back >= length else len(buf) - back
    return len(buf)  # no lead byte in the last 4 bytes: not UTF-8; let the decoder replace it


def stream_text(tok, ids):
    """Yield text as token ids arrive (ids: any iterable, e.g. a sampling loop that yields ids), holding
    back the bytes of a character that is not complete yet. "".join(stream_text(tok, ids)) is the text.
    Note: SentencePiece's word-start "▁" shows as a leading space on the first piece."""
    pending = b""
    for token_id in ids:
        pending += tok.decode_bytes([token_id])
        n = utf8_complete_length(pending)
        if n:
            yield pending[:n].decode("utf-8", errors="replace")
            pending = pending[n:]
    if pending:
        yield pending.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------
# 1. Byte-level BPE (GPT-2, Radford et al. 2019; the tokenizer.json format of Hugging Face `tokenizers`)


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters (openai/gpt-2 encoder.py).
    BPE works on bytes, but vocabularies are stored as strings of these characters, so a token can hold
    any bytes (half of a UTF-8 character too) and still be written in JSON. Printable bytes map to
    themselves; the 68 others (control characters, space, ...) to chr(256 + n) in order:
    space -> 'Ġ', newline -> 'Ċ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}

# The GPT-2 pre-tokenization regex (ByteLevel with use_regex=true): English contractions, words with an
# optional leading space, numbers, punctuation runs, and whitespace (a run of spaces gives its last space
# to the next word: "a   b" -> "a", "  ", " b").
GPT2_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

NO_MERGE = 1 << 62  # rank of a pair that has no merge rule: larger than every real rank


def component_types(spec):
    """All "type"s in a tokenizer.json component, looking inside Sequences."""
    if not spec:
        return set()
    nested = spec.get("pretokenizers") or spec.get("normalizers") or spec.get("decoders") or []
    return {spec["type"]}.union(*(component_types(s) for s in nested))


def parse_normalizer(spec, where):
    """tokenizer.json "normalizer" -> list of str -> str functions (Qwen2 uses NFC)."""
    if spec is None:
        return []
    kind = spec["type"]
    if kind == "Sequence":
        return [step for s in spec["normalizers"] for step in parse_normalizer(s, where)]
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return [lambda text, form=kind: unicodedata.normalize(form, text)]
    raise ValueError(f"{where}: normalizer type {kind!r} is not supported "
                     f"(supported: NFC, NFD, NFKC, NFKD, Sequence)")


def split_isolated(pattern, text):
    """Split text into the matches of pattern and the stretches between them, keeping both
    (the "Isolated" behavior of the `tokenizers` Split pre-tokenizer)."""
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            pieces.append(text[start:match.start()])
        if match.end() > match.start():
            pieces.append(match.group())
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def parse_pre_tokenizer(spec, where):
    """tokenizer.json "pre_tokenizer" -> list of steps, each a function str -> list[str]. The steps run
    in order; each one splits every piece the previous step made. BPE never merges across pieces."""
    if spec is None:
        return []
    kind = spec["type"]
    if kind == "Sequence":
        return [step for s in spec["pretokenizers"] for step in parse_pre_tokenizer(s, where)]
    if kind == "Digits":  # SmolLM2: every digit on its own, so numbers are read digit by digit
        pattern = regex.compile(r"\p{N}|\P{N}+" if spec.get("individual_digits") else r"\p{N}+|\P{N}+")
        return [pattern.findall]
    if kind == "Split":  # Llama 3, Qwen2: their own version of the GPT-2 regex
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise ValueError(f"{where}: Split pre-tokenizer with behavior {spec.get('behavior')!r}, "
                             f"invert {spec.get('invert')} is not supported (only Isolated, invert false)")
        source = spec["pattern"]
        pattern = regex.compile(source["Regex"] if "Regex" in source else regex.escape(source["String"]))
        return [lambda text: split_isolated(pattern, text)]
    if kind == "ByteLevel":
        steps = []
        if spec.get("add_prefix_space"):  # GPT-2: " hello" and "hello" at the start encode alike
            steps.append(lambda text: [text if text.startswith(" ") else " " + text])
        if spec.get("use_regex", True):
            steps.append(GPT2_SPLIT.findall)  # the regex matches every character, so nothing falls between
        return steps
    raise ValueError(f"{where}: pre_tokenizer type {kind!r} is not supported "
                     f"(supported: Sequence, Split, ByteLevel, Digits)")


def merge_lowest_rank_first(symbols, merge_rank):
    """The BPE loop: repeatedly merge the adjacent pair with the lowest merge rank (the leftmost if tied,
    as `tokenizers` does) until no adjacent pair has a merge rule. ["h","e","l","l","o"] -> ["hello"].
    ranks[i] is the rank of the pair (symbols[i], symbols[i+1]); after a merge only the two pairs that
    touch the merged symbol change, so we update those two. O(n^2) for n symbols, in C (min, index)."""
    ranks = [merge_rank.get(pair, NO_MERGE) for pair in zip(symbols, symbols[1:])]
    while ranks:
        best = min(ranks)
        if best == NO_MERGE:
            break
        i = ranks.index(best)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        del ranks[i]
        if i > 0:
            ranks[i - 1] = merge_rank.get((symbols[i - 1], symbols[i]), NO_MERGE)
        if i < len(ranks):
            ranks[i] = merge_rank.get((symbols[i], symbols[i + 1]), NO_MERGE)
    return symbols


def merge_lowest_rank_first_heap(symbols, merge_rank):
    """The same merges in the same order, in O(n log n), for long words (a run of 100k spaces would take
    minutes above). The candidate pairs wait in a heap ordered by (rank, position); the symbols form a
    linked list (right[i]: the next live symbol after i), merged ones become None. A heap entry goes
    stale when a neighbour merges; we skip it when the pair now at its position is not the one pushed."""
    n = len(symbols)
    right = list(range(1, n + 1))  # right[i] == n: no symbol to the right
    left = list(range(-1, n - 1))  # left[i] == -1: no symbol to the left
    heap = [(merge_rank[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in merge_rank]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = right[i]
        if symbols[i] is None or j == n or merge_rank.get((symbols[i], symbols[j])) != rank:
            continue  # stale
        symbols[i], symbols[j] = symbols[i] + symbols[j], None  # merge j into i, unlink j
        right[i] = right[j]
        if right[i] < n:
            left[right[i]] = i
        for a, b in ((left[i], i), (i, right[i])):  # the merged symbol's new pairs
            if a >= 0 and b < n and (symbols[a], symbols[b]) in merge_rank:
                heapq.heappush(heap, (merge_rank[symbols[a], symbols[b]], a))
    return [s for s in symbols if s is not None]


class ByteLevelBPE:
    """Encode: cut out added tokens -> normalize -> pre-tokenize into words -> each word's UTF-8 bytes as
    characters (bytes_to_unicode) -> merge adjacent symbols, lowest merge rank first -> vocabulary ids."""

    def __init__(self, tokenizer_json, where):
        model = tokenizer_json["model"]
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(key):
                raise ValueError(f"{where}: BPE option {key}={model[key]!r} is not supported")
        self.vocab = model["vocab"]  # token string (bytes_to_unicode characters) -> id
        self.ignore_merges = model.get("ignore_merges", False)
        # merge rank: (left, right) -> position in the merge list; merges learned earlier apply first.
        self.merge_rank = {}
        for rank, merge in enumerate(model["merges"]):
            pair = merge.split(" ") if isinstance(merge, str) else merge  # "Ġ t" or ["Ġ", "t"]
            if len(pair) != 2:
                raise ValueError(f"{where}: merge #{rank} {merge!r} is not a pair of tokens")
            if "".join(pair) not in self.vocab:
                raise ValueError(f"{where}: merge #{rank} {merge!r} makes {''.join(pair)!r}, "
                                 f"which is not in the vocabulary")
            self.merge_rank[tuple(pair)] = rank
        self.normalizers = parse_normalizer(tokenizer_json.get("normalizer"), where)
        self.pre_tokenizer = parse_pre_tokenizer(tokenizer_json.get("pre_tokenizer"), where)

        added = tokenizer_json.get("added_tokens", [])
        self.added_id = {t["content"]: t["id"] for t in added}
        self.added_pattern = added_tokens_pattern(added)
        self.special_ids = {t["id"] for t in added if t.get("special")}

        # decode table: id -> bytes. Vocabulary tokens are strings of byte characters; added tokens are
        # their own text. (A token with a character outside the byte table is taken as text, as in
        # `tokenizers`' ByteLevel decoder.)
        self.token_bytes = {id: bytes(CHAR_TO_BYTE[c] for c in token) if all(c in CHAR_TO_BYTE for c in token)
                            else token.encode("utf-8") for token, id in self.vocab.items()}
        self.token_bytes.update({id: token.encode("utf-8") for token, id in self.added_id.items()})
        self.id_to_str = {id: token for token, id in self.vocab.items()}
        self.id_to_str.update({id: token for token, id in self.added_id.items()})
        self.vocab_size = max(self.id_to_str) + 1
        self.where = where
        self.warned_bytes = set()
        self.cache = {}  # word -> ids: in real text a few thousand words make up most of the words
        self.bos_id = self.eos_id = self.pad_id = None  # set by load_tokenizer from the config files

    def encode(self, text):
        ids = []
        for piece in split_on_added_tokens(text, self.added_pattern, self.added_id):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_ordinary(self, text):
        """Encode text that holds no added tokens."""
        for normalize in self.normalizers:
            text = normalize(text)
        words = [text]
        for split in self.pre_tokenizer:
            words = [piece for word in words for piece in split(word)]
        ids = []
        for word in words:
            word_ids = self.cache.get(word)
            if word_ids is None:
                if len(self.cache) >= 200_000:  # bound the memory on huge datasets; refills in a moment
                    self.cache.clear()
                word_ids = self.cache[word] = self.bpe(word)
            ids.extend(word_ids)
        return ids

    def bpe(self, word):
        """One pre-tokenized word -> ids. Start from single bytes and repeatedly merge the adjacent pair
        with the lowest merge rank (the leftmost if tied), as `tokenizers` does, until no pair has a merge."""
        chars = "".join([BYTE_TO_CHAR[b] for b in word.encode("utf-8")])
        if self.ignore_merges and chars in self.vocab:  # Llama 3: a word that is in the vocabulary is
            return [self.vocab[chars]]                  # one token, whatever the merges would make of it
        symbols = [c for c in chars if c in self.vocab]
        if len(symbols) < len(chars):  # SmolLM2 lacks a few bytes (0x1d, 0xf1, ...): `tokenizers` drops them
            self.warn_missing_bytes(word, chars)
        symbols = merge_lowest_rank_first(symbols, self.merge_rank) if len(symbols) <= 500 \
            else merge_lowest_rank_first_heap(symbols, self.merge_rank)
        return [self.vocab[s] for s in symbols]  # every merge result is in the vocabulary (checked at load)

    def warn_missing_bytes(self, word, chars):
        missing = {CHAR_TO_BYTE[c] for c in chars if c not in self.vocab} - self.warned_bytes
        if missing:
            self.warned_bytes |= missing
            warnings.warn(f"{self.where}: no token for byte(s) {', '.join(hex(b) for b in sorted(missing))} "
                          f"(in {word!r}); dropped, as the `tokenizers` library does", stacklevel=5)

    def decode_bytes(self, ids):
        """ids -> the raw bytes, possibly ending inside a UTF-8 character (see stream_text).
        Concatenative: decode_bytes(a + b) == decode_bytes(a) + decode_bytes(b)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # torch / numpy
        try:
            return b"".join([self.token_bytes[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"{self.where}: token id {e.args[0]} is not in the vocabulary "
                             f"(size {self.vocab_size})") from None

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token):
        """Token string as stored in the vocabulary ("Ġhello", "<|im_end|>") -> id, or None."""
        return self.added_id.get(token, self.vocab.get(token))

    def id_to_token(self, id):
        if id not in self.id_to_str:
            raise ValueError(f"{self.where}: token id {id} is not in the vocabulary (size {self.vocab_size})")
        return self.id_to_str[id]


# ----------------------------------------------------------------------------------------------------
# 2. SentencePiece (Kudo & Richardson 2018) through the sentencepiece package


class SentencePieceTokenizer:
    """tokenizer.model, with the added/special tokens cut out of the text first and each stretch of text
    between them encoded on its own. SentencePiece starts every text it encodes with a word-start "▁"
    (add_dummy_prefix); after an added token that would turn "[INST] Hello" into "[INST]", "▁", "▁Hello".
    As mistral-common (which encodes each message on its own) and transformers do, the text's own
    space after an added token is that "▁" instead: "[INST]", "▁Hello". With no space there,
    legacy=True (the default, and what sentencepiece, mistral-common and Meta's Llama 2 code do) still
    starts a word: "<s>[INST]" -> "<s>", "▁[", ...; legacy=False (tokenizer_config.json's "legacy": false,
    as Mistral-7B-Instruct-v0.3 has; Metaspace prepend_scheme "first" in transformers) does not:
    "[INST]Hi" -> "[INST]", "Hi". The text's start is encoded by sentencepiece itself either way."""

    def __init__(self, model_path, added_tokens, legacy=True):
        self.where = str(model_path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        # The same model without the word-start "▁" (add_dummy_prefix=false), for text after an added
        # token. A protobuf parser merges a message field that comes twice, so appending a normalizer_spec
        # (field 3) holding only add_dummy_prefix (its field 3) = false changes just that setting.
        self.sp_no_prefix = sentencepiece.SentencePieceProcessor(
            model_proto=self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00")
        self.legacy = legacy
        n = self.sp.get_piece_size()
        # The model's own control pieces (<s>, </s>) and <unk> are special tokens too: "</s>" written in
        # the text means the id, as in Hugging Face.
        own = [{"content": self.sp.id_to_piece(i), "id": i, "special": True}
               for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)]
        # Gemma's tokenizer_config.json lists its whitespace pieces ("▁▁", ...) as added tokens: they are
        # the model's own pieces (same id), which sentencepiece encodes and decodes (as spaces) itself.
        added_tokens = [t for t in added_tokens if not ("▁" in t["content"] and not t.get("special")
                                                        and t["id"] < n and self.sp.id_to_piece(t["id"]) == t["content"])]
        added = {t["content"]: t for t in own + list(added_tokens)}.values()
        self.added_id = {t["content"]: t["id"] for t in added}
        self.added_str = {t["id"]: t["content"] for t in added}
        self.added_pattern = added_tokens_pattern(list(added))
        self.special_ids = {t["id"] for t in added if t.get("special")}
        self.vocab_size = max([n, *(id + 1 for id in self.added_str)])
        # defaults from the model file; load_tokenizer overrides them from the config files
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def encode(self, text):
        ids = []
        for k, piece in enumerate(split_on_added_tokens(text, self.added_pattern, self.added_id)):
            if isinstance(piece, int):
                ids.append(piece)
            elif k > 0 and (piece.startswith(" ") or not self.legacy):  # after an added token (see above)
                ids.extend(self.sp_no_prefix.encode(piece))
            else:
                ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids, skip_special_tokens=False):
        """Runs of ordinary ids go through sentencepiece's decoder, which drops the "▁" a run starts with,
        except after an added token with legacy=False, where that "▁" is a space of the text; added
        tokens are their text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        self.check_ids(ids)
        text, run, after_added = [], [], False
        for i in ids:
            if i in self.added_str:
                text.append(self.decode_run(run, after_added))
                run, after_added = [], True
                if not (skip_special_tokens and i in self.special_ids):
                    text.append(self.added_str[i])
            else:
                run.append(i)
        text.append(self.decode_run(run, after_added))
        return "".join(text)

    def decode_run(self, run, after_added):
        return (self.sp_no_prefix if after_added and not self.legacy else self.sp).decode(run)

    def decode_bytes(self, ids):
        """ids -> raw bytes, concatenative like ByteLevelBPE.decode_bytes: each piece's "▁" is a space
        (including the first one, which decode() drops); byte-fallback pieces "<0xE2>" are that byte."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        self.check_ids(ids)
        out = []
        for i in ids:
            if i in self.added_str:
                out.append(self.added_str[i].encode("utf-8"))
            elif self.sp.is_byte(i):
                out.append(bytes([int(self.sp.id_to_piece(i)[3:5], 16)]))
            else:
                out.append(self.sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
        return b"".join(out)

    def check_ids(self, ids):
        for i in ids:
            if not (0 <= i < self.sp.get_piece_size() or i in self.added_str):
                raise ValueError(f"{self.where}: token id {i} is not in the vocabulary "
                                 f"(size {self.vocab_size})")

    def token_to_id(self, token):
        """Piece string ("▁hello", "</s>") -> id, or None."""
        if token in self.added_id:
            return self.added_id[token]
        id = self.sp.piece_to_id(token)  # sentencepiece answers unk_id for strings it does not know
        return None if self.sp.is_unknown(id) and token != self.sp.id_to_piece(id) else id

    def id_to_token(self, id):
        self.check_ids([id])
        return self.added_str[id] if id in self.added_str else self.sp.id_to_piece(id)


# ----------------------------------------------------------------------------------------------------
# Loading a Hugging Face model folder


def read_json(path):
    """The JSON file at path as a dict; {} when there is no such file."""
    if not Path(path).exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None


def special_token_id(tok, name, tokenizer_config, other_configs, where):
    """The id of the bos/eos/pad token (name "bos"/"eos"/"pad"): tokenizer_config.json's "bos_token"
    (a string or {"content": ...}) if it has the key, else "bos_token_id" from config.json or
    generation_config.json, else the tokenizer file's own default (sentencepiece has one) or None.
    An explicit null in tokenizer_config.json means none: Qwen2 has "bos_token": null and adds no BOS,
    though its config.json names a bos_token_id."""
    if f"{name}_token" in tokenizer_config and tokenizer_config[f"{name}_token"] is None:
        return None
    token = tokenizer_config.get(f"{name}_token")
    if isinstance(token, dict):
        token = token.get("content")
    if token is not None:
        id = tok.token_to_id(token)
        if id is None:
            raise ValueError(f"{where}: {name}_token {token!r} is not a token of the tokenizer")
        return id
    for config in other_configs:
        id = config.get(f"{name}_token_id")
        if isinstance(id, list):  # generation_config.json may list several eos ids; the first is the main one
            id = id[0] if id else None
        if id is not None:
            return id
    return getattr(tok, f"{name}_id")


def load_tokenizer(path):
    """A Hugging Face model folder -> ByteLevelBPE (tokenizer.json holds a byte-level BPE) or
    SentencePieceTokenizer (tokenizer.model), with bos/eos/pad ids and the chat template filled in."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    tokenizer_config = read_json(folder / "tokenizer_config.json")
    tokenizer_json = read_json(folder / "tokenizer.json")
    model_config = read_json(folder / "config.json")
    generation_config = read_json(folder / "generation_config.json")

    model = tokenizer_json.get("model", {})
    byte_level = "ByteLevel" in (component_types(tokenizer_json.get("pre_tokenizer"))
                                 | component_types(tokenizer_json.get("decoder")))
    if model.get("type") == "BPE" and byte_level:
        tok = ByteLevelBPE(tokenizer_json, where=str(folder / "tokenizer.json"))
    elif (folder / "tokenizer.model").exists():
        added = [{"id": int(id), **token}
                 for id, token in tokenizer_config.get("added_tokens_decoder", {}).items()]
        added += tokenizer_json.get("added_tokens", [])
        tok = SentencePieceTokenizer(folder / "tokenizer.model", added,
                                     legacy=tokenizer_config.get("legacy") is not False)
    else:
        found = "a tokenizer.json that is not a byte-level BPE" if tokenizer_json else "neither"
        raise FileNotFoundError(f"{folder}: no tokenizer found (looked for tokenizer.json with a byte-level "
                                f"BPE, or a SentencePiece tokenizer.model; found {found})")

    where = folder / "tokenizer_config.json"
    tok.bos_id = special_token_id(tok, "bos", tokenizer_config, [model_config, generation_config], where)
    tok.eos_id = special_token_id(tok, "eos", tokenizer_config, [model_config, generation_config], where)
    tok.pad_id = special_token_id(tok, "pad", tokenizer_config, [model_config, generation_config], where)
    # Generation stops at any of these: Llama 3 Instruct's generation_config.json lists <|eot_id|> too.
    eos = generation_config.get("eos_token_id")
    tok.stop_ids = {tok.eos_id, *(eos if isinstance(eos, list) else [eos])} - {None}

    # The chat template: a string, or (some repos) a list of {"name", "template"} of which we use
    # "default"; newer transformers write it to chat_template.jinja. chat_templates has them all by name.
    template = tokenizer_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):
        tok.chat_templates = {t["name"]: t["template"] for t in template}
    else:
        tok.chat_templates = {"default": template} if template is not None else {}
    tok.chat_template = tok.chat_templates.get("default")
    tok.folder = str(folder)  # what data_cache.py keys a cache by (the files above)
    return tok
