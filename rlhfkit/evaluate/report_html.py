"""HTML building blocks of the report and its text sections (win rates, samples, config).

Completions, prompts, configs, run names and metric names are untrusted text: every one of them goes
through ``esc`` (``html.escape``) here, and the page's Content-Security-Policy forbids scripts and
remote loads as a second line of defence.
"""

from __future__ import annotations

import html
import math

from rlhfkit.tracking import RunData

MAX_TEXT_CHARS = 20_000  # per prompt/completion shown; keeps a report of long rollouts openable

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.note { color: #8a4b00; background: #fff6e5; padding: 0.4em 0.7em; border-left: 3px solid #e0a030; }
.finding { background: #eef4ff; padding: 0.4em 0.7em; border-left: 3px solid #3060c0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; }
pre.box { max-height: 16em; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere;
          background: #f7f7f7; border: 1px solid #ddd; padding: 0.5em; margin: 0.2em 0 0.6em 0; }
pre.config { max-height: 30em; }
.sample { border: 1px solid #e3e3e3; padding: 0.5em; margin: 0.6em 0; }
.meta { color: #555; font-size: 0.85em; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def missing_note(runs: list[RunData], fname: str) -> str:
    names = [r.name for r in runs if fname in r.missing]
    return note(f"{fname} is missing in: {', '.join(names)}") if names else ""


def num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _ci_cell(est: dict | None, pct: bool = False) -> str:
    if not isinstance(est, dict) or not isinstance(est.get("value"), (int, float)):
        return "-"

    def f(v):
        if not isinstance(v, (int, float)):
            return "?"
        return f"{100 * v:.1f}%" if pct else f"{v:.4g}"

    if est.get("ci_low") is None and est.get("kind"):  # a bound, reported without an interval
        return f"{f(est['value'])} ({est['kind']})"
    return f"{f(est['value'])} [{f(est.get('ci_low'))}, {f(est.get('ci_high'))}]"


def _d(x) -> dict:
    """x if it is a dict, else {}: eval.json comes from disk and may not follow the schema."""
    return x if isinstance(x, dict) else {}


def _table(head: list[str], rows: list[list]) -> str:
    """HTML table; every cell is escaped."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def section_win_rates(runs: list[RunData]) -> str:
    parts = [missing_note(runs, "eval.json")]
    head = ["run", "source", "win rate", "LC win rate", "gold diff", "proxy diff", "KL", "prompts",
            "words (pol/ref)", "distinct-2 (pol/ref)"]  # fmt: skip

    def pair(block: dict, key: str, fmt: str) -> str:
        vals = [_d(block.get(side)).get(key) for side in ("policy", "reference")]
        return " / ".join(fmt.format(v) if isinstance(v, (int, float)) else "-" for v in vals)

    rows = []
    for r in runs:
        if r.eval is None:
            continue
        e = r.eval
        rows.append([
            r.name, _d(e.get("win_rate")).get("source", "-"), _ci_cell(e.get("win_rate"), True),
            _ci_cell(e.get("lc_win_rate"), True), _ci_cell(_d(e.get("gold")).get("difference")),
            _ci_cell(_d(e.get("proxy")).get("difference")), _ci_cell(e.get("kl")), e.get("n_prompts", "-"),
            pair(_d(e.get("length")), "mean_words", "{:.1f}"), pair(_d(e.get("distinct")), "distinct_2", "{:.3f}"),
        ])  # fmt: skip
    if rows:
        alphas = [r.eval["alpha"] for r in runs if r.eval and isinstance(r.eval.get("alpha"), float)]
        level = f"{100 * (1 - alphas[0]):.0f}%" if alphas else "95%"
        parts.append(
            f"<p>Policy against its reference on the same prompts; brackets are {level} bootstrap intervals "
            "over prompts. Diff = policy minus reference, paired per prompt.</p>" + _table(head, rows)
        )
    rm = [(r.name, r.reward_eval) for r in runs if r.reward_eval]
    if rm:
        keys = sorted({k for _, d in rm for k in d})
        table = _table(["run", *keys], [[n, *(_fmt_val(d.get(k)) for k in keys)] for n, d in rm])
        parts.append("<h3>Reward model (reward_eval.json)</h3>" + table)
    if not rows and not rm:
        parts.append(note("No run has an eval.json (written by evaluate_pairs) or a reward_eval.json."))
    return "".join(parts)


def _fmt_val(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _text_box(text) -> str:
    s = "" if text is None else str(text)
    extra = ""
    if len(s) > MAX_TEXT_CHARS:
        extra = f'<div class="meta">[{len(s) - MAX_TEXT_CHARS} more characters not shown]</div>'
        s = s[:MAX_TEXT_CHARS]
    return f'<pre class="box">{esc(s)}</pre>{extra}'


def section_samples(runs: list[RunData], max_samples: int) -> str:
    parts = [missing_note(runs, "samples.jsonl")]
    for r in runs:
        if not r.samples:
            if "samples.jsonl" not in r.missing:
                parts.append(note(f"{r.name}: samples.jsonl has no samples"))
            continue
        steps = sorted({num(s.get("step")) for s in r.samples if math.isfinite(num(s.get("step")))})
        shown = [steps[0], steps[-1]] if len(steps) > 1 else steps
        parts.append(
            f"<h3>{esc(r.name)}</h3><p class='meta'>First and last sampled steps, up to "
            f"{max_samples} completions each; text is shown verbatim (not rendered).</p>"
        )
        for st in shown:
            at = [s for s in r.samples if num(s.get("step")) == st][:max_samples]
            parts.append(f"<h4>step {esc(_fmt_val(st if not st.is_integer() else int(st)))}</h4>")
            for s in at:
                meta = (
                    f"reward {esc(_fmt_val(s.get('reward')))} &middot; gold {esc(_fmt_val(s.get('gold')))}"
                )
                parts.append(
                    f'<div class="sample"><div class="meta">{meta}</div>'
                    f"<div class='meta'>prompt</div>{_text_box(s.get('prompt'))}"
                    f"<div class='meta'>completion</div>{_text_box(s.get('completion'))}</div>"
                )
    return "".join(parts)


def section_config(runs: list[RunData]) -> str:
    parts = []
    for r in runs:
        parts.append(f"<h3>{esc(r.name)}</h3>")
        if r.config_text is None:
            parts.append(note(f"{r.name}: config.yaml is missing"))
        else:
            parts.append(f'<pre class="box config">{esc(r.config_text)}</pre>')
    return "".join(parts)
