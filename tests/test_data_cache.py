"""data_cache.py: a data set rendered once and memory-mapped gives exactly the examples and statistics of
rendering it, under a key that changes with everything they depend on; a damaged cache, or one that an
interrupted build left, is never used."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import data_cache
from config import Config
from conftest import ROOT
from test_data import tok, tok_dir, write  # noqa: F401, F811  (fixtures)

BAD = '{"instruction": "no output"}'


def data_files(tmp_path):
    """Three formats in three files: alpaca (with a bad record and a long one), messages, preference."""
    alpaca = [json.dumps({"instruction": f"Question {k}?", "input": "x" * (k % 3), "output": f"Answer {k}."})
              for k in range(14)]
    alpaca[5] = BAD
    alpaca[9] = json.dumps({"instruction": "Long?", "output": " ".join(["word"] * 80)})
    messages = [json.dumps({"messages": [{"role": "user", "content": f"Hi {k}"},
                                         {"role": "assistant", "content": f"Hello {k}!"}]}) for k in range(9)]
    pairs = [json.dumps({"prompt": f"Capital {k}?", "chosen": f"Paris {k}.", "rejected": f"Lyon {k}."})
             for k in range(6)]
    return [write(tmp_path, "a.jsonl", alpaca), write(tmp_path, "m.jsonl", messages), write(tmp_path, "p.jsonl", pairs)]


def make_config(files, **overrides):
    settings = dict(train_data=files, val_fraction=0.2, seq_len=128, on_bad_data="skip", data_weights=[1.0, 2.0, 1.0])
    return Config(**dict(settings, **overrides))


def load(cfg, tok, logs=None):
    return data.load_datasets(cfg, tok, log=logs.append if logs is not None else lambda line: None)


def assert_same_examples(a, b):
    """The same examples, bit for bit: ids and labels (and the rejected side's), dtypes, sources."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["source"] == y["source"]
        for side_x, side_y in [(x, y)] + ([(x["rejected"], y["rejected"])] if "rejected" in x else []):
            for key in ("input_ids", "labels"):
                assert side_x[key].dtype == side_y[key].dtype == np.int32
                assert side_x[key].tobytes() == side_y[key].tobytes()


def cache_folders():
    root = data_cache.cache_root()
    return sorted(name for name in os.listdir(root) if not name.startswith(".") and name != "hashes")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder; chunks of 3 records, so that small files make several worker tasks."""
    monkeypatch.setenv("SFT_DATA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_cache, "CHUNK", 3)
    return tmp_path / "cache"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cached_examples_and_statistics_equal_rendering_them(tmp_path, tok, cache, monkeypatch, workers):
    monkeypatch.setenv("SFT_DATA_WORKERS", workers)
    cfg = make_config(data_files(tmp_path))
    fresh = load(Config(**{**vars(cfg), "data_cache": False}), tok)
    logs = []
    built = load(cfg, tok, logs)
    assert any(line.startswith("data: building the cache") for line in logs)
    logs.clear()
    mapped = load(cfg, tok, logs)
    assert not any("building" in line for line in logs)  # the second start renders nothing
    for run in (built, mapped):
        assert_same_examples(run[0], fresh[0])
        assert_same_examples(run[1], fresh[1])
        assert run[2] == fresh[2] and run[2].report() == fresh[2].report()
    assert fresh[2].skipped == {"missing field": 1} and fresh[2].truncated["train"] + fresh[2].truncated["val"] == 1
    assert isinstance(mapped[0], data_cache.Examples) and not mapped[0][0]["input_ids"].flags.writeable
    # the rest of the code sees the same thing: plans, packed batches, pairs
    for packing in ("none", "packed"):
        plan = data.plan_batches(fresh[0], 2, 128, packing, seed=3)
        assert data.plan_batches(mapped[0], 2, 128, packing, seed=3) == plan
        a, b = (data.collate(run[0], plan[0], 128, 0) for run in (fresh, mapped))
        assert all(a[k].equal(b[k]) for k in ("input_ids", "targets", "position_ids"))
    pairs = [i for i, ex in enumerate(fresh[0]) if "rejected" in ex][:2]
    a, b = (data.collate_pairs(run[0], [[i] for i in pairs], 128, 0) for run in (fresh, mapped))
    assert a["input_ids"].equal(b["input_ids"]) and a["n_trained"] == b["n_trained"]
    assert data.count_trained(mapped[0], plan[0]) == data.count_trained(fresh[0], plan[0])
    assert_same_examples(mapped[0] + mapped[1], list(fresh[0]) + list(fresh[1]))
    assert_same_examples(mapped[1][1:3], fresh[1][1:3])


def test_key_changes_with_data_template_and_settings_not_with_weights(tmp_path, tok, cache, monkeypatch):
    files = data_files(tmp_path)
    key = lambda **overrides: data_cache.cache_key(make_config(files, **overrides), tok, files)[0]  # noqa: E731
    base = key()
    assert key() == base and key(data_weights=[]) == base  # the mixture is drawn at each start
    changed = [key(template="plain"), key(seq_len=256), key(train_on="all"), key(truncation="drop"),
               key(val_fraction=0.3), key(seed=2), key(on_bad_data="stop"), key(data_format="alpaca")]
    assert base not in changed and len(set(changed)) == len(changed)
    assert key(val_data=files[1], seed=2) == key(val_data=files[1])  # no split: the seed changes nothing
    # the same size and mtime, one byte changed: a new key (the digest is of the content; ctime moved)
    monkeypatch.setattr(data_cache, "MEMO_AFTER_NS", 0)  # remember digests at once (else after 2 s)
    stat = os.stat(files[0])
    assert key() == base and os.listdir(cache / "hashes")  # remembered
    with open(files[0], "r+b") as f:
        f.seek(2)
        f.write(b"X")
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(files[0]).st_size == stat.st_size and key() != base


def test_a_tokenizer_file_changes_the_key(tmp_path, tok_dir):
    from tokenizer import load_tokenizer
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in os.listdir(tok_dir):
        (folder / name).write_bytes((tok_dir / name).read_bytes())
    files = [os.path.join(ROOT, "data", "examples", "alpaca.jsonl")]
    before = data_cache.cache_key(make_config(files), load_tokenizer(folder), files)[0]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, model_max_length=7)))
    assert data_cache.cache_key(make_config(files), load_tokenizer(folder), files)[0] != before


def damage(folder, how):
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    if how == "truncated":
        os.truncate(path("input_ids.npy"), os.path.getsize(path("input_ids.npy")) - 4)
    elif how == "missing file":
        os.remove(path("labels.npy"))
    elif how == "no meta.json":  # files without meta.json: a build that did not finish
        os.remove(path("meta.json"))
    elif how == "offsets out of order":
        offsets = np.load(path("offsets.npy"))
        offsets[[1, 2]] = offsets[[2, 1]]
        np.save(path("offsets.npy"), offsets)
    elif how == "other key":
        meta = json.load(open(path("meta.json")))
        meta["ingredients"]["settings"]["seq_len"] = 4096
        json.dump(meta, open(path("meta.json"), "w"))


@pytest.mark.parametrize("how", ["truncated", "missing file", "no meta.json", "offsets out of order", "other key"])
def test_a_damaged_cache_is_rebuilt_not_used(tmp_path, tok, cache, how):
    cfg = make_config(data_files(tmp_path))
    fresh = load(Config(**{**vars(cfg), "data_cache": False}), tok)
    load(cfg, tok)
    [key] = cache_folders()
    damage(cache / key, how)
    logs = []
    again = load(cfg, tok, logs)
    assert any("does not check out" in line for line in logs) and any("building" in line for line in logs)
    assert_same_examples(again[0], fresh[0]) and again[2] == fresh[2]
    assert cache_folders() == [key]


def test_an_interrupted_build_leaves_nothing_that_is_used(tmp_path, tok, cache, monkeypatch):
    cfg = make_config(data_files(tmp_path))
    calls = []

    def interrupted(bounds):  # Ctrl-C in the middle of the build
        calls.append(bounds)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_chunk(bounds)
    render_chunk = data_cache.render_chunk
    monkeypatch.setattr(data_cache, "render_chunk", interrupted)
    monkeypatch.setenv("SFT_DATA_WORKERS", "1")
    with pytest.raises(KeyboardInterrupt):
        load(cfg, tok)
    assert os.listdir(cache) == ["hashes"] or os.listdir(cache) == []  # no build, no temporary folder
    monkeypatch.setattr(data_cache, "render_chunk", render_chunk)
    # a build killed outright leaves its temporary folder: never read, and removed by the next build
    built = load(cfg, tok)
    [key] = cache_folders()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = cache / f".{key}.{data_cache.socket.gethostname()}.{int(dead.stdout)}"
    os.rename(cache / key, killed)
    logs = []
    again = load(cfg, tok, logs)
    assert any("building" in line for line in logs) and not killed.exists()
    assert_same_examples(again[0], built[0])


def test_show_and_statistics_are_the_same_from_the_cache(tmp_path, tok_dir, cache, capsys):
    path = data_files(tmp_path)[0]
    argv = ["--data", path, "--model", str(tok_dir), "--show", "2", "--on_bad_data", "skip"]
    outputs = []
    for _ in range(2):  # the build, then the cache
        data.main(argv)
        outputs.append([line for line in capsys.readouterr().out.splitlines() if "the cache" not in line])
    assert outputs[0] == outputs[1] and "skipped bad records: 1" in "\n".join(outputs[0])
    assert any(line.startswith("--- ") for line in outputs[0])


TORCHRUN_CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import data
from config import Config
from tokenizer import load_tokenizer
dist.init_process_group("gloo")
tok, logs = load_tokenizer({tok!r}), []
try:  # a bad record stops the build on rank 0: the other rank fails the same way (and does not hang)
    data.load_datasets(Config(train_data={files!r}), tok, log=logs.append)
except data.DataError as e:
    error = str(e)
train, val, stats = data.load_datasets(Config(train_data={files!r}, on_bad_data="skip"), tok, log=logs.append)
print("RESULT", json.dumps(dict(rank=dist.get_rank(), built=sum("building" in l for l in logs), error=error,
                                 examples=len(train), first=train[0]["input_ids"].tolist())))
dist.destroy_process_group()
"""


def test_under_torchrun_rank_0_builds_and_the_other_rank_maps_or_fails_alike(tmp_path, tok_dir, cache):
    files = data_files(tmp_path)[:2]
    script = tmp_path / "child.py"
    script.write_text(TORCHRUN_CHILD.format(root=ROOT, files=files, tok=str(tok_dir)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(torchrun + [str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines()
                      if "RESULT " in line), key=lambda r: r["rank"])
    assert [r["built"] for r in results] == [2, 1]  # the failed build on both ranks, then rank 0's alone
    assert results[0]["error"] == results[1]["error"] and "a.jsonl:6: missing field 'output'" in results[0]["error"]
    assert results[0]["examples"] == results[1]["examples"] and results[0]["first"] == results[1]["first"]
    assert len(cache_folders()) == 1


def test_a_cache_that_cannot_be_written_falls_back_to_rendering(tmp_path, tok, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("SFT_DATA_CACHE_DIR", str(blocked / "data"))
    cfg = make_config(data_files(tmp_path))
    logs = []
    train, val, stats = load(cfg, tok, logs)
    assert any("cannot write the cache" in line for line in logs)
    assert_same_examples(train, load(Config(**{**vars(cfg), "data_cache": False}), tok)[0])
