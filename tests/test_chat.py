"""chat.py: works through a pipe, streams exactly the text generation produces, keeps the history in
the training template, and /reset, /system and the context budget do what they say."""
import io
import os
import subprocess
import sys

import pytest
import torch

import chat
import data
from conftest import ROOT
from model import generate, load_model
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_smollm_dir(real_model_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template (tools/make_tiny_model.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_tiny_model import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), real_model_dir)


def test_chat_through_a_pipe_answers_with_the_history_and_exits_cleanly(real_model_dir):
    turns = "What is the capital of France?\nAnd of Italy?\n"
    result = subprocess.run([sys.executable, "chat.py", "--model", real_model_dir, "--temperature", "0",
                             "--max_new_tokens", "12"], input=turns, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = result.stdout.strip().splitlines()
    assert len(answers) == 2, result.stdout
    assert "Paris" in answers[0]
    assert "Rome" in answers[1]  # "And of Italy?" means something only after the first turn


def test_streamed_text_is_the_decoded_answer(tiny_smollm_dir):
    """Sampled (seeded) from a random model: varied tokens, some of them pieces of a UTF-8 character."""
    model, tok = load_model(tiny_smollm_dir), load_tokenizer(tiny_smollm_dir)
    messages = [{"role": "user", "content": "Hello there, café ☕?"}]
    out = io.StringIO()
    text = chat.answer(model, tok, messages, "auto", 40, 1.0, 0, 1.0, out, torch.Generator().manual_seed(0))
    prompt = tok.encode(data.format_chat(messages, "auto", add_generation_prompt=True, tokenizer=tok))
    stops = data.stop_ids(tok, "auto")
    ids = generate(model, [prompt], 40, temperature=1.0, stop_ids=stops, generator=torch.Generator().manual_seed(0))[0]
    assert len(set(text)) > 10
    assert text == tok.decode([i for i in ids if i not in stops])
    assert out.getvalue() == text + "\n"


def run_chat(monkeypatch, model_dir, lines, *args):
    """Run chat.main on `lines` with the model's answers replaced by "answer N"; returns the list of
    conversations the model was asked to continue."""
    seen = []

    def fake_answer(model, tokenizer, messages, *rest):
        seen.append([dict(m) for m in messages])
        return f"answer {len(seen)}"
    monkeypatch.setattr(chat, "answer", fake_answer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    chat.main(["--model", model_dir, *args])
    return seen


def test_history_grows_turn_by_turn_and_reset_forgets_it(monkeypatch, tiny_smollm_dir):
    seen = run_chat(monkeypatch, tiny_smollm_dir, ["one", "two", "/reset", "three"])
    assert seen[0] == [{"role": "user", "content": "one"}]
    assert seen[1] == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "answer 1"},
                       {"role": "user", "content": "two"}]
    assert seen[2] == [{"role": "user", "content": "three"}]


def test_system_command_sets_the_system_prompt_and_starts_over(monkeypatch, tiny_smollm_dir):
    seen = run_chat(monkeypatch, tiny_smollm_dir, ["one", "/system Be brief.", "two", "/reset", "three",
                                                   "/system", "four", "/quit", "never read"])
    assert seen[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "two"}]
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "three"}]
    assert seen[3] == [{"role": "user", "content": "four"}]
    assert len(seen) == 4


def test_oldest_turns_are_dropped_to_fit_the_context_but_not_the_system_prompt(tiny_smollm_dir):
    tok = load_tokenizer(tiny_smollm_dir)
    messages = [{"role": "system", "content": "sys"}]
    for k in range(10):
        messages += [{"role": "user", "content": f"question {k} " * 5}, {"role": "assistant", "content": "ok " * 5}]
    messages.append({"role": "user", "content": "last"})
    kept = chat.fit_context(messages, tok, "auto", budget=120)
    rendered = tok.encode(data.format_chat(kept, "auto", add_generation_prompt=True, tokenizer=tok))
    assert len(rendered) <= 120
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user" and kept[1:] == messages[-len(kept) + 1:]
    assert len(kept) < len(messages)
