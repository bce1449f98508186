"""Configs: YAML mirrors the dataclass, bad files and values name the key, overrides win, every field
is documented."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from rlhfkit.config import (
    CommonConfig,
    ConfigError,
    add_config_arguments,
    config_from_args,
    field_docs,
    load_config,
    to_dict,
)
from rlhfkit.train.sft import SFTConfig


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_yaml_keys_mirror_the_dataclass(tmp_path):
    # every field written out with a non-default value comes back as that value
    changed = {
        "model": "tiny", "output_dir": "runs/x", "seed": 3, "max_steps": 7, "log_every": 2, "save_every": 5,
        "resume": "auto", "mixed_precision": "no", "report_to": "none", "progress": False, "data": "d.jsonl",
        "eval_data": "e.jsonl", "eval_fraction": 0.1, "max_length": 128, "epochs": 2.5, "batch_size": 32,
        "micro_batch_size": 8, "lr": 3e-4, "weight_decay": 0.01, "adam_eps": 1e-6, "warmup_ratio": 0.1,
        "lr_schedule": "linear", "grad_clip": 0.5, "packing": "padded", "eval_every": 10, "stop_at_step": 4,
        "keep_checkpoints": 2, "save_optimizer": False, "lora_r": 8, "lora_alpha": 32.0, "lora_dropout": 0.05,
        "lora_targets": "q_proj,v_proj",
    }
    assert set(changed) == {f.name for f in dataclasses.fields(SFTConfig)}, "update this test for new fields"
    cfg = load_config(SFTConfig, write_yaml(tmp_path / "c.yaml", changed))
    assert to_dict(cfg) == changed
    # and the resolved config a run writes reads back unchanged
    assert load_config(SFTConfig, write_yaml(tmp_path / "round.yaml", to_dict(cfg))) == cfg


def test_empty_yaml_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(SFTConfig, str(path)) == SFTConfig()


def test_unknown_key_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path / "typo.yaml", {"lr": 1e-4, "learning_rate": 1e-4})
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, path)
    assert path in str(e.value) and "'learning_rate'" in str(e.value)


@pytest.mark.parametrize("key, value", [("lr", "abc"), ("batch_size", 2.5), ("progress", "maybe"), ("seed", [1])])
def test_bad_type_names_the_key(tmp_path, key, value):
    path = write_yaml(tmp_path / "bad.yaml", {key: value})
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, path)
    assert path in str(e.value) and f"{key}:" in str(e.value)


def test_bad_override_names_the_option():
    with pytest.raises(ConfigError, match="--lr: expected float"):
        load_config(SFTConfig, None, {"lr": "abc"})


def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lr\n- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(SFTConfig, str(path))


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"lr": 1e-3, "batch_size": 4, "max_steps": 9})
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SFTConfig)
    args = parser.parse_args(["--config", path, "--lr", "0.5", "--max-steps", "none", "--packing", "padded"])
    cfg = config_from_args(SFTConfig, args)
    assert cfg.lr == 0.5  # command line over YAML
    assert cfg.max_steps is None  # 'none' clears an optional field
    assert cfg.batch_size == 4  # YAML over default
    assert cfg.packing == "padded"
    assert cfg.micro_batch_size == SFTConfig().micro_batch_size  # default untouched


def test_validate_runs_on_load():
    with pytest.raises(ValueError, match="packing"):
        load_config(SFTConfig, None, {"packing": "packed"})


@pytest.mark.parametrize("cls", [CommonConfig, SFTConfig])
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_field_docs_reads_the_string_under_each_field():
    docs = field_docs(SFTConfig)
    assert docs["lr"].startswith("AdamW peak learning rate")
    assert docs["seed"].startswith("Random seed")  # inherited from CommonConfig
