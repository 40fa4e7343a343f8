"""Why a run scored what it did: its top losses (with where the model looked), most-confused pairs, embedding map.

fastai's `ClassificationInterpretation` (top losses, most confused) plus a 2-D map of the test images' pooled
features (t-SNE, or PCA for a quick look) coloured by true class with the errors marked: a class that
sits inside another's cloud is one the backbone's features cannot separate, whatever the head does.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from transferlab.core.errors import ConfigError, MissingPackage
from transferlab.core.plotting import pyplot, save_figure
from transferlab.insight.cam import CamExplainer, backbone_of, body_of, overlay, target_layer
from transferlab.insight.pixels import PixelClassifier, load_pixels

log = logging.getLogger(__name__)


def top_losses(labels: np.ndarray, probs: np.ndarray, k: int) -> list[int]:
    """Indices of the k images with the highest cross-entropy (-log p(true class)), highest first."""
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))
    return [int(i) for i in np.argsort(-loss, kind="stable")[:k]]


def most_confused(labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], k: int) -> list[tuple[str, str, int]]:
    """(true, predicted, count) of the most frequent errors, most frequent first."""
    pairs: dict[tuple[int, int], int] = {}
    for t, p in zip(labels.tolist(), predicted.tolist()):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:k]
    return [(class_names[t], class_names[p], n) for (t, p), n in ranked]


def render_top_losses(
    model: PixelClassifier, paths: Sequence[Path], labels: np.ndarray, probs: np.ndarray, chosen: Sequence[int], method: str, out: Path
) -> Optional[Path]:
    """A grid: each image's crop with the map of its predicted class; title true / predicted / p(predicted) / loss."""
    if not chosen:
        return None
    body = body_of(model)
    pixels = torch.stack([load_pixels(paths[i], model.preprocessing) for i in chosen]).to(model.mean.device)
    predicted = [int(probs[i].argmax()) for i in chosen]
    maps: Optional[np.ndarray] = None
    try:
        explainer = CamExplainer(model, body, target_layer(backbone_of(model), model.input_size, None), method)
        method = explainer.method
    except (ConfigError, MissingPackage) as exc:  # a ViT (no spatial maps), or pytorch-grad-cam not installed
        log.warning("Top losses without class activation maps: %s", exc)
    else:
        try:
            maps = explainer(pixels, predicted)
        finally:
            explainer.close()
    plt = pyplot()
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, i, image, p) in enumerate(zip(axes.flat, chosen, pixels.cpu(), predicted)):
        ax.imshow(overlay(image, maps[k]) if maps is not None else image.permute(1, 2, 0).numpy())
        truth = int(labels[i])
        loss = -math.log(max(float(probs[i, truth]), 1e-12))
        ax.set_title(
            f"{Path(paths[i]).name[:28]}\ntrue {model.class_names[truth][:18]} / pred {model.class_names[p][:18]}\n"
            f"p(pred) {probs[i, p]:.2f}, p(true) {probs[i, truth]:.2f}, loss {loss:.2f}",
            fontsize=7,
        )
    shown = f"{method} map of the predicted class" if maps is not None else "no class activation maps"
    fig.suptitle(f"Top {len(chosen)} losses (test) · {shown}", fontsize=9)
    return save_figure(fig, out, dpi=100)


def write_most_confused(pairs: list[tuple[str, str, int]], out_csv: Path, out_png: Path) -> Optional[Path]:
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true", "predicted", "count"])
        writer.writerows(pairs)
    if not pairs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(pairs) + 1.2))
    ax.barh(range(len(pairs)), [n for _, _, n in pairs], color="#c0504d")
    ax.set_yticks(range(len(pairs)), [f"{t} -> {p}" for t, p, _ in pairs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test images")
    ax.set_title("Most confused pairs (true -> predicted)", fontsize=9)
    return save_figure(fig, out_png, dpi=100)


def project_2d(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """[N, 2]: t-SNE (PCA-initialised, perplexity capped for small N) or PCA of L2-normalised features."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "pca" or len(x) < 8:
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    reduced = PCA(n_components=min(50, len(x) - 1, x.shape[1]), random_state=seed).fit_transform(x)
    return TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(reduced)


def render_embedding_map(points: np.ndarray, labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], method: str, out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    cmap = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=14, color=cmap(c % cmap.N), label=name if len(class_names) <= 20 else None)
    wrong = labels != predicted
    if wrong.any():
        ax.scatter(
            points[wrong, 0], points[wrong, 1], s=60, facecolors="none", edgecolors="black", linewidths=1.2, label=f"misclassified ({wrong.sum()})"
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Test images, pooled features ({method.upper()}), coloured by true class", fontsize=9)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(class_names) > 10 else 1)
    return save_figure(fig, out, dpi=100)
