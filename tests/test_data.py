"""data.py: every format loads, bad input stops with file:line (or is skipped and counted), masks line
up exactly with the whole-text token ids, and batches are deterministic, padded little and packed
without one example seeing another."""
import io
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import loss
import model as model_lib
from config import Config, ConfigError
from conftest import ROOT, save_tiny_model
from test_templates import CHATML_SPECIALS, SMOLLM2, corpus, make_tokenizer_folder
from tokenizer import load_tokenizer

EXAMPLES = os.path.join(ROOT, "data", "examples")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small SmolLM2-like tokenizer folder: byte-level BPE, ChatML special tokens, SmolLM2's template."""
    extra = ["The capital of France is Paris.", "Rivers carry water to the sea."] * 20
    return make_tokenizer_folder(tmp_path_factory.mktemp("tok") / "smol", CHATML_SPECIALS, "<|im_start|>",
                                 "<|im_end|>", SMOLLM2, corpus() + extra)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def config(paths, **overrides):
    return Config(train_data=list(paths), val_fraction=0.0, **overrides)


def trained_text(tok, ids, labels):
    return tok.decode([i for i, label in zip(ids, labels) if label != -100])


# ---------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("name, fmt, first", [
    ("alpaca.jsonl", "alpaca", [{"role": "user", "content": "Give three tips for staying focused while studying."}]),
    ("messages.jsonl", "messages", [{"role": "user", "content": "What is the capital of Japan?"}]),
    ("sharegpt.json", "sharegpt", [{"role": "user", "content": "How many legs does a spider have?"}]),
    ("prompt_completion.jsonl", "prompt_completion", [{"role": "user", "content": "The opposite of hot is"}]),
    ("text.jsonl", "text", []),
])
def test_every_example_file_loads_with_its_format_detected(name, fmt, first):
    path = os.path.join(EXAMPLES, name)
    detected, conversations = data.read_conversations(path)
    assert detected == fmt and len(conversations) >= 4
    messages = data.load_conversations(path)
    assert messages[0][:-1] == first and messages[0][-1]["role"] == "assistant"


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path):
    path = write(tmp_path, "a.jsonl", [json.dumps({"instruction": "Translate.", "input": "Hello", "output": "Bonjour"}),
                                       json.dumps({"instruction": "Count to 2.", "input": "", "output": "1 2"})])
    assert data.load_conversations(path) == [
        [{"role": "user", "content": "Translate.\n\nHello"}, {"role": "assistant", "content": "Bonjour"}],
        [{"role": "user", "content": "Count to 2."}, {"role": "assistant", "content": "1 2"}]]


def test_sharegpt_roles_map_to_system_user_assistant():
    conversation = data.load_conversations(os.path.join(EXAMPLES, "sharegpt.json"))[1]
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user", "assistant"]


def test_text_record_is_one_assistant_message():
    assert data.load_conversations(os.path.join(EXAMPLES, "text.jsonl"))[0] == [
        {"role": "assistant", "content": "Rivers carry water from high ground to the sea. Along the way they cut "
                                         "valleys, move sand and stones, and build plains where they slow down."}]


BAD_INPUT = {
    "malformed JSON": (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '],
                       r"bad\.jsonl:2: malformed JSON"),
    "missing field": (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'],
                      r"bad\.jsonl:2: missing field 'output'"),
    "unknown role": (['{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}'],
                     r"bad\.jsonl:1: message 1: unknown role 'tool'"),
    "non-string content": (['{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}'],
                           r"bad\.jsonl:1: message 0: content is int, expected a string"),
    "unknown sharegpt role": (['{"conversations": [{"from": "robot", "value": "a"}]}'],
                              r"bad\.jsonl:1: conversations\[0\]: unknown role 'robot'"),
    "not an object": (['{"text": "a"}', '["text", "a"]'], r"bad\.jsonl:2: expected a JSON object, got list"),
    "empty file": ([], r"bad\.jsonl: empty file"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_stops_with_file_line_and_reason(tmp_path, tok, case):
    lines, message = BAD_INPUT[case]
    path = write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(data.DataError, match=message):
        data.load_datasets(config([path]), tok, log=lambda line: None)


def test_error_in_a_json_list_names_the_line_of_the_item(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c"}\n]\n')
    with pytest.raises(data.DataError, match=r"list\.json:4: missing field 'completion'"):
        data.load_conversations(str(path))


@pytest.mark.parametrize("text, line, kept, skipped", [
    ('[{"text": "a"}, {"text": "b"}]\n{"text": "c"}\n{"text": "d"}\n', 2, 2, 2),  # an array, then JSONL records
    ('[\n {"text": "a"}\n] and more\n', 3, 1, 1),                                # an array, then any text
    ('{\n "text": "a"\n}\n{"text": "c"}\n', 4, 1, 1),                            # one record, then another
])
def test_text_after_the_json_value_of_a_file_is_a_file_line_error_or_counted_when_skipped(tmp_path, text, line, kept,
                                                                                         skipped):
    path = tmp_path / "more.json"
    path.write_text(text)
    with pytest.raises(data.DataError, match=rf"more\.json:{line}: text after the JSON value that ends on line"):
        data.read_conversations(str(path))
    stats = data.DataStats()
    assert len(data.read_conversations(str(path), on_bad="skip", stats=stats)[1]) == kept  # the JSON value's records
    assert stats.skipped == {"text after the JSON value": skipped}  # and each line after it, counted


def test_a_json_file_of_one_object_over_several_lines_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{\n  "prompt": "a",\n  "completion": "b"\n}\n')
    assert data.load_conversations(str(path)) == [[{"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}]]


def test_a_data_path_that_is_a_directory_is_called_one(tmp_path):
    with pytest.raises(data.DataError, match=f"{tmp_path}: is a directory, not a data file"):
        data.load_conversations(str(tmp_path))
    with pytest.raises(ConfigError, match=f"val_data: {tmp_path}: is a directory"):
        data.check_data_files(Config(train_data=[os.path.join(EXAMPLES, "alpaca.jsonl")], val_data=str(tmp_path)))


def test_format_set_in_the_config_overrides_detection(tmp_path, tok):
    path = write(tmp_path, "p.jsonl", ['{"prompt": "a", "completion": "b", "text": "c"}'])
    assert data.read_conversations(path, "text")[1][0][1] == [{"role": "assistant", "content": "c"}]
    with pytest.raises(data.DataError, match=r"p\.jsonl:1: missing field 'instruction'"):
        data.read_conversations(path, "alpaca")


def test_skip_mode_skips_and_counts_every_bad_record(tmp_path, tok):
    good = '{"prompt": "The capital of France is", "completion": " Paris."}'
    path = write(tmp_path, "mixed.jsonl", [good, '{"prompt": ', good, '{"prompt": "a"}', '{"prompt": 1, "completion": "b"}',
                                           '{"prompt": "no answer", "completion": ""}'])
    train, _, stats = data.load_datasets(config([path], on_bad_data="skip", template="plain"), tok, log=lambda line: None)
    assert len(train) == 3  # the empty completion still trains its EOS
    assert stats.skipped == {"malformed JSON": 1, "missing field": 1, "non-string content": 1}
    assert "mixed.jsonl:2: malformed JSON" in stats.notes[0]
    assert "skipped bad records: 3" in stats.report()


@pytest.mark.parametrize("overrides, message", [
    (dict(train_data=["nowhere.jsonl"]), "train_data: nowhere.jsonl: file not found"),
    (dict(val_data="nowhere.jsonl"), "val_data: nowhere.jsonl: file not found"),
    (dict(data_weights=[1.0, 2.0]), "data_weights has 2 weights for 1 train_data files"),
    (dict(template="vicuna"), "template = 'vicuna' should be one of auto, chatml"),
    (dict(train_data=[]), "train_data is empty"),
])
def test_data_settings_are_checked_before_anything_loads(overrides, message):
    cfg = Config(**{"train_data": [os.path.join(EXAMPLES, "alpaca.jsonl")], **overrides})
    with pytest.raises(ConfigError, match=message):
        data.check_data_files(cfg)


# ---------------------------------------------------------------------------------------------------
# Exact masks

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]


def test_ids_are_the_tokenization_of_the_whole_rendered_text(tok):
    ids, labels = data.render(CHAT, tok)
    assert ids == tok.encode(data.format_chat(CHAT, "auto", tokenizer=tok))
    assert len(labels) == len(ids)
    assert all(label in (-100, i) for label, i in zip(labels, ids))


def test_every_answer_and_its_end_of_turn_token_is_trained_nothing_else(tok):
    ids, labels = data.render(CHAT, tok)
    end = tok.token_to_id("<|im_end|>")
    ends = [k for k, i in enumerate(ids) if i == end]
    assert len(ends) == 5                                   # system, user, assistant, user, assistant
    assert [labels[k] == end for k in ends] == [False, False, True, False, True]
    assert trained_text(tok, ids, labels) == "Paris.<|im_end|>Rome.<|im_end|>"
    newline_after_answer = ends[2] + 1
    assert labels[newline_after_answer] == -100             # the engine writes the \n, not the model


def test_train_on_last_trains_only_the_last_answer(tok):
    ids, labels = data.render(CHAT, tok, train_on="last")
    assert trained_text(tok, ids, labels) == "Rome.<|im_end|>"


def test_train_on_all_trains_every_token_but_the_first(tok):
    ids, labels = data.render(CHAT, tok, train_on="all")
    assert labels[0] == -100 and labels[1:] == ids[1:]


def test_bpe_merge_across_the_prompt_answer_boundary_keeps_the_mask_aligned(tok):
    """The prompt ends with a space and the answer starts with a word: BPE merges them into one token
    " Paris", so the prompt's own tokenization is not a prefix of the whole text's. Masking the first
    len(tokenize(prompt)) tokens would be off by one; we train the merged token, which the model must
    write, and everything after it."""
    messages = [{"role": "user", "content": "The capital of France is "}, {"role": "assistant", "content": "Paris."}]
    prompt_ids, whole_ids = tok.encode("The capital of France is "), tok.encode("The capital of France is Paris.</s>")
    assert whole_ids[:len(prompt_ids)] != prompt_ids          # the merge really happens with this tokenizer
    ids, labels = data.render(messages, tok, template="plain")
    assert trained_text(tok, ids, labels) == " Paris.<|im_end|>"
    first = next(k for k, label in enumerate(labels) if label != -100)
    assert first == len(prompt_ids) - 1                       # the naive mask would start one later
    assert tok.decode(ids[first:first + 1]).startswith(" P")


def test_conversation_without_an_answer_is_refused_as_no_trained_token(tmp_path, tok):
    path = write(tmp_path, "q.jsonl", ['{"messages": [{"role": "user", "content": "Hello"}]}'])
    with pytest.raises(data.DataError, match=r"q\.jsonl:1: no trained token"):
        data.load_datasets(config([path]), tok, log=lambda line: None)


# ---------------------------------------------------------------------------------------------------
# Datasets: truncation, split, mixture


def long_answer_file(tmp_path):
    return write(tmp_path, "long.jsonl", [
        json.dumps({"prompt": "Short?", "completion": "Yes."}),
        json.dumps({"prompt": "Long?", "completion": " ".join(["word"] * 100)}),
        json.dumps({"prompt": " ".join(["prompt"] * 100), "completion": "Late answer."})])


def test_truncate_cuts_to_seq_len_and_counts(tmp_path, tok):
    cfg = config([long_answer_file(tmp_path)], seq_len=40, truncation="truncate", on_bad_data="skip", template="plain")
    train, _, stats = data.load_datasets(cfg, tok, log=lambda line: None)
    assert [len(ex["input_ids"]) <= 40 for ex in train] == [True, True]
    assert stats.truncated["train"] == 1
    assert stats.skipped == {"no trained token after truncation": 1}  # the answer was cut off entirely


def test_drop_leaves_long_examples_out_and_counts_them(tmp_path, tok):
    cfg = config([long_answer_file(tmp_path)], seq_len=40, truncation="drop", template="plain")
    train, _, stats = data.load_datasets(cfg, tok, log=lambda line: None)
    assert len(train) == 1 and stats.dropped == {("train", "longer than seq_len=40"): 2}
    assert "dropped 2" in stats.report()


def test_no_trained_token_after_truncation_stops_by_default(tmp_path, tok):
    cfg = config([long_answer_file(tmp_path)], seq_len=40, template="plain")
    with pytest.raises(data.DataError, match=r"long\.jsonl:3: no trained token left after truncation to seq_len=40"):
        data.load_datasets(cfg, tok, log=lambda line: None)


def test_statistics_count_examples_tokens_and_trained_tokens(tok):
    cfg = config([os.path.join(EXAMPLES, "messages.jsonl")])
    train, _, stats = data.load_datasets(cfg, tok, log=lambda line: None)
    assert stats.examples["train"] == 5
    assert stats.tokens["train"] == sum(len(ex["input_ids"]) for ex in train)
    assert stats.trained_tokens["train"] == sum(int((ex["labels"] != -100).sum()) for ex in train)


def test_template_jinja_loads_the_same_examples_as_the_hand_written_template(tok, tmp_path):
    """The training path with template = "jinja" (the model's own template rendered) gives the ids and
    labels of template = "auto" on SmolLM2; a message the template leaves out is counted when skipped."""
    paths = [os.path.join(EXAMPLES, "messages.jsonl")]
    auto, _, _ = data.load_datasets(config(paths), tok, log=lambda line: None)
    jinja, _, stats = data.load_datasets(config(paths, template="jinja"), tok, log=lambda line: None)
    assert stats.template == "jinja"
    assert [(a["input_ids"].tolist(), a["labels"].tolist()) for a in auto] == \
        [(j["input_ids"].tolist(), j["labels"].tolist()) for j in jinja]


def test_validation_split_is_seeded_disjoint_and_sized(tmp_path, tok):
    path = write(tmp_path, "many.jsonl", [json.dumps({"prompt": f"Question {k}?", "completion": f"Answer {k}."})
                                          for k in range(40)])
    cfg = Config(train_data=[path], val_fraction=0.25, seed=7, template="plain")
    train, val, _ = data.load_datasets(cfg, tok, log=lambda line: None)
    train_again, val_again, _ = data.load_datasets(cfg, tok, log=lambda line: None)
    sources = lambda examples: [ex["source"] for ex in examples]
    assert len(val) == 10 and len(train) == 30
    assert not set(sources(train)) & set(sources(val))
    assert sources(val) == sources(val_again) and sources(train) == sources(train_again)
    other_seed, _ = data.load_datasets(Config(train_data=[path], val_fraction=0.25, seed=8, template="plain"), tok,
                                       log=lambda line: None)[1:3][0], None
    assert sources(other_seed) != sources(val)


def test_validation_file_replaces_the_split(tok):
    cfg = Config(train_data=[os.path.join(EXAMPLES, "messages.jsonl")], val_data=os.path.join(EXAMPLES, "alpaca.jsonl"))
    train, val, _ = data.load_datasets(cfg, tok, log=lambda line: None)
    assert len(train) == 5 and len(val) == 6


def test_weighted_mixture_follows_the_weights(tmp_path, tok):
    a = write(tmp_path, "a.jsonl", [json.dumps({"prompt": f"a{k}", "completion": "A"}) for k in range(30)])
    b = write(tmp_path, "b.jsonl", [json.dumps({"prompt": f"b{k}", "completion": "B"}) for k in range(10)])
    cfg = config([a, b], data_weights=[1.0, 3.0], template="plain")
    train, _, stats = data.load_datasets(cfg, tok, log=lambda line: None)
    from_b = sum(ex["source"].startswith(b) for ex in train)
    assert len(train) == 40 and from_b == 30                  # b is oversampled to 3/4 of the epoch
    assert len({ex["source"] for ex in train if ex["source"].startswith(b)}) == 10
    assert f"mixture: {a} 10, {b} 30" in stats.report()


def test_text_files_use_the_plain_template(tok):
    train, _, _ = data.load_datasets(config([os.path.join(EXAMPLES, "text.jsonl")]), tok, log=lambda line: None)
    assert tok.decode(train[0]["input_ids"]).startswith("Rivers carry water")
    assert tok.decode(train[0]["input_ids"]).endswith("slow down.<|im_end|>")


# ---------------------------------------------------------------------------------------------------
# Batches


def examples_of_lengths(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, 128, n).astype(np.int32)
        labels = ids.copy()
        labels[: n // 2] = -100
        out.append({"input_ids": ids, "labels": labels, "source": f"x:{len(out)}"})
    return out


LENGTHS = np.random.default_rng(1).integers(3, 60, 200).tolist()


@pytest.mark.parametrize("packing", ["none", "packed"])
def test_plan_is_deterministic_and_covers_every_example_once_per_epoch(packing):
    examples = examples_of_lengths(LENGTHS)
    plan = data.plan_batches(examples, 4, 64, packing, seed=3, epoch=0)
    assert plan == data.plan_batches(examples, 4, 64, packing, seed=3, epoch=0)
    assert plan != data.plan_batches(examples, 4, 64, packing, seed=3, epoch=1)
    flat = sorted(i for batch in plan for row in batch for i in row)
    assert flat == list(range(len(examples)))
    assert all(len(batch) <= 4 for batch in plan)


def test_grouping_by_length_pads_much_less_than_random_batches():
    examples = examples_of_lengths(LENGTHS)
    padding = lambda plan: sum(len(b) * max(LENGTHS[r[0]] for r in b) - sum(LENGTHS[r[0]] for r in b) for b in plan)
    grouped = data.plan_batches(examples, 4, 64, "none", seed=0)
    order = np.random.default_rng(0).permutation(len(examples))
    shuffled = [[[int(i)] for i in order[s:s + 4]] for s in range(0, len(order), 4)]
    assert padding(grouped) < padding(shuffled) / 3


def test_packed_rows_fit_seq_len_and_are_well_filled():
    examples = examples_of_lengths(LENGTHS)
    rows = [row for batch in data.plan_batches(examples, 4, 128, "packed", seed=0) for row in batch]
    fill = [sum(LENGTHS[i] for i in row) for row in rows]
    assert max(fill) <= 128
    assert sum(fill) / (128 * len(rows)) > 0.9


def test_collate_shifts_targets_and_never_crosses_an_example_boundary():
    examples = examples_of_lengths([5, 7, 4])
    batch = data.collate(examples, [[0, 1], [2]], 16, pad_id=0)
    ids, targets, positions = batch["input_ids"], batch["targets"], batch["position_ids"]
    assert ids.shape == (2, 12)
    a, b = examples[0], examples[1]
    assert targets[0, :4].tolist() == a["labels"][1:].tolist()   # position t predicts token t + 1
    assert targets[0, 4] == -100                                  # the last token of `a` predicts nothing
    assert targets[0, 5:11].tolist() == b["labels"][1:].tolist()
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert (targets[1, 3:] == -100).all() and (ids[1, 4:] == 0).all()
    assert batch["n_trained"] == int((targets != -100).sum()) == data.count_trained(examples, [[0, 1], [2]])
    assert batch["n_tokens"] == 16                                # padding is not counted
    assert batch["is_token"].tolist() == [[True] * 12, [True] * 4 + [False] * 8]


def test_packed_attention_mask_is_block_diagonal_causal():
    batch = data.collate(examples_of_lengths([3, 2]), [[0, 1]], 8, pad_id=0)
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 0],
                             [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(batch["attn_mask"][0, 0], expected)


def test_unpacked_batch_needs_no_mask():
    assert data.collate(examples_of_lengths([3, 5]), [[0], [1]], 8, pad_id=0)["attn_mask"] is None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny") / "llama")
    save_tiny_model(folder)
    return model_lib.load_model(folder, dtype=torch.float64)


def batch_loss(model, batch, attn_mask="batch"):
    mask = batch["attn_mask"] if attn_mask == "batch" else attn_mask
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], mask)
    return loss.masked_cross_entropy(hidden, model.lm_head.weight, batch["targets"]).item()


def test_packed_row_loss_equals_the_examples_run_one_by_one(tiny_model):
    examples = examples_of_lengths([9, 23, 5, 14], seed=4)
    packed = data.collate(examples, [[0, 1, 2, 3]], 64, pad_id=0)
    alone = [data.collate(examples, [[i]], 64, pad_id=0) for i in range(4)]
    n = sum(b["n_trained"] for b in alone)
    assert packed["n_trained"] == n
    per_token = sum(batch_loss(tiny_model, b) for b in alone) / n
    assert batch_loss(tiny_model, packed) / n == pytest.approx(per_token, rel=1e-5)
    # with a plain causal mask the examples would see each other, and the loss would differ:
    assert batch_loss(tiny_model, packed, attn_mask=None) / n != pytest.approx(per_token, rel=1e-3)


# ---------------------------------------------------------------------------------------------------
# Looking at the data


def test_show_colours_trained_tokens_green_and_masked_ones_grey_on_a_terminal(tok):
    ids, labels = data.render(CHAT, tok)
    example = {"input_ids": np.array(ids), "labels": np.array(labels), "source": "chat:1"}
    out = io.StringIO()
    data.show([example], tok, 1, color=True, file=out)
    text = out.getvalue()
    green = [piece for piece in text.split("\033[") if piece.startswith(("32m", "92m"))]
    assert "".join(piece[3:] for piece in green) == "Paris.<|im_end|>Rome.<|im_end|>"
    assert "\033[90m" in text and text.rstrip().endswith("\033[0m")


# ---------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_show_prints_examples_with_trained_tokens_marked_and_statistics(tok_dir):
    out = run_cli("--data", os.path.join(EXAMPLES, "messages.jsonl"), "--model", str(tok_dir), "--show", "2")
    assert out.returncode == 0, out.stderr
    assert "«The capital of Japan is Tokyo.<|im_end|>»" in out.stdout
    assert "train: 5 examples" in out.stdout and "skipped bad records: 0" in out.stdout
    assert out.stdout.count("--- ") == 2


def test_cli_bad_input_exits_nonzero_with_file_line_and_no_traceback(tmp_path, tok_dir):
    path = write(tmp_path, "bad.jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a"'])
    out = run_cli("--data", path, "--model", str(tok_dir))
    assert out.returncode != 0
    assert out.stderr.strip() == f"error: {path}:2: malformed JSON: Expecting ',' delimiter (column 20)"
    skipped = run_cli("--data", path, "--model", str(tok_dir), "--on_bad_data=skip", "--show", "0")
    assert skipped.returncode == 0 and "skipped bad records: 1 {'malformed JSON': 1}" in skipped.stdout


# ---------------------------------------------------------------------------------------------------
# Preference pairs (objective = dpo | orpo)


def test_preference_records_become_pairs_with_exact_masks_on_each_side(tmp_path, tok):
    """Prompt as a string or as messages, answers as strings or one assistant message: the chosen
    side is the example, the rejected one rides along; only each final answer and its <|im_end|> are
    trained, and the prompt's tokens are the same on both sides."""
    path = write(tmp_path, "prefs.jsonl", [
        json.dumps({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, surely."}),
        json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                               {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}],
                    "chosen": [{"role": "assistant", "content": "6"}],
                    "rejected": [{"role": "assistant", "content": "7"}]})])
    train, _, stats = data.load_datasets(config([path]), tok, log=lambda line: None)
    assert stats.lines[1].endswith("preference, 2 records")
    for example, (good, bad) in zip(train, [("Paris.", "Lyon, surely."), ("6", "7")]):
        chosen, rejected = example, example["rejected"]
        assert trained_text(tok, chosen["input_ids"], chosen["labels"]) == good + "<|im_end|>"
        assert trained_text(tok, rejected["input_ids"], rejected["labels"]) == bad + "<|im_end|>"
        prompt = int((chosen["labels"] != -100).argmax())  # the first trained token
        assert chosen["input_ids"][:prompt].tolist() == rejected["input_ids"][:prompt].tolist()
    batch = data.collate_pairs(train, [[0], [1]], 512, tok.pad_id)
    assert batch["n_pairs"] == 2 and batch["input_ids"].shape[0] == 4
    assert batch["n_trained"] == sum(int((ex["labels"] != -100).sum()) for ex in train)  # the chosen sides
    assert batch["input_ids"][2, :len(train[0]["rejected"]["input_ids"])].tolist() == \
        train[0]["rejected"]["input_ids"].tolist()


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q?", "chosen": "A.", "rejected": "A."}, "prefs.jsonl:1: chosen and rejected are the same answer"),
    ({"prompt": "Q?", "chosen": "A."}, "prefs.jsonl:1: field 'rejected' should be a string or a list of one"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "A."}], "rejected": "B."},
     "prefs.jsonl:1: field 'chosen' should be a string or a list of one assistant message"),
    ({"chosen": "A.", "rejected": "B."}, "prefs.jsonl:1: missing field 'prompt'"),
])
def test_bad_preference_record_stops_with_file_line_and_reason(tmp_path, tok, record, message):
    path = write(tmp_path, "prefs.jsonl", [json.dumps(record)])
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.load_datasets(config([path]), tok, log=lambda line: None)
