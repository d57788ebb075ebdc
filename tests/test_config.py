"""config.py: defaults, config files, typed --key=value overrides, clear errors."""
import glob
import os
import re
import sys

import pytest

from config import ConfigError, load_config, parse_cli


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tmp_path, text):
    path = tmp_path / "x.py"
    path.write_text(text)
    return str(path)


def test_config_file_assignments_override_the_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path, 'lr = 1e-4\nmethod = "qlora"\nbetas = (0.9, 0.95)\n'))
    assert (cfg.lr, cfg.method, cfg.betas) == (1e-4, "qlora", (0.9, 0.95))
    assert cfg.seq_len == load_config().seq_len  # untouched keys keep their defaults


def test_command_line_values_take_the_type_of_the_default():
    cfg = load_config(None, ["--lr=3e-4", "--max_steps=7", "--packing=packed", "--merge=true",
                             "--train_data=a.jsonl,b.jsonl", "--lora_alpha=16"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 7 and cfg.merge is True
    assert cfg.train_data == ["a.jsonl", "b.jsonl"] and cfg.lora_alpha == 16.0


def test_command_line_overrides_the_config_file(tmp_path):
    cfg, flags = parse_cli(["--config", write_config(tmp_path, "lr = 1e-4\n"), "--lr", "5e-4", "--resume"],
                           {"resume": False})
    assert cfg.lr == 5e-4 and flags["resume"] is True


@pytest.mark.parametrize("overrides, message", [
    (["--weight_dacay=0.1"], "unknown config key 'weight_dacay'; did you mean 'weight_decay'"),
    (["--max_steps=ten"], "max_steps = 'ten' should be int"),
    (["--method=dora"], "method = 'dora' should be one of full, lora, qlora, freeze, head"),
    (["--lr"], "--lr needs a value"),
])
def test_bad_overrides_are_config_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_cli(overrides)


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    path = write_config(tmp_path, "lora_rnak = 8\n")
    with pytest.raises(ConfigError, match=r"x\.py: unknown config key 'lora_rnak'; did you mean 'lora_rank'"):
        load_config(path)


def test_syntax_error_in_a_config_file_names_file_and_line(tmp_path):
    path = write_config(tmp_path, "lr = 1e-4\nseq_len = = 3\n")
    with pytest.raises(ConfigError, match=r"x\.py:2: "):
        load_config(path)


@pytest.mark.parametrize("name", sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)))
def test_every_bundled_config_loads_and_its_data_files_exist(name):
    cfg = load_config(os.path.join(ROOT, name))
    for path in [*cfg.train_data, cfg.val_data, cfg.test_data]:
        assert not path or os.path.exists(os.path.join(ROOT, path)), f"{name}: {path} missing"


# ---------------------------------------------------------------------------------------------
# Ranges, and one convention for every script


def test_every_numeric_setting_has_an_allowed_range():
    from config import RANGES, Config, default_of
    numeric = {f.name for f in __import__("dataclasses").fields(Config)
               if isinstance(default_of(f.name), (int, float, tuple)) and not isinstance(default_of(f.name), bool)}
    assert numeric == set(RANGES)
    load_config()  # the defaults lie in their ranges


@pytest.mark.parametrize("override, message", [
    ("--batch_size=0", "batch_size = 0 should be >= 1"), ("--grad_accum=0", "grad_accum = 0 should be >= 1"),
    ("--lora_rank=0", "lora_rank = 0 should be >= 1"), ("--max_steps=-5", "max_steps = -5 should be >= 0"),
    ("--lr=-1", "lr = -1.0 should be > 0"), ("--min_lr=-1e-5", "min_lr = -1e-05 should be >= 0"),
    ("--grad_clip=-1", "grad_clip = -1.0 should be >= 0"),
    ("--val_fraction=1.5", "val_fraction = 1.5 should be in [0, 1)"),
    ("--save_every=0", "save_every = 0 should be >= 1"), ("--log_every=0", "log_every = 0 should be >= 1"),
    ("--eval_every=-1", "eval_every = -1 should be >= 0"), ("--seq_len=1", "seq_len = 1 should be >= 2"),
    ("--dpo_beta=0", "dpo_beta = 0.0 should be > 0"), ("--orpo_lambda=-1", "orpo_lambda = -1.0 should be >= 0"),
    ("--betas=(0.9,1.0)", "betas = (0.9, 1.0) should be in [0, 1) (each of them)"),
    ("--data_weights=[1,-1]", "data_weights = [1, -1] should be >= 0"), ("--device=gpu", "device = 'gpu' should be"),
])
def test_a_number_out_of_its_range_is_a_config_error_naming_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_nan_is_in_no_range(tmp_path):
    with pytest.raises(ConfigError, match=r"lr = nan should be > 0"):
        load_config(write_config(tmp_path, "lr = float('nan')\n"))


def test_an_out_dir_that_is_a_file_or_not_writable_is_refused_without_creating_anything(tmp_path, monkeypatch):
    from config import check_out_folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_out_folder(str(tmp_path / "file" / "run"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root, chmod would not stop a write
    with pytest.raises(ConfigError, match=f"{tmp_path}.* is not writable"):
        check_out_folder(str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()


def script_main(path):
    """The main() of a script, imported by its path (bench/ and tools/ are not packages)."""
    import importlib.util
    name = "script_" + re.sub(r"\W", "_", path)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name].main


TRAIN = ["--config", "configs/tiny.py", "--max_steps=1"]
SWEEP = ["--config", "configs/tiny.py", "--grid", "lr=1e-3"]
WALK = [  # (script, arguments, what its one line says): a missing or invalid model, data and output path
    ("train.py", TRAIN + ["--model=nowhere/../x/m"], "no such folder"),
    ("train.py", TRAIN + ["--model=README.md"], "is a file"),
    ("train.py", TRAIN + ["--train_data=data"], "train_data: data: is a directory"),
    ("train.py", TRAIN + ["--out_dir=README.md/run"], "is a file, not a folder"),
    ("eval.py", ["--config", "configs/tiny.py", "--model=/nonexistent/m"], "/nonexistent/m: not a folder"),
    ("eval.py", ["--config", "configs/tiny.py", "--adapter=/nonexistent/a"], "adapter_config.json: missing"),
    ("eval.py", ["--config", "configs/tiny.py", "--test_data=data"], "data: is a directory"),
    ("eval.py", ["--config", "configs/tiny.py", "--out=README.md"], "is a file, not a folder"),
    ("eval.py", ["--config", "configs/tiny.py", "--base_cache=README.md"], "is a file, not a folder"),
    ("chat.py", ["--model=/nonexistent/m"], "no such folder"),
    ("chat.py", ["--model=README.md"], "is a file"),
    ("chat.py", ["--model=models/tiny", "--adapter=/nonexistent/a"], "adapter_config.json: missing"),
    ("data.py", ["--data", "data/examples/alpaca.jsonl", "--model=/nonexistent/m"], "no such folder"),
    ("data.py", ["--data", "/nonexistent/d.jsonl", "--model=models/tiny"], "file not found"),
    ("data.py", ["--data", "data", "--model=models/tiny"], "is a directory"),
    ("sweep.py", SWEEP + ["--model=/nonexistent/m"], "no such folder"),
    ("sweep.py", SWEEP + ["--train_data=data"], "is a directory"),
    ("sweep.py", SWEEP + ["--out_dir=README.md"], "is a file, not a folder"),
    ("bench/bench.py", ["--model", "/nonexistent/m"], "not a model folder"),
    ("bench/bench.py", ["--model", "README.md"], "not a model folder"),
    ("tools/get_model.py", ["--gguf", "/nonexistent/m.gguf", "--out", "/nonexistent/out"], "/nonexistent/m.gguf"),
    ("tools/get_model.py", ["x/y", "--out", "README.md", "--endpoint", "http://127.0.0.1:9"], "README.md"),
    ("tools/make_tiny_model.py", ["--tokenizer", "/nonexistent/m", "--out", "/nonexistent/out"], "not a model folder"),
    ("tools/make_tiny_model.py", ["--tokenizer", "models/tiny", "--out", "README.md"], "is a file, not a folder"),
    ("tools/make_demo_data.py", ["--out", "README.md"], "is a file, not a folder"),
]


@pytest.mark.parametrize("script, args, message", WALK, ids=[f"{s} {' '.join(a[-2:])}" for s, a, _ in WALK])
def test_every_script_answers_a_bad_model_data_or_output_path_with_one_error_line_and_exit_2(
        tiny_model, monkeypatch, capsys, script, args, message):
    """In this process (a subprocess each would cost seconds): an exception that escaped main() would
    be a traceback, and fails the test as one."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit:
        script_main(script)(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("error:") == 1, err
    assert re.search(r"(^|[\r\n])error: [^\r\n]*" + re.escape(message), err), err
