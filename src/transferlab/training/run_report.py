"""After the test: the run's interpretation (top losses with their maps, most-confused pairs, embedding map) and
<run>/report.html, one self-contained page with the figures a reader asks for first.

A multi-label run (its metrics hold `test/support/<label>`) has no confusion pairs or single loss per image; its
interpretation is the most-missed labels (insight.missed_labels: most_missed.png / .csv, the images where each of
the worst labels was missed or wrongly added, with that label's map), and its page shows mAP and the F1s with
their intervals, a per-label table with the most-missed labels first, precision_recall.png and that gallery.

Settings: conf/interpret/default.yaml (`interpret.enabled=false` skips all of it).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from transferlab.data.labels import multi_hot
from transferlab.insight.embeddings import pooled_features
from transferlab.insight.html_page import escape, figure, page, table
from transferlab.insight.interpretation import most_confused, project_2d, render_embedding_map, render_top_losses, top_losses, write_most_confused
from transferlab.insight.missed_labels import gallery_labels, label_order, most_missed, render_most_missed, write_most_missed
from transferlab.insight.pixels import inspecting, trained_classifier
from transferlab.models.classifier import TransferClassifier

log = logging.getLogger(__name__)

PICTURES = (
    ("confusion_matrix.png", "confusion matrix (test)"),
    ("reliability_diagram.png", "reliability diagram (test)"),
    ("top_losses.png", "top losses, with the map of the predicted class"),
    ("most_confused.png", "most confused pairs"),
    ("embedding_map.png", "embedding map of the test images"),
)
LABEL_PICTURES = (  # a multi-label run's
    ("precision_recall.png", "precision-recall per label (test)"),
    ("most_missed.png", "most-missed labels: the test images where each was missed or wrongly added, with that label's map"),
)
PER_LABEL_KEYS = ("ap", "f1", "precision", "recall", "support", "ece")  # <split>/<key>/<label> in metrics.json


def test_features(classifier: TransferClassifier, datamodule: Any, out_dir: Path) -> np.ndarray:
    """The test images' pooled features: from the run's feature cache when it has them, else one pass now."""
    cached = getattr(datamodule, "feature_sets", {}).get("test")
    if cached is not None and len(cached):
        return np.stack([np.asarray(array[row], dtype=np.float32) for array, row in cached.rows])
    scratch = out_dir / ".test_features.npy"
    try:
        return np.array(
            pooled_features(
                classifier.backbone,
                datamodule.splits["test"],
                scratch,
                cache_dir=None,
                device=classifier.device,
                precision="32-true",
                batch_size=int(datamodule.batch_size),
                workers=datamodule.workers(),
            )
        )
    finally:
        scratch.unlink(missing_ok=True)


def interpret_run(
    out_dir: Path, classifier: TransferClassifier, datamodule: Any, probs: torch.Tensor, settings: Mapping[str, Any], seed: int
) -> list[Path]:
    """top_losses.png, most_confused.csv/.png, embedding_map.png in the run folder (multi-label: interpret_labels)."""
    if classifier.task.multilabel:
        return interpret_labels(out_dir, classifier, datamodule, probs, settings)
    samples = datamodule.splits["test"]
    paths = [Path(p) for p, _ in samples]
    labels = np.array([label for _, label in samples])
    p = probs.float().numpy()
    predicted = p.argmax(axis=1)
    names = classifier.class_names
    written: list[Optional[Path]] = []
    with inspecting(classifier):
        model = trained_classifier(classifier)
        chosen = top_losses(labels, p, int(settings["top_losses"]))
        written.append(render_top_losses(model, paths, labels, p, chosen, str(settings["cam_method"]), out_dir / "top_losses.png"))
        pairs = most_confused(labels, predicted, names, int(settings["most_confused"]))
        written.append(write_most_confused(pairs, out_dir / "most_confused.csv", out_dir / "most_confused.png"))
        method = str(settings["embedding"])
        if method != "none" and len(samples) >= 3:
            features = test_features(classifier, datamodule, out_dir)
            keep = np.arange(len(samples))
            if len(keep) > int(settings["max_points"]):
                keep = np.sort(np.random.default_rng(seed).choice(len(keep), int(settings["max_points"]), replace=False))
            points = project_2d(features[keep], method, seed)
            written.append(render_embedding_map(points, labels[keep], predicted[keep], names, method, out_dir / "embedding_map.png"))
    return [w for w in written if w is not None]


def interpret_labels(out_dir: Path, classifier: TransferClassifier, datamodule: Any, probs: torch.Tensor, settings: Mapping[str, Any]) -> list[Path]:
    """most_missed.csv / .png: for the `interpret.top_losses` / 3 most-missed labels (lowest AP, then recall), their
    surest misses and wrongest additions among the test images (Pascal VOC's difficult pairs left out)."""
    samples = datamodule.splits["test"]
    names = classifier.class_names
    paths = [Path(p) for p, _ in samples]
    targets = multi_hot([label for _, label in samples], len(names)).astype(np.float64)
    p = probs.double().numpy()
    thresholds = [float(classifier.thresholds.get(name, 0.5)) for name in names]
    mask = classifier.metric_masks.get("test")
    mask = None if mask is None else np.asarray(mask)
    picks = most_missed(p, targets, thresholds, label_order(p, targets, thresholds, mask), gallery_labels(int(settings["top_losses"])), mask)
    written: list[Optional[Path]] = [write_most_missed(picks, paths, targets, p, thresholds, names, out_dir / "most_missed.csv")]
    with inspecting(classifier):
        model = trained_classifier(classifier)
        written.append(render_most_missed(model, picks, paths, targets, p, thresholds, str(settings["cam_method"]), out_dir / "most_missed.png"))
    return [w for w in written if w is not None]


def label_names(metrics: Mapping[str, Any]) -> list[str]:
    """A multi-label run's labels, as its metrics name them (`test/support/<label>`: every label has one); none for
    a single-label run."""
    return [key.removeprefix("test/support/") for key in metrics if key.startswith("test/support/")]


def _per_label_keys(names: list[str]) -> set[str]:
    splits = ("test", "val", "oof")
    return {f"{s}/{k}/{n}" for s in splits for k in PER_LABEL_KEYS for n in names} | {
        key for n in names for key in (f"threshold/{n}", f"calibration/temperature/{n}")
    }


def _metric_rows(metrics: Mapping[str, Any], leave_out: frozenset[str] = frozenset()) -> list[list[str]]:
    rows = []
    for key, value in metrics.items():
        if key.endswith("_ci95") or not isinstance(value, (int, float)) or isinstance(value, bool) or key in leave_out:
            continue
        interval = metrics.get(f"{key}_ci95")
        rows.append([escape(key), f"{value:.4f}", f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""])
    return rows


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _label_body(out_dir: Path, metrics: Mapping[str, Any], names: list[str]) -> list[str]:
    """A multi-label run's page: the headline figures, the per-label table (most missed first), the pictures, the
    gallery's images, then every other figure (a reader asks for the labels before the 30 summary numbers)."""
    headline = [k for k in ("test/map", "test/f1_micro", "test/f1_macro") if k in metrics]
    per_label = _per_label_keys(names)
    body = [
        "<h2>Metrics</h2><p>Intervals: 95 % percentile bootstrap over the test images (an image's labels are resampled together;"
        " at a perfect score never narrower than Clopper-Pearson). F1, precision and recall at each label's threshold.</p>",
        table(
            ["metric", "value", "95 % interval"],
            _metric_rows({k: metrics[k] for k in headline} | {f"{k}_ci95": metrics.get(f"{k}_ci95") for k in headline}),
        ),
    ]
    rows = [
        [metrics.get(f"test/{k}/{n}") for k in ("ap", "f1", "precision", "recall")]
        + [metrics.get(f"threshold/{n}"), metrics.get(f"test/support/{n}"), n]
        for n in names
    ]
    rows.sort(key=lambda r: (r[0] is None, r[0] or 0.0, 1.0 if r[3] is None else r[3]))
    body += [
        "<h2>Per label, most missed first</h2><p>Sorted by average precision, lowest first, then by recall, lowest first: "
        "the labels the model misses most lead. A label without a positive test image has no AP and comes last.</p>",
        table(
            ["label", "AP", "F1", "precision", "recall", "threshold", "support"],
            [[escape(r[6]), *(_number(v) for v in r[:5]), _number(r[5], 0)] for r in rows],
        ),
    ]
    figures = [figure(out_dir / name, caption) for name, caption in LABEL_PICTURES if (out_dir / name).is_file()]
    if figures:
        body += ["<h2>Pictures</h2>", f'<div class="pictures">{"".join(figures)}</div>']
    if (out_dir / "most_missed.csv").is_file():
        with open(out_dir / "most_missed.csv", newline="") as fh:
            found = list(csv.reader(fh))
        if len(found) > 1:
            body += [
                "<h2>Most-missed labels</h2><p>Per label, most missed first: the test images where it was missed (lowest probability first) "
                "or wrongly added (highest first).</p>",
                table(found[0], [[escape(c) for c in r] for r in found[1:]]),
            ]
    body += ["<h2>Other figures</h2>", table(["metric", "value", "95 % interval"], _metric_rows(metrics, frozenset(per_label | set(headline))))]
    return body


def write_report(out_dir: Path, metrics: Mapping[str, Any], title: str) -> Path:
    """<run>/report.html: headline metrics with intervals, the pictures, per-class accuracy, the most confused pairs
    (multi-label: _label_body)."""
    names = label_names(metrics)
    if names:
        path = out_dir / "report.html"
        path.write_text(page(title, _label_body(out_dir, metrics, names)))
        return path
    body = [
        "<h2>Metrics</h2><p>Intervals: 95 % over the test images (accuracy: exact Clopper-Pearson; balanced accuracy, macro-F1: Clopper-Pearson at the jackknife effective sample size).</p>",
        table(["metric", "value", "95 % interval"], _metric_rows(metrics)),
    ]
    figures = [figure(out_dir / name, caption) for name, caption in PICTURES if (out_dir / name).is_file()]
    body += ["<h2>Pictures</h2>", f'<div class="pictures">{"".join(figures)}</div>']
    for name, heading in (("most_confused.csv", "Most confused pairs"), ("per_class_accuracy.csv", "Per-class accuracy")):
        if (out_dir / name).is_file():
            with open(out_dir / name, newline="") as fh:
                rows = list(csv.reader(fh))
            if len(rows) > 1:
                body += [f"<h2>{heading}</h2>", table(rows[0], [[escape(c) for c in r] for r in rows[1:]])]
    path = out_dir / "report.html"
    path.write_text(page(title, body))
    return path
