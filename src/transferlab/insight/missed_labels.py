"""Which labels a multi-label model misses, and the test images that show how: the multi-label counterpart of top losses.

A multi-label model has no single "wrong class" per image: each label is right or wrong on its own. So the question
becomes per label: which labels does it miss most (lowest average precision: the ranking itself is poor; then lowest
recall: positives left under the threshold), and for each of those, the images where the label was *missed* (a
false negative; the lowest probability first: the surest miss) or *wrongly added* (a false positive; the highest
probability first). `most_missed.png` shows them with the map of that label (each label has its own logit, so its
own map: where the model looked when it said, or did not say, this label); `most_missed.csv` lists them.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from transferlab.core.errors import ConfigError, MissingPackage
from transferlab.core.plotting import pyplot, save_figure
from transferlab.data.labels import SEPARATOR
from transferlab.insight.cam import CamExplainer, backbone_of, body_of, overlay, target_layer
from transferlab.insight.pixels import PixelClassifier, load_pixels
from transferlab.models.multilabel_metrics import average_precision

log = logging.getLogger(__name__)

PER_LABEL = 3  # images per label in most_missed.png: up to 2 misses and 1 wrongly added, more of one if the other has none
MISSED, ADDED = "missed", "wrongly added"


@dataclass
class MissedImage:
    label: int
    index: int  # the test image
    kind: str  # MISSED (a false negative) or ADDED (a false positive)
    prob: float  # the label's calibrated probability


def _counted(targets: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    return np.ones(targets.shape, dtype=bool) if mask is None else np.asarray(mask) > 0


def label_order(probs: np.ndarray, targets: np.ndarray, thresholds: Sequence[float], mask: Optional[np.ndarray] = None) -> list[int]:
    """Labels, most missed first: lowest AP, then lowest recall at the threshold; labels without a counted positive
    among these images (no AP, no recall) last, in label order."""
    ap = average_precision(probs, targets, mask)
    counted = _counted(targets, mask)
    positive = (targets > 0.5) & counted
    hits = positive & (probs >= np.asarray(thresholds, dtype=np.float64)[None, :])
    support = positive.sum(axis=0)
    recall = np.divide(hits.sum(axis=0), support, out=np.full(len(support), np.nan), where=support > 0)

    def key(k: int) -> tuple[bool, float, float]:
        return (not np.isfinite(ap[k]), float(np.nan_to_num(ap[k])), float(np.nan_to_num(recall[k], nan=1.0)))

    return sorted(range(probs.shape[1]), key=key)


def most_missed(
    probs: np.ndarray,
    targets: np.ndarray,
    thresholds: Sequence[float],
    order: Sequence[int],
    labels: int,
    mask: Optional[np.ndarray] = None,
    per_label: int = PER_LABEL,
) -> list[MissedImage]:
    """For the first `labels` labels of `order` that have an error: their surest misses and wrongest additions."""
    counted = _counted(targets, mask)
    found: list[MissedImage] = []
    shown = 0
    for k in order:
        if shown >= labels:
            break
        over = probs[:, k] >= thresholds[k]
        missed = np.flatnonzero((targets[:, k] > 0.5) & ~over & counted[:, k])
        added = np.flatnonzero((targets[:, k] <= 0.5) & over & counted[:, k])
        missed = missed[np.argsort(probs[missed, k], kind="stable")].tolist()
        added = added[np.argsort(-probs[added, k], kind="stable")].tolist()
        if not missed and not added:
            continue
        picks = [(i, MISSED) for i in missed[:2]] + [(i, ADDED) for i in added[:1]]
        rest = [(i, MISSED) for i in missed[2:]] + [(i, ADDED) for i in added[1:]]
        picks += rest[: max(0, per_label - len(picks))]
        found += [MissedImage(k, i, kind, float(probs[i, k])) for i, kind in picks[:per_label]]
        shown += 1
    return found


def label_sets(rows: np.ndarray, names: Sequence[str]) -> list[str]:
    """Each 0/1 row [K] as its names joined by `;` (blank: none)."""
    return [SEPARATOR.join(n for n, on in zip(names, row) if on) for row in np.asarray(rows) > 0.5]


def write_most_missed(
    picks: Sequence[MissedImage],
    paths: Sequence[Path],
    targets: np.ndarray,
    probs: np.ndarray,
    thresholds: Sequence[float],
    names: Sequence[str],
    out: Path,
) -> Path:
    """most_missed.csv: label, kind (missed / wrongly added), path, prob (the label's), threshold, labels (the true
    set), predicted (the set over threshold); most-missed label first, as in the picture."""
    truth = label_sets(targets, names)
    predicted = label_sets(probs >= np.asarray(thresholds)[None, :], names)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "kind", "path", "prob", "threshold", "labels", "predicted"])
        for p in picks:
            writer.writerow(
                [names[p.label], p.kind, str(paths[p.index]), f"{p.prob:.6f}", f"{thresholds[p.label]:.6f}", truth[p.index], predicted[p.index]]
            )
    return out


def _label_maps(model: PixelClassifier, pixels: torch.Tensor, labels: list[int], method: str) -> tuple[Optional[np.ndarray], str]:
    """Each image's map of its label, or None (a model without spatial maps, or no pytorch-grad-cam): the gallery
    then shows the plain images."""
    try:
        explainer = CamExplainer(model, body_of(model), target_layer(backbone_of(model), model.input_size, None), method)
    except (ConfigError, MissingPackage) as exc:
        log.warning("Most-missed labels without class activation maps: %s", exc)
        return None, method
    try:
        return explainer(pixels, labels), explainer.method
    finally:
        explainer.close()


def render_most_missed(
    model: PixelClassifier,
    picks: Sequence[MissedImage],
    paths: Sequence[Path],
    targets: np.ndarray,
    probs: np.ndarray,
    thresholds: Sequence[float],
    method: str,
    out: Path,
) -> Optional[Path]:
    """A row per label (most missed first), each image with the map of that label; captions: the label and what
    went wrong, the true set, the predicted set, the label's probability against its threshold."""
    if not picks:
        return None
    names = model.class_names
    pixels = torch.stack([load_pixels(paths[p.index], model.preprocessing) for p in picks]).to(model.mean.device)
    maps, method = _label_maps(model, pixels, [p.label for p in picks], method)
    truth = label_sets(targets, names)
    predicted = label_sets(probs >= np.asarray(thresholds)[None, :], names)
    rows = list(dict.fromkeys(p.label for p in picks))
    cols = max(sum(p.label == k for p in picks) for k in rows)
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.1 * cols, 3.9 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    filled = dict.fromkeys(rows, 0)
    for n, (p, image) in enumerate(zip(picks, pixels.cpu())):
        ax = axes[rows.index(p.label), filled[p.label]]
        filled[p.label] += 1
        ax.imshow(overlay(image, maps[n]) if maps is not None else image.permute(1, 2, 0).numpy())
        sign = "<" if p.kind == MISSED else ">="
        ax.set_title(
            f"{names[p.label][:22]} {p.kind}\ntrue: {truth[p.index][:34] or '(none)'}\npred: {predicted[p.index][:34] or '(none)'}\n"
            f"p({names[p.label][:16]}) {p.prob:.2f} {sign} {thresholds[p.label]:.2f}",
            fontsize=7,
        )
    shown = f"{method} map of the row's label" if maps is not None else "no class activation maps"
    fig.suptitle(f"Most-missed labels (test), lowest AP first · {shown}", fontsize=9)
    return save_figure(fig, out, dpi=100)


def gallery_labels(top_losses: int) -> int:
    """How many labels most_missed.png shows for interpret.top_losses images in all (PER_LABEL each)."""
    return max(1, math.ceil(top_losses / PER_LABEL)) if top_losses > 0 else 0
