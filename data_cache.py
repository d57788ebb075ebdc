"""Tokenize once: a data set's rendered examples in a cache that every later start memory-maps.

Rendering a data set (JSON, templates, tokenizer) takes about a minute per 100,000 records, and every
start needs it: each run, each --resume, each sweep point, each eval.py, each torchrun rank. So
data.load_datasets renders it once into a folder, and later starts map that folder instead:

    .cache/data/<key>/                   (under the repository, gitignored; SFT_DATA_CACHE_DIR moves it,
                                          data_cache = False turns it off, rm -rf .cache/data clears it)
        meta.json                        the key's ingredients, the build's DataStats, the parts, the files' sizes
        input_ids.npy labels.npy         int32: every example's tokens, back to back
        offsets.npy                      int64 (n + 1,): example i is tokens [offsets[i], offsets[i + 1])
        rejected_input_ids.npy rejected_labels.npy rejected_offsets.npy
                                         the rejected side of preference pairs (no tokens for other examples)
        trained.npy                      int32 (n,): each example's trained tokens, for statistics and
                                         mixtures without reading the labels
        source_file.npy source_line.npy  where each example came from ("file:line")

The key is a hash of everything the examples depend on: the data files (size and SHA-256 of the content),
the tokenizer's files, the template as resolved (with the chat_template text for "jinja"), train_on,
seq_len, truncation, data_format, on_bad_data, the split (val_fraction and seed) when there is one, the
cache format (CACHE_VERSION) and the code that renders (data.py, templates.py, tokenizer.py, this file).
data_weights is not in it: the mixture is drawn from the cached parts at each start, as without a cache.

A build renders chunks of records in worker processes (forked, in order), writes into a temporary
folder and renames it into place when complete, so a folder under its key is a finished build. Each
start checks meta.json's key, every file's size, the arrays' dtypes and shapes and the offsets; a
folder that fails is removed and built again, never used. (Bytes changed inside a file of the right
size go unnoticed: catching them would mean hashing the whole cache at every start.)
"""
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import data

CACHE_VERSION = 1
ROOT = os.path.dirname(os.path.abspath(__file__))
CODE = ("data.py", "templates.py", "tokenizer.py", "data_cache.py")  # the code that renders
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "config.json", "generation_config.json")  # what tokenizer.load_tokenizer reads
SETTINGS = ("train_on", "seq_len", "truncation", "data_format", "on_bad_data")
TOKENS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")  # int32, one value per token
ROWS = {"offsets": np.int64, "rejected_offsets": np.int64, "trained": np.int32,  # one value per example
        "source_file": np.int32, "source_line": np.int64}                        # (offsets: n + 1)
CHUNK = 2000  # records per task of a worker process
MEMO_AFTER_NS = 2 * 10**9  # file_digest remembers the digest of a file unchanged for this long


class CacheError(ValueError):
    """A cache folder that is not a complete build of its key."""


def cache_root():
    return os.environ.get("SFT_DATA_CACHE_DIR") or os.path.join(ROOT, ".cache", "data")


def worker_count():
    """Processes for a build: the CPUs this process may use (SFT_DATA_WORKERS overrides), and one
    where fork is missing (the workers inherit the records by fork instead of receiving them pickled)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(os.environ.get("SFT_DATA_WORKERS", cpus))


# ---------------------------------------------------------------------------------------------------
# The key


def write_json(path, value):
    """Write a JSON file whole or not at all (a temporary file renamed over it)."""
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def file_digest(path, memo_dir):
    """SHA-256 of a file's content, remembered under the stat that git's index trusts (path, size,
    mtime, ctime, inode): an unchanged 600 MB file is not read again at each start, and any write
    changes ctime, which no tool can set back. A file changed in the last 2 s is not remembered: a
    second change within the same clock tick could leave the stat as it was."""
    st = os.stat(path)
    stamp = [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    memo = os.path.join(memo_dir, hashlib.sha256(stamp[0].encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(memo) as f:
            saved = json.load(f)
        if saved["stamp"] == stamp:
            return saved["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > MEMO_AFTER_NS:
        with contextlib.suppress(OSError):  # only a shortcut: without it the file is read again next time
            os.makedirs(memo_dir, exist_ok=True)
            write_json(memo, {"stamp": stamp, "sha256": h.hexdigest()})
    return h.hexdigest()


def cache_key(cfg, tokenizer, files):
    """(key, ingredients): the hash that names the cache folder and what it hashes; None for a
    tokenizer that was not loaded from a folder (no files to key it by: no cache)."""
    folder = getattr(tokenizer, "folder", None)
    if folder is None:
        return None
    memo = os.path.join(cache_root(), "hashes")
    identity = lambda path: [path, os.path.getsize(path), file_digest(path, memo)]  # noqa: E731
    ingredients = {
        "version": CACHE_VERSION,
        "code": [identity(os.path.join(ROOT, name))[1:] for name in CODE],
        "tokenizer": {name: identity(os.path.join(folder, name))[1:] for name in TOKENIZER_FILES
                      if os.path.isfile(os.path.join(folder, name))},
        "template": [data.resolve_template(name, tokenizer)[:2] for name in (cfg.template, "plain")],
        "settings": {key: getattr(cfg, key) for key in SETTINGS},
        "split": None if cfg.val_data else [cfg.val_fraction, cfg.seed],
        "train_data": [identity(path) for path in files],
        "val_data": identity(cfg.val_data) if cfg.val_data else None,
    }
    ingredients = json.loads(json.dumps(ingredients))  # tuples -> lists, as meta.json gives them back
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:24], ingredients


# ---------------------------------------------------------------------------------------------------
# Loading: the entry point of data.load_datasets


def load_parts(cfg, tokenizer, files, stats, log=print):
    """(train parts, val): the examples of each train file and the validation examples, as
    data.render_parts renders them, read from the cache (built first if it has no complete build for
    this key), and stats filled as the build filled them. None: no cache for this tokenizer, or
    none could be written (the caller renders)."""
    keyed = cache_key(cfg, tokenizer, files)
    if keyed is None:
        return None
    key, ingredients = keyed
    folder = os.path.join(cache_root(), key)
    with local_rank_0_first():  # under torchrun one process per machine builds, the others then map
        store = open_store(folder, ingredients, log)
        if store is None:
            try:
                build(cfg, tokenizer, files, folder, ingredients, log)
            except OSError as e:  # a full disk, a read-only folder: train without the cache
                log(f"data: cannot write the cache {folder} ({e}); rendering without it")
                return None
            store = open_store(folder, ingredients, log)
        if store is None:
            raise RuntimeError(f"data cache: {folder} was built but does not check out")
    meta = store.meta
    stats.skipped.update(meta["skipped"])
    stats.truncated.update(meta["truncated"])
    stats.dropped.update({(split, reason): n for split, reason, n in meta["dropped"]})
    stats.notes, stats.lines, stats.template = meta["notes"], meta["lines"], meta["template"]
    train_parts = [Examples(store, np.arange(a, b)) for split, a, b in meta["parts"] if split == "train"]
    val = np.concatenate([np.arange(a, b) for split, a, b in meta["parts"] if split == "val"] + [np.zeros(0, int)])
    return train_parts, Examples(store, val)


@contextlib.contextmanager
def local_rank_0_first():
    """Under torchrun: the local rank 0 runs the block while the other ranks wait at a barrier, then
    they run it (and find its build). If the local rank 0 fails, the others then fail the same way.
    Every rank passes exactly one barrier, whatever it finds. In a single process: just the block."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    # NCCL's barrier runs on a GPU: this rank's (train.py does not set a current device)
    devices = [int(os.environ.get("LOCAL_RANK", 0))] if dist.get_backend() == "nccl" else None
    if not first:
        dist.barrier(device_ids=devices)
    try:
        yield
    finally:
        if first:
            dist.barrier(device_ids=devices)


def open_store(folder, ingredients, log):
    """The Store of folder if it holds a complete build of these ingredients, else None; a folder
    that does not check out is removed (a stale or damaged cache is rebuilt, never used)."""
    if not os.path.isdir(folder):
        return None
    try:
        return Store(folder, ingredients)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log(f"data: cache {folder} does not check out ({e}); building it again")
        discard(folder)
        return None


def discard(folder):
    """Remove a folder: first renamed, so that no other process finds half of it under its key."""
    root, key = os.path.split(folder)
    doomed = os.path.join(root, f".discarded.{key}.{socket.gethostname()}.{os.getpid()}")
    with contextlib.suppress(OSError):
        os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Reading: the arrays of a folder, and examples as views into them


class Store:
    """The arrays of one cache folder, memory-mapped (read-only), after checking that the folder is
    a complete build of `ingredients`. example(i) is what data.render_examples made for it."""

    def __init__(self, folder, ingredients):
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = meta = json.load(f)
        if meta["ingredients"] != ingredients:
            raise CacheError("its key's ingredients differ")
        n, tokens = meta["examples"], meta["tokens"]
        shapes = {"input_ids": tokens, "labels": tokens, "rejected_input_ids": meta["rejected_tokens"],
                  "rejected_labels": meta["rejected_tokens"], "offsets": n + 1, "rejected_offsets": n + 1,
                  "trained": n, "source_file": n, "source_line": n}
        dtypes = dict(dict.fromkeys(TOKENS, np.int32), **ROWS)
        for name, size in meta["sizes"].items():
            path = os.path.join(folder, f"{name}.npy")
            if os.path.getsize(path) != size:
                raise CacheError(f"{name}.npy has {os.path.getsize(path)} bytes, not {size}")
            array = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
            if array.shape != (shapes[name],) or array.dtype != dtypes[name]:
                raise CacheError(f"{name}.npy is {array.dtype} {array.shape}, not {np.dtype(dtypes[name])} "
                                 f"({shapes[name]},)")
            setattr(self, name, array)
        for side, ids in (("offsets", self.input_ids), ("rejected_offsets", self.rejected_input_ids)):
            offsets = getattr(self, side)
            if offsets[0] != 0 or offsets[-1] != len(ids) or (np.diff(offsets) < 0).any():
                raise CacheError(f"{side}.npy does not cut the tokens into examples")
        if n and not 0 <= self.source_file.min() <= self.source_file.max() < len(meta["files"]):
            raise CacheError("source_file.npy names files that are not there")
        ends = [0] + [b for _, _, b in meta["parts"]]
        if [[a, b] for _, a, b in meta["parts"]] != [list(p) for p in zip(ends, ends[1:])] or ends[-1] != n:
            raise CacheError("its parts do not tile the examples")
        self.folder, self.files = folder, meta["files"]
        self.lengths = np.diff(self.offsets).astype(np.int32)

    def example(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        example = {"input_ids": self.input_ids[a:b], "labels": self.labels[a:b],
                   "source": f"{self.files[self.source_file[i]]}:{self.source_line[i]}"}
        a, b = self.rejected_offsets[i], self.rejected_offsets[i + 1]
        if b > a:  # a preference pair (a rejected side always has tokens)
            example["rejected"] = {"input_ids": self.rejected_input_ids[a:b], "labels": self.rejected_labels[a:b]}
        return example


class Examples(Sequence):
    """A list of examples held by a Store: examples[i] is a dict as render_examples makes it, its arrays
    views into the memory map; slicing, + and iteration work as on a list, and nothing is read until
    an example is. `index` picks the Store's examples, in order (a mixture repeats some)."""

    def __init__(self, store, index):
        self.store, self.index = store, np.asarray(index, dtype=np.int64)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Examples(self.store, self.index[k])
        return self.store.example(self.index[k])

    def __iter__(self):
        return map(self.store.example, self.index)

    def __add__(self, other):
        if isinstance(other, Examples) and other.store is self.store:
            return Examples(self.store, np.concatenate([self.index, other.index]))
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self):
        return f"<{len(self):,} examples of the data cache {self.store.folder}>"

    @property
    def lengths(self):
        """The token count of each example (without reading its tokens)."""
        return self.store.lengths[self.index]

    def counts(self):
        """(tokens, trained tokens) of all the examples, as data.count counts them."""
        rejected = np.diff(self.store.rejected_offsets)[self.index]
        return int(self.lengths.sum() + rejected.sum()), int(self.store.trained[self.index].sum())

    def file_counts(self):
        """{file: how many of the examples come from it}."""
        n = np.bincount(self.store.source_file[self.index], minlength=len(self.store.files))
        return Counter({name: int(k) for name, k in zip(self.store.files, n) if k})

    @staticmethod
    def join(parts):
        """One Examples of parts of the same Store, in order."""
        return Examples(parts[0].store, np.concatenate([p.index for p in parts]))

    @staticmethod
    def mix(parts, weights, seed):
        """data.mix of parts of the same Store: the same draw, made on the indices."""
        mixture = data.mix([p.index.tolist() for p in parts], weights, seed)
        return Examples(parts[0].store, np.array(mixture, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------
# Building: render in worker processes, write into a temporary folder, rename it into place


def build(cfg, tokenizer, files, folder, ingredients, log):
    """Render the data set into `folder`, through a temporary folder renamed into place once complete.
    Another process that finishes the same build first wins; this one's copy is then dropped."""
    root, key = os.path.split(folder)
    os.makedirs(root, exist_ok=True)
    remove_dead_builds(root, key)
    tmp = os.path.join(root, f".{key}.{socket.gethostname()}.{os.getpid()}")
    workers, start = worker_count(), time.perf_counter()
    log(f"data: building the cache {folder} ({workers} worker process{'es' * (workers > 1)})")
    names = files + ([cfg.val_data] if cfg.val_data else [])
    stats, writer = data.DataStats(), Writer(tmp, {name: k for k, name in reversed(list(enumerate(names)))})
    try:
        def render(conversations, template, split):  # data.render_parts' render, into the writer
            chunks = rendered_chunks(conversations, tokenizer, template, cfg, split, writer.file_index, workers)
            with contextlib.closing(chunks):  # an error stops the workers now, not when garbage-collected
                for packed, chunk_stats, error in chunks:
                    if error:
                        raise data.DataError(*error)
                    merge_stats(stats, chunk_stats)
                    writer.add(packed)
            return writer.end_part(split)
        data.render_parts(cfg, tokenizer, files, stats, render)
        writer.finish(ingredients, names, stats)
        try:
            os.rename(tmp, folder)
        except OSError:  # the folder exists: another process finished first (checked when opened)
            pass
    finally:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: built the cache in {time.perf_counter() - start:.1f} s")


def remove_dead_builds(root, key):
    """Remove the temporary folders of this key's builds that were killed on this machine (their
    process is gone); they are never read, only their disk space is taken back."""
    host = socket.gethostname()
    for name in os.listdir(root):
        prefix, _, pid = name.rpartition(".")
        if prefix == f".{key}.{host}" and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def merge_stats(stats, part):
    """Add a chunk's DataStats to the build's: chunk by chunk in order, it adds up to what one
    process rendering everything would have counted (notes: the first five, in order)."""
    stats.skipped.update(part.skipped)
    stats.truncated.update(part.truncated)
    stats.dropped.update(part.dropped)
    stats.notes += part.notes[:5 - len(stats.notes)]


JOB = None  # what the worker processes render: set before they fork, so that they inherit it unpickled


def rendered_chunks(conversations, tokenizer, template, cfg, split, file_index, workers):
    """(packed arrays, DataStats, error) of each chunk of CHUNK conversations, in order, rendered by
    `workers` forked processes (here, when there is one chunk or one worker)."""
    global JOB
    size = max(1, min(CHUNK, -(-len(conversations) // (4 * workers))))  # small sets: 4 chunks a worker
    bounds = [(s, min(s + size, len(conversations))) for s in range(0, len(conversations), size)]
    JOB = (conversations, tokenizer, template, cfg, split, file_index)
    try:
        if workers > 1 and len(bounds) > 1:  # (a pool that notices a worker killed, by the OOM killer say)
            pool = ProcessPoolExecutor(min(workers, len(bounds)), mp_context=multiprocessing.get_context("fork"))
            try:
                yield from pool.map(render_chunk, bounds)
            except BaseException:  # an error, Ctrl-C: drop the chunks not started, do not wait for them
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()  # all done: the workers exit
        else:
            yield from map(render_chunk, bounds)
    finally:
        JOB = None


def render_chunk(bounds):
    """One chunk of JOB's conversations -> (packed arrays, DataStats, None), or (None, None, (message,
    kind)) when a bad record stops the build (on_bad_data = "stop"): the parent raises it, in order."""
    conversations, tokenizer, template, cfg, split, file_index = JOB
    stats = data.DataStats()
    try:
        examples = data.render_examples(conversations[bounds[0]:bounds[1]], tokenizer, template, cfg, split, stats)
    except data.DataError as e:
        return None, None, (str(e), e.kind)
    return pack(examples, file_index), stats, None


def pack(examples, file_index):
    """A chunk's examples as a few flat arrays (sent back to the parent in one piece each)."""
    empty = {"input_ids": np.zeros(0, np.int32), "labels": np.zeros(0, np.int32)}
    rejected = [ex.get("rejected", empty) for ex in examples]
    join = lambda arrays: np.concatenate(arrays + [np.zeros(0, np.int32)]).astype(np.int32)  # noqa: E731
    sources = [ex["source"].rsplit(":", 1) for ex in examples]
    return {"input_ids": join([ex["input_ids"] for ex in examples]), "labels": join([ex["labels"] for ex in examples]),
            "rejected_input_ids": join([r["input_ids"] for r in rejected]),
            "rejected_labels": join([r["labels"] for r in rejected]),
            "lengths": np.array([len(ex["input_ids"]) for ex in examples], np.int64),
            "rejected_lengths": np.array([len(r["input_ids"]) for r in rejected], np.int64),
            "trained": np.array([(ex["labels"] != data.IGNORE).sum() for ex in examples], np.int32),
            "source_file": np.array([file_index[path] for path, _ in sources], np.int32),
            "source_line": np.array([int(line) for _, line in sources], np.int64)}


class Writer:
    """The arrays of a cache, written chunk by chunk into a folder: the token arrays straight to their
    .npy files (a header for 0 tokens first, rewritten with the count at the end: numpy leaves room
    for the digits), the small per-example arrays kept until finish()."""

    def __init__(self, folder, file_index):
        os.makedirs(folder)
        self.folder, self.file_index = folder, file_index
        self.files = {name: open(os.path.join(folder, f"{name}.npy"), "wb") for name in TOKENS}
        self.counts = dict.fromkeys(TOKENS, 0)
        for name, f in self.files.items():
            self.header(f, 0)
        self.header_size = f.tell()
        self.rows = {name: [] for name in ("lengths", "rejected_lengths", "trained", "source_file", "source_line")}
        self.parts, self.n = [], 0

    @staticmethod
    def header(f, n):
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.int32).str, "fortran_order": False,
                                                 "shape": (n,)})

    def add(self, packed):
        for name, f in self.files.items():
            packed[name].tofile(f)
            self.counts[name] += len(packed[name])
        for name, rows in self.rows.items():
            rows.append(packed[name])
        self.n += len(packed["lengths"])

    def end_part(self, split):
        """Close the current part (the examples added since the last part): its range of examples."""
        start = self.parts[-1][2] if self.parts else 0
        self.parts.append((split, start, self.n))
        return range(start, self.n)

    def finish(self, ingredients, files, stats):
        """Headers with the final counts, the per-example arrays, then meta.json: written last, so
        that a folder without it is no build."""
        for name, f in self.files.items():
            end = f.tell()
            f.seek(0)
            self.header(f, self.counts[name])
            if f.tell() != self.header_size:
                raise RuntimeError(f"{name}.npy: the header changed size")
            f.seek(end)
        rows = {name: np.concatenate(arrays + [np.zeros(0, np.int64)]) for name, arrays in self.rows.items()}
        arrays = {"offsets": np.concatenate([[0], np.cumsum(rows["lengths"])]),
                  "rejected_offsets": np.concatenate([[0], np.cumsum(rows["rejected_lengths"])]),
                  "trained": rows["trained"], "source_file": rows["source_file"], "source_line": rows["source_line"]}
        for name, array in arrays.items():
            np.save(os.path.join(self.folder, f"{name}.npy"), array.astype(ROWS[name]))
        self.close()
        names = list(TOKENS) + list(ROWS)
        write_json(os.path.join(self.folder, "meta.json"), {
            "ingredients": ingredients, "files": files, "parts": self.parts, "examples": self.n,
            "tokens": self.counts["input_ids"], "rejected_tokens": self.counts["rejected_input_ids"],
            "sizes": {name: os.path.getsize(os.path.join(self.folder, f"{name}.npy")) for name in names},
            "skipped": stats.skipped, "truncated": stats.truncated, "notes": stats.notes, "lines": stats.lines,
            "dropped": [[split, reason, n] for (split, reason), n in stats.dropped.items()],
            "template": stats.template})
        for name in os.listdir(self.folder):  # on the disk before the rename makes the folder a build
            fd = os.open(os.path.join(self.folder, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def close(self):
        for f in self.files.values():
            f.close()
