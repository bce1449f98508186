"""One self-contained HTML report over one or more run directories.

The file has no external resources: figures are matplotlib PNGs embedded as base64 data URIs, the
CSS is inline, and there is no JavaScript. A Content-Security-Policy meta tag forbids scripts and
remote loads, as a second line of defence behind escaping: completions, prompts, configs, run names
and metric names are untrusted text and every one of them goes through `html.escape`.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, never through pyplot,
so writing a report neither changes the caller's matplotlib backend nor leaks open figures.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhfkit.evaluate.overopt import gold_rl, overopt_summary

__all__ = ["write_report", "load_run", "RunData"]

CURVE_NAMESPACES = ("reward/", "loss/", "kl/", "eval/", "policy/", "value/")
MAX_TEXT_CHARS = 20_000  # per prompt/completion shown; keeps a report of long rollouts openable
COLORS = [f"C{i}" for i in range(10)]

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


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


@dataclass
class RunData:
    """Everything read from one run directory; `problems` lists missing or malformed files."""

    name: str
    path: Path
    config: dict | None = None
    config_text: str | None = None
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    eval: dict | None = None
    reward_eval: dict | None = None
    problems: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)


def _read_jsonl(path: Path, run: RunData) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            # A live run can leave a half-written last line; show it rather than abort the report.
            run.problems.append(f"{path.name} line {i} is not valid JSON ({e.msg}); skipped")
            continue
        if not isinstance(row, dict):
            run.problems.append(f"{path.name} line {i} is not a JSON object; skipped")
            continue
        rows.append(row)
    return rows


def _read_json(path: Path, run: RunData) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        run.problems.append(f"{path.name} is not valid JSON ({e.msg})")
        return None
    if not isinstance(d, dict):
        run.problems.append(f"{path.name} is not a JSON object")
        return None
    return d


def load_run(run_dir: Path, name: str | None = None) -> RunData:
    """Read a run directory (see docs/evaluation.md for the layout); never raises on missing files."""
    run_dir = Path(run_dir)
    run = RunData(name=name or run_dir.name, path=run_dir)
    if not run_dir.is_dir():
        run.problems.append(f"run directory {run_dir} does not exist")
        run.missing.update({"config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json"})
        return run
    for fname in ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "reward_eval.json"):
        p = run_dir / fname
        if not p.is_file():
            run.missing.add(fname)
            if fname != "reward_eval.json":  # optional by contract; its absence is no problem
                run.problems.append(f"{fname} is missing")
            continue
        if fname == "config.yaml":
            run.config_text = p.read_text(encoding="utf-8", errors="replace")
            try:
                cfg = yaml.safe_load(run.config_text)
            except yaml.YAMLError as e:
                run.problems.append(f"config.yaml does not parse as YAML: {e}")
                cfg = None
            run.config = cfg if isinstance(cfg, dict) else None
            if cfg is not None and run.config is None:
                run.problems.append("config.yaml is not a YAML mapping")
        elif fname == "metrics.jsonl":
            run.metrics = _read_jsonl(p, run)
        elif fname == "samples.jsonl":
            run.samples = _read_jsonl(p, run)
        elif fname == "eval.json":
            run.eval = _read_json(p, run)
        else:
            run.reward_eval = _read_json(p, run)
    return run


# ---------------------------------------------------------------- figures


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of rows where `key` is a finite number, sorted by step."""
    pts = sorted((_num(r.get("step")), _num(r.get(key))) for r in rows if key in r)
    pts = [(s, v) for s, v in pts if math.isfinite(s) and math.isfinite(v)]
    a = np.array(pts, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def _pair(rows: list[dict], kx: str, ky: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(_num(r.get(kx)), _num(r.get(ky))) for r in rows]
    a = np.array([p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])], dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def _mpl(s: str) -> str:
    """Text safe for matplotlib: no mathtext from '$', no legend-hiding leading '_'."""
    s = str(s).replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<img src="{_png(fig)}" alt="{_esc(alt)}">'


def _grid(n: int, ncols: int = 3, w: float = 4.2, h: float = 3.0) -> tuple[Figure, list]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _missing_note(runs: list[RunData], fname: str) -> str:
    names = [r.name for r in runs if fname in r.missing]
    return _note(f"{fname} is missing in: {', '.join(names)}") if names else ""


def _section_learning_curves(runs: list[RunData]) -> str:
    parts = [_missing_note(runs, "metrics.jsonl")]
    keys = sorted({k for r in runs for row in r.metrics for k in row if k.startswith(CURVE_NAMESPACES)})
    if not keys:
        return "".join(parts) + _note("No reward/, loss/, kl/, eval/, policy/ or value/ metrics were logged.")
    for ns in CURVE_NAMESPACES:
        ns_keys = [k for k in keys if k.startswith(ns)]
        if not ns_keys:
            continue
        fig, axes = _grid(len(ns_keys))
        for ax, key in zip(axes, ns_keys):
            for ci, run in enumerate(runs):
                x, y = _series(run.metrics, key)
                if x.size:
                    ax.plot(
                        x, y, color=COLORS[ci % 10], label=_mpl(run.name), marker="." if x.size < 30 else None
                    )
            ax.set_title(_mpl(key), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        if len(runs) > 1:
            axes[0].legend(fontsize=7)
        parts.append(f"<h3>{_esc(ns)}</h3>" + _img(fig, f"{ns} metrics against step"))
    return "".join(parts)


def _pick_kl_key(rows: list[dict]) -> str | None:
    keys = sorted({k for row in rows for k in row if k.startswith("kl/")})
    for k in ("kl/mean", "kl/seq", "kl/sequence"):
        if k in keys:
            return k
    return keys[0] if keys else None


def _frontier(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper-left envelope: best reward reached at KL <= x, as a step line."""
    order = np.argsort(x)
    return x[order], np.maximum.accumulate(y[order])


def _section_reward_kl(runs: list[RunData]) -> str:
    panels = []  # (title, xlabel, ylabel, [(run_index, x, y)])
    train = []
    for ci, r in enumerate(runs):
        kx = _pick_kl_key(r.metrics)
        ky = "reward/mean" if any("reward/mean" in m for m in r.metrics) else None
        if kx and ky:
            x, y = _pair(r.metrics, kx, ky)
            if x.size:
                train.append((ci, x, y, f"{ky} vs {kx}"))
    if train:
        panels.append(("training reward vs KL", "KL (nats)", "reward/mean", train))
    ev = []
    for ci, r in enumerate(runs):
        x, y = _pair(r.metrics, "eval/kl", "eval/gold")
        if x.size:
            ev.append((ci, x, y, "eval/gold vs eval/kl"))
    if ev:
        panels.append(("gold reward vs KL (eval)", "eval/kl (nats)", "eval/gold", ev))
    if not panels:
        return _missing_note(runs, "metrics.jsonl") + _note(
            "No run logged a KL metric together with reward/mean, nor eval/kl together with eval/gold."
        )
    fig, axes = _grid(len(panels), ncols=2, w=5.5, h=4.0)
    used = []
    for ax, (title, xl, yl, series) in zip(axes, panels):
        for ci, x, y, desc in series:
            ax.scatter(x, y, s=10, color=COLORS[ci % 10], label=_mpl(runs[ci].name), alpha=0.7)
            used.append(f"{runs[ci].name}: {desc}")
        fx, fy = _frontier(np.concatenate([s[1] for s in series]), np.concatenate([s[2] for s in series]))
        ax.step(fx, fy, where="post", color="k", lw=1, label="frontier (all runs)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    listing = "".join(f"<li>{_esc(u)}</li>" for u in used)
    return (
        _img(fig, "reward against KL")
        + "<p>Each point is one logged step; the black line is the best reward reached at or below each KL "
        "across all runs. Further up and to the left is better.</p>" + f"<ul class='meta'>{listing}</ul>"
    )


def _section_gold_proxy(runs: list[RunData]) -> str:
    parts, drawable = [], []
    for r in runs:
        if "metrics.jsonl" in r.missing:
            parts.append(_note(f"{r.name}: metrics.jsonl is missing"))
            continue
        summ = overopt_summary(r.metrics)
        if summ["n_points"] == 0:
            parts.append(_note(f"{r.name}: no eval/gold was logged in metrics.jsonl"))
            continue
        drawable.append((r, summ))
    if not drawable:
        return "".join(parts)
    fig, axes = _grid(len(drawable), ncols=2, w=5.5, h=3.8)
    findings = []
    for ax, (r, s) in zip(axes, drawable):
        steps = np.array(s["steps"], dtype=float)
        sk = np.array([math.nan if v is None else v for v in s["sqrt_kl"]], dtype=float)
        use_kl = bool(np.all(np.isfinite(sk)))
        x = sk if use_kl else steps
        gold = np.array(s["gold"], dtype=float)
        ax.plot(x, gold, "o-", ms=3, color="C0", label="gold")
        if s["fit_rl"] is not None and use_kl:
            d = np.linspace(0, max(x.max(), 1e-9), 200)
            f = s["fit_rl"]
            ax.plot(
                d,
                gold[0] + gold_rl(d, f["alpha"], f["beta"]),
                "--",
                color="C0",
                lw=1,
                label=f"Gao RL fit a={f['alpha']:.3g} b={f['beta']:.3g}",
            )
        proxy = np.array([math.nan if v is None else v for v in s["proxy"]], dtype=float)
        if np.any(np.isfinite(proxy)):
            ax2 = ax.twinx()
            ax2.plot(x, proxy, "s-", ms=3, color="C1", label="proxy")
            ax2.set_ylabel("eval/proxy", color="C1")
        if s["turnover_step"] is not None:
            xt = x[int(np.flatnonzero(steps == s["turnover_step"])[0])]
            ax.axvline(xt, color="red", ls=":", lw=1.5, label=f"turnover (step {s['turnover_step']})")
        ax.set_xlabel("sqrt(eval/kl)" if use_kl else "step (eval/kl not logged at every eval)")
        ax.set_ylabel("eval/gold", color="C0")
        ax.set_title(_mpl(r.name), fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        cls = "finding" if s["proxy_rises_gold_does_not"] or s["turnover_step"] is not None else "meta"
        findings.append(f'<p class="{cls}"><b>{_esc(r.name)}:</b> {_esc(s["message"])}</p>')
    return (
        "".join(parts)
        + _img(fig, "gold and proxy reward against sqrt KL")
        + "".join(findings)
        + "<p class='meta'>Gao et al. 2022: gold R(d) = d(alpha - beta log d) with d = sqrt(KL), fitted to gold minus "
        "its first eval. The red line marks where smoothed gold started a sustained fall while proxy rose.</p>"
    )


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
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _section_win_rates(runs: list[RunData]) -> str:
    parts = [_missing_note(runs, "eval.json")]
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
        parts.append(_note("No run has an eval.json (written by evaluate_pairs) or a reward_eval.json."))
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
    return f'<pre class="box">{_esc(s)}</pre>{extra}'


def _section_samples(runs: list[RunData], max_samples: int) -> str:
    parts = [_missing_note(runs, "samples.jsonl")]
    for r in runs:
        if not r.samples:
            if "samples.jsonl" not in r.missing:
                parts.append(_note(f"{r.name}: samples.jsonl has no samples"))
            continue
        steps = sorted({_num(s.get("step")) for s in r.samples if math.isfinite(_num(s.get("step")))})
        shown = [steps[0], steps[-1]] if len(steps) > 1 else steps
        parts.append(
            f"<h3>{_esc(r.name)}</h3><p class='meta'>First and last sampled steps, up to "
            f"{max_samples} completions each; text is shown verbatim (not rendered).</p>"
        )
        for st in shown:
            at = [s for s in r.samples if _num(s.get("step")) == st][:max_samples]
            parts.append(f"<h4>step {_esc(_fmt_val(st if not st.is_integer() else int(st)))}</h4>")
            for s in at:
                meta = (
                    f"reward {_esc(_fmt_val(s.get('reward')))} &middot; gold {_esc(_fmt_val(s.get('gold')))}"
                )
                parts.append(
                    f'<div class="sample"><div class="meta">{meta}</div>'
                    f"<div class='meta'>prompt</div>{_text_box(s.get('prompt'))}"
                    f"<div class='meta'>completion</div>{_text_box(s.get('completion'))}</div>"
                )
    return "".join(parts)


def _section_config(runs: list[RunData]) -> str:
    parts = []
    for r in runs:
        parts.append(f"<h3>{_esc(r.name)}</h3>")
        if r.config_text is None:
            parts.append(_note(f"{r.name}: config.yaml is missing"))
        else:
            parts.append(f'<pre class="box config">{_esc(r.config_text)}</pre>')
    return "".join(parts)


SECTIONS = [
    ("learning-curves", "Learning curves"),
    ("reward-kl", "Reward vs KL"),
    ("gold-proxy", "Gold vs proxy reward (overoptimization)"),
    ("win-rates", "Win rates"),
    ("samples", "Samples"),
    ("config", "Config"),
]


def write_report(
    run_dirs: list[Path], out: Path, title: str = "rlhfkit report", max_samples: int = 6
) -> Path:
    """Write one self-contained HTML report comparing `run_dirs`; returns `out`.

    Sections (HTML ids): learning-curves, reward-kl, gold-proxy, win-rates, samples, config. A missing
    or malformed file is reported in the affected sections and in a problems list at the top.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    names = [Path(p).name for p in run_dirs]
    runs = [
        load_run(p, n if names.count(n) == 1 else f"{n} ({i})")
        for i, (p, n) in enumerate(zip(run_dirs, names))
    ]
    for r in runs:
        for p in r.problems:
            warnings.warn(f"{r.name}: {p}", stacklevel=2)
    builders = {
        "learning-curves": lambda: _section_learning_curves(runs),
        "reward-kl": lambda: _section_reward_kl(runs),
        "gold-proxy": lambda: _section_gold_proxy(runs),
        "win-rates": lambda: _section_win_rates(runs),
        "samples": lambda: _section_samples(runs, max_samples),
        "config": lambda: _section_config(runs),
    }
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    run_list = "".join(
        f"<li><b>{_esc(r.name)}</b> <span class='meta'>{_esc(r.path)}</span></li>" for r in runs
    )
    problems = "".join(f"<li>{_esc(r.name)}: {_esc(p)}</li>" for r in runs for p in r.problems)
    toc = " &middot; ".join(f'<a href="#{sid}">{_esc(t)}</a>' for sid, t in SECTIONS)
    body = [
        f"<h1>{_esc(title)}</h1><p class='meta'>generated {now}</p><ul>{run_list}</ul>",
        f"<h2>Problems</h2><ul class='note'>{problems}</ul>" if problems else "",
        f"<p>{toc}</p>",
    ]
    for sid, heading in SECTIONS:
        body.append(f'<section id="{sid}"><h2>{_esc(heading)}</h2>{builders[sid]()}</section>')
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
