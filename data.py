"""From data files to training batches: loading, splitting, mixing, truncation, batching, --show.

    python data.py --config configs/x.py --show 3               # 3 rendered examples + statistics
    python data.py --data data/examples/alpaca.jsonl --model models/SmolLM2-135M-Instruct --show 2

1. Loading. JSONL files, or JSON files holding a list of records (or one record), in five formats,
   detected per file from the keys of its first record or set with data_format: alpaca {instruction,
   input?, output}, messages {messages: [{role, content}]}, sharegpt {conversations: [{from, value}]},
   prompt_completion {prompt, completion} and text {text} (continued pre-training). Each becomes a list
   of {"role", "content"} messages (alpaca and prompt/completion: user + assistant; text: one assistant
   message, rendered with the plain template).
2. Datasets. A validation split by fraction with a fixed seed (or a validation file), a weighted
   mixture of several files, rendering with templates.py (exact masks), truncation to seq_len.
3. Batches. A deterministic plan of example indices per (seed, epoch): batches of similar lengths, or
   packed rows; collate turns one entry into tensors, with the shift to next-token targets, position
   ids restarting per example and a block-diagonal causal mask for packed rows.

Bad input (a malformed line, a missing field, an unknown role, a non-string content, an empty file, an
example with no trained token left) stops with "file:line: reason", or with on_bad_data="skip" is
skipped and counted in DataStats. Nothing is dropped without being counted.
"""
from config import quiet_ctrl_c

quiet_ctrl_c(__name__)  # first: Ctrl-C while torch loads (seconds) exits 130, no traceback

import bisect
import functools
import gc
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from config import ConfigError, UserError, fetch_model, parse_cli, script
from templates import (IGNORE, TEMPLATES, DataError, TemplateError, check_messages, detect_template,  # noqa: F401
                       format_chat, render, resolve_template, stop_ids, token_spans)

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference")
WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class DataStats:
    """What loading did, counted per split ("train", "val") and per reason. Printed by report()."""
    examples: Counter = field(default_factory=Counter)        # split -> examples kept
    tokens: Counter = field(default_factory=Counter)          # split -> tokens in them
    trained_tokens: Counter = field(default_factory=Counter)  # split -> tokens that get a loss
    truncated: Counter = field(default_factory=Counter)       # split -> kept, cut to seq_len
    dropped: Counter = field(default_factory=Counter)         # (split, reason) -> examples left out
    skipped: Counter = field(default_factory=Counter)         # reason -> bad records skipped
    notes: list = field(default_factory=list)                 # the first messages of skipped records
    lines: list = field(default_factory=list)                 # what was picked (template, mixture)
    template: str = ""                                        # the template family used ("chatml", ...)

    def skip(self, error):
        self.skipped[error.kind] += 1
        if len(self.notes) < 5:
            self.notes.append(str(error))

    def report(self):
        out = list(self.lines)
        for split in sorted(self.examples.keys() | {s for s, _ in self.dropped}, key=lambda s: s != "train"):
            n, tokens, trained = self.examples[split], self.tokens[split], self.trained_tokens[split]
            dropped = {reason: k for (s, reason), k in self.dropped.items() if s == split}
            out.append(f"{split}: {n:,} examples, {tokens:,} tokens, {trained:,} trained tokens "
                       f"({100 * trained / max(tokens, 1):.1f}%), truncated {self.truncated[split]:,}, "
                       f"dropped {sum(dropped.values()):,}" + (f" {dict(dropped)}" if dropped else ""))
        skipped = sum(self.skipped.values())
        out.append(f"skipped bad records: {skipped:,}" + (f" {dict(self.skipped)}" if skipped else ""))
        out += [f"  e.g. {note}" for note in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# 1. Loading: files -> records -> conversations


def read_records(path, on_bad, stats):
    """[(line number, parsed JSON value)] of a data file: JSONL (one record per line), or JSON that is
    one value over any number of lines: a list of records, or one record. Text after that value is
    an error per line (with on_bad = "skip", each line is skipped and counted), never ignored."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a data file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    start = WHITESPACE.match(text).end()
    if text.startswith("[", start):  # a JSON list of records; one broken item breaks the whole file
        records, end = json_list_items(text, path, start)
    elif (one := one_json_record(text, start)) is not None:
        records, end = one
    else:
        return jsonl_records(text, path, on_bad, stats)
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    for number, line in enumerate(text[end:].split("\n"), start=line_of(end)):
        if line.strip():
            error = DataError(f"{path}:{number}: text after the JSON value that ends on line {line_of(end)} (a JSON "
                              f"file is one list of records, or one record; JSONL has one record per line)",
                              "text after the JSON value")
            if on_bad == "stop":
                raise error
            stats.skip(error)
    return records


def one_json_record(text, start):
    """([(line, record)], the position after it) when the text starts with one JSON object spread over
    several lines (its first line is no JSON value by itself, as each line of JSONL is), else None."""
    first_line = text[start:].split("\n", 1)[0]
    try:
        json.loads(first_line)
        return None
    except json.JSONDecodeError:
        pass
    try:
        record, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None  # read as JSONL, which names the first malformed line
    return ([(text.count("\n", 0, start) + 1, record)], end) if isinstance(record, dict) else None


def jsonl_records(text, path, on_bad, stats):
    """[(line number, parsed JSON value)] of JSONL text; a malformed line stops, or is skipped and counted."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            error = DataError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})", "malformed JSON")
            if on_bad == "stop":
                raise error from None
            stats.skip(error)
    return records


def json_list_items(text, path, start):
    """(the items of the JSON list at `start`, each with the line it starts on; the position after it)."""
    decoder, items, line, last = json.JSONDecoder(), [], 1, 0
    pos = start + 1
    while True:
        pos = WHITESPACE.match(text, pos).end()
        if text.startswith("]", pos):
            return items, pos + 1
        line, last = line + text.count("\n", last, pos), pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (a broken JSON list cannot "
                            f"be skipped in part; fix it or use JSONL)") from None
        items.append((line, item))
        pos = WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{line + text.count(chr(10), last, pos)}: malformed JSON: "
                            f"expected ',' or ']' after a list item")


def detect_format(records, path):
    """The format of a file, from the keys of its first record."""
    keys = {"chosen": "preference", "messages": "messages", "conversations": "sharegpt", "instruction": "alpaca",
            "prompt": "prompt_completion", "text": "text"}
    for line, record in records:
        if isinstance(record, dict):
            for key, fmt in keys.items():
                if key in record:
                    return fmt
            raise DataError(f"{path}:{line}: cannot tell the data format from the keys {sorted(record)}; "
                            f"expected one of {sorted(keys)}, or set data_format")
    raise DataError(f"{path}: no JSON object in the file to tell the data format from")


def text_field(record, key, optional=False):
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise DataError(f"missing field '{key}'", "missing field")
    if not isinstance(value, str):
        raise DataError(f"field '{key}' is {type(value).__name__}, expected a string", "non-string content")
    return value


def list_field(record, key):
    if key not in record:
        raise DataError(f"missing field '{key}'", "missing field")
    if not isinstance(record[key], list) or not record[key]:
        raise DataError(f"field '{key}' should be a non-empty list of messages", "bad messages")
    return record[key]


def to_pair(record):
    """A preference record -> {"chosen": messages, "rejected": messages}: the shared prompt (a string,
    or a list of messages) followed by each answer (a string, or a list of one assistant message)."""
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        check_messages(prompt)
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        prompt = [{"role": "user", "content": text_field(record, "prompt")}]
    pair = {}
    for side in ("chosen", "rejected"):
        answer = record.get(side)
        if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict) \
                and answer[0].get("role") == "assistant":
            answer = answer[0].get("content")
        if side not in record or not isinstance(answer, str):
            raise DataError(f"field '{side}' should be a string or a list of one assistant message",
                            "bad preference answer")
        pair[side] = prompt + [{"role": "assistant", "content": answer}]
        check_messages(pair[side])
    if pair["chosen"] == pair["rejected"]:
        raise DataError("chosen and rejected are the same answer", "chosen equals rejected")
    return pair


def to_messages(record, fmt):
    """One record of format `fmt` -> [{"role", "content"}, ...] ({"chosen": ..., "rejected": ...} for
    a preference record). Raises DataError (no place yet)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", "not an object")
    if fmt == "preference":
        return to_pair(record)
    if fmt == "alpaca":  # the optional input follows the instruction after a blank line
        instruction, extra = text_field(record, "instruction"), text_field(record, "input", optional=True)
        system = text_field(record, "system", optional=True)
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": instruction + ("\n\n" + extra if extra else "")},
                     {"role": "assistant", "content": text_field(record, "output")}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": text_field(record, "prompt")},
                    {"role": "assistant", "content": text_field(record, "completion")}]
    elif fmt == "text":  # continued pre-training: the whole text is trained, with template "plain"
        messages = [{"role": "assistant", "content": text_field(record, "text")}]
    elif fmt == "messages":  # keep role and content only (some datasets add "name", "weight", ...)
        messages = list_field(record, "messages")
        check_messages(messages)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:  # sharegpt
        messages = []
        for k, turn in enumerate(list_field(record, "conversations")):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"conversations[{k}] should be an object with 'from' and 'value'", "missing field")
            if turn["from"] not in SHAREGPT_ROLES:
                raise DataError(f"conversations[{k}]: unknown role {turn['from']!r} (expected one of "
                                f"{', '.join(SHAREGPT_ROLES)})", "unknown role")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    check_messages(messages)
    return messages


def read_conversations(path, fmt="auto", on_bad="stop", stats=None):
    """(format, [(place 'file:line', messages)]) of one file; bad records stop or are counted."""
    if fmt not in ("auto",) + FORMATS:
        raise DataError(f"unknown data format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    stats = stats if stats is not None else DataStats()
    records = read_records(path, on_bad, stats)
    if not records:
        error = DataError(f"{path}: empty file (no records)", "empty file")
        if on_bad == "stop":
            raise error
        stats.skip(error)
        return fmt, []
    fmt = detect_format(records, path) if fmt == "auto" else fmt
    conversations = []
    for line, record in records:
        try:
            conversations.append((f"{path}:{line}", to_messages(record, fmt)))
        except DataError as e:
            error = DataError(f"{path}:{line}: {e}", e.kind)
            if on_bad == "stop":
                raise error from None
            stats.skip(error)
    return fmt, conversations


def load_conversations(path, format="auto"):
    """Every record of a file as a list of {"role", "content"} messages; stops at the first bad one."""
    return [messages for _, messages in read_conversations(path, format)[1]]


# ---------------------------------------------------------------------------------------------------
# 2. Datasets: split, render, truncate, mix


def split_val(conversations, fraction, seed):
    """(train, val): a seeded random `fraction` of the conversations, at least one if fraction > 0."""
    if fraction <= 0 or len(conversations) < 2:
        return conversations, []
    order = np.random.default_rng(seed).permutation(len(conversations))
    n_val = min(max(1, round(fraction * len(conversations))), len(conversations) - 1)
    val = set(order[:n_val].tolist())
    return ([c for k, c in enumerate(conversations) if k not in val],
            [c for k, c in enumerate(conversations) if k in val])


def render_examples(conversations, tokenizer, resolved, cfg, split, stats):
    """Rendered examples {"input_ids", "labels" (int32 arrays), "source"}, truncated or dropped to
    seq_len, every drop and skip counted in stats under `split`. A preference pair gives the chosen
    side's example with the rejected one under "rejected" (only the final answer trained on each)."""
    examples = []
    for source, messages in conversations:
        pair = isinstance(messages, dict)
        try:
            sides = ([render_one(messages[side], tokenizer, resolved, cfg, "last") for side in ("chosen", "rejected")]
                     if pair else [render_one(messages, tokenizer, resolved, cfg, cfg.train_on)])
        except DataError as e:
            error = DataError(f"{source}: {e}", e.kind)
            if cfg.on_bad_data == "stop":
                raise error from None
            stats.skip(error)
            continue
        if None in sides:
            stats.dropped[(split, f"longer than seq_len={cfg.seq_len}")] += 1
            continue
        stats.truncated[split] += any([side.pop("truncated") for side in sides])
        examples.append(dict(sides[0], source=source, **({"rejected": sides[1]} if pair else {})))
    return examples


def render_one(messages, tokenizer, resolved, cfg, train_on):
    """{"input_ids", "labels", "truncated"} of one conversation, cut to seq_len (None: dropped)."""
    ids, labels = render(messages, tokenizer, train_on=train_on, resolved=resolved)
    if not any(label != IGNORE for label in labels):
        raise DataError("no trained token (no assistant message?)", "no trained token")
    truncated = len(ids) > cfg.seq_len
    if truncated and cfg.truncation == "drop":
        return None
    ids, labels = ids[:cfg.seq_len], labels[:cfg.seq_len]
    if truncated and not any(label != IGNORE for label in labels):
        raise DataError(f"no trained token left after truncation to seq_len={cfg.seq_len}",
                        "no trained token after truncation")
    return {"input_ids": np.array(ids, dtype=np.int32), "labels": np.array(labels, dtype=np.int32),
            "truncated": truncated}


def count(examples, split, stats):
    stats.examples[split] += len(examples)
    if hasattr(examples, "counts"):  # cached examples: from their per-example counts, no token read
        tokens, trained = examples.counts()
    else:
        tokens = sum(len(ex["input_ids"]) + len(ex.get("rejected", {}).get("input_ids", ())) for ex in examples)
        trained = count_trained(examples, [range(len(examples))])
    stats.tokens[split] += tokens
    stats.trained_tokens[split] += trained


def mix(parts, weights, seed):
    """A weighted mixture of several datasets: one epoch has as many examples as all parts together,
    part i contributing a share weights[i] / sum(weights) of them, drawn without replacement from a
    seeded shuffle of the part (and cycling through it again when the share is larger than the part)."""
    total, rng, mixture = sum(len(p) for p in parts), np.random.default_rng(seed), []
    bounds = np.round(total * np.cumsum([0.0, *weights]) / sum(weights)).astype(int)  # shares sum to total
    for part, n in zip(parts, np.diff(bounds)):
        if part and n:
            order = np.concatenate([rng.permutation(len(part)) for _ in range(-(-n // len(part)))])[:n]
            mixture += [part[i] for i in order]
    return mixture


def check_data_files(cfg):
    """The train_data files, after checking that the data settings make sense and every file exists:
    a ConfigError names the first problem, before anything is loaded or written."""
    files = [cfg.train_data] if isinstance(cfg.train_data, str) else list(cfg.train_data)
    if not files:
        raise ConfigError("train_data is empty: give one data file or a list of them")
    if cfg.data_weights and len(cfg.data_weights) != len(files):
        raise ConfigError(f"data_weights has {len(cfg.data_weights)} weights for {len(files)} train_data files")
    for key, allowed in [("data_format", ("auto",) + FORMATS), ("template", ("auto",) + tuple(TEMPLATES))]:
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} = {getattr(cfg, key)!r} should be one of {', '.join(allowed)}")
    for key, paths in [("train_data", files), ("val_data", [cfg.val_data] if cfg.val_data else [])]:
        for path in paths:
            if not os.path.isfile(path):
                raise ConfigError(f"{key}: {path}: " + ("is a directory, not a data file" if os.path.isdir(path)
                                                        else "file not found"))
    return files


def load_datasets(cfg, tokenizer, log=print):
    """(train examples, val examples, DataStats) for a run: read cfg.train_data (a mixture when
    data_weights is set), split off val_fraction with cfg.seed unless val_data is given, render,
    truncate/drop to seq_len. Text-format files use template plain. Logs what it picked.
    With data_cache (the default) the rendered examples come from data_cache.py's memory-mapped
    cache, built on the first start: the same examples and statistics, not rendered again."""
    files = check_data_files(cfg)
    stats = DataStats()
    cached = None
    if cfg.data_cache:
        import data_cache  # it imports this module
        cached = data_cache.load_parts(cfg, tokenizer, files, stats, log)
    if cached is not None:
        train_parts, val = cached
        join = data_cache.Examples.join
        mixture = data_cache.Examples.mix
    else:
        render = lambda conversations, template, split: render_examples(  # noqa: E731
            conversations, tokenizer, template, cfg, split, stats)
        train_parts, val_parts = render_parts(cfg, tokenizer, files, stats, render)
        val = [ex for part in val_parts for ex in part]
        join, mixture = (lambda parts: [ex for part in parts for ex in part]), mix
    train = mixture(train_parts, cfg.data_weights, cfg.seed) if cfg.data_weights else join(train_parts)
    if cfg.data_weights:
        shares = source_file_counts(train)
        stats.lines.append("mixture: " + ", ".join(f"{f} {shares[f]:,}" for f in files))
    count(train, "train", stats)
    count(val, "val", stats)
    for line in stats.report().splitlines():
        log(f"data: {line}")
    if not train:
        raise DataError("no training examples left: all were skipped or dropped (see the statistics)")
    return train, val, stats


def render_parts(cfg, tokenizer, files, stats, render):
    """([train examples of each file], [validation parts]): each file read, split (val_fraction, per
    file, seed + its position) unless val_data is given, and rendered by render(conversations, template,
    split) -> examples, in this order (the order of the statistics' notes). data_cache builds with it."""
    resolved = resolve_template(cfg.template, tokenizer)
    stats.template = resolved[0]
    stats.lines.append(resolved[2])
    plain = resolve_template("plain", tokenizer)  # for text-format files (continued pre-training)

    def load(path):
        fmt, conversations = read_conversations(path, cfg.data_format, cfg.on_bad_data, stats)
        stats.lines.append(f"{path}: {fmt}, {len(conversations):,} records")
        return (plain if fmt == "text" else resolved), conversations

    train_parts, val_parts = [], []
    for k, path in enumerate(files):
        template, conversations = load(path)
        if not cfg.val_data:  # split each file on its own, so that every task has validation examples
            conversations, val_part = split_val(conversations, cfg.val_fraction, cfg.seed + k)
            val_parts.append(render(val_part, template, "val"))
        train_parts.append(render(conversations, template, "train"))
    if cfg.val_data:
        template, conversations = load(cfg.val_data)
        val_parts.append(render(conversations, template, "val"))
    return train_parts, val_parts


def source_file_counts(examples):
    """{file: how many of the examples come from it}."""
    if hasattr(examples, "file_counts"):  # cached examples count without making a "source" string each
        return examples.file_counts()
    return Counter(ex["source"].rsplit(":", 1)[0] for ex in examples)


def example_lengths(examples):
    """The token count of each example, an array (cached examples know it without reading tokens)."""
    lengths = getattr(examples, "lengths", None)
    return np.asarray(lengths) if lengths is not None else np.array([len(ex["input_ids"]) for ex in examples])


# ---------------------------------------------------------------------------------------------------
# 3. Batches: a deterministic plan (indices), then collate (tensors)


def without_gc(fn):
    """fn with Python's cyclic garbage collector paused: for a builder of a million small lists that
    hold no reference cycles (the collector finds nothing in them, yet walks them again and again
    as they grow)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        was_on = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_on:
                gc.enable()
    return wrapped


@without_gc
def plan_batches(examples, batch_size, seq_len, packing="none", seed=0, epoch=0):
    """The batches of one epoch as example indices: [batch][row][example index]. The same (seed, epoch)
    always gives the same plan, so a resumed run continues exactly and ranks can take plan[rank::world].
    packing="none": one example per row; examples are shuffled, sorted by length within chunks of
    64 batches (similar lengths share a batch: little padding), cut into batches, batches shuffled.
    packing="packed": rows of up to seq_len tokens filled best-fit (each example into the fullest row
    it fits in), rows shuffled, batch_size rows per batch."""
    rng = np.random.default_rng([seed, epoch])
    lengths = example_lengths(examples)
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"an example has {lengths.max()} tokens > seq_len={seq_len}")
    order = rng.permutation(len(examples))
    if packing == "none":
        chunk = np.arange(len(order)) // (64 * batch_size)
        order = order[np.lexsort((lengths[order], chunk))]  # by chunk, then by length (a stable sort)
        full = len(order) // batch_size * batch_size  # numpy builds the nested lists, not a loop per row
        batches = order[:full].reshape(-1, batch_size, 1).tolist()
        batches += [order[full:, None].tolist()] if full < len(order) else []
    elif packing == "packed":
        rows, space = [], []  # space: sorted (free tokens, row index) of the rows that still have room
        shortest = max(int(lengths.min()), 1) if len(lengths) else 1  # a row with less room is full for good
        for i, n in zip(order.tolist(), lengths[order].tolist()):  # Python ints: no numpy scalar per step
            k = bisect.bisect_left(space, (n, -1))  # the fullest row with room for n more tokens
            if k == len(space):
                rows.append([])
                free, row = seq_len, len(rows) - 1
            else:
                free, row = space.pop(k)
            rows[row].append(i)
            if free - n >= shortest:
                bisect.insort(space, (free - n, row))
        rng.shuffle(rows)
        batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    else:
        raise ValueError(f"packing={packing!r}: expected none or packed")
    return [batches[k] for k in rng.permutation(len(batches))]


def count_trained(examples, rows):
    """The trained tokens of a planned batch, without collating it (labels[0] is never trained, so an
    example's count is the same before and after the shift)."""
    return sum(int((examples[i]["labels"] != IGNORE).sum()) for row in rows for i in row)


def collate(examples, rows, seq_len, pad_id):
    """The tensors of one planned batch (rows: [row][example index], an entry of plan_batches):
    input_ids (B, T) long: each row's examples back to back, right-padded with pad_id to the longest row.
    targets (B, T) long: targets[b, t] is the token position t is trained to predict (the next token of
        the same example, where trained), else -100. The last token of an example predicts nothing, so
        in a packed row no example is asked to predict the start of the next one.
    position_ids (B, T) long: 0, 1, 2, ... restarting at every example of a packed row.
    attn_mask: None (the plain causal mask) when every row holds one example, else bool (B, 1, T, T),
        block-diagonal causal: True where query t may attend key s (same example, s <= t). Padding
        attends only to padding, so no query row is all False (which would make softmax NaN).
    is_token (B, T) bool: True where the position holds a token, False on padding.
    n_trained: the number of targets != -100 (sum these over an optimizer step to normalize the loss).
    n_tokens: the number of tokens that are not padding."""
    lengths = [sum(len(examples[i]["input_ids"]) for i in row) for row in rows]
    if max(lengths) > seq_len:
        raise ValueError(f"a row of {max(lengths)} tokens is longer than seq_len={seq_len}")
    B, T = len(rows), max(lengths)
    input_ids = np.full((B, T), pad_id if pad_id is not None else 0, dtype=np.int64)
    targets = np.full((B, T), IGNORE, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    segment = np.full((B, T), -1, dtype=np.int64)  # which example of its row each position holds
    for b, row in enumerate(rows):
        pos = 0
        for k, i in enumerate(row):
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            n = len(ids)
            input_ids[b, pos:pos + n] = ids
            targets[b, pos:pos + n - 1] = labels[1:]  # the shift: position t predicts token t + 1
            position_ids[b, pos:pos + n] = np.arange(n)
            segment[b, pos:pos + n] = k
            pos += n
        position_ids[b, pos:] = np.arange(T - pos)
    attn_mask = None
    if any(len(row) > 1 for row in rows):
        segment = torch.from_numpy(segment)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attn_mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    targets = torch.from_numpy(targets)
    is_token = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    return {"input_ids": torch.from_numpy(input_ids), "targets": targets, "is_token": is_token,
            "position_ids": torch.from_numpy(position_ids), "attn_mask": attn_mask,
            "n_trained": int((targets != IGNORE).sum()), "n_tokens": sum(lengths)}


def collate_pairs(examples, rows, seq_len, pad_id):
    """The batch of a planned batch of preference pairs (one pair per row): the P chosen sides, then
    the P rejected ones, as collate makes them (2P rows), and "n_pairs": P."""
    flat = [examples[i] for row in rows for i in row]
    flat += [ex["rejected"] for ex in flat]
    batch = collate(flat, [[i] for i in range(len(flat))], seq_len, pad_id)
    P = len(flat) // 2  # n_trained: the chosen answers' tokens, as count_trained counts them
    return dict(batch, n_pairs=P, n_trained=int((batch["targets"][:P] != IGNORE).sum()))


# ---------------------------------------------------------------------------------------------------
# 4. Looking at the data: python data.py --show N


def utf8_complete(buf):
    """Length of the longest prefix of buf that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(buf)) + 1):
        lead = buf[-back]
        if lead >> 6 != 0b10:  # not a continuation byte: does its character fit?
            size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            return len(buf) if back >= size else len(buf) - back
    return len(buf)


def show(examples, tokenizer, n, color=None, file=None):
    """Print n examples token by token. On a terminal trained tokens are green and masked ones grey (two
    shades alternating, so token boundaries show); otherwise trained stretches are wrapped in «...».
    Newlines show as ↵."""
    file = file or sys.stdout
    color = file.isatty() if color is None else color
    shades = {True: ("\033[32m", "\033[92m"), False: ("\033[90m", "\033[37m")}
    for ex in examples[:n]:
        ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
        print(f"--- {ex['source']}: {len(ids)} tokens, {sum(l != IGNORE for l in labels)} trained", file=file)
        out, pending, was_trained = [], b"", False
        for k, (i, label) in enumerate(zip(ids, labels)):
            trained = label != IGNORE
            pending += tokenizer.decode_bytes([i])
            cut = utf8_complete(pending)
            text = pending[:cut].decode("utf-8", errors="replace").replace("\n", "↵\n")
            pending = pending[cut:]
            if color:
                out.append(shades[trained][k % 2] + text)
            else:  # «» around each trained stretch
                out.append(("«" if trained > was_trained else "»" if was_trained > trained else "") + text)
            was_trained = trained
        out.append("\033[0m" if color else "»" if was_trained else "")
        print("".join(out), file=file)


@script
def main(argv=None):
    cfg, flags = parse_cli(sys.argv[1:] if argv is None else argv, {"show": 3, "data": ""}, {"show": "[0, inf)"})
    if flags["data"]:  # a quick look at one file: all of it, no validation split
        cfg.train_data, cfg.data_weights, cfg.val_data, cfg.val_fraction = [flags["data"]], [], "", 0.0
    from tokenizer import load_tokenizer
    try:
        tokenizer = load_tokenizer(fetch_model(cfg.model))
        train, val, stats = load_datasets(cfg, tokenizer)  # prints the statistics
    except (OSError, ValueError) as e:  # a file that cannot be read
        raise UserError(str(e)) from None
    show(train, tokenizer, flags["show"])


if __name__ == "__main__":
    sys.exit(main())
