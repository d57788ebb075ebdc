"""Every setting of a run, its default, and how a config file and the command line change it.

A config file is plain Python assignments over these defaults (nanoGPT style):

    # configs/demo.py
    model = "models/SmolLM2-135M-Instruct"
    method = "lora"
    lr = 2e-4

and the command line overrides any key with the type of its default:

    python train.py --config configs/demo.py --lr=1e-4 --max_steps=50 --packing=packed

An unknown key or a value of the wrong type is an error that names the key (and, for a typo, the
closest known key), and so is a number out of its range (RANGES); nothing runs and nothing is
written. A config file is Python and runs as such, like any script you run: run only files you trust.
"""
import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import re
import signal
import sys
from dataclasses import dataclass, field


@dataclass
class Config:
    # --- model and fine-tuning method -------------------------------------------------------
    model: str = "models/SmolLM2-135M-Instruct"  # a Hugging Face model folder
    method: str = "lora"            # full | lora | qlora | freeze | head   (see lora.py)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # or a comma list: "q_proj,v_proj"
    rslora: bool = False            # scale alpha / sqrt(r) instead of alpha / r
    train_layers: int = 2           # method=freeze: train only the top N blocks
    train_head: bool = True         # method=freeze: also train the final norm and lm_head
    merge: bool = False             # lora/qlora: also write OUT_DIR/merged/ (a plain HF folder)
    # --- data (see data.py) --------------------------------------------------------------------
    train_data: list = field(default_factory=list)  # one file or several (a mixture)
    data_weights: list = field(default_factory=list)  # mixture weights, one per train file
    val_data: str = ""              # empty: split val_fraction off the training data
    test_data: str = ""             # held-out set for eval.py
    val_fraction: float = 0.05
    data_format: str = "auto"       # auto | alpaca | messages | sharegpt | prompt_completion | text | preference
    template: str = "auto"          # auto | jinja | a family in templates.py (chatml, llama3.1, qwen3, gemma, ...)
    train_on: str = "assistant"     # assistant | last | all
    seq_len: int = 512
    truncation: str = "truncate"    # truncate | drop: what to do with examples longer than seq_len
    packing: str = "none"           # none | packed
    on_bad_data: str = "stop"       # stop | skip (skipped examples are counted and reported)
    data_cache: bool = True         # render once into .cache/data/, memory-map it at later starts (data_cache.py)
    # --- optimisation (see train.py) -----------------------------------------------------------
    batch_size: int = 4             # examples (or packed rows) per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    max_steps: int = 0              # optimizer steps; 0 = run `epochs` epochs
    epochs: float = 1.0
    lr: float = 2e-4
    min_lr: float = 2e-5            # cosine decay ends here
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global gradient norm; 0 = no clipping
    neftune_alpha: float = 0.0      # NEFTune noise on input embeddings; 0 = off
    distill_weight: float = 0.0     # weight of the KL-to-base-model loss (forgetting mitigation)
    distill_on: str = "prompt"      # where that KL is taken: the prompt tokens, or the answer tokens
    objective: str = "sft"          # sft | dpo | orpo: dpo and orpo need preference data (prompt, chosen, rejected)
    dpo_beta: float = 0.1           # DPO: how far from the reference model the rewards may pull
    orpo_lambda: float = 0.1        # ORPO: weight of the odds-ratio term next to the SFT loss
    # --- hardware -------------------------------------------------------------------------------
    dtype: str = "auto"             # float32 | bfloat16 (bf16 frozen weights + autocast) | auto
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    kernels: str = "fast"           # fast | plain: the speed and memory layer (fast.py), or none of it
    grad_checkpointing: bool = False
    compile: bool = False           # torch.compile the model
    parallel: str = "ddp"           # under torchrun: ddp (a whole copy per rank) | fsdp (FSDP2: 1/N each; parallel.py)
    # --- run folder, evaluation, checkpoints ----------------------------------------------------
    out_dir: str = "runs/default"
    log_every: int = 1
    eval_every: int = 50            # 0 = only at the end
    eval_batches: int = 0           # 0 = the whole validation set
    sample_prompts: list = field(default_factory=list)  # printed with their generations at eval
    save_every: int = 50
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = never stop early
    seed: int = 1337


# Keys that take one of a few words. (data_format and template are checked by data.py.)
CHOICES = {
    "method": ("full", "lora", "qlora", "freeze", "head"),
    "train_on": ("assistant", "last", "all"),
    "truncation": ("truncate", "drop"),
    "packing": ("none", "packed"),
    "on_bad_data": ("stop", "skip"),
    "dtype": ("auto", "float32", "bfloat16"),
    "distill_on": ("prompt", "answer"),
    "kernels": ("fast", "plain"),
    "objective": ("sft", "dpo", "orpo"),
    "parallel": ("ddp", "fsdp"),
}


# The allowed range of every numeric key, in interval notation: "[1, inf)" is >= 1, "(0, inf)" is > 0.
RANGES = {
    "lora_rank": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)", "train_layers": "[0, inf)",
    "val_fraction": "[0, 1)", "seq_len": "[2, inf)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)",
    "max_steps": "[0, inf)", "epochs": "(0, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)", "warmup_steps": "[0, inf)",
    "weight_decay": "[0, inf)", "betas": "[0, 1)", "eps": "(0, inf)", "grad_clip": "[0, inf)",
    "neftune_alpha": "[0, inf)", "distill_weight": "[0, inf)", "dpo_beta": "(0, inf)", "orpo_lambda": "[0, inf)",
    "log_every": "[1, inf)", "eval_every": "[0, inf)", "eval_batches": "[0, inf)", "save_every": "[1, inf)",
    "early_stopping_patience": "[0, inf)", "seed": "[0, inf)",
}
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# What a resumed run must share with how it started (config.json), or the weights it goes on from
# mean something else: the model and method, the data and how it is rendered and batched, the
# optimizer and its schedule, the objective, seed and dtype. Not in it: device, kernels,
# grad_checkpointing and compile (the same math up to float rounding), logging, evaluation, saving,
# early stopping and the export (merge), which change what is written, never the weights.
MATH_KEYS = ("model", "method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "rslora", "train_layers",
             "train_head", "train_data", "data_weights", "val_data", "val_fraction", "data_format", "template",
             "train_on", "seq_len", "truncation", "packing", "batch_size", "grad_accum", "max_steps", "epochs",
             "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "eps", "grad_clip", "neftune_alpha",
             "distill_weight", "distill_on", "objective", "dpo_beta", "orpo_lambda", "dtype", "seed")


# Exit codes, the same in every script
EXIT_OK, EXIT_NON_FINITE, EXIT_USER_ERROR, EXIT_INTERRUPT = 0, 1, 2, 130


class UserError(Exception):
    """The user's mistake: a setting, a data file, a model folder. Scripts print it as one line
    (`error: ...`, no traceback) and exit with code 2."""


class ConfigError(UserError):
    """A mistake in the config file or on the command line."""


KEYS = {f.name: f for f in dataclasses.fields(Config)}


def default_of(key):
    f = KEYS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def unknown_key_error(key, where):
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def coerce(key, value, where):
    """Return `value` as the type of `key`'s default, or raise ConfigError."""
    kind = type(default_of(key))
    if isinstance(value, str) and kind is not str:  # from the command line: parse the text
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        elif kind in (list, tuple):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = [v for v in text.split(",") if v]  # a,b,c  ->  ["a", "b", "c"]
            if isinstance(value, (str, int, float)):
                value = [value]
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind in (list, tuple) and isinstance(value, (str, list, tuple)):
        value = kind([value] if isinstance(value, str) else value)
    if type(value) is not kind:
        raise ConfigError(f"{where}: {key} = {value!r} should be {kind.__name__}")
    return value


def read_config_file(path):
    """Run a config file and return its plain assignments as a dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: is a directory, not a config file" if os.path.isdir(path) else
                          f"{path}: config file not found")
    scope = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def check_range(key, value, interval=None):
    """ConfigError unless the number (each number of a tuple or list) lies in the interval, RANGES[key]
    by default ("[0, 1)": 0 <= x < 1); NaN never does."""
    interval = interval or RANGES[key]
    low, high = (float(end) for end in interval[1:-1].split(", "))
    for x in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or \
                not (low < x < high or x == low and interval[0] == "[" or x == high and interval[-1] == "]"):
            allowed = f"in {interval}" if high < math.inf else (">= " if interval[0] == "[" else "> ") + f"{low:g}"
            each = " (each of them)" if isinstance(value, (tuple, list)) else ""
            raise ConfigError(f"{key} = {value!r} should be {allowed}{each}")


def load_config(path=None, overrides=()):
    """Defaults, then the config file, then `--key=value` overrides (strings)."""
    values = {}
    for key, value in (read_config_file(path) if path else {}).items():
        if key not in KEYS:
            raise unknown_key_error(key, path)
        values[key] = coerce(key, value, path)
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if key not in KEYS:
            raise unknown_key_error(key, "command line")
        if not sep:
            raise ConfigError(f"command line: --{key} needs a value: --{key}=VALUE")
        values[key] = coerce(key, value, "command line")
    cfg = Config(**values)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} = {getattr(cfg, key)!r} should be one of {', '.join(allowed)}")
    for key in RANGES:
        check_range(key, getattr(cfg, key))
    if len(cfg.betas) != 2:
        raise ConfigError(f"betas = {cfg.betas!r} should be two numbers (beta1, beta2)")
    check_range("data_weights", cfg.data_weights, "[0, inf)")
    if cfg.data_weights and not sum(cfg.data_weights) > 0:
        raise ConfigError(f"data_weights = {cfg.data_weights!r}: at least one weight should be > 0")
    if not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device = {cfg.device!r} should be auto, cpu, cuda or cuda:N")
    return cfg


def config_differences(saved, cfg, keys=MATH_KEYS):
    """{key: (saved value, cfg's value)} where cfg differs from a saved config.json (a dict); a key
    the saved config lacks (written by an older version) counts as its default."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as the saved JSON has them
    was = {key: saved.get(key, json.loads(json.dumps(default_of(key)))) for key in keys}
    return {key: (was[key], now[key]) for key in keys if was[key] != now[key]}


def split_cli(argv, flags=None, ranges=None):
    """Split argv into (config path, ["--key=value" overrides], the script's own flags).

    `flags` maps a script flag to its default (`{"resume": False, "show": 0}`): a bool flag is
    a switch (`--resume`), any other takes a value (`--show 3` or `--show=3`). Everything else
    must be `--config FILE` or a config override (`--key=value` or `--key value`). `ranges` maps
    numeric flags to their allowed interval, as RANGES does for config keys: {"show": "[0, inf)"}.
    """
    flags = dict(flags or {})
    path, overrides, args = None, [], list(argv)
    while args:
        arg = args.pop(0)
        name, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument '{arg}'")
        if name == "config" or (name in flags and not isinstance(flags[name], bool)):
            if not sep:
                if not args:
                    raise ConfigError(f"command line: --{name} needs a value")
                value = args.pop(0)
            if name == "config":
                path = value
            elif flags[name] is None:
                flags[name] = value
            else:
                try:
                    flags[name] = type(flags[name])(value)
                except ValueError:
                    raise ConfigError(f"command line: --{name}={value} should be of type "
                                      f"{type(flags[name]).__name__}") from None
        elif name in flags:
            flags[name] = True
        elif name in KEYS and not sep and args and not args[0].startswith("--"):
            overrides.append(f"--{name}={args.pop(0)}")  # --lr 1e-4
        else:
            overrides.append(arg)
    for name, interval in (ranges or {}).items():
        check_range(f"--{name}", flags[name], interval)
    return path, overrides, flags


def parse_cli(argv, flags=None, ranges=None):
    """-> (Config, the script's own flags): split_cli, then the config file with the overrides."""
    path, overrides, flags = split_cli(argv, flags, ranges)
    return load_config(path, overrides), flags


def check_out_folder(folder, key="out_dir"):
    """ConfigError unless `folder` is, or can be made, a writable folder: checked before anything is
    loaded, and without creating it (a refused run writes nothing)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{key} = {folder!r}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} = {folder!r}: {path} is not writable")


def describe_os_error(e):
    """One line naming the path: 'runs/x/ckpt: No space left on device'."""
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where}: {e.strerror}" if where and e.strerror else str(e) or type(e).__name__


@contextlib.contextmanager
def naming(path):
    """An OSError inside the block that names no file (a write to a full disk) names `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def quiet_ctrl_c(name):
    """Call it first thing in a script, with __name__: Ctrl-C while the slow imports load (torch takes
    seconds) exits with 130 and no traceback. script() gives main() Python's KeyboardInterrupt back.
    os._exit, not sys.exit: an exception raised inside torch's C++ import code would abort the process."""
    if name == "__main__":
        signal.signal(signal.SIGINT, lambda *a: (print("interrupted", file=sys.stderr, flush=True),
                                                 os._exit(EXIT_INTERRUPT)))


def script(main):
    """Decorator for a script's main(): its return value is the exit code (None: 0); a UserError
    becomes one line on stderr and exit code 2, and so does an OSError (disk full, permission
    denied, ...), naming its path; Ctrl-C exits with 130."""
    @functools.wraps(main)
    def wrapped(*a, **kw):
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            return main(*a, **kw)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except BrokenPipeError:  # the reader stopped reading (| head): not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_OK)
        except OSError as e:
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPT)
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the tools, its mistakes one line like every script's: `error: ...`, exit 2 (script)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def fetch_model(name, models_dir="models"):
    """The folder of a config's `model`. A folder is used as it is. A Hugging Face Hub id ORG/NAME
    means models_dir/NAME, and an absent models_dir/NAME is filled first by tools/get_model.py
    (from the Hub, or offline for the models it can build: SmolLM2-135M-Instruct, tiny). Anything
    else (a file, a path to nothing) is a ConfigError saying which."""
    get_model = load_tool("get_model")
    parent, short = os.path.split(os.path.normpath(name))
    if os.path.basename(parent) == models_dir and short in {"tiny", *get_model.SHORT_NAMES}:
        source, folder = short, name  # models/NAME of a model get_model knows (tiny, ...)
    elif os.path.isdir(name):
        return name
    elif os.path.exists(name):
        raise ConfigError(f"model = {name!r}: is a file; give a model folder (or a Hub id ORG/NAME)")
    elif HUB_ID.fullmatch(name) and not name.startswith((".", models_dir + "/")):
        source, folder = name, os.path.join(models_dir, name.split("/")[-1])
    else:
        raise ConfigError(f"model = {name!r}: no such folder (give a model folder or a Hub id ORG/NAME)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"{folder} is absent: python tools/get_model.py {source} --out {folder}", file=sys.stderr)
        try:
            get_model.get_model(source, folder)
        except (get_model.DownloadError, ValueError, OSError) as e:
            raise ConfigError(f"model = {name!r}: {folder} is absent and could not be fetched: {e}") from None
    return folder


def load_tool(name):
    """A module of tools/ (tools/NAME.py), imported by its path: tools/ is not a package."""
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(tools, f"{name}.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def resolve_hardware(cfg, log=print):
    """(torch.device, "float32" | "bfloat16") with cfg.device and cfg.dtype "auto" resolved.

    device auto: cuda if there is one. dtype auto: bfloat16 on a GPU that supports it; on a CPU,
    whichever dtype multiplies matrices faster here, timed on the spot (1024^3 matmuls, a fraction
    of a second). CPUs differ a lot: with AMX (Intel's matrix tiles) bf16 is several times fp32;
    with AVX512-BF16 alone it is about half, and without any bf16 instructions it is emulated.
    """
    import time
    import torch
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device = {cfg.device!r}: " + (f"this machine has {torch.cuda.device_count()} CUDA devices"
                          if torch.cuda.is_available() else "no CUDA device here") + "; use device = 'cpu' or 'auto'")
    if cfg.dtype != "auto":
        return device, cfg.dtype
    if device.type == "cuda":
        return device, "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    # Five rounds, the two dtypes alternating, the best of each: a slow spell of a shared machine
    # during one timing must not decide the dtype of the whole run.
    matrices = {name: torch.randn(1024, 1024, dtype=getattr(torch, name)) for name in ("float32", "bfloat16")}
    best = dict.fromkeys(matrices, 0.0)
    for _ in range(5):
        for name, a in matrices.items():
            a @ a  # warm-up
            start = time.perf_counter()
            a @ a
            best[name] = max(best[name], 2 * 1024 ** 3 / (time.perf_counter() - start))
    dtype = max(best, key=best.get)
    log(f"dtype auto -> {dtype} (matmul here: float32 {best['float32'] / 1e9:.0f}, "
        f"bfloat16 {best['bfloat16'] / 1e9:.0f} GFLOP/s)")
    return device, dtype
