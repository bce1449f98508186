"""Optional markdown for model text (issue 17, labelling page): sanitised and inert."""

from __future__ import annotations

import re

import pytest
from annotate_helpers import new_store, pair_dict, sign_in, write_jsonl
from fastapi.testclient import TestClient

from rlhfkit.annotate.markdown import render
from rlhfkit.annotate.server import create_app
from rlhfkit.cli.annotate import main

HOSTILE = ("**bold <script>alert(1)</script>** `code <img src=x onerror=alert(2)>` "
           "[link](javascript:alert(3)) ![img](http://evil.example/x.png) <a href=x>a</a> "
           '<b onmouseover="alert(4)">b</b> **"><svg onload=alert(5)>**')


@pytest.mark.parametrize("text, html", [
    ("**a** and *b* and _c_", "<p><strong>a</strong> and <em>b</em> and <em>c</em></p>"),
    ("snake_case_name and 2*3*4", "<p>snake_case_name and 2*3*4</p>"),
    ("- one\n- **two**", "<ul><li>one</li><li><strong>two</strong></li></ul>"),
    ("1. first\n2) second", "<ol><li>first</li><li>second</li></ol>"),
    ("# Title\nline", "<p><strong>Title</strong><br>line</p>"),
    ("para 1\n\npara 2", "<p>para 1</p><p>para 2</p>"),
    ("```py\nif a < b:\n    x = '**y**'\n```\nafter", "<pre><code>if a &lt; b:\n    x = &#39;**y**&#39;</code></pre><p>after</p>"),
    ("```\nunterminated <b>", "<pre><code>unterminated &lt;b&gt;</code></pre>"),
])
def test_render_by_example(text, html):
    assert str(render(text)) == html


def test_hostile_text_stays_inert():
    html = str(render(HOSTILE))
    tags = set(re.findall(r"</?([a-zA-Z][a-zA-Z0-9]*)", html))
    assert tags <= {"p", "strong", "em", "code", "pre", "ul", "ol", "li", "br"}
    assert "=" not in "".join(re.findall(r"<[^>]*>", html))  # no tag carries an attribute
    assert "&lt;script&gt;" in html and "[link](javascript:alert(3))" in html


def test_markdown_setting_changes_the_page(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'md.db'}"
    assert main(["init", "--db", db]) == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0, a={"role": "assistant", "content": HOSTILE})])
    assert main(["import", str(pairs), "--project", "demo", "--db", db, "--overlap", "1", "--gold-rate", "0"]) == 0
    store = new_store(db)
    c = TestClient(create_app(store, warm_up=False))
    sign_in(c, store.admin.add_annotator("demo", "alice"))
    plain = c.get("/label").text
    assert "<strong>bold" not in plain and "**bold &lt;script&gt;" in plain
    assert main(["import", "--project", "demo", "--db", db, "--markdown", "on"]) == 0
    assert "markdown on" in capsys.readouterr().out and store.admin.project_info("demo")["markdown"] is True
    page = c.get("/label").text
    assert '<div class="text completion md"' in page and "<strong>bold &lt;script&gt;alert(1)&lt;/script&gt;</strong>" in page
    assert "<img" not in page and "<svg" not in page and 'href="x"' not in page and "javascript:alert(3)" in page
    with pytest.raises(SystemExit):
        main(["import", "--project", "demo", "--db", db, "--markdown", "maybe"])
