"""A multi-label model's held-out step: a temperature per label, then a decision threshold per label, both chosen on
held-out images (the validation split, the probe's inner folds, or the out-of-fold images of a cross-validation).

Temperatures first (models.multilabel_metrics.label_temperatures: per-label temperature scaling with the same
limit on sharpening as the single-label one), then thresholds on the calibrated probabilities, so the stored
thresholds are on the probabilities every output shows: `threshold=f1` chooses each label's threshold that
maximises its F1 on the held-out images (a label with no positive there keeps 0.5, counted in the log), a number
uses that threshold for every label. The val/* figures at thresholds chosen on the same images are optimistic;
the test split never takes part.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

from transferlab.core.errors import ConfigError
from transferlab.models import multilabel_metrics as ml
from transferlab.models.evaluation import Calibration

log = logging.getLogger(__name__)


def fixed_threshold(threshold: Any) -> Optional[float]:
    """None for `f1`, else the fixed threshold in (0, 1); one line for anything else."""
    if threshold == "f1":
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < 1:
        raise ConfigError(f"threshold: expected f1 (per label, max F1 on held-out images) or a probability in (0, 1), got {threshold!r}")
    return value


def multilabel_held_out(
    raw: torch.Tensor, labels: torch.Tensor, names: list[str], method: str, what: str, threshold: Any = "f1", mask: Optional[np.ndarray] = None
) -> tuple[dict[str, Any], Calibration]:
    """(val/* at the chosen thresholds, per label too; how the model is calibrated and decides)."""
    fixed = fixed_threshold(threshold)
    logits, targets = raw.double().cpu().numpy(), labels.cpu().numpy()
    images, k = len(targets), len(names)
    errors = int((((logits > 0) != (targets > 0.5)) & (mask > 0 if mask is not None else True)).sum()) if images else 0
    if method == "temperature" and images:
        temperatures, rules, fitted = ml.label_temperatures(logits, targets, mask)
        rule = "; ".join(f"{rule} {rules.count(rule)}" for rule in sorted(set(rules)))
    else:
        temperatures, fitted = np.ones(k), None
        rule = "no_held_out_images" if method == "temperature" else "none"
    probs = 1 / (1 + np.exp(-logits / temperatures))
    if fixed is not None:
        chosen, fell_back = np.full(k, fixed), np.zeros(k, dtype=bool)
    elif images:
        chosen, fell_back = ml.best_f1_thresholds(probs, targets, mask)
    else:
        chosen, fell_back = np.full(k, 0.5), np.ones(k, dtype=bool)
    calibration = Calibration(
        method,
        rule,
        [float(t) for t in temperatures],
        images,
        errors,
        [None if not np.isfinite(t) else float(t) for t in fitted] if fitted is not None else None,  # type: ignore[misc]
        what,
        thresholds=[float(t) for t in chosen],
        threshold_rule="fixed" if fixed is not None else "f1",
        labels=list(names),
    )
    if not images:
        return {}, calibration
    before = ml.multilabel_metrics(1 / (1 + np.exp(-logits)), targets, chosen, names, per_label=False, mask=mask)
    found = {f"val/{key}": value for key, value in ml.multilabel_metrics(probs, targets, chosen, names, per_label=True, mask=mask).items()}
    found["val/loss"] = found["val/nll"]
    for key in ("ece", "nll"):
        found[f"val/{key}_before_calibration"] = before[key]
    log.info(
        "Multi-label decisions on %d %s: temperatures %.2f to %.2f (%s); thresholds %s%s; ECE %.4f -> %.4f; val/map %.3f",
        images,
        what,
        float(np.min(temperatures)),
        float(np.max(temperatures)),
        rule,
        f"fixed at {fixed:g}" if fixed is not None else f"max F1, {float(np.min(chosen)):.2f} to {float(np.max(chosen)):.2f}",
        f" ({int(fell_back.sum())} label(s) with no held-out positive keep 0.5)" if fixed is None and fell_back.any() else "",
        before["ece"],
        found["val/ece"],
        found.get("val/map", float("nan")),
    )
    return found, calibration
