"""transferlab-rank's steps: resolve the candidates, compute each one's frozen features once (through the feature
cache a frozen training run reads), score them on the same images and folds, and recommend one.

    candidates -> for each: build, features, scores, cost (a failure is a row with its reason) -> paired tests
    against the best probe -> the recommendation rule -> rows (insight.ranking_page writes them)

The scores (models.transferability, models.few_shot_heads): the nested cross-validated accuracy of the L-BFGS probe
(the reference, with a Clopper-Pearson interval; mAP with a bootstrap interval for label sets), k-NN leave-one-out
accuracy and LogME. The rule: among candidates whose probe is not significantly worse than the best one
(Nadeau-Bengio corrected paired t over the same folds, p >= alpha), the highest ImageNet top-1 prior (known before
unknown), then the fewest parameters.
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import OmegaConf

from transferlab.core.errors import ConfigError, close_matches
from transferlab.core.hardware import resolve_device
from transferlab.core.statistics import corrected_paired_t, fold_test_to_train, proportion_interval
from transferlab.data.features.fill import recorded_throughput
from transferlab.data.labels import class_index, multi_hot
from transferlab.insight.embeddings import pooled_features
from transferlab.models.backbones import create_backbone
from transferlab.models.few_shot_heads import knn_leave_one_out
from transferlab.models.multilabel_metrics import multilabel_intervals
from transferlab.models.priors import prior_top1
from transferlab.models.transferability import agreement, fold_score, logme, outer_folds, probe_cross_validation

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One backbone to score: its full backbone config, the name shown, and the overrides that train it."""

    name: str
    settings: dict[str, Any]
    overrides: list[str]
    error: str = ""


@dataclass
class Scored:
    """A candidate's row (ranking.csv's columns) and what the paired test needs: its per-fold probe scores."""

    row: dict[str, Any]
    fold_scores: list[float] = field(default_factory=list)
    computed: int = 0


def resolve_candidates(items: list[Any], conf_dir: Path) -> list[Candidate]:
    """`backbones`: config names (conf/backbone/<name>.yaml) or mappings of backbone keys over the config of the
    same `name` (else over backbone=custom): {name: tf_efficientnet_lite0, weights: none}."""
    folder = conf_dir / "backbone"
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    found = []
    for item in items:
        if isinstance(item, str):
            if item not in options:
                found.append(
                    Candidate(
                        item,
                        {"name": item},
                        [],
                        f"no backbone config {item!r}{close_matches(item, options)}; give {{name: {item}}} for any timm or torchvision name",
                    )
                )
                continue
            settings = dict(OmegaConf.to_container(OmegaConf.load(folder / f"{item}.yaml"), resolve=True))  # type: ignore[arg-type]
            found.append(Candidate(item, settings, [f"backbone={item}"]))
            continue
        keys = dict(item)
        if "name" not in keys:
            raise ConfigError(f"backbones: the mapping {keys} needs a `name` (a backbone config or model name)")
        base = str(keys["name"]) if keys["name"] in options else "custom"
        settings = dict(OmegaConf.to_container(OmegaConf.load(folder / f"{base}.yaml"), resolve=True))  # type: ignore[arg-type]
        unknown = sorted(set(keys) - set(settings) - {"members"})
        if unknown:
            raise ConfigError(f"backbones: {unknown[0]!r} is not a backbone key{close_matches(unknown[0], list(settings))}")
        changed = {k: v for k, v in keys.items() if settings.get(k) != v}
        settings.update(keys)
        overrides = [f"backbone={base}"] + [f"backbone.{k}={_override_value(v)}" for k, v in changed.items()]
        found.append(Candidate(str(keys["name"]), settings, overrides))
    return found


def _override_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def pool_labels(samples: list[Any], num_classes: int, multilabel: bool) -> np.ndarray:
    """Class indices [N], or multi-hot rows [N, K] for label sets."""
    labels = [label for _, label in samples]
    return multi_hot(labels, num_classes).astype(np.float64) if multilabel else np.array([class_index(x) for x in labels], dtype=np.int64)


def body_cost(backbone: Any) -> tuple[int, float]:
    """(parameters, MB of parameters and buffers) of the feature extractor (its ImageNet classifier left out)."""
    body = backbone.body
    parameters = sum(p.numel() for p in body.parameters())
    size = sum(t.numel() * t.element_size() for t in [*body.parameters(), *body.buffers()])
    return int(parameters), round(size / 1e6, 2)


def throughput(store: Optional[Path], computed: int, seconds: float) -> Optional[float]:
    """Images/s of this run's fill when it computed features, else the rate recorded beside the store by whoever
    computed them (data.features.fill: a training run, the audit, an earlier ranking); None when nothing recorded it."""
    if computed and seconds > 0:
        return round(computed / seconds, 1)
    return recorded_throughput(store)


@dataclass(frozen=True)
class RankSettings:
    """rank.yaml's values the scoring needs."""

    folds: int
    c_folds: int
    seed: int
    alpha: float
    device: str
    precision: str
    cache_dir: Optional[str]
    batch_size: Any
    shard_images: int


def score_candidate(
    candidate: Candidate, samples: list[Any], labels: np.ndarray, classes: int, splits: list, settings: RankSettings, datamodule: Any, scratch: Path
) -> Scored:
    """Features (cached), the three scores and the cost of one candidate; any failure becomes the row's `error`."""
    row: dict[str, Any] = {"backbone": candidate.name, "weights": str(candidate.settings.get("weights", ""))}
    if candidate.error:
        return Scored({**row, "error": candidate.error})
    stats: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        # Seeded as transferlab-train seeds before building: weights=none gives the same net, hence the same cached features.
        pl.seed_everything(settings.seed, workers=True)
        backbone = create_backbone(**candidate.settings)
        features = pooled_features(
            backbone,
            [(path, 0) for path, _ in samples],
            scratch / "features.npy",
            cache_dir=settings.cache_dir,
            device=resolve_device(settings.device),
            precision=settings.precision,
            batch_size=settings.batch_size,
            workers=datamodule.workers(),
            shard_images=settings.shard_images,
            auto_workers=datamodule.num_workers == "auto",
            stats=stats,
        )
    except Exception as error:  # a candidate that cannot be built or run is reported, the others still ranked
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("transferlab-rank: %s (%s) could not be scored: %s", candidate.name, row["weights"], reason)
        return Scored({**row, "error": f"{type(error).__name__}: {reason}"})
    feature_seconds = time.perf_counter() - started
    x = np.array(features, dtype=np.float64)
    del features
    parameters, megabytes = body_cost(backbone)
    source = str(getattr(backbone, "source", "") or "") or None  # what `auto` resolved to
    rate = throughput(stats.get("store"), int(stats.get("computed", 0)), float(stats.get("seconds", 0.0)))
    del backbone
    gc.collect()
    probe = probe_cross_validation(x, labels, classes, splits, settings.c_folds, settings.seed)
    knn = knn_leave_one_out(
        torch.from_numpy(x).float(), torch.from_numpy(labels).float() if labels.ndim == 2 else torch.from_numpy(labels), num_classes=classes
    )
    low, high = probe_interval(probe.logits, labels, settings.seed)
    row.update(
        probe_acc=fold_score(probe.logits, labels),
        probe_acc_ci95_low=low,
        probe_acc_ci95_high=high,
        knn_acc=float(knn.score),
        logme=logme(x, labels, classes),
        prior_top1=prior_top1(candidate.settings, source),
        feature_seconds=round(feature_seconds, 2),
        images_per_second=rate,
        parameters=parameters,
        feature_dim=int(x.shape[1]),
        model_mb=megabytes,
        error="",
    )
    log.info(
        "transferlab-rank: %s (%s): probe %.3f [%.3f, %.3f], k-NN %.3f (k=%d), LogME %.3f; features %.1f s (%d computed)",
        candidate.name, row["weights"], row["probe_acc"], low, high, row["knn_acc"], knn.k, row["logme"], feature_seconds, stats.get("computed", 0),
    )  # fmt: skip
    return Scored(row, probe.fold_scores, int(stats.get("computed", 0)))


def probe_interval(logits: np.ndarray, labels: np.ndarray, seed: int) -> tuple[float, float]:
    """95 %: Clopper-Pearson of the out-of-fold right answers; for label sets the bootstrap interval of the mAP."""
    if labels.ndim == 2:
        found = multilabel_intervals(1 / (1 + np.exp(-logits)), labels, 0.5, seed=seed).get("map_ci95", [math.nan, math.nan])
        return float(found[0]), float(found[1])
    right = int((logits.argmax(axis=1) == labels).sum())
    low, high = proportion_interval(right, len(labels))
    return low, high


def recommend(scored: list[Scored], folds: int, alpha: float) -> Optional[int]:
    """Fill p_vs_best on every scored row and `recommended` on all; return the recommended row's index.

    The best probe's row is compared with itself (p = 1). Among the rows not significantly worse (p >= alpha), the
    highest prior wins (a known prior before an unknown one), then the fewest parameters."""
    ok = [i for i, s in enumerate(scored) if not s.row.get("error")]
    for s in scored:
        s.row["recommended"] = False
        s.row.setdefault("p_vs_best", None)
    if not ok:
        return None
    best = max(ok, key=lambda i: (scored[i].row["probe_acc"], -scored[i].row["parameters"]))
    for i in ok:
        scored[i].row["p_vs_best"] = (
            1.0 if i == best else corrected_paired_t(scored[best].fold_scores, scored[i].fold_scores, fold_test_to_train(folds))[1]
        )
    eligible = [i for i in ok if scored[i].row["p_vs_best"] >= alpha]
    chosen = max(eligible, key=lambda i: (scored[i].row["prior_top1"] is not None, scored[i].row["prior_top1"] or 0.0, -scored[i].row["parameters"]))
    scored[chosen].row["recommended"] = True
    return chosen


def agreements(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Kendall's tau of each cheap score with the probe's cross-validated accuracy, over the scored backbones."""
    ok = [r for r in rows if not r.get("error")]
    found = {}
    for score in ("knn_acc", "logme"):
        tau, n = agreement([r[score] for r in ok], [r["probe_acc"] for r in ok])
        found[score] = {"kendall_tau": None if math.isnan(tau) else round(tau, 3), "backbones": n}
    return found


def rank_backbones(candidates: list[Candidate], datamodule: Any, settings: RankSettings, out_dir: Path) -> tuple[list[Scored], Optional[int]]:
    """Score every candidate on the same images (every image outside an official test list) and folds."""
    samples = list(datamodule.pool)
    classes = len(datamodule.class_names)
    labels = pool_labels(samples, classes, bool(datamodule.multilabel))
    smallest = int(labels.sum(axis=0).min()) if labels.ndim == 2 else int(np.bincount(labels, minlength=classes).min())
    if smallest < settings.folds:
        raise ConfigError(
            f"folds: {settings.folds} folds need at least {settings.folds} images of every class (or label); the smallest has {smallest}; lower folds"
        )
    splits = outer_folds(labels, settings.folds, settings.seed)
    scratch = out_dir / ".features"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        scored = [score_candidate(c, samples, labels, classes, splits, settings, datamodule, scratch) for c in candidates]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return scored, recommend(scored, settings.folds, settings.alpha)
