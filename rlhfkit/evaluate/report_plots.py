"""The report's figures: learning curves, reward against KL, gold against proxy reward.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through pyplot,
so writing a report neither changes the caller's matplotlib backend nor leaks open figures; each is
embedded as a base64 PNG data URI (the report loads nothing external).
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhfkit.evaluate.overopt import gold_rl, overopt_summary
from rlhfkit.evaluate.report_html import esc, missing_note, note, num
from rlhfkit.tracking import RunData

CURVE_NAMESPACES = ("reward/", "loss/", "kl/", "eval/", "policy/", "value/")
COLORS = [f"C{i}" for i in range(10)]


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of rows where `key` is a finite number, sorted by step."""
    pts = sorted((num(r.get("step")), num(r.get(key))) for r in rows if key in r)
    pts = [(s, v) for s, v in pts if math.isfinite(s) and math.isfinite(v)]
    a = np.array(pts, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def _pair(rows: list[dict], kx: str, ky: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(num(r.get(kx)), num(r.get(ky))) for r in rows]
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
    return f'<img src="{_png(fig)}" alt="{esc(alt)}">'


def _grid(n: int, ncols: int = 3, w: float = 4.2, h: float = 3.0) -> tuple[Figure, list]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def section_learning_curves(runs: list[RunData]) -> str:
    parts = [missing_note(runs, "metrics.jsonl")]
    keys = sorted({k for r in runs for row in r.metrics for k in row if k.startswith(CURVE_NAMESPACES)})
    if not keys:
        return "".join(parts) + note("No reward/, loss/, kl/, eval/, policy/ or value/ metrics were logged.")
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
        parts.append(f"<h3>{esc(ns)}</h3>" + _img(fig, f"{ns} metrics against step"))
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


def section_reward_kl(runs: list[RunData]) -> str:
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
        return missing_note(runs, "metrics.jsonl") + note(
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
    listing = "".join(f"<li>{esc(u)}</li>" for u in used)
    return (
        _img(fig, "reward against KL")
        + "<p>Each point is one logged step; the black line is the best reward reached at or below each KL "
        "across all runs. Further up and to the left is better.</p>" + f"<ul class='meta'>{listing}</ul>"
    )


def section_gold_proxy(runs: list[RunData]) -> str:
    parts, drawable = [], []
    for r in runs:
        if "metrics.jsonl" in r.missing:
            parts.append(note(f"{r.name}: metrics.jsonl is missing"))
            continue
        summ = overopt_summary(r.metrics)
        if summ["n_points"] == 0:
            parts.append(note(f"{r.name}: no eval/gold was logged in metrics.jsonl"))
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
        findings.append(f'<p class="{cls}"><b>{esc(r.name)}:</b> {esc(s["message"])}</p>')
    return (
        "".join(parts)
        + _img(fig, "gold and proxy reward against sqrt KL")
        + "".join(findings)
        + "<p class='meta'>Gao et al. 2022: gold R(d) = d(alpha - beta log d) with d = sqrt(KL), fitted to gold minus "
        "its first eval. The red line marks where smoothed gold started a sustained fall while proxy rose.</p>"
    )
