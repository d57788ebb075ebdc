"""config.py: defaults, config files, typed --key=value overrides, clear errors."""
import glob
import os

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
