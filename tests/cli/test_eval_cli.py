"""``rlhfkit eval``, ``rlhfkit report`` and ``rlhfkit compare`` as a user runs them.

Mostly in-process through ``rlhfkit.cli.main`` (what the console script calls), once as a
subprocess of the installed script. Models are 'tiny' (random 2-layer Llama, seed 0: two loads give
identical weights) and 'tiny:0.5' (a differently initialised, peaked one).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhfkit.cli import main

# evaluate_pairs' record (rlhfkit/evaluate/winrate.py, EVAL_SCHEMA_VERSION = 1)
EVAL_KEYS = {"schema_version", "meta", "n_prompts", "alpha", "n_boot", "seed", "win_rate", "lc_win_rate", "gold",
             "proxy", "kl", "length", "distinct", "samples"}
ESTIMATE_KEYS = {"value", "ci_low", "ci_high"}
SMALL = ["--task", "sentiment", "--num-prompts", "4", "--max-new-tokens", "8"]


def run_eval(out: Path, *args: str) -> dict:
    assert main(["eval", *args, *SMALL, "--out", str(out)]) == 0
    return json.loads((out / "eval.json").read_text())


def rlhfkit_exe() -> str:
    exe = Path(sys.executable).parent / "rlhfkit"
    found = str(exe) if exe.exists() else shutil.which("rlhfkit")
    assert found, "the rlhfkit console script is not installed; run `pip install -e .` (or `make setup`)"
    return found


# --- eval --------------------------------------------------------------------------------------------


def test_eval_policy_equal_to_reference(tmp_path, capsys):
    """Same weights and the same sampling seed: the same completions, so every pair is a tie, the gold
    difference is 0 and the sequence KL is 0 (its CI contains 0)."""
    d = run_eval(tmp_path, "--policy", "tiny", "--reference", "tiny")
    assert set(d) == EVAL_KEYS
    assert d["schema_version"] == 1 and d["n_prompts"] == 4
    assert d["meta"] == {"policy": "tiny", "reference": "tiny", "task": "sentiment", "judge": "gold", "proxy": None,
                         "temperature": 0.7, "max_new_tokens": 8, "seed": 0, "best_of_n": 1}
    assert d["kl"]["ci_low"] <= 0 <= d["kl"]["ci_high"] and abs(d["kl"]["value"]) < 1e-4
    wr = d["win_rate"]
    assert wr["source"] == "gold" and (wr["n_wins"], wr["n_ties"], wr["n_losses"]) == (0, 4, 0) and wr["value"] == 0.5
    assert set(d["gold"]) == {"policy", "reference", "difference"}
    assert set(d["gold"]["difference"]) >= ESTIMATE_KEYS and d["gold"]["difference"]["value"] == 0
    assert d["proxy"] is None
    assert d["length"]["policy"] == d["length"]["reference"] and d["length"]["policy"]["n"] == 4
    assert set(d["distinct"]["policy"]) == {"distinct_1", "distinct_2"}
    assert len(d["samples"]) == 4 and all(s["policy"] == s["reference"] for s in d["samples"])  # same weights, seed
    out = capsys.readouterr().out
    assert "KL(policy || reference) nats" in out and f"wrote {tmp_path / 'eval.json'}" in out


def test_eval_as_a_subprocess_writes_eval_json_in_the_working_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([rlhfkit_exe(), "eval", "--policy", "tiny", "--reference", "tiny", *SMALL],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads((tmp_path / "eval.json").read_text())
    assert set(d) == EVAL_KEYS and d["n_prompts"] == 4
    assert "win rate (from gold)" in out.stdout


def test_eval_kl_and_rm_judge_with_a_different_policy(tmp_path, monkeypatch):
    """A reward-model judge decides the pairs; a peaked policy against a near-uniform reference has a
    clearly positive KL, estimated from log-probs at the sampling temperature."""
    from rlhfkit.evaluate import policy as eval_policy
    from rlhfkit.models.heads import RewardModel

    rm_dir = RewardModel.init_from("tiny", seed=0).save(tmp_path / "rm")
    temperatures = []
    real = eval_policy.sequence_logps

    def recording(model, tok, prompts, completions, temperature=1.0):
        temperatures.append(temperature)
        return real(model, tok, prompts, completions, temperature)

    monkeypatch.setattr(eval_policy, "sequence_logps", recording)
    with pytest.warns(UserWarning, match="no normalisation constants"):
        d = run_eval(tmp_path / "out", "--policy", "tiny:0.5", "--reference", "tiny", "--judge", f"rm:{rm_dir}",
                     "--temperature", "0.8")
    wr = d["win_rate"]
    assert wr["source"] == "prefs" and wr["n_wins"] + wr["n_ties"] + wr["n_losses"] == 4
    assert d["meta"]["judge"] == f"rm:{rm_dir}"
    assert temperatures == [0.8, 0.8]
    assert d["kl"]["ci_low"] > 1.0  # nats; 8 tokens of a peaked model against a ~uniform one


def test_sequence_logps_at_a_temperature_equal_a_naive_sum(tiny):
    from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
    from rlhfkit.evaluate.policy import sequence_logps

    model, tok = tiny
    prompts = [[{"role": "user", "content": "Hi."}], [{"role": "user", "content": "Tell me a longer story, please."}]]
    completions = ["Hello there.", "Once"]
    got = sequence_logps(model, tok, prompts, completions, 0.5)
    for p, c, g in zip(prompts, completions, got):
        p_ids, c_ids = tokenize_prompt(tok, p), tokenize_completion(tok, p, c)
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float() / 0.5
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c_ids)[:, None]).sum().item()
        assert g == pytest.approx(want, abs=1e-4)


def test_best_of_n_with_a_gold_proxy(tmp_path):
    """bon:2:tiny draws seeds 0 and 1 and keeps the better by the proxy; the reference (same weights)
    draws seed 0, so by the gold proxy the policy never loses a prompt."""
    d = run_eval(tmp_path, "--policy", "bon:2:tiny", "--reference", "tiny", "--proxy", "gold")
    assert d["meta"]["best_of_n"] == 2 and d["meta"]["proxy"] == "gold"
    assert set(d["proxy"]) == {"policy", "reference", "difference"}
    assert d["win_rate"]["source"] == "gold" and d["win_rate"]["n_losses"] == 0
    assert d["gold"]["difference"]["value"] >= 0
    # KL is the analytic best-of-n bound log 2 - 1/2, not a Monte-Carlo estimate from the base model
    # (which would read ~0: the picked samples are scored by the model they were drawn from)
    assert d["kl"]["value"] == pytest.approx(math.log(2) - 0.5)
    assert d["kl"]["ci_low"] is None and "bound" in d["kl"]["kind"]


def test_best_of_n_without_proxy_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--policy", "bon:2:tiny", "--reference", "tiny", *SMALL, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "best-of-N needs --proxy" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--policy", "bon:x:tiny"], "best-of-N needs bon:N:MODEL with N >= 1"),
    (["--policy", "bon:2"], "best-of-N needs bon:N:MODEL with N >= 1"),
    (["--policy", "tiny", "--task", "nope"], "unknown task 'nope'"),
    (["--policy", "tiny", "--judge", "oracle"], "--judge oracle: use gold, rm:PATH or lm:MODEL"),
    (["--policy", "tiny", "--proxy", "lm:x"], "--proxy lm:x: use gold or rm:PATH"),
])
def test_eval_bad_arguments_exit_2_before_loading_anything(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_missing_policy_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["eval", "--policy", str(missing), "--reference", "tiny", *SMALL, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rlhfkit eval: error:") and f"model path '{missing}' does not exist" in err
    assert not (tmp_path / "eval.json").exists()


# --- report and compare on hand-built run directories --------------------------------------------------


def make_run(path: Path, *, task: str = "sentiment", gold: list[float] = (0.5, 0.6), seed: int = 0) -> Path:
    """A run directory as the trainers write it: config.yaml, metrics.jsonl (and samples.jsonl)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"method": "grpo", "model": "tiny", "task": task, "seed": seed}))
    rows = [{"step": s, "time": 1000.0 + s, "reward/mean": 0.4 + 0.1 * s, "kl/seq": 0.01 * s, "eval/gold": g}
            for s, g in enumerate(gold)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "samples.jsonl").write_text(json.dumps(
        {"step": 1, "prompt": "How was the film?", "completion": "Lovely <b>and</b> warm.", "reward": 0.9, "gold": 0.8}) + "\n")
    return path


def test_report_writes_report_html_in_the_run(tmp_path, capsys):
    from rlhfkit.evaluate.winrate import evaluate_pairs

    run = make_run(tmp_path / "grpo-tiny")
    (run / "eval.json").write_text(json.dumps(evaluate_pairs(
        ["good", "fine", "great"], ["bad", "fine", "ok"], gold_policy=[0.9, 0.5, 0.8], gold_reference=[0.2, 0.5, 0.6],
        meta={"policy": "p", "reference": "r"})))
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    for section in ("learning-curves", "reward-kl", "gold-proxy", "win-rates", "samples", "config"):
        assert f'id="{section}"' in html
    assert "grpo-tiny" in html and "How was the film?" in html
    assert "Lovely &lt;b&gt;and&lt;/b&gt; warm." in html  # model text escaped, not rendered
    assert "<h2>Problems</h2>" not in html


def test_report_rejects_a_missing_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a run directory" in capsys.readouterr().err


def test_compare_prints_a_table(tmp_path, capsys):
    a = [make_run(tmp_path / f"a{i}", gold=[0.5, g], seed=i) for i, g in enumerate((0.8, 0.9))]
    b = [make_run(tmp_path / f"b{i}", gold=[0.5, g], seed=i) for i, g in enumerate((0.2, 0.3))]
    assert main(["compare", *map(str, a), "--", *map(str, b)]) == 0
    out = capsys.readouterr().out
    assert "metric eval/gold  tasks: sentiment" in out
    assert "A: n=2" in out and "B: n=2" in out and "mean 0.85" in out and "mean 0.25" in out
    assert "P(A > B) = 1" in out and "A is better" in out
    assert main(["compare", "--metric", "reward/mean", *map(str, a), "--", *map(str, b)]) == 0
    assert "No clear difference" in capsys.readouterr().out  # same reward curves in both groups


def test_compare_without_separator_exits_2(tmp_path, capsys):
    runs = [str(make_run(tmp_path / n)) for n in ("a", "b")]
    with pytest.raises(SystemExit) as e:
        main(["compare", *runs])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: rlhfkit compare [--metric M] RUNS_A... -- RUNS_B..." in err and "separate the two groups" in err
