"""The data audit: label issues, near-duplicates (leakage across the run's splits), outliers, skipped files.

Inputs are the images with their given labels and split, and their pooled features (insight.embeddings);
outputs are CSV files with fixed columns, audit.json, and the list of files a user may leave out of training
(`data.exclude`). Nothing is moved or deleted.

Labels are class indices [N], or for multi-label data label sets as a 0/1 matrix [N, K]: the label issues then come
from cleanlab's multi-label functions (insight.label_issues), and every "given" / "suggested" cell of the CSVs is
a set, its names joined by `;` (blank: none of the labels).
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from transferlab.data.labels import Label, joined
from transferlab.insight.duplicates import Pair, find_duplicates, nearest_neighbours, perceptual_hashes
from transferlab.insight.label_issues import LabelIssue, Outlier, find_label_issues, find_multilabel_issues, find_outliers, out_of_fold_probabilities

log = logging.getLogger(__name__)

EXCLUDE_KINDS = ("label_issues", "duplicates", "outliers")


@dataclass
class AuditSettings:
    folds: int  # K of the out-of-fold probe
    seed: int
    threshold: float  # duplicates: cosine similarity at or above which two images are reported
    hash_distance: int  # ... or perceptual hashes this close (bits of 64)
    hash_min_similarity: float  # ... with at least this cosine similarity
    neighbours: int  # most similar partners kept per image in the blocked search
    outlier_z: float  # robust z-score of the mean neighbour similarity beyond which an image is unlike all others
    workers: int


@dataclass
class AuditResult:
    paths: list[Path]
    labels: np.ndarray
    splits: list[str]
    class_names: list[str]
    probs: np.ndarray
    c: float
    oof_accuracy: float
    label_issues: list[LabelIssue]
    duplicates: list[Pair]
    outliers: list[Outlier]
    skipped: dict[str, str] = field(default_factory=dict)
    probe_metric: str = "accuracy"  # what oof_accuracy holds: accuracy, or map (multi-label)

    @property
    def multilabel(self) -> bool:
        return bool(self.labels.ndim == 2)

    def given(self, index: int) -> Label:
        """An image's given class, or its given label set."""
        return tuple(int(k) for k in (self.labels[index] > 0).nonzero()[0]) if self.multilabel else int(self.labels[index])

    def text(self, label: Label) -> str:
        """A class name, or a set's names joined by `;`."""
        return joined(label, self.class_names)

    def cross_split(self, pair: Pair) -> bool:
        return self.splits[pair.a] != self.splits[pair.b]

    @property
    def leaks(self) -> list[Pair]:
        return [p for p in self.duplicates if self.cross_split(p)]


def run_audit(
    paths: list[Path], labels: np.ndarray, splits: list[str], class_names: list[str], features: np.ndarray, settings: AuditSettings
) -> AuditResult:
    num_classes = len(class_names)
    started = time.perf_counter()
    oof = out_of_fold_probabilities(features, labels, num_classes, settings.folds, settings.seed)
    issues = find_multilabel_issues(labels, oof.probs) if labels.ndim == 2 else find_label_issues(labels, oof.probs)
    probed = time.perf_counter()
    log.info(
        "Audit: %d-fold probe on %d images, C=%g, out-of-fold %s %.3f; %d label issue(s); %.1f s",
        settings.folds,
        len(paths),
        oof.c,
        "mAP" if oof.metric == "map" else "accuracy",
        oof.accuracy,
        len(issues),
        probed - started,
    )
    hashes = perceptual_hashes(paths, settings.workers)
    hashed = time.perf_counter()
    neighbours = nearest_neighbours(features, settings.neighbours)
    pairs = find_duplicates(features, neighbours, hashes, settings.threshold, settings.hash_distance, settings.hash_min_similarity)
    outliers = find_outliers(features, labels, num_classes, neighbours[0], settings.outlier_z)
    log.info(
        "Audit: perceptual hashes %.1f s; neighbour search, %d near-duplicate pair(s), %d outlier(s): %.1f s",
        hashed - probed,
        len(pairs),
        len(outliers),
        time.perf_counter() - hashed,
    )
    return AuditResult(paths, labels, splits, class_names, oof.probs, oof.c, oof.accuracy, issues, pairs, outliers, probe_metric=oof.metric)


def _write(path: Path, head: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        writer.writerows(rows)
    return path


def write_tables(result: AuditResult, out: Path) -> dict[str, Path]:
    """label_issues.csv, duplicates.csv, outliers.csv (and skipped_images.csv when files were refused)."""
    names, text = result.class_names, result.text
    files = {
        "label_issues": _write(
            out / "label_issues.csv",
            ["path", "given", "suggested", "score"],
            [[str(result.paths[i.index]), text(i.given), text(i.suggested), f"{i.score:.6f}"] for i in result.label_issues],
        ),
        "duplicates": _write(
            out / "duplicates.csv",
            ["path_a", "path_b", "similarity", "cross_split"],
            [[str(result.paths[p.a]), str(result.paths[p.b]), f"{p.similarity:.6f}", str(result.cross_split(p)).lower()] for p in result.duplicates],
        ),
        "outliers": _write(
            out / "outliers.csv",
            ["path", "given", "nearest_class", "neighbour_similarity", "z"],
            [
                [str(result.paths[o.index]), text(result.given(o.index)), names[o.nearest], f"{o.similarity:.6f}", f"{o.z:.3f}"]
                for o in result.outliers
            ],
        ),
    }
    if result.skipped:
        files["skipped"] = _write(out / "skipped_images.csv", ["path", "reason"], [list(kv) for kv in sorted(result.skipped.items())])
    return files


def exclusions(result: AuditResult, kinds: list[str]) -> list[Path]:
    """The files a user may train without: flagged labels, outliers, and of each duplicate pair path_b (images are
    listed train, val, test, so that is the one in the later split: the evaluation keeps no twin of a training image)."""
    chosen: dict[str, Path] = {}
    for kind in kinds:
        if kind == "label_issues":
            chosen.update((str(result.paths[i.index]), result.paths[i.index]) for i in result.label_issues)
        elif kind == "duplicates":
            chosen.update((str(result.paths[p.b]), result.paths[p.b]) for p in result.duplicates)
        elif kind == "outliers":
            chosen.update((str(result.paths[o.index]), result.paths[o.index]) for o in result.outliers)
    return list(chosen.values())


def write_exclude(paths: list[Path], kinds: list[str], out: Path) -> Path:
    lines = [f"# transferlab-audit: {', '.join(kinds)}; train without them with data.exclude={out}", *(str(p) for p in paths)]
    out.write_text("\n".join(lines) + "\n")
    return out


def summary(result: AuditResult, settings: AuditSettings, exclude_file: Optional[Path]) -> dict[str, Any]:
    """audit.json: the counts; the probe's out-of-fold figure is `out_of_fold_accuracy` (multi-label: `out_of_fold_map`)."""
    counts = {s: result.splits.count(s) for s in dict.fromkeys(result.splits)}
    facts = {
        "images": len(result.paths),
        "classes": len(result.class_names),
        "splits": counts,
        "probe": {"folds": settings.folds, "C": result.c, f"out_of_fold_{result.probe_metric}": round(result.oof_accuracy, 4)},
        "label_issues": len(result.label_issues),
        "duplicates": len(result.duplicates),
        "cross_split_duplicates": len(result.leaks),
        "outliers": len(result.outliers),
        "skipped": len(result.skipped),
        "thresholds": {
            "similarity": settings.threshold,
            "hash_distance": settings.hash_distance,
            "hash_min_similarity": settings.hash_min_similarity,
            "outlier_z": settings.outlier_z,
        },
        "exclude_file": str(exclude_file) if exclude_file else None,
    }
    if result.multilabel:  # single-label audit.json keeps its keys as they were
        facts["task"] = "multilabel"
    return facts
