"""One self-contained HTML report over one or more run directories.

The file has no external resources: figures are matplotlib PNGs embedded as base64 data URIs, the
CSS is inline, and there is no JavaScript. A Content-Security-Policy meta tag forbids scripts and
remote loads, as a second line of defence behind escaping: completions, prompts, configs, run names
and metric names are untrusted text and every one of them goes through `html.escape`.

Runs are read by ``rlhfkit.tracking.read_run`` (leniently: a missing or malformed file becomes a
problem listed at the top); ``report_plots`` draws the figures and ``report_html`` the text sections.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from pathlib import Path

from rlhfkit.evaluate.report_html import CSP, CSS, esc, section_config, section_samples, section_win_rates
from rlhfkit.evaluate.report_plots import section_gold_proxy, section_learning_curves, section_reward_kl
from rlhfkit.tracking import read_run

__all__ = ["write_report"]

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
        read_run(p, n if names.count(n) == 1 else f"{n} ({i})")
        for i, (p, n) in enumerate(zip(run_dirs, names))
    ]
    for r in runs:
        for p in r.problems:
            warnings.warn(f"{r.name}: {p}", stacklevel=2)
    builders = {
        "learning-curves": lambda: section_learning_curves(runs),
        "reward-kl": lambda: section_reward_kl(runs),
        "gold-proxy": lambda: section_gold_proxy(runs),
        "win-rates": lambda: section_win_rates(runs),
        "samples": lambda: section_samples(runs, max_samples),
        "config": lambda: section_config(runs),
    }
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    run_list = "".join(
        f"<li><b>{esc(r.name)}</b> <span class='meta'>{esc(r.path)}</span></li>" for r in runs
    )
    problems = "".join(f"<li>{esc(r.name)}: {esc(p)}</li>" for r in runs for p in r.problems)
    toc = " &middot; ".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t in SECTIONS)
    body = [
        f"<h1>{esc(title)}</h1><p class='meta'>generated {now}</p><ul>{run_list}</ul>",
        f"<h2>Problems</h2><ul class='note'>{problems}</ul>" if problems else "",
        f"<p>{toc}</p>",
    ]
    for sid, heading in SECTIONS:
        body.append(f'<section id="{sid}"><h2>{esc(heading)}</h2>{builders[sid]()}</section>')
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
