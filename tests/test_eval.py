"""eval.py's guarantees: the metric functions on hand-made cases, the model-based scores against
transformers (the oracle) or a model whose log-probabilities we wrote down, the demo task's data as
committed, and eval.py end to end (base vs LoRA-tuned, --limit, --json, the markdown report)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import eval as ev
import lora
import model as model_lib
from config import Config
from conftest import ROOT
from tokenizer import load_tokenizer

sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_demo_data  # noqa: E402

REFERENCE = '{"category":"billing","urgency":"high","product":"Ion Power Bank","order_id":null,"sentiment":"neutral"}'


# ---------------------------------------------------------------------------------------------------
# String metrics


def test_exact_match_ignores_only_surrounding_whitespace():
    assert ev.exact_match("  Paris\n", "Paris")
    assert not ev.exact_match("paris", "Paris")
    assert not ev.exact_match("Paris.", "Paris")


def test_normalized_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert ev.normalized_exact_match("The  Eiffel tower!", "eiffel Tower")
    assert ev.normalized_exact_match('{"k": "An apple"}', '{"k":"apple"}')
    assert not ev.normalized_exact_match("Eiffel", "Eiffel Tower")


def test_json_field_accuracy_counts_the_reference_fields_the_answer_gets_exactly_right():
    answer = '{"category":"billing","urgency":"low","product":"ion power bank","order_id":null,"extra":1}'
    # right: category, order_id (null == null); wrong: urgency, product (case), sentiment (missing)
    assert ev.json_field_matches(answer, REFERENCE) == {"category": True, "urgency": False, "product": False,
                                                        "order_id": True, "sentiment": False}
    assert ev.json_field_accuracy(answer, REFERENCE) == pytest.approx(2 / 5)
    assert ev.json_field_accuracy(' {"sentiment": "neutral", "order_id": null, "product": "Ion Power Bank", '
                                  '"urgency": "high", "category": "billing"} ', REFERENCE) == 1.0


def test_json_field_accuracy_of_an_answer_that_is_not_a_json_object_is_zero():
    for answer in ['{"category":"billing"', "category: billing", '["billing"]', "```json\n{}\n```"]:
        assert ev.json_field_accuracy(answer, REFERENCE) == 0.0


def test_generation_metrics_over_a_hand_made_set():
    other = REFERENCE.replace("billing", "returns")
    predictions = [REFERENCE, REFERENCE.replace("high", "low").replace(":", ": "), "I can help!"]
    metrics = ev.generation_metrics(predictions, [REFERENCE, REFERENCE, other])
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["normalized_exact_match"] == pytest.approx(1 / 3)  # "high" vs "low" still differs
    assert metrics["valid_json"] == pytest.approx(2 / 3)
    assert metrics["field_accuracy"] == pytest.approx((5 + 4 + 0) / 15)
    assert metrics["field_accuracy_by_field"]["urgency"] == pytest.approx(1 / 3)
    assert metrics["field_accuracy_by_field"]["category"] == pytest.approx(2 / 3)


def test_an_answer_counts_as_stopped_only_when_it_ends_with_a_stop_token(monkeypatch, real_model_dir):
    """generate() returns the new tokens, the stop token included when one was hit: the answer text
    leaves it out, and the stop rate counts it."""
    tokenizer = load_tokenizer(real_model_dir)
    end = tokenizer.token_to_id("<|im_end|>")
    hello = tokenizer.encode("Hello")
    monkeypatch.setattr(ev, "generate", lambda model, prompts, *a, **k: [hello + [end], hello][:len(prompts)])
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hey"}]]
    answers, stopped = ev.generate_answers(None, tokenizer, "auto", prompts, 8, batch_size=2)
    assert answers == ["Hello", "Hello"] and sorted(stopped) == [False, True]


def test_json_metrics_only_when_every_reference_is_a_json_object():
    metrics = ev.generation_metrics(["Paris", "4"], ["Paris", "four"])
    assert metrics == {"exact_match": 0.5, "normalized_exact_match": 0.5}


def test_bits_per_byte_of_a_model_that_guesses_uniformly_among_256_bytes_is_8():
    n_bytes = 1000
    assert ev.bits_per_byte(n_bytes * math.log(256), n_bytes) == pytest.approx(8.0)
    # 500 two-byte tokens, each one of 65536 equally likely: the same 8 bits per byte
    assert ev.bits_per_byte(500 * math.log(65536), n_bytes) == pytest.approx(8.0)


# ---------------------------------------------------------------------------------------------------
# Scores from a model


class CharTokenizer:
    """One token per ASCII character (ids < 128), enough for tiny models with a 128-token vocabulary."""
    pad_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode_bytes(self, ids):
        return bytes(ids)


class BigramModel(nn.Module):
    """logits[b, t] = log p(next token | ids[b, t]): the next token depends only on the current one,
    so the log-probability of any continuation can be written down by hand."""

    def __init__(self, next_probs, V=128):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, 4)  # eval.py finds the device here
        self.table = torch.full((V, V), math.log(1 / V), dtype=torch.float64)
        for prev, probs in next_probs.items():  # the mass not given is spread over the other tokens
            row = torch.full((V,), (1 - sum(probs.values())) / (V - len(probs)), dtype=torch.float64)
            for token, p in probs.items():
                row[ord(token)] = p
            self.table[ord(prev)] = row.log()

    def forward(self, ids):
        return self.table[ids]


def test_multiple_choice_picks_the_choice_with_the_highest_summed_log_probability():
    # context "Question: q?\nAnswer:", then each choice as " " + choice: one token per character
    model = BigramModel({":": {" ": 0.999}, " ": {"a": 0.3, "b": 0.6, "c": 0.09}, "b": {"b": 0.8}, "c": {"c": 0.99}})
    scores = ev.multiple_choice_scores(model, CharTokenizer(), "q?", ["a", "bb", "cc", "bbb"])
    expected = [math.log(0.999 * 0.3), math.log(0.999 * 0.6 * 0.8), math.log(0.999 * 0.09 * 0.99),
                math.log(0.999 * 0.6 * 0.8 * 0.8)]
    assert scores == pytest.approx(expected, abs=1e-6)  # fp32 log-softmax
    item = {"question": "q?", "choices": ["a", "bb", "cc", "bbb"], "answer": 1}
    assert ev.multiple_choice_accuracy(model, CharTokenizer(), [item]) == 1.0
    assert ev.multiple_choice_accuracy(model, CharTokenizer(), [dict(item, answer=3)]) == 0.0


def test_summed_not_averaged_log_probability_decides():
    # " a": 0.999 * 0.4 = 0.40 beats " bb": 0.999 * 0.55 * 0.55 = 0.30,
    # though " bb" is better per token (mean log-prob -0.40 vs -0.46)
    model = BigramModel({":": {" ": 0.999}, " ": {"a": 0.4, "b": 0.55}, "b": {"b": 0.55}})
    item = {"question": "q?", "choices": ["bb", "a"], "answer": 1}
    assert ev.multiple_choice_accuracy(model, CharTokenizer(), [item]) == 1.0


def hf_logprobs(folder, ids):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].log_softmax(-1)  # (T, V)


def test_choice_scores_in_a_padded_batch_equal_transformers_scoring_each_choice_alone(tiny_model_dir):
    model = model_lib.load_model(tiny_model_dir)
    context, choices = [5, 17, 42, 9], [[3], [77, 12, 100], [64, 64]]
    scores = ev.continuation_logprobs(model, context, choices)
    for choice, score in zip(choices, scores):
        logp = hf_logprobs(tiny_model_dir, context + choice)
        expected = sum(logp[len(context) + j - 1, t].item() for j, t in enumerate(choice))
        assert score == pytest.approx(expected, abs=1e-4)


def test_validation_loss_is_the_sum_of_token_losses_over_the_number_of_trained_tokens(tiny_model_dir):
    """Examples of different lengths and different numbers of trained tokens, in batches of 2: the
    result is (all token losses summed) / (all trained tokens), as transformers computes them
    one example at a time; not a mean of per-batch or per-example means."""
    model = model_lib.load_model(tiny_model_dir)
    examples = [{"input_ids": [1, 5, 9, 17, 33], "labels": [-100, -100, -100, 17, 33]},
                {"input_ids": [2, 4, 8, 16, 32, 64, 127, 3, 7], "labels": [-100, 4, 8, 16, 32, 64, 127, 3, 7]},
                {"input_ids": [11, 12, 13], "labels": [-100, -100, 13]}]
    total, tokens = 0.0, 0
    for ex in examples:
        logp = hf_logprobs(tiny_model_dir, ex["input_ids"])
        for t in range(1, len(ex["input_ids"])):
            if ex["labels"][t] != -100:
                total -= logp[t - 1, ex["input_ids"][t]].item()
                tokens += 1
    m = ev.language_model_loss(model, CharTokenizer(), examples, batch_size=2)
    assert m["tokens"] == tokens == 11
    assert m["loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert m["bpb"] == pytest.approx(total / tokens / math.log(2), abs=1e-5)  # one byte per token


def test_general_text_becomes_one_example_per_paragraph_all_but_the_first_token_trained():
    examples = ev.text_examples(CharTokenizer(), "abc\n\nde\n  \nfghij\n\nk", max_len=4)
    assert [ex["input_ids"] for ex in examples] == [[97, 98, 99], [100, 101], [102, 103, 104, 105]]
    assert examples[0]["labels"] == [-100, 98, 99]


def test_a_malformed_multiple_choice_line_names_file_and_line(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n'
                    '{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(ValueError, match=r"mc.jsonl:2: expected"):
        ev.load_multiple_choice(str(path))


def test_bundled_multiple_choice_set_is_well_formed_and_balanced():
    items = ev.load_multiple_choice(os.path.join(ROOT, "data", "eval", "mc.jsonl"))
    assert len(items) >= 40
    assert all(len(item["choices"]) == 4 for item in items)
    answers = [item["answer"] for item in items]
    assert max(answers.count(k) for k in range(4)) <= len(items) // 4 + 1  # no letter bias to exploit


# ---------------------------------------------------------------------------------------------------
# The demo task


def test_demo_data_files_are_what_the_generator_writes():
    splits = make_demo_data.make_splits(seed=0)
    for name, records in {**splits, **make_demo_data.preference_splits(splits, seed=0)}.items():
        with open(os.path.join(ROOT, "data", "demo", f"{name}.jsonl"), encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == records, f"data/demo/{name}.jsonl is stale"


def test_demo_splits_share_no_message_and_answers_follow_the_schema():
    splits = make_demo_data.make_splits(seed=0)
    messages = [r["messages"][1]["content"] for records in splits.values() for r in records]
    assert len(set(messages)) == len(messages)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2400, "val": 200, "test": 200}
    for record in splits["test"]:
        system, user, assistant = record["messages"]
        answer = json.loads(assistant["content"])
        assert system["content"] == make_demo_data.INSTRUCTION
        assert tuple(answer) == make_demo_data.FIELDS
        assert assistant["content"] == json.dumps(answer, separators=(",", ":"))
        assert answer["product"] in make_demo_data.PRODUCTS or answer["product"] is None
        if answer["order_id"]:
            assert answer["order_id"][1:] in user["content"]  # the number is in the message


def test_demo_preference_pairs_differ_from_the_right_ticket_in_exactly_one_field():
    splits = make_demo_data.make_splits(seed=0)
    pairs = make_demo_data.preference_splits(splits, seed=0)
    assert {k: len(v) for k, v in pairs.items()} == {"preference_train": 2400, "preference_val": 200}
    for pair, record in zip(pairs["preference_val"], splits["val"]):
        chosen, rejected = json.loads(pair["chosen"]), json.loads(pair["rejected"])
        assert pair["prompt"] == record["messages"][:2] and pair["chosen"] == record["messages"][2]["content"]
        assert sum(chosen[k] != rejected[k] for k in make_demo_data.FIELDS) == 1


# ---------------------------------------------------------------------------------------------------
# eval.py end to end


@pytest.fixture(scope="module")
def tiny_smollm_dir(real_model_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template (tools/make_tiny_model.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_tiny_model import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), real_model_dir)


def test_eval_compares_base_and_adapter_and_prints_json_last(tiny_smollm_dir, tmp_path):
    model = model_lib.load_model(tiny_smollm_dir)
    lora.apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():  # B = 0 would make the adapter a no-op and base == tuned
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.normal_(0.0, 0.5)
    lora.save_adapter(model, str(tmp_path / "run" / "adapter"), base_model_path=tiny_smollm_dir)
    config = tmp_path / "tiny.py"
    config.write_text(f"model = {tiny_smollm_dir!r}\nval_data = 'data/demo/val.jsonl'\n"
                      f"test_data = 'data/demo/test.jsonl'\ndtype = 'float32'\n")
    result = subprocess.run([sys.executable, "eval.py", "--config", str(config), "--adapter",
                             str(tmp_path / "run" / "adapter"), "--limit", "3", "--max_new_tokens", "8", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("val_loss", "exact_match", "field_accuracy", "mc_accuracy", "forgetting_ppl_base", "forgetting_ppl_tuned"):
        assert metrics[key] is not None, key
    assert 0.0 <= metrics["base"]["stop_rate"] <= 1.0 and 0.0 <= metrics["tuned"]["stop_rate"] <= 1.0
    assert metrics["base"]["val_tokens"] == metrics["tuned"]["val_tokens"] > 0  # 3 examples, same tokens
    assert metrics["forgetting_ppl_base"] != metrics["forgetting_ppl_tuned"]
    assert metrics["val_loss"] == metrics["tuned"]["val_loss"] != metrics["base"]["val_loss"]
    report = (tmp_path / "run" / "eval.md").read_text()
    assert "| metric | base | fine-tuned | change |" in report
    assert "| 3 | " in report and "| 4 | " not in report  # --limit 3: three test prompts shown
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["exact_match"] == metrics["exact_match"]


def test_eval_reports_reward_accuracy_and_margin_on_held_out_preference_pairs(tiny_smollm_dir, tmp_path):
    """The base's preference accuracy is how often it finds the chosen answer more likely; the tuned
    model's DPO rewards β (log π - log π_base), recomputed here from the two models' log-probabilities."""
    model = model_lib.load_model(tiny_smollm_dir)
    lora.apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.normal_(0.0, 0.5)
    lora.save_adapter(model, str(tmp_path / "run" / "adapter"), base_model_path=tiny_smollm_dir)
    config = tmp_path / "tiny.py"
    config.write_text(f"model = {tiny_smollm_dir!r}\ndtype = 'float32'\ndpo_beta = 0.5\n")
    result = subprocess.run([sys.executable, "eval.py", "--config", str(config), "--adapter",
                             str(tmp_path / "run" / "adapter"), "--pref_data", "data/examples/preference.jsonl",
                             "--mc_data", "", "--general_text", "", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["base"]["pref_accuracy"] <= 1 and "reward_accuracy" not in metrics["base"]
    cfg = Config(model=tiny_smollm_dir)
    tokenizer = load_tokenizer(tiny_smollm_dir)
    pairs = ev.preference_pairs(cfg, tokenizer, "data/examples/preference.jsonl", 0)
    base = ev.pair_logps(model_lib.load_model(tiny_smollm_dir), tokenizer, pairs, 2)
    tuned = ev.pair_logps(lora.load_adapter(model_lib.load_model(tiny_smollm_dir), str(tmp_path / "run" / "adapter")),
                                tokenizer, pairs, 3)
    rewards = 0.5 * (tuned - base)
    assert metrics["tuned"]["reward_margin"] == pytest.approx((rewards[:, 0] - rewards[:, 1]).mean().item(), abs=1e-5)
    assert metrics["tuned"]["reward_accuracy"] == (rewards[:, 0] > rewards[:, 1]).double().mean().item()
    assert metrics["base"]["pref_accuracy"] == (base[:, 0] > base[:, 1]).double().mean().item()


def test_base_cache_reuses_the_base_metrics_only_for_identical_settings(tiny_smollm_dir, tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(f"model = {tiny_smollm_dir!r}\nval_data = 'data/demo/val.jsonl'\n"
                      f"test_data = 'data/demo/test.jsonl'\ndtype = 'float32'\n")

    def base_eval(*extra):
        result = subprocess.run([sys.executable, "eval.py", "--config", str(config), "--max_new_tokens", "8",
                                 "--base_cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                                 "--json", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])["base"], "metrics and answers from" in result.stderr

    first, reused = base_eval("--limit", "2")
    assert not reused and len(os.listdir(tmp_path / "cache")) == 1
    again, reused = base_eval("--limit", "2")
    assert reused and again == first
    other, reused = base_eval("--limit", "3")  # other settings: evaluated afresh, cached apart
    assert not reused and len(os.listdir(tmp_path / "cache")) == 2


def test_eval_refuses_adapter_and_model_together(tmp_path):
    result = subprocess.run([sys.executable, "eval.py", "--adapter", "a", "--model", "b"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not both" in result.stderr


def test_an_adapter_of_another_base_model_is_one_line_before_the_base_is_evaluated(tiny_model, tmp_path, capsys):
    from make_tiny_model import make_tiny_model
    other = model_lib.load_model(make_tiny_model(str(tmp_path / "other"), tiny_model, hidden_size=32))
    lora.apply_lora(other, rank=4, alpha=8.0)
    lora.save_adapter(other, str(tmp_path / "adapter"), base_model_path=str(tmp_path / "other"))
    config = tmp_path / "tiny.py"
    config.write_text(f"model = {tiny_model!r}\nval_data = 'data/demo/val.jsonl'\ndtype = 'float32'\n")
    with pytest.raises(SystemExit) as exit:
        ev.main(["--config", str(config), "--adapter", str(tmp_path / "adapter"), "--limit", "2"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("error:") == 1 and "[base]" not in err  # nothing evaluated yet
    assert f"adapter_model.safetensors: does not fit this model: layers.0.mlp.down_proj is a linear layer of " \
           f"128 -> 64 here, the adapter's A and B are (4, 128) and (32, 4) (trained on {tmp_path / 'other'}?)" in err
