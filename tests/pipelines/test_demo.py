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
    for name in ("pairs.jsonl", "prefs.jsonl", "state.json", "report.html", "grpo/eval.json", "grpo/metrics.jsonl"):
        assert (out / name).exists(), name
    e = json.loads((out / "grpo" / "eval.json").read_text())
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
    assert state["done"] == ["sample", "label", "reward", "train:grpo"]
    assert set(state["phase_seconds"]) == set(state["done"])
    before = (out / "pairs.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "eval_policy", real_eval)
    assert cli.main(["demo", "--resume", str(out)]) == 0
    assert json.loads((out / "state.json").read_text())["done"][-2:] == ["eval:grpo", "report"]
    assert (out / "report.html").exists() and (out / "grpo" / "eval.json").exists()
    assert (out / "pairs.jsonl").stat().st_mtime_ns == before  # the sample phase was not redone


def test_demo_rejects_unknown_method_and_bad_resume(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--methods", "ppo,magic"])
    assert e.value.code == 2 and "magic" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--resume", str(tmp_path)])
    assert e.value.code == 2 and "state.json" in capsys.readouterr().err


def test_summary_leads_with_gold_before_after_and_escapes_model_text():
    """The table shows gold at the start and after with the gain's CI; the examples are the first prompts
    of the eval, in order, with every control character of a reply escaped (a reply cannot drive the terminal)."""
    from rlhfkit.pipelines import demo as pipeline

    est = lambda v, lo, hi: {"value": v, "ci_low": lo, "ci_high": hi}  # noqa: E731
    e = {"n_prompts": 2, "gold": {"reference": est(0.5, 0.4, 0.6), "policy": est(0.6, 0.5, 0.7),
                                  "difference": est(0.1, 0.02, 0.18)},
         "win_rate": est(0.7, 0.55, 0.85), "kl": {"value": 1.5},
         "samples": [{"prompt": "Hi\x1b[2J", "policy": "Fine.\x1b[31m\u202eevil\rX", "reference": "Hello\nthere",
                      "gold_policy": 0.9, "gold_reference": 0.2},
                     {"prompt": "Two", "policy": "b", "reference": "a", "gold_policy": 0.3, "gold_reference": 0.8}]}
    table, notes = pipeline.summarise({"grpo": e}, None)
    row = table.splitlines()[1].split()
    assert row[:6] == ["grpo", "0.500", "0.600", "+0.100", "[+0.020,", "+0.180]"]
    assert any("improved" in n for n in notes)
    lines = pipeline.examples({"grpo": e})
    text = "\n".join(lines)
    assert "\x1b" not in text and "\u202e" not in text and "\r" not in text
    assert "Fine.\\x1b[31m\\u202eevil\\x0dX" in text and "Hello\\nthere" in text
    assert [ln.split(":")[0] for ln in lines if ln.startswith("prompt")] == ["prompt 1", "prompt 2"]
    assert "(gold 0.20)" in lines[1] and "(gold 0.90)" in lines[2]
