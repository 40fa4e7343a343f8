"""audit.html: the audit's findings with thumbnails, one self-contained file (insight.html_page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferlab.insight.audit import AuditResult
from transferlab.insight.html_page import escape, page, table, thumb


def _findings(head: list[str], rows: list[list[str]], total: int, csv_name: str, classes: list[str] | None = None) -> str:
    """A table of the first rows of one finding, or "None found.", and how many more the CSV holds."""
    if not rows:
        return "<p>None found.</p>"
    more = f"<p>{total - len(rows)} more in <code>{escape(csv_name)}</code>.</p>" if total > len(rows) else ""
    return table(head, rows, classes) + more


def probe_line(facts: dict[str, Any]) -> str:
    """`accuracy 0.953`, or `mAP 0.987` for a multi-label audit's one-vs-rest probe."""
    probe = facts["probe"]
    return f"mAP {probe['out_of_fold_map']:.3f}" if "out_of_fold_map" in probe else f"accuracy {probe['out_of_fold_accuracy']:.3f}"


def write_audit_page(result: AuditResult, facts: dict[str, Any], path: Path, max_rows: int) -> Path:
    names, text = result.class_names, result.text
    issues = result.label_issues[:max_rows]
    pairs = result.duplicates[:max_rows]
    outliers = result.outliers[:max_rows]
    probe = facts["probe"]
    body = [
        '<ul class="summary">',
        f"<li>{facts['images']} images, {facts['classes']} {'labels (multi-label)' if result.multilabel else 'classes'}; splits: "
        + ", ".join(f"{escape(k)} {v}" for k, v in facts["splits"].items())
        + "</li>",
        f"<li>Out-of-fold probe: {probe['folds']} folds, C={probe['C']:g}, {probe_line(facts)}</li>",
        f"<li><b>{facts['label_issues']}</b> label issue(s), <b>{facts['duplicates']}</b> near-duplicate pair(s) "
        f"(<b>{facts['cross_split_duplicates']}</b> across splits: leakage), <b>{facts['outliers']}</b> outlier(s), "
        f"<b>{facts['skipped']}</b> unusable file(s)</li>",
        "<li>Nothing was moved or deleted."
        + (f" Exclude list: <code>{escape(facts['exclude_file'])}</code>" if facts["exclude_file"] else "")
        + "</li>",
        "</ul>",
        "<h2>Label issues</h2><p>"
        + (
            "Confident learning on label sets (cleanlab's multi-label filter) on out-of-fold one-vs-rest probabilities; given and "
            "suggested sets (labels with p &ge; 0.5); score = 1 - the label quality aggregated over labels, most suspicious first.</p>"
            if result.multilabel
            else "Confident learning (cleanlab) on out-of-fold probabilities; score = 1 - p(given label), most suspicious first.</p>"
        ),
        _findings(
            ["image", "path", "given", "suggested", "score"],
            [
                [thumb(result.paths[i.index]), escape(result.paths[i.index]), escape(text(i.given)), escape(text(i.suggested)), f"{i.score:.3f}"]
                for i in issues
            ],
            len(result.label_issues),
            "label_issues.csv",
        ),
        "<h2>Near-duplicates</h2><p>Rows in red straddle train / val / test: the same picture is trained and evaluated on.</p>",
        _findings(
            ["image a", "image b", "paths", "similarity", "hash bits", "splits"],
            [
                [
                    thumb(result.paths[p.a]),
                    thumb(result.paths[p.b]),
                    f"{escape(result.paths[p.a])}<br>{escape(result.paths[p.b])}",
                    f"{p.similarity:.3f}",
                    escape(p.hash_distance if p.hash_distance is not None else ""),
                    f"{escape(result.splits[p.a])} / {escape(result.splits[p.b])}",
                ]
                for p in pairs
            ],
            len(result.duplicates),
            "duplicates.csv",
            ["warn" if result.cross_split(p) else "" for p in pairs],
        ),
        "<h2>Outliers</h2><p>Images unlike all others: low mean similarity to their nearest neighbours in feature space (robust z-score).</p>",
        _findings(
            ["image", "path", "given", "nearest class", "neighbour similarity", "z"],
            [
                [thumb(result.paths[o.index]), escape(result.paths[o.index]), escape(text(result.given(o.index))), escape(names[o.nearest])]
                + [f"{o.similarity:.3f}", f"{o.z:.1f}"]
                for o in outliers
            ],
            len(result.outliers),
            "outliers.csv",
        ),
        "<h2>Unusable files</h2>",
        table(["path", "reason"], [[escape(p), escape(r)] for p, r in sorted(result.skipped.items())[:max_rows]])
        if result.skipped
        else "<p>None.</p>",
    ]
    path.write_text(page("Data audit", body))
    return path
