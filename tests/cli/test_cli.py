"""The ``rlhfkit`` command as a user runs it: subprocesses of the installed console script."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from rlhfkit.train.sft import SFTConfig


def rlhfkit_exe() -> str:
    """The console script installed beside this interpreter (``pip install -e .`` puts it there)."""
    exe = Path(sys.executable).parent / "rlhfkit"
    found = str(exe) if exe.exists() else shutil.which("rlhfkit")
    assert found, "the rlhfkit console script is not installed; run `pip install -e .` (or `make setup`)"
    return found


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([rlhfkit_exe(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_help_lists_the_commands():
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    assert "usage: rlhfkit" in out.stdout
    for command in ("sft", "info"):
        assert f"  {command} " in out.stdout


def test_info_reports_versions_and_the_bundled_model():
    out = cli("info")
    assert out.returncode == 0, out.stderr
    import rlhfkit

    rows = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip() and "  " in line)
    assert rows["rlhfkit"].strip() == rlhfkit.__version__
    for key in ("torch", "transformers", "device", "accelerate"):
        assert key in out.stdout
    assert "bundled model converted" in out.stdout


def test_sft_help_documents_every_config_field():
    out = cli("sft", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps help text
    for f in dataclasses.fields(SFTConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "--config" in text
    assert "AdamW peak learning rate" in text


def test_sft_trains_tiny_and_writes_the_run_dir(sft_jsonl, tmp_path):
    run = tmp_path / "cli-run"
    out = cli("sft", "--model", "tiny", "--data", str(sft_jsonl), "--output-dir", str(run), "--batch-size", "4",
              "--micro-batch-size", "2", "--max-steps", "2", "--eval-fraction", "0", "--progress", "false")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert Path(result["run_dir"]) == run and result["steps"] == 2
    assert Path(result["checkpoint"]) == run / "checkpoints" / "step-2"
    assert (run / "checkpoints" / "step-2" / "model.safetensors").exists()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == "tiny" and config["batch_size"] == 4 and config["max_steps"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss/sft"] > 0 for r in rows)


def test_unknown_option_exits_2_with_a_message():
    out = cli("sft", "--learning-rate", "1e-4")
    assert out.returncode == 2
    assert "unrecognized arguments: --learning-rate" in out.stderr


def test_unknown_command_exits_2():
    out = cli("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr


def test_bad_option_value_exits_2_naming_the_option():
    out = cli("sft", "--lr", "abc")
    assert out.returncode == 2
    assert "--lr: expected float" in out.stderr


def test_malformed_data_file_fails_with_file_and_line(tmp_path, sft_conversations):
    # (each reader error's message is tested in test_data_io; this checks the CLI shows it well)
    bad_line = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}'
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(c) for c in sft_conversations[:3]] + [bad_line] + [json.dumps(sft_conversations[3])]
    path.write_text("\n".join(lines) + "\n")
    out = cli("sft", "--model", "tiny", "--data", str(path), "--output-dir", str(tmp_path / "run"),
              "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "1", "--progress", "false")
    assert out.returncode != 0
    assert f"{path}:4:" in out.stderr and "content must be a string" in out.stderr
    assert "Traceback" not in out.stderr  # the user's data is at fault: a message, not a stack trace
