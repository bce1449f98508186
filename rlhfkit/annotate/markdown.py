"""A small, inert markdown renderer for model text on the labelling page (a per-project option).

Safe by construction: the text is HTML-escaped first, then only these fixed tags are put around
already-escaped text, none with attributes: fenced code blocks (```` ``` ````) -> ``<pre><code>``,
`inline code` -> ``<code>``, **bold** -> ``<strong>``, *italic* / _italic_ -> ``<em>``, lines
starting with ``#`` -> ``<strong>`` (a heading, not a big one), ``-``/``*``/``1.`` lists ->
``<ul>``/``<ol>``, blank-line-separated paragraphs -> ``<p>``. Links and images stay as their
markdown text: nothing in a reply can make the page load or navigate anywhere. The CSP would block
script even if a tag slipped through; this keeps reviewers' eyes on the text, not on a phishing link.
"""

from __future__ import annotations

import re

from markupsafe import Markup, escape

_FENCE = re.compile(r"^```[^\n`]*\n(.*?)(?:^```[ \t]*$|\Z)", re.M | re.S)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ITALIC = re.compile(r"(?<![\w*])[*_](?=\S)([^*_\n]+?)(?<=\S)[*_](?![\w*])")
_BULLET = re.compile(r"^\s*[-*] +(.*)$")
_NUMBERED = re.compile(r"^\s*\d{1,3}[.)] +(.*)$")
_HEADING = re.compile(r"^#{1,6} +(.*)$")


def render(text: str) -> Markup:
    """``text`` as inert HTML (see the module docstring)."""
    out, pos = [], 0
    for m in _FENCE.finditer(text):
        out.append(_blocks(text[pos:m.start()]))
        out.append(f"<pre><code>{escape(m.group(1).rstrip(chr(10)))}</code></pre>")
        pos = m.end()
    out.append(_blocks(text[pos:]))
    return Markup("".join(out))


def _inline(line: str) -> str:
    """Escape, then mark up code spans (their content left as is), bold and italics."""
    parts = _INLINE_CODE.split(line)
    html = []
    for k, part in enumerate(parts):
        safe = str(escape(part))
        if k % 2:  # inside `...`
            html.append(f"<code>{safe}</code>")
        else:
            safe = _BOLD.sub(r"<strong>\1</strong>", safe)
            html.append(_ITALIC.sub(r"<em>\1</em>", safe))
    return "".join(html)


def _blocks(text: str) -> str:
    html = []
    for para in re.split(r"\n[ \t]*\n", text.strip("\n")):
        lines = [ln for ln in para.split("\n")]
        if not any(ln.strip() for ln in lines):
            continue
        if all(_BULLET.match(ln) for ln in lines if ln.strip()):
            items = "".join(f"<li>{_inline(_BULLET.match(ln).group(1))}</li>" for ln in lines if ln.strip())
            html.append(f"<ul>{items}</ul>")
        elif all(_NUMBERED.match(ln) for ln in lines if ln.strip()):
            items = "".join(f"<li>{_inline(_NUMBERED.match(ln).group(1))}</li>" for ln in lines if ln.strip())
            html.append(f"<ol>{items}</ol>")
        else:
            rendered = []
            for ln in lines:
                h = _HEADING.match(ln)
                rendered.append(f"<strong>{_inline(h.group(1))}</strong>" if h else _inline(ln))
            html.append("<p>" + "<br>".join(rendered) + "</p>")
    return "".join(html)
