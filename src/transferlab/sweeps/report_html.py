"""report.html of a sweep: one self-contained file (inline CSS, PNGs as data URIs, no scripts) to open or mail.

Plots: the few-shot curve of a sweep over data.shots (sweeps.few_shot), the optimised metric against each swept
parameter (failed jobs marked), learning curves from each job's csv/metrics.csv, and the best run's confusion matrix
and pictures.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any, Optional

from matplotlib.ticker import MaxNLocator

from transferlab.core.plotting import pyplot
from transferlab.insight.html_page import figure
from transferlab.sweeps.collect import Job, Sweep, cell, columns, headline, with_interval
from transferlab.sweeps.compare import Verdict, group_label, seed_groups, shown_metrics, vs_best
from transferlab.sweeps.few_shot import CURVE_CSV, TABLE_HEAD, curve_figure, few_shot_curve, table_rows

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.5rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
th{background:#f4f4f4} tr.failed td{background:#fde8e8} tr.pruned td,tr.incomplete td,tr.interrupted td{background:#fff6dc} tr.best td{background:#e6f4ea}
.headline{background:#f4f8ff;border-left:4px solid #3b73d1;padding:.6rem 1rem} img{max-width:100%;border:1px solid #eee}
.pictures{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:.8rem} .pictures img{width:100%} figcaption{font-size:.8rem;color:#555}
code{background:#f4f4f4;padding:0 .2rem}
"""


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _number(text: Optional[str]) -> Optional[float]:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def metric_vs_parameters(sweep: Sweep) -> Optional[str]:
    """One panel per swept parameter; numbers on a (log) axis, other values as categories; pruned trials in
    orange (their best val/acc before pruning), failures as red x."""
    if not sweep.swept:
        return None
    plt = pyplot()
    n = len(sweep.swept)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.4 * ((n + cols - 1) // cols)), squeeze=False)
    done = [j for j in sweep.jobs if j.value(sweep.metric) is not None]
    values = [v for j in done if (v := j.value(sweep.metric)) is not None]
    floor = min(values) if values else 0.0
    for ax, key in zip(axes.flat, sweep.swept):
        raw = [j.overrides.get(key, "") for j in sweep.jobs]
        numeric = all(_number(v) is not None for v in raw)
        if numeric:
            position: dict[str, float] = {v: _number(v) or 0.0 for v in raw}
            positive = [p for p in position.values() if p > 0]
            wide = len(positive) == len(position) and max(positive) / min(positive) >= 100
            if key in (sweep.log_scale or ()) or (sweep.log_scale is None and wide):  # Optuna's own scale, else a guess
                ax.set_xscale("log")
        else:
            categories = sorted(set(raw))
            position = {v: i for i, v in enumerate(categories)}
            ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 3 else 0, fontsize=8)
        colors = ["#e0a000" if j.status == "pruned" else "#3b73d1" for j in done]
        ax.scatter([position[j.overrides.get(key, "")] for j in done], values, c=colors, zorder=3)
        failed = [j for j in sweep.jobs if j.status == "failed"]
        if failed:
            ax.scatter(
                [position[j.overrides.get(key, "")] for j in failed], [floor] * len(failed), marker="x", color="#d13b3b", zorder=4, label="failed"
            )
            ax.legend(fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _png(fig)


def _curves(job: Job) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch values from <job>/csv/metrics.csv (Lightning's CSVLogger: one row per logging step)."""
    path = job.path / "csv" / "metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {"val/acc": [], "train/loss_epoch": []}
    if not path.is_file():
        return curves
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for key, points in curves.items():
                value, epoch = _number(row.get(key)), _number(row.get("epoch"))
                if value is not None and epoch is not None:
                    points.append((int(epoch), value))
    return curves


def learning_curves(sweep: Sweep, limit: int = 12) -> Optional[str]:
    jobs = [j for j in sweep.jobs if j.status != "failed"][:limit]  # the best first
    curves = {j.name: _curves(j) for j in jobs}
    if not any(points for c in curves.values() for points in c.values()):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    best = sweep.best.name if sweep.best else None
    epochs = sorted({e for c in curves.values() for points in c.values() for e, _ in points})
    for ax, key in zip(axes, ("val/acc", "train/loss_epoch")):
        for name, curve in curves.items():
            points = sorted(dict(curve[key]).items())
            if points:
                ax.plot(*zip(*points), marker="o", linewidth=2.5 if name == best else 1.2, label=f"job {name}")
        ax.set_xlabel("epoch")
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    return _png(fig)


def _table(sweep: Sweep, verdicts: dict[str, Verdict]) -> str:
    keys, _ = columns(sweep)
    keys = sweep.swept or keys
    shown = shown_metrics(sweep, 8)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["job", *keys, "status", *shown, "vs best", "seconds"])
    best = sweep.best.name if sweep.best else None
    rows = []
    for job in sweep.jobs:
        css = "best" if job.name == best else job.status
        cells = [
            job.name,
            *(cell(job.overrides.get(k, "")) for k in keys),
            job.status,
            *(with_interval(job, m) for m in shown),
            vs_best(sweep, verdicts, job),
            cell(job.duration_s),
        ]
        rows.append(f'<tr class="{css}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    fixed = {k: v for k, v in (sweep.jobs[0].overrides.items() if sweep.jobs else []) if k not in keys}
    same = f"<p>Same in every job: <code>{html.escape(', '.join(f'{k}={v}' for k, v in fixed.items()))}</code></p>" if fixed else ""
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{same}"


def _failures(sweep: Sweep) -> str:
    failed = [j for j in sweep.jobs if j.status == "failed"]
    if not failed:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(j.name)}</td><td>{html.escape(', '.join(f'{k}={v}' for k, v in j.overrides.items() if k in sweep.swept))}</td>"
        f"<td>{html.escape(j.error or '')}</td><td><code>{html.escape(str(j.path / 'error.txt'))}</code></td></tr>"
        for j in failed
    )
    return f"<h2>Failures</h2><table><tr><th>job</th><th>overrides</th><th>error</th><th>traceback</th></tr>{rows}</table>"


FIRST_PICTURES = (  # what a reader asks for first: the test report and the run's interpretation (training.run_report)
    ("confusion_matrix.png", "confusion matrix (test)"),
    ("top_losses.png", "top losses, with the map of the predicted class"),
    ("most_confused.png", "most confused pairs"),
    ("embedding_map.png", "embedding map of the test images"),
    ("reliability_diagram.png", "reliability diagram (test)"),
    ("precision_recall.png", "precision-recall per label (test, multi-label)"),
    ("most_missed.png", "most-missed labels, with each label's map (multi-label)"),
)


def _best_pictures(job: Job, limit: int = 12) -> str:
    pictures = [(job.path / name, caption) for name, caption in FIRST_PICTURES if (job.path / name).is_file()]
    first = {p for p, _ in pictures}
    others = sorted(p for p in job.path.rglob("*.png") if p not in first and ".hydra" not in p.parts and "wandb" not in p.parts)
    pictures += [(p, p.relative_to(job.path).as_posix()) for p in others[: max(0, limit - len(pictures))]]
    figures = "".join(figure(p, c) for p, c in pictures)
    report = job.path / "report.html"
    link = f"<p>The run's own page: <code>{html.escape(str(report))}</code></p>" if report.is_file() else ""
    return (f'<div class="pictures">{figures}</div>' if figures else "<p>No pictures in the best run's folder.</p>") + link


def _seeds(sweep: Sweep) -> str:
    groups = seed_groups(sweep)
    if not groups:
        return ""
    shown = shown_metrics(sweep, 4)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["settings", *shown])
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [group_label(g, sweep.swept), *(g.summary(m) or "" for m in shown)]) + "</tr>"
        for g in groups
    )
    return f"<h2>Repeated seeds (mean ± std)</h2><table><tr>{head}</tr>{rows}</table>"


def _few_shot(sweep: Sweep) -> str:
    """The few-shot curve (a sweep over data.shots): its picture, its table and how to read it."""
    curve = few_shot_curve(sweep)
    if curve is None:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_HEAD)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(curve))
    return (
        f"<h2>Few-shot curve: {html.escape(curve.metric)} against training images per class</h2>"
        f'<img src="{_png(curve_figure(curve))}" alt="few-shot curve"><p>{html.escape(curve.note())} Also: <code>{CURVE_CSV}</code>.</p>'
        f"<table><tr>{head}</tr>{rows}</table>"
    )


def write_html(sweep: Sweep, path: Path, verdicts: Optional[dict[str, Verdict]] = None) -> Path:
    best = sweep.best
    parts = [
        f"<h1>Sweep report: {html.escape(sweep.path.name)}</h1>",
        f'<p class="headline">{html.escape(headline(sweep))}</p>',
        f"<p>Folder <code>{html.escape(str(sweep.path.resolve()))}</code>; "
        + (f"ranked by <code>{html.escape(sweep.metric)}</code> ({sweep.direction})" if not sweep.unranked else "jobs listed by name, not ranked")
        + ". Also: <code>summary.csv</code>, <code>summary.md</code>.</p>",
        _few_shot(sweep),
        "<h2>Jobs</h2>",
        _table(sweep, verdicts or {}),
        "<p>Intervals: 95 % over the test images (core.statistics). <i>vs best</i>: a paired bootstrap of each job's per-image "
        "correctness against the best job's on the same images; <i>indistinguishable</i> = no difference at p &lt; 0.05.</p>",
        _seeds(sweep),
        _failures(sweep),
    ]
    scatter = metric_vs_parameters(sweep)
    if scatter:
        parts += [f"<h2>{html.escape(sweep.metric)} against each swept parameter</h2>", f'<img src="{scatter}" alt="metric against parameters">']
    curves = learning_curves(sweep)
    if curves:
        parts += ["<h2>Learning curves</h2>", f'<img src="{curves}" alt="learning curves">']
    if best:
        overrides = ", ".join(f"{k}={v}" for k, v in best.overrides.items() if k in sweep.swept) or "defaults"
        parts += [f"<h2>Best run: job {html.escape(best.name)}</h2>", f"<p><code>{html.escape(overrides)}</code></p>", _best_pictures(best)]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>Sweep report {html.escape(sweep.path.name)}</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    path.write_text(page)
    return path
