"""Write the course's data files (data/course/) from the demo task's (data/demo/, tools/make_demo_data.py).

    python course/make_course_data.py          # deterministic: the same files every time

    val_100.jsonl         the first 100 validation examples: every course run validates on these
    test_no_system.jsonl  the test set without its system message (lesson 2: the prompt that
                          inference sends differs from the one training rendered)
    train_32.jsonl        the first 32 training examples (lesson 8: small enough to overfit)
    clean_200.jsonl       the first 200 training examples (lesson 10: small and clean)
    noisy_2400.jsonl      all 2,400 training examples, half of them corrupted (lesson 10: large and
                          noisy). A corrupted record says how in its "noise" field (data.py reads only
                          "messages"): label noise (one field has a wrong value, as from a hasty
                          annotator) or format noise (the JSON written another way: spaces, another
                          key order, a chatty preamble, a missing field, Python's repr).
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from make_demo_data import FIELDS, PRODUCTS, answer_text  # noqa: E402
from sweep import read_jsonl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ("billing", "shipping", "technical", "account", "returns")
CHOICES = {"category": CATEGORIES, "urgency": ("high", "medium", "low"),
           "sentiment": ("negative", "neutral", "positive")}
NOISY_SHARE = 0.5


def label_noise(answer, rng):
    """One field gets a wrong but well-formed value. -> (answer, description)"""
    field = rng.choice(FIELDS)
    wrong = dict(answer)
    if field in CHOICES:
        wrong[field] = rng.choice([v for v in CHOICES[field] if v != answer[field]])
    elif field == "product":
        wrong[field] = rng.choice([None] + [p for p in sorted(PRODUCTS) if p != answer[field]]) \
            if answer[field] else rng.choice(sorted(PRODUCTS))
    else:  # order_id: dropped when there is one, made up when there is none
        wrong[field] = None if answer[field] else f"#{rng.randrange(10000, 100000)}"
    return answer_text(wrong), f"label: wrong {field}"


def format_noise(answer, rng):
    """The same facts, written another way. -> (answer text, description)"""
    kind = rng.choice(["spaces", "key order", "preamble", "missing field", "python repr"])
    ordered = {k: answer[k] for k in FIELDS}
    if kind == "spaces":
        return json.dumps(ordered), f"format: {kind}"
    if kind == "key order":
        keys = list(FIELDS)
        while keys == list(FIELDS):
            rng.shuffle(keys)
        return json.dumps({k: answer[k] for k in keys}, separators=(",", ":")), f"format: {kind}"
    if kind == "preamble":
        return rng.choice(["Sure! Here is the ticket: ", "Here you go:\n", "The ticket as JSON: "]) \
            + answer_text(answer), f"format: {kind}"
    if kind == "missing field":
        drop = rng.choice(FIELDS)
        return json.dumps({k: v for k, v in ordered.items() if k != drop}, separators=(",", ":")), \
            f"format: missing {drop}"
    return repr(ordered), f"format: {kind}"


def corrupt(records, share, seed):
    """A copy of records in which a seeded `share` of them has a corrupted answer (half label noise,
    half format noise), each marked with a "noise" field saying what was done."""
    rng = random.Random(seed)
    picked = set(rng.sample(range(len(records)), round(share * len(records))))
    out = []
    for k, record in enumerate(records):
        record = json.loads(json.dumps(record))  # a deep copy
        if k in picked:
            answer = json.loads(record["messages"][-1]["content"])
            text, what = (label_noise if rng.random() < 0.5 else format_noise)(answer, rng)
            record["messages"][-1]["content"] = text
            record["noise"] = what
        out.append(record)
    return out


def without_system(records):
    return [dict(r, messages=[m for m in r["messages"] if m["role"] != "system"]) for r in records]


def make_files(demo_dir):
    """{file name: [record]} of every course file."""
    train = read_jsonl(os.path.join(demo_dir, "train.jsonl"))
    val = read_jsonl(os.path.join(demo_dir, "val.jsonl"))
    test = read_jsonl(os.path.join(demo_dir, "test.jsonl"))
    return {"val_100.jsonl": val[:100], "test_no_system.jsonl": without_system(test),
            "train_32.jsonl": train[:32], "clean_200.jsonl": train[:200],
            "noisy_2400.jsonl": corrupt(train, NOISY_SHARE, seed=0)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default=os.path.join(ROOT, "data", "demo"), help="the demo task's folder")
    p.add_argument("--out", default=os.path.join(ROOT, "data", "course"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, records in make_files(args.demo).items():
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        noisy = sum("noise" in r for r in records)
        print(f"{path}: {len(records)} examples" + (f", {noisy} corrupted" if noisy else ""))


if __name__ == "__main__":
    main()
