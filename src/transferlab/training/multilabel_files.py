"""What a multi-label run's test leaves behind, beside metrics.json: test_predictions.csv with label sets,
per_label_metrics.csv, precision_recall.png, and the intervals of mAP and the F1s (bootstrap over test images,
models.multilabel_metrics.multilabel_intervals).

test_predictions.csv columns: `path`, `labels` (the true set, names joined by `;`), `predicted` (the labels whose
calibrated probability reaches their threshold), `prob_<label>` per label. A single-label run's files are
written by training.artifacts and are unchanged.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.loggers import Logger

from transferlab.core.plotting import log_images, pyplot, save_figure
from transferlab.data.images import Sample
from transferlab.data.labels import joined, predicted_sets
from transferlab.models import multilabel_metrics as ml

PER_LABEL = "per_label_metrics.csv"
PR_CURVES = "precision_recall.png"


def write_label_predictions(path: Path, samples: Sequence[Sample], names: Sequence[str], probs: torch.Tensor, thresholds: Any) -> None:
    """One row per test image: path, labels (true set), predicted (set over threshold), prob_<label>..."""
    if len(samples) != len(probs):
        raise RuntimeError(f"{len(probs)} predictions for {len(samples)} images: the evaluation lost or repeated images")
    values = probs.double().numpy()
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels", "predicted", *(f"prob_{name}" for name in names)])
        for (image, label), predicted, row in zip(samples, predicted_sets(values, thresholds, names), values.tolist()):
            writer.writerow([str(image), joined(label, names), predicted, *(f"{p:.6f}" for p in row)])


def write_per_label(path: Path, metrics: dict[str, Any], names: Sequence[str], thresholds: Sequence[float], prefix: str = "test/") -> None:
    """label, ap, f1, precision, recall, threshold, support, ece: one row per label, the most missed (lowest AP) first."""
    rows = []
    for name, threshold in zip(names, thresholds):
        values = [metrics.get(f"{prefix}{key}/{name}") for key in ("ap", "f1", "precision", "recall")]
        rows.append([name, *values, threshold, metrics.get(f"{prefix}support/{name}"), metrics.get(f"{prefix}ece/{name}")])
    rows.sort(key=lambda row: (row[1] is None, row[1] if row[1] is not None else 0.0))
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "ap", "f1", "precision", "recall", "threshold", "support", "ece"])
        for row in rows:
            writer.writerow([row[0], *("" if v is None else f"{v:.4f}" if isinstance(v, float) else v for v in row[1:])])


def write_pr_curves(
    path: Path, probs: np.ndarray, targets: np.ndarray, names: Sequence[str], mask: Optional[np.ndarray], loggers: list[Logger]
) -> None:
    """Precision against recall per label (the 12 with the most positives when there are more), AP in the legend."""
    from sklearn.metrics import precision_recall_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    support = targets.sum(axis=0) if mask is None else (targets * mask).sum(axis=0)
    shown = [k for k in np.argsort(-support, kind="stable")[:12] if support[k] > 0]
    ap = ml.average_precision(probs, targets, mask)
    for k in shown:
        keep = mask[:, k] > 0 if mask is not None else np.ones(len(targets), dtype=bool)
        precision, recall, _ = precision_recall_curve(targets[keep, k], probs[keep, k])
        ax.step(recall, precision, where="post", label=f"{names[k]} (AP {ap[k]:.3f}, {int(support[k])})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall per label ({len(targets)} test images)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)
    log_images(loggers, "test/precision_recall", [path])


def multilabel_test(
    out_dir: Path,
    samples: Sequence[Sample],
    names: Sequence[str],
    logits: torch.Tensor,
    uncalibrated: torch.Tensor,
    targets: torch.Tensor,
    thresholds: Sequence[float],
    mask: Optional[np.ndarray],
    seed: int,
    write: bool,
    loggers: list[Logger],
) -> dict[str, Any]:
    """test/map_ci95 and the F1s' intervals, the ECE / NLL before calibration; the files when `write` (rank 0)."""
    probs, truth = logits.double().sigmoid(), targets.numpy()
    found: dict[str, Any] = {f"test/{k}": v for k, v in ml.multilabel_intervals(probs.numpy(), truth, thresholds, seed=seed, mask=mask).items()}
    if not torch.equal(logits, uncalibrated):
        before = ml.multilabel_metrics(uncalibrated.double().sigmoid().numpy(), truth, thresholds, list(names), per_label=False, mask=mask)
        found.update({f"test/{k}_before_calibration": before[k] for k in ("ece", "nll") if k in before})
    if write:
        write_label_predictions(out_dir / "test_predictions.csv", samples, names, probs, thresholds)
        write_pr_curves(out_dir / PR_CURVES, probs.numpy(), truth, names, mask, loggers)
    return found


def out_of_fold_figures(
    logits: torch.Tensor, targets: torch.Tensor, names: Sequence[str], cuts: np.ndarray, mask: Optional[np.ndarray], seed: int
) -> dict[str, Any]:
    """A cross-validation's out-of-fold metrics (each image predicted once, at its fold's thresholds), with intervals."""
    probs, truth = logits.double().sigmoid().numpy(), targets.numpy()
    found: dict[str, Any] = dict(ml.multilabel_metrics(probs, truth, cuts, list(names), per_label=True, mask=mask))
    found.update(ml.multilabel_intervals(probs, truth, cuts, seed=seed, mask=mask))
    return found
