"""The main job: `rlhfkit demo`, and the README's promises about commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit import cli

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    found = set()
    for block in blocks:
        for line in block.splitlines():
            m = re.search(r"(?:^|\s)rlhfkit(?:\.cli)?\s+([a-z][a-z-]*)", line)
            if m:
                found.add(m.group(1))
    return sorted(found)


def test_readme_shows_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_exists(command, capsys):
    assert command in {**cli.TRAINERS, **cli.TOOLS}, f"README shows `rlhfkit {command}`, which does not exist"
    try:
        code = cli.main([command, "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_demo_quick_on_the_bundled_model(tmp_path):
    """`rlhfkit demo --quick` runs the whole loop on SmolLM2-135M-Instruct and writes what it promises."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "demo", "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("pairs.jsonl", "prefs.jsonl", "state.json", "report.html", "ppo/eval.json", "ppo/metrics.jsonl"):
        assert (out / name).exists(), name
    e = json.loads((out / "ppo" / "eval.json").read_text())
    assert e["gold"]["difference"]["ci_low"] <= e["gold"]["difference"]["value"] <= e["gold"]["difference"]["ci_high"]
    assert "gold gain" in proc.stdout and "report:" in proc.stdout
    assert re.search(r"reward model held-out accuracy: \d\.\d{3}", proc.stdout)
    html = (out / "report.html").read_text()
    assert 'id="win-rates"' in html and 'id="samples"' in html


def test_demo_ctrl_c_then_resume_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the eval phase leaves a run directory; --resume (with no other arguments: the
    run's own settings are restored) redoes only the unfinished phases."""
    from rlhfkit.pipelines import demo as pipeline

    out = tmp_path / "demo"
    real_eval = pipeline.eval_policy

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "eval_policy", interrupted)
    assert cli.main(["demo", "--quick", "--model", "tiny", "--output-dir", str(out)]) == 130
    assert "rlhfkit demo --resume" in capsys.readouterr().err
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ["sample", "label", "reward", "train:ppo"]
    before = (out / "pairs.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "eval_policy", real_eval)
    assert cli.main(["demo", "--resume", str(out)]) == 0
    assert json.loads((out / "state.json").read_text())["done"][-2:] == ["eval:ppo", "report"]
    assert (out / "report.html").exists() and (out / "ppo" / "eval.json").exists()
    assert (out / "pairs.jsonl").stat().st_mtime_ns == before  # the sample phase was not redone


def test_demo_rejects_unknown_method_and_bad_resume(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--methods", "ppo,magic"])
    assert e.value.code == 2 and "magic" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--resume", str(tmp_path)])
    assert e.value.code == 2 and "state.json" in capsys.readouterr().err
