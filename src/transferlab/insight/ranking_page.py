"""transferlab-rank's files: ranking.csv (one row per candidate), ranking.json (the rows, the rule, the agreement
of the cheap scores with the probe), ranking.md and a self-contained ranking.html with the score-vs-cost plot."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from transferlab.core.files import atomic_write
from transferlab.core.plotting import pyplot, save_figure
from transferlab.insight.html_page import escape, figure, page, table

COLUMNS = (
    "backbone",
    "weights",
    "probe_acc",
    "probe_acc_ci95_low",
    "probe_acc_ci95_high",
    "knn_acc",
    "logme",
    "prior_top1",
    "p_vs_best",
    "recommended",
    "feature_seconds",
    "images_per_second",
    "parameters",
    "feature_dim",
    "model_mb",
    "error",
)
RULE = (
    "Among the candidates whose probe is not significantly worse than the best one (Nadeau-Bengio corrected paired t-test "
    "over the same folds, p >= {alpha}), the highest ImageNet top-1 of the weights (a known one before an unknown one), "
    "then the fewest parameters."
)


def cell(value: Any) -> str:
    """A CSV/Markdown cell: empty for unknown, true/false, floats to 4 significant decimals."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return ""
        if 0 < abs(value) < 1e-3:
            return f"{value:.2g}"  # a small p-value keeps its size instead of printing as 0
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell(row.get(k)) for k in COLUMNS})
    atomic_write(path, buffer.getvalue().encode())


def plot(rows: Sequence[dict[str, Any]], path: Path, metric: str) -> Optional[Path]:
    """The probe's score (with its interval) against the backbone's parameters, the recommended one starred."""
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        x, y = r["parameters"] / 1e6, r["probe_acc"]
        ax.errorbar(x, y, yerr=[[y - r["probe_acc_ci95_low"]], [r["probe_acc_ci95_high"] - y]], fmt="*" if r["recommended"] else "o",
                    markersize=14 if r["recommended"] else 7, capsize=4, color="tab:red" if r["recommended"] else "tab:blue")  # fmt: skip
        ax.annotate(f"{r['backbone']} ({r['weights']})", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the feature extractor (millions, log scale)")
    ax.set_ylabel(f"{metric}, cross-validated (95 % interval)")
    ax.set_title("Score against cost (★ recommended)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_outputs(out_dir: Path, rows: Sequence[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Path]:
    """ranking.csv, ranking.json, ranking.md, ranking.html (and ranking.png, the plot the page embeds)."""
    files = {name: out_dir / f"ranking.{name}" for name in ("csv", "json", "md", "html")}
    write_csv(rows, files["csv"])
    atomic_write(files["json"], json.dumps({**facts, "rows": list(rows)}, indent=2, default=str).encode())
    atomic_write(files["md"], markdown(rows, facts).encode())
    picture = plot(rows, out_dir / "ranking.png", facts["metric"])
    body = [f"<p>{escape(line)}</p>" for line in summary_lines(rows, facts)]
    body.append(table(COLUMNS, ([escape(cell(r.get(k))) for k in COLUMNS] for r in rows), ["warn" if r.get("error") else "" for r in rows]))
    if picture is not None:
        body.append(figure(picture, "probe score against parameters"))
    atomic_write(files["html"], page("Backbone ranking", body).encode())
    return files


def summary_lines(rows: Sequence[dict[str, Any]], facts: dict[str, Any]) -> list[str]:
    """What the ranking says, in sentences: the recommendation, the rule, how far the cheap scores can be trusted."""
    lines = [
        f"{facts['images']} images ({facts['classes']} {'labels' if facts['multilabel'] else 'classes'}), {facts['folds']}-fold "
        f"cross-validation of the L-BFGS probe (C by {facts['c_folds']} inner folds); probe_acc is the out-of-fold {facts['metric']}."
    ]
    chosen = next((r for r in rows if r.get("recommended")), None)
    if chosen is None:
        lines.append("No candidate could be scored: see the error column.")
    else:
        lines.append(f"Recommended: {chosen['backbone']} ({chosen['weights']}). Train it with: {facts['train_command']}")
    lines.append("Rule: " + RULE.format(alpha=facts["alpha"]))
    for score, found in facts["agreement"].items():
        tau = found["kendall_tau"]
        lines.append(
            f"Agreement of {score} with the probe over {found['backbones']} backbones: Kendall tau "
            + (f"{tau:.2f}" if tau is not None else "undefined (fewer than 3 scored backbones, or ties)")
        )
    lines.append(f"Features computed in this run: {facts['features_computed']} (the rest came from the feature cache).")
    return lines


def markdown(rows: Sequence[dict[str, Any]], facts: dict[str, Any]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(cell(r.get(k)).replace("|", "/") for k in COLUMNS) + " |\n" for r in rows)
    return "# Backbone ranking\n\n" + "\n\n".join(summary_lines(rows, facts)) + "\n\n" + head + body
