"""After the test: the run's interpretation (top losses with their maps, most-confused pairs, embedding map) and
<run>/report.html, one self-contained page with the figures a reader asks for first.

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

from transferlab.insight.embeddings import pooled_features
from transferlab.insight.html_page import escape, figure, page, table
from transferlab.insight.interpretation import most_confused, project_2d, render_embedding_map, render_top_losses, top_losses, write_most_confused
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
    """top_losses.png, most_confused.csv/.png, embedding_map.png in the run folder."""
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


def _metric_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, value in metrics.items():
        if key.endswith("_ci95") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        interval = metrics.get(f"{key}_ci95")
        rows.append([escape(key), f"{value:.4f}", f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""])
    return rows


def write_report(out_dir: Path, metrics: Mapping[str, Any], title: str) -> Path:
    """<run>/report.html: headline metrics with intervals, the pictures, per-class accuracy, the most confused pairs."""
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
