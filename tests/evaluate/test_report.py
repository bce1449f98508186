"""The HTML report (rlhfkit.evaluate.report): structure, self-containment, escaping, missing files."""

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from rlhfkit.evaluate.overopt import gold_rl
from rlhfkit.evaluate.report import write_report
from rlhfkit.evaluate.winrate import evaluate_pairs

SECTION_IDS = ["learning-curves", "reward-kl", "gold-proxy", "win-rates", "samples", "config"]
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.imgs, self.tags, self.text, self.urls = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]

    def handle_data(self, data):
        self.text.append(data)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run "full" has every file, a rise-then-fall gold curve and hostile completions; run "partial"
    has only config.yaml and a metrics.jsonl with a broken line; run "ghost" does not exist."""
    root = tmp_path_factory.mktemp("runs")
    full = root / "full"
    full.mkdir()
    (full / "config.yaml").write_text(f"method: ppo\nseed: 1\nmodel: tiny\nnote: '</pre>{XSS_SCRIPT}'\n")
    d = np.linspace(0, 4, 40)
    gold = gold_rl(d, 1.0, 0.5)
    rows = []
    for i, (x, g) in enumerate(zip(d, gold)):
        rows.append({"step": 10 * i, "time": float(i), "loss/policy": 1.0 / (i + 1), "reward/mean": float(x),
                     "kl/mean": float(x * x), "policy/clipfrac": 0.1, "perf/tokens_per_s": 1000.0,
                     "eval/gold": float(g), "eval/proxy": float(x), "eval/kl": float(x * x),
                     "loss/$weird_": 0.0})  # fmt: skip
    _write_jsonl(full / "metrics.jsonl", rows)
    samples = [
        {"step": 0, "prompt": "Say hi", "completion": XSS_SCRIPT, "reward": 0.5, "gold": None},
        {
            "step": 0,
            "prompt": XSS_IMG,
            "completion": "**bold** " + "long " * 5000,
            "reward": None,
            "gold": 1.0,
        },
        {"step": 390, "prompt": "Say hi", "completion": f"hi {XSS_IMG}", "reward": 2.0, "gold": -1.0},
    ]
    _write_jsonl(full / "samples.jsonl", samples)
    ev = evaluate_pairs(
        ["a b c d", "e f g", "h i"], ["a", "b c", "d e f g h"],
        gold_policy=[1.0, 2.0, 0.0], gold_reference=[0.0, 1.0, 1.0], meta={"run": XSS_SCRIPT}, n_boot=200,
    )  # fmt: skip
    (full / "eval.json").write_text(json.dumps(ev))
    (full / "reward_eval.json").write_text(json.dumps({"accuracy": 0.71, "accuracy/chat": 0.8}))

    partial = root / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text("method: dpo\nseed: 2\nmodel: tiny\n")
    (partial / "metrics.jsonl").write_text('{"step": 0, "loss/policy": 0.7}\n{"step": 1, "loss/pol')

    out = root / "out" / "report.html"
    with pytest.warns(UserWarning):  # the problems are also warned about
        path = write_report([full, partial, root / "ghost"], out, title=f"t {XSS_IMG}")
    assert path == out
    doc = out.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(doc)
    parser.close()
    sections = dict(re.findall(r'<section id="([a-z-]+)">(.*?)</section>', doc, flags=re.S))
    return doc, parser, sections


def test_report_has_every_section(report):
    doc, parser, sections = report
    assert doc.startswith("<!DOCTYPE html>")
    for sid in SECTION_IDS:
        assert sid in parser.ids
        assert sid in sections


def test_report_images_are_embedded_pngs_and_nothing_external(report):
    _, parser, sections = report
    assert len(parser.imgs) >= 5  # 4 learning-curve namespaces + reward-kl + gold-proxy
    for img in parser.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in parser.urls), parser.urls
    assert "script" not in parser.tags and "link" not in parser.tags
    assert sections["learning-curves"].count("<img") == 5  # reward/ loss/ kl/ eval/ policy/; perf/ is left out


def test_untrusted_text_is_escaped(report):
    """The hostile strings appear only escaped: no raw tag, no parsed <script>, no <img src=x>, but
    the text content (after entity decoding) shows them verbatim."""
    doc, parser, _ = report
    assert XSS_SCRIPT not in doc
    assert XSS_IMG not in doc
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert "&lt;img src=x onerror=alert(1)&gt;" in doc
    assert not any(img.get("src") == "x" or "onerror" in img for img in parser.imgs)
    text = "".join(parser.text)
    assert XSS_SCRIPT in text and XSS_IMG in text
    assert "**bold**" in text  # markdown is shown as text, not rendered


def test_samples_section(report):
    _, _, sections = report
    s = sections["samples"]
    assert s.count('class="box"') == 6  # 3 samples x (prompt + completion)
    assert "more characters not shown" in s  # the 25,009-character completion is cut at 20,000
    assert "samples.jsonl is missing in: partial, ghost" in s
    assert "step 0" in s and "step 390" in s


def test_gold_proxy_flags_turnover_and_divergence(report):
    _, _, sections = report
    g = sections["gold-proxy"]
    assert "turned over at step 270" in g
    assert "exploiting the proxy reward model" in g
    assert "partial: no eval/gold was logged" in g
    assert "ghost: metrics.jsonl is missing" in g


def test_win_rates_and_config_and_problems(report):
    doc, _, sections = report
    w = sections["win-rates"]
    assert "gold" in w and "66.7%" in w  # gold wins on prompts 1, 2; loses on 3 -> 2/3
    assert "eval.json is missing in: partial, ghost" in w
    assert "0.71" in w and "accuracy/chat" in w
    c = sections["config"]
    assert "method: ppo" in c and "&lt;/pre&gt;" in c and "config.yaml is missing" in c
    assert "metrics.jsonl line 2 is not valid JSON" in doc
    assert "perf/" not in sections["learning-curves"]
    assert "policy/" in sections["learning-curves"]


def test_report_of_empty_run_dirs(tmp_path):
    """Only missing files: every section still renders and says what is missing."""
    (tmp_path / "bare").mkdir()
    with pytest.warns(UserWarning):
        out = write_report([tmp_path / "bare"], tmp_path / "r.html")
    doc = out.read_text()
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in doc
    assert "metrics.jsonl is missing in: bare" in doc
    assert "<img" not in doc
    with pytest.raises(ValueError, match="at least one run"):
        write_report([], tmp_path / "x.html")


def test_report_survives_off_schema_files(tmp_path):
    """eval.json with wrong types, a metrics line that is a JSON list, non-string sample fields."""
    run = tmp_path / "odd"
    run.mkdir()
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    (run / "metrics.jsonl").write_text(
        '[1, 2]\n{"step": 0, "reward/mean": "high"}\n{"step": 1, "reward/mean": 1.5}\n'
    )
    (run / "samples.jsonl").write_text(
        json.dumps({"step": 0, "prompt": ["x"], "completion": 7, "reward": "r"}) + "\n"
    )
    (run / "eval.json").write_text(
        json.dumps({"win_rate": "bogus", "alpha": "x", "length": "y", "n_prompts": 3})
    )
    with pytest.warns(UserWarning):
        doc = write_report([run], tmp_path / "r.html").read_text()
    assert "metrics.jsonl line 1 is not a JSON object" in doc
    assert "config.yaml is not a YAML mapping" in doc
    assert "<td>odd</td>" in doc and "<td>3</td>" in doc
    assert "[&#x27;x&#x27;]" in doc  # the list prompt is shown as text
