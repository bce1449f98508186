"""The run directory's reader: strict for compare (a bad file is an error naming it), lenient for the
report (the problem is listed and the rest is read)."""

from __future__ import annotations

import json

import pytest

from rlhfkit.tracking import RunDir, read_config, read_eval, read_metrics, read_run


def test_what_the_writer_writes_the_reader_reads(tmp_path):
    run = RunDir(tmp_path / "r", {"task": "concise", "lr": 1e-5}, method="sft", progress=False)
    run.log(1, {"loss/sft": 2.5})
    run.log_samples(1, [{"prompt": "p", "completion": "c"}])
    run.write_json("eval.json", {"gold": {"policy": {"value": 0.5}}})
    run.close()
    data = read_run(tmp_path / "r")
    assert data.problems == [] and data.missing == {"reward_eval.json"}
    assert data.config["task"] == "concise" and data.config["method"] == "sft"
    assert [r["loss/sft"] for r in data.metrics] == [2.5] and data.samples[0]["completion"] == "c"
    assert read_eval(tmp_path / "r") == data.eval == {"gold": {"policy": {"value": 0.5}}}
    assert read_config(tmp_path / "r")["lr"] == 1e-5 and read_metrics(tmp_path / "r") == data.metrics


def test_strict_and_lenient_reading_of_a_broken_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n{half a line\n[1, 2]\n")
    (tmp_path / "config.yaml").write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not valid JSON \("):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match="config.yaml is not a YAML mapping"):
        read_config(tmp_path)
    with pytest.raises(ValueError, match="has no config.yaml"):
        read_config(tmp_path / "nowhere")
    data = read_run(tmp_path)
    assert data.metrics == [{"step": 1}] and data.config is None
    assert "metrics.jsonl line 2 is not valid JSON (Expecting property name enclosed in double quotes); skipped" \
        in data.problems
    assert "metrics.jsonl line 3 is not a JSON object; skipped" in data.problems
    assert "config.yaml is not a YAML mapping" in data.problems and "samples.jsonl is missing" in data.problems
