"""Did the fine-tune work, and what did it cost? The base model and the fine-tuned one, side by side.

    python eval.py --config configs/demo.py --adapter runs/demo/adapter        # LoRA on the config's model
    python eval.py --config configs/demo.py --model runs/full/model            # any HF folder
    python eval.py --config configs/demo.py --limit 20 --json                  # the base model alone

The base is the config's `model`; the fine-tuned model is the base with --adapter loaded on it, or
the folder given with --model. Each is measured on held-out data only:

1. Language modelling on the validation set (val_data, or the slice of train_data that training held
   out with the same val_fraction and seed): the loss per trained token (nats), token-weighted (sum of
   all token losses / number of trained tokens, never a mean of per-batch means), its perplexity
   exp(loss), and bits per byte = loss * tokens / (ln 2 * bytes of those tokens). Perplexity depends
   on the tokenizer (a tokenizer with longer tokens has fewer, harder predictions); bits per byte
   does not, so it compares models with different tokenizers.
2. Generation on the test set (test_data or --test_data): the prompt is every message but the last,
   the reference is the last (assistant) message; greedy decoding, batched, with a KV cache.
   stop_rate (the share of answers that end with the end-of-turn token within the length limit: a
   base model rambles on), exact_match (ignoring surrounding whitespace), normalized_exact_match (lowercase, no punctuation,
   articles or extra spaces, as SQuAD normalises), and when every reference is a JSON object:
   valid_json (the whole answer parses as one) and field_accuracy (the share of reference fields
   the answer gets exactly right, per field too).
3. Multiple choice (a small bundled general-knowledge set, ARC/MMLU style): each choice is scored by
   the summed log-probability of its tokens after "Question: ...\\nAnswer:", and the best one is the
   model's pick. Nothing is generated, so a model that cannot follow the format still gets a score.
4. Forgetting: perplexity on general English text that the fine-tune never saw (a bundled file, one
   example per paragraph). A fine-tune that made this much worse has overwritten general knowledge.

The report (markdown, with a table of test prompts and both models' answers) goes to the run folder:
--out, else the adapter's or model's parent folder, else the config's out_dir.
--base_cache DIR reuses the base model's metrics from an earlier run with identical settings.
--pref_data FILE: held-out preference pairs (prompt, chosen, rejected): how often each model finds the
chosen answer more likely, and for the fine-tuned model DPO's reward accuracy and margin against the base.
--limit N uses the first N examples of each set. With --json the last line printed is one JSON
object: the fine-tuned model's metrics (the base's when there is none), forgetting_ppl_base and
forgetting_ppl_tuned, and every metric of both models under "base" and "tuned".
"""
from config import quiet_ctrl_c

quiet_ctrl_c(__name__)  # first: Ctrl-C while torch loads (seconds) exits 130, no traceback

import hashlib
import json
import math
import os
import re
import string
import sys
import time

import torch
from tqdm import tqdm

import data
import fast
import lora
from config import ConfigError, UserError, check_out_folder, fetch_model, parse_cli, resolve_hardware, script
from loss import fused_cross_entropy, masked_cross_entropy, sequence_logps
from model import check_logits_are_lm_head, generate, load_model, read_config
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
IGNORE = data.IGNORE

# ---------------------------------------------------------------------------------------------------
# 1. Metrics on strings


def exact_match(prediction, reference):
    """The answer is the reference, up to surrounding whitespace."""
    return prediction.strip() == reference.strip()


def normalize_answer(text):
    """SQuAD's normalisation (Rajpurkar et al. 2016): lowercase, drop punctuation and the articles
    a/an/the, collapse whitespace. Punctuation becomes a space rather than nothing, so that
    '{"k":"v"}' and '{"k": "v"}' both read 'k v' (SQuAD's would give 'kv' and 'k v')."""
    text = "".join(" " if c in string.punctuation else c for c in text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalized_exact_match(prediction, reference):
    return normalize_answer(prediction) == normalize_answer(reference)


def parse_json_object(text):
    """The JSON object that the whole text is (surrounding whitespace allowed), or None."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def json_field_matches(prediction, reference):
    """{field: the answer has it, with exactly the reference's value} for every field of the
    reference (a JSON object string). An answer that is not a JSON object gets every field wrong."""
    ref, pred = parse_json_object(reference), parse_json_object(prediction)
    if ref is None:
        raise ValueError(f"the reference is not a JSON object: {reference[:80]!r}")
    return {key: pred is not None and key in pred and pred[key] == value for key, value in ref.items()}


def json_field_accuracy(prediction, reference):
    """The share of the reference's fields that the answer gets exactly right (1.0 for an empty reference)."""
    matches = json_field_matches(prediction, reference)
    return sum(matches.values()) / len(matches) if matches else 1.0


def bits_per_byte(total_nats, n_bytes):
    """Summed loss in nats over some tokens -> bits per byte of the text of those tokens."""
    return total_nats / (math.log(2) * n_bytes)


def generation_metrics(predictions, references):
    """Every string metric over a test set, as shares in [0, 1]. The JSON ones only when every
    reference is a JSON object; field_accuracy then counts every (example, field) pair once."""
    n = len(references)
    metrics = {"exact_match": sum(map(exact_match, predictions, references)) / n,
               "normalized_exact_match": sum(map(normalized_exact_match, predictions, references)) / n}
    if all(parse_json_object(r) is not None for r in references):
        per_field, right, total = {}, 0, 0
        for p, r in zip(predictions, references):
            for key, ok in json_field_matches(p, r).items():
                per_field.setdefault(key, []).append(ok)
                right, total = right + ok, total + 1
        metrics["valid_json"] = sum(parse_json_object(p) is not None for p in predictions) / n
        metrics["field_accuracy"] = right / max(total, 1)
        metrics["field_accuracy_by_field"] = {k: sum(v) / len(v) for k, v in per_field.items()}
    return metrics


# ---------------------------------------------------------------------------------------------------
# 2. Scoring text with a model: loss, perplexity, bits per byte; multiple choice


def device_of(model):
    return model.embed_tokens.weight.device


def trained_bytes(tokenizer, labels):
    """UTF-8 bytes of the trained tokens (labels != -100); a special token counts as its text."""
    return sum(len(tokenizer.decode_bytes([int(t)])) for t in labels if t != IGNORE)


@torch.no_grad()
def language_model_loss(model, tokenizer, examples, batch_size=8, desc="loss", fused=True):
    """{"loss", "ppl", "bpb", "tokens", "bytes"} over examples ({"input_ids", "labels"}, as
    data.render_examples makes them). Token-weighted: sum of every trained token's loss / tokens.
    Examples are batched by length, one per row, right-padded: causal attention never looks right."""
    check_logits_are_lm_head(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, tokens, device = 0.0, 0, device_of(model)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, file=sys.stderr, leave=False):
        rows = [[i] for i in order[start:start + batch_size]]
        longest = max(len(examples[row[0]]["input_ids"]) for row in rows)
        batch = data.collate(examples, rows, longest, tokenizer.pad_id)
        hidden = model.hidden_states(batch["input_ids"].to(device), batch["position_ids"].to(device))
        cross_entropy = fused_cross_entropy if fused else masked_cross_entropy  # the same sum (loss.py)
        total += cross_entropy(hidden, model.lm_head.weight, batch["targets"].to(device)).item()
        tokens += batch["n_trained"]
    n_bytes = sum(trained_bytes(tokenizer, ex["labels"]) for ex in examples)
    loss = total / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss), "bpb": bits_per_byte(total, max(n_bytes, 1)),
            "tokens": tokens, "bytes": n_bytes}


def text_examples(tokenizer, text, max_len):
    """One example per paragraph (blank-line separated) of a plain text, every token but the first
    trained, cut to max_len tokens: the forgetting check's data."""
    examples = []
    for paragraph in re.split(r"\n\s*\n", text):
        ids = tokenizer.encode(paragraph.strip())[:max_len]
        if len(ids) >= 2:
            examples.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
    return examples


@torch.no_grad()
def continuation_logprobs(model, context_ids, continuations):
    """Summed log-probability of each continuation (a list of token ids) right after context_ids.

    The rows context + continuation are right-padded into one batch (B, T). logits[b, t] (V,) predict
    token t + 1, so continuation token j (at position len(context) + j) is scored by the log-softmax
    of the logits at position len(context) + j - 1."""
    rows = [list(context_ids) + list(c) for c in continuations]
    T, n_ctx = max(map(len, rows)), len(context_ids)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
    logprobs = model(ids.to(device_of(model))).float().log_softmax(-1)            # (B, T, V)
    scores = []
    for b, c in enumerate(continuations):
        positions = torch.arange(n_ctx - 1, n_ctx - 1 + len(c))
        scores.append(logprobs[b, positions, torch.tensor(c)].sum().item())
    return scores


def multiple_choice_scores(model, tokenizer, question, choices):
    """Summed log-probability of each choice's tokens after 'Question: {question}\\nAnswer:'.
    Context and ' ' + choice are tokenized apart, so every choice is scored on exactly its own
    tokens (the byte-level BPE keeps a leading space with its word, so this is also how the
    joined text tokenizes). The sum, not the mean: a choice is as likely as all its tokens together."""
    context = tokenizer.encode(f"Question: {question}\nAnswer:")
    return continuation_logprobs(model, context, [tokenizer.encode(" " + c) for c in choices])


def load_multiple_choice(path):
    """[{"question", "choices", "answer"}] from a JSONL file; a malformed line stops with file:line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = (isinstance(item.get("question"), str) and isinstance(item.get("choices"), list)
                      and len(item["choices"]) >= 2 and all(isinstance(c, str) for c in item["choices"])
                      and isinstance(item.get("answer"), int) and 0 <= item["answer"] < len(item["choices"]))
            except (json.JSONDecodeError, AttributeError):
                ok = False
            if not ok:
                raise ValueError(f"{path}:{number}: expected {{\"question\": str, \"choices\": [str, ...], "
                                 f"\"answer\": index of the right choice}}")
            items.append(item)
    return items


def multiple_choice_accuracy(model, tokenizer, items):
    right = 0
    for item in tqdm(items, desc="multiple choice", file=sys.stderr, leave=False):
        scores = multiple_choice_scores(model, tokenizer, item["question"], item["choices"])
        right += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
    return right / len(items)


# ---------------------------------------------------------------------------------------------------
# 3. Generation on the test set


def prompts_and_references(conversations, where):
    """(prompt messages, reference answer) of each conversation: all but the last message, and the last,
    which must be the assistant's."""
    pairs = []
    for k, messages in enumerate(conversations):
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise data.DataError(f"{where}: example {k + 1} does not end with an assistant answer to score")
        pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs


def preference_pairs(cfg, tokenizer, path, limit):
    """The rendered pairs of a preference file (prompt, chosen, rejected), as training renders them."""
    stats = data.DataStats()
    conversations = data.read_conversations(path, "preference", cfg.on_bad_data, stats)[1][:limit or None]
    return data.render_examples(conversations, tokenizer, data.resolve_template(cfg.template, tokenizer), cfg,
                                "test", stats)


@torch.no_grad()
def pair_logps(model, tokenizer, pairs, batch_size):
    """(P, 2) fp64: the summed log-probability of each pair's chosen and rejected answer."""
    out, device = [], device_of(model)
    for start in tqdm(range(0, len(pairs), batch_size), desc="preference pairs", file=sys.stderr, leave=False):
        rows = [[i] for i in range(start, min(start + batch_size, len(pairs)))]
        longest = max(len(side["input_ids"]) for [i] in rows for side in (pairs[i], pairs[i]["rejected"]))
        batch = data.collate_pairs(pairs, rows, longest, tokenizer.pad_id)
        hidden = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       return_hidden=True)
        logps = sequence_logps(hidden, model.lm_head.weight, batch["targets"].to(device))[0].double().cpu()
        out.append(torch.stack([logps[:len(rows)], logps[len(rows):]], dim=1))
    return torch.cat(out)


def preference_metrics(logps, reference=None, beta=0.1):
    """How often the chosen answer is the more likely one, and by how much (log-probability); with the
    base model's logps as the reference, DPO's implicit rewards r = β (log π - log π_ref): how often the
    chosen answer's reward is the higher (reward accuracy), and the mean reward margin."""
    metrics = {"pref_accuracy": (logps[:, 0] > logps[:, 1]).double().mean().item(),
               "pref_logp_margin": (logps[:, 0] - logps[:, 1]).mean().item()}
    if reference is not None:
        rewards = beta * (logps - reference)
        metrics.update(reward_accuracy=(rewards[:, 0] > rewards[:, 1]).double().mean().item(),
                       reward_margin=(rewards[:, 0] - rewards[:, 1]).mean().item())
    return metrics


def generate_answers(model, tokenizer, template, prompts, max_new_tokens, batch_size=16):
    """Greedy answers to a list of conversations (each ends before the answer), rendered with the
    same template code as training, and for each whether it ended with a stop token (the model
    closed its turn) within max_new_tokens. Batched by prompt length; generate() left-pads."""
    ids = [tokenizer.encode(data.format_chat(p, template, add_generation_prompt=True, tokenizer=tokenizer))
           for p in prompts]
    stops = set(data.stop_ids(tokenizer, template))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers, stopped = [None] * len(ids), [False] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", file=sys.stderr, leave=False):
        chunk = order[start:start + batch_size]
        outs = generate(model, [ids[i] for i in chunk], max_new_tokens, temperature=0.0, stop_ids=stops)
        for i, out in zip(chunk, outs):
            stopped[i] = bool(out) and out[-1] in stops
            answers[i] = tokenizer.decode(out[:-1] if stopped[i] else out)
    return answers, stopped


# ---------------------------------------------------------------------------------------------------
# 4. One model, every metric; the report


def evaluate(model, tokenizer, cfg, sets, flags, label):
    """All metrics of one model on the sets of read_sets(); returns (metrics, test answers)."""
    print(f"[{label}] evaluating", file=sys.stderr)
    metrics, answers, t0 = {}, [], time.time()
    model.eval()
    if sets["val"] is not None:
        val = val_examples(cfg, tokenizer, sets["val"], flags["limit"])
        if val:  # none when train_data is the only data and val_fraction = 0
            m = language_model_loss(model, tokenizer, val, flags["eval_batch_size"], desc=f"{label} val loss",
                                    fused=cfg.kernels == "fast")
            metrics.update(val_loss=m["loss"], val_ppl=m["ppl"], val_bpb=m["bpb"], val_tokens=m["tokens"])
    if sets["test"]:
        prompts, references = zip(*sets["test"])
        longest = max(len(tokenizer.encode(r)) for r in references)
        max_new = flags["max_new_tokens"] or int(1.5 * longest) + 16
        answers, stopped = generate_answers(model, tokenizer, cfg.template, list(prompts), max_new,
                                            flags["eval_batch_size"])
        metrics.update(generation_metrics(answers, references), stop_rate=sum(stopped) / len(stopped))
    if sets["mc"]:
        metrics["mc_accuracy"] = multiple_choice_accuracy(model, tokenizer, sets["mc"])
    if sets["general"]:
        general = text_examples(tokenizer, sets["general"], cfg.seq_len)[:flags["limit"] or None]
        m = language_model_loss(model, tokenizer, general, flags["eval_batch_size"], desc=f"{label} general text",
                                fused=cfg.kernels == "fast")
        metrics.update(forgetting_ppl=m["ppl"], forgetting_bpb=m["bpb"])
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics, answers


def val_examples(cfg, tokenizer, source, limit):
    """The rendered validation examples: val_data, or the held-out slice of train_data (as in training)."""
    if source == "val_data":
        stats = data.DataStats()
        resolved = data.resolve_template(cfg.template, tokenizer)
        fmt, conversations = data.read_conversations(cfg.val_data, cfg.data_format, cfg.on_bad_data, stats)
        if fmt == "text":
            resolved = data.resolve_template("plain", tokenizer)
        examples = data.render_examples(conversations, tokenizer, resolved, cfg, "val", stats)
    else:
        examples = data.load_datasets(cfg, tokenizer, log=lambda line: None)[1]
    return examples[:limit or None]


def read_sets(cfg, flags):
    """What to evaluate on, read once (tokenization happens per model, in evaluate())."""
    limit = flags["limit"] or None
    test_path = flags["test_data"] or cfg.test_data
    sets = {"val": "val_data" if cfg.val_data else "train_data" if cfg.train_data else None,
            "test": None, "mc": None, "general": None, "test_path": test_path}
    if test_path:
        sets["test"] = prompts_and_references(data.load_conversations(test_path, cfg.data_format)[:limit], test_path)
    if flags["mc_data"]:
        sets["mc"] = load_multiple_choice(flags["mc_data"])[:limit]
    if flags["general_text"]:
        with open(flags["general_text"], encoding="utf-8") as f:
            sets["general"] = f.read()
    return sets


def evaluate_base(model, tokenizer, cfg, sets, flags):
    """evaluate() of the base model, or, with --base_cache DIR, its metrics and answers from an
    earlier evaluation with the same settings: the base model does not change between fine-tunes,
    so comparing several of them needs its numbers once. The cache key is everything the numbers
    depend on: the model's files, template, dtype, sequence length, evaluation sets and flags."""
    if not flags["base_cache"]:
        return evaluate(model, tokenizer, cfg, sets, flags, "base")
    weights = sorted(f for f in os.listdir(cfg.model) if f.endswith((".safetensors", ".json")))
    key = json.dumps(dict(
        model=[(f, os.path.getsize(os.path.join(cfg.model, f)), os.path.getmtime(os.path.join(cfg.model, f)))
               for f in weights],
        config={k: getattr(cfg, k) for k in ("template", "train_on", "dtype", "seq_len", "val_data",
                                             "train_data", "val_fraction", "data_format", "seed")},
        flags={k: flags[k] for k in ("test_data", "limit", "mc_data", "general_text", "max_new_tokens")},
        sets=[sets["test"], sets["mc"], sets["general"]]), sort_keys=True, default=str)
    path = os.path.join(flags["base_cache"], "base_" + hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if os.path.exists(path):
        print(f"[base] metrics and answers from {path}", file=sys.stderr)
        with open(path) as f:
            saved = json.load(f)
        return saved["metrics"], saved["answers"]
    metrics, answers = evaluate(model, tokenizer, cfg, sets, flags, "base")
    os.makedirs(flags["base_cache"], exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(metrics=metrics, answers=answers), f)
    os.replace(path + ".tmp", path)
    return metrics, answers


METRIC_ROWS = [  # (key, label, format, better)
    ("val_loss", "validation loss (nats/token)", "{:.4f}", "lower"),
    ("val_ppl", "validation perplexity", "{:.3f}", "lower"),
    ("val_bpb", "validation bits per byte", "{:.4f}", "lower"),
    ("stop_rate", "answers that end their turn (stop token within the length limit)", "{:.1%}", "higher"),
    ("exact_match", "exact match", "{:.1%}", "higher"),
    ("normalized_exact_match", "normalized exact match", "{:.1%}", "higher"),
    ("valid_json", "valid JSON", "{:.1%}", "higher"),
    ("field_accuracy", "JSON field accuracy", "{:.1%}", "higher"),
    ("mc_accuracy", "multiple-choice accuracy", "{:.1%}", "higher"),
    ("pref_accuracy", "preference pairs: chosen more likely than rejected", "{:.1%}", "higher"),
    ("pref_logp_margin", "preference pairs: log p(chosen) - log p(rejected)", "{:.3f}", "higher"),
    ("reward_accuracy", "preference pairs: DPO reward accuracy (vs base)", "{:.1%}", "higher"),
    ("reward_margin", "preference pairs: DPO reward margin (vs base)", "{:.3f}", "higher"),
    ("forgetting_ppl", "general-text perplexity (forgetting)", "{:.3f}", "lower"),
    ("forgetting_bpb", "general-text bits per byte (forgetting)", "{:.4f}", "lower"),
    ("seconds", "evaluation time (s)", "{:.0f}", None),
]


def cell(text, width=300):
    """Text for a markdown table cell: one line, pipes escaped, long text shortened."""
    text = re.sub(r"\n\s*\n", "\n", text.strip())  # a run of blank lines shows as one break
    text = text if len(text) <= width else text[:width] + "..."
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or " "


def metrics_table(base, tuned):
    columns = ["metric", "base"] + (["fine-tuned", "change"] if tuned else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for key, label, fmt, better in METRIC_ROWS:
        if base.get(key) is None and (tuned or {}).get(key) is None:
            continue
        show = lambda m: fmt.format(m[key]) if m.get(key) is not None else "-"
        row = [label, show(base)]
        if tuned:
            change = tuned.get(key) - base.get(key) if None not in (base.get(key), tuned.get(key)) else None
            verdict = "" if not change or better is None else \
                " (better)" if (change < 0) == (better == "lower") else " (worse)"
            row += [show(tuned), ("+" if change >= 0 else "") + fmt.format(change) + verdict if change is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    if tuned and tuned.get("forgetting_ppl") and base.get("forgetting_ppl"):
        lines.append(f"\nForgetting check: general-text perplexity {tuned['forgetting_ppl'] / base['forgetting_ppl'] - 1:+.1%} "
                     f"relative to the base model.")
    for name, m in [("base", base), ("fine-tuned", tuned)]:
        if m and m.get("field_accuracy_by_field"):
            by_field = ", ".join(f"{k} {v:.1%}" for k, v in m["field_accuracy_by_field"].items())
            lines.append(f"\nField accuracy by field, {name}: {by_field}")
    return "\n".join(lines)


def write_report(path, command, cfg, flags, sets, base, tuned, base_answers, tuned_answers, tuned_name):
    val_name = {"val_data": cfg.val_data, "train_data": "held out of train_data", None: "none"}[sets["val"]]
    lines = ["# Evaluation: base vs fine-tuned" if tuned else "# Evaluation of the base model", "",
             f"Command: `{command}`", "",
             f"- base: `{cfg.model}`" + (f"\n- fine-tuned: `{tuned_name}`" if tuned else ""),
             f"- validation set: {val_name}" + (f" ({base['val_tokens']:,} trained tokens)" if "val_tokens" in base else ""),
             f"- test set: {sets['test_path'] or 'none'}" + (f" ({len(sets['test'])} examples, greedy)" if sets["test"] else ""),
             f"- multiple choice: {flags['mc_data'] or 'none'}" + (f" ({len(sets['mc'])} questions)" if sets["mc"] else ""),
             f"- general text (forgetting): {flags['general_text'] or 'none'}",
             f"- dtype {cfg.dtype}" + (f", first {flags['limit']} examples of each set" if flags["limit"] else ""), "",
             metrics_table(base, tuned), ""]
    if sets["test"]:
        n = min(flags["show"], len(sets["test"]))
        lines += [f"## The first {n} test prompts", "",
                  "| # | prompt (last message) | reference | base | " + ("fine-tuned |" if tuned else ""),
                  "|---|---|---|---|" + ("---|" if tuned else "")]
        for k in range(n):
            prompt, reference = sets["test"][k]
            mark = lambda a: ("✓ " if exact_match(a, reference) else "✗ ") + cell(a)
            row = [str(k + 1), cell(prompt[-1]["content"]), cell(reference), mark(base_answers[k])]
            row += [mark(tuned_answers[k])] if tuned else []
            lines.append("| " + " | ".join(row) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------


def with_kernels(model, cfg, device):
    """The model on its device, with the fast layer when kernels = "fast" (fast.py): call it again
    after load_adapter, which adds plain LoRA layers."""
    model.to(device)
    return fast.accelerate(model) if cfg.kernels == "fast" else model


@script
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, flags = parse_cli(argv, {
        "adapter": "", "model": "", "test_data": "", "limit": 0, "json": False, "out": "", "show": 10,
        "mc_data": os.path.join(ROOT, "data", "eval", "mc.jsonl"), "max_new_tokens": 0,
        "general_text": os.path.join(ROOT, "data", "eval", "general.txt"), "eval_batch_size": 16,
        "base_cache": "", "pref_data": ""},
        ranges={"limit": "[0, inf)", "show": "[0, inf)", "max_new_tokens": "[0, inf)", "eval_batch_size": "[1, inf)"})
    if flags["adapter"] and flags["model"]:
        raise ConfigError("give --adapter (LoRA on the config's model) or --model (a model folder), not both")
    cfg.model = fetch_model(cfg.model)
    tuned_name = flags["adapter"] or flags["model"]
    folder = flags["out"] or (os.path.dirname(os.path.abspath(tuned_name)) if tuned_name else cfg.out_dir)
    check_out_folder(folder, "--out")
    if flags["base_cache"]:
        check_out_folder(flags["base_cache"], "--base_cache")
    device, cfg.dtype = resolve_hardware(cfg)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    try:
        sets = read_sets(cfg, flags)
        tokenizer = load_tokenizer(cfg.model)
        model = with_kernels(load_model(cfg.model, dtype=dtype, device=device), cfg, device)
        # What is evaluated after the base must be readable, and fit, before the base's evaluation
        # (minutes) is spent: an adapter of another base model stops here.
        if flags["adapter"]:
            lora.read_adapter(model, flags["adapter"])
        elif flags["model"]:
            read_config(flags["model"])
            load_tokenizer(flags["model"])
        pref = flags["pref_data"]  # held-out preference pairs: how often the chosen answer wins
        pairs = preference_pairs(cfg, tokenizer, pref, flags["limit"]) if pref else None
        base, base_answers = evaluate_base(model, tokenizer, cfg, sets, flags)
        base_pairs = pair_logps(model, tokenizer, pairs, flags["eval_batch_size"]) if pref else None
        base.update(preference_metrics(base_pairs) if pref else {})
        tuned, tuned_answers = None, []
        if flags["adapter"]:  # the same base weights with the LoRA layers added in place
            model = with_kernels(lora.load_adapter(model, flags["adapter"]), cfg, device)
        elif flags["model"]:
            del model
            tokenizer = load_tokenizer(flags["model"])
            model = with_kernels(load_model(flags["model"], dtype=dtype, device=device), cfg, device)
            pairs = preference_pairs(cfg, tokenizer, pref, flags["limit"]) if pref else None
        if tuned_name:
            tuned, tuned_answers = evaluate(model, tokenizer, cfg, sets, flags, "fine-tuned")
            if pref:
                tuned_pairs = pair_logps(model, tokenizer, pairs, flags["eval_batch_size"])
                tuned.update(preference_metrics(tuned_pairs, base_pairs, cfg.dpo_beta))
    except ValueError as e:  # a file that does not parse, an adapter that does not fit (OSError: script())
        raise UserError(str(e)) from None

    report = os.path.join(folder, "eval.md" if tuned else "eval_base.md")
    write_report(report, " ".join(["python eval.py"] + argv), cfg, flags, sets, base, tuned, base_answers, tuned_answers, tuned_name)
    result = dict(tuned or base)
    result.update(forgetting_ppl_base=base.get("forgetting_ppl"),
                  forgetting_ppl_tuned=tuned.get("forgetting_ppl") if tuned else None,
                  base=base, tuned=tuned, report=report)
    for key in ("val_loss", "exact_match", "field_accuracy", "mc_accuracy"):
        result.setdefault(key, None)
    with open(report[:-3] + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(metrics_table(base, tuned))
    print(f"report: {report}")
    if flags["json"]:
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
