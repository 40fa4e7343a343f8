"""What a classifier's outputs on a split say: accuracy and its class-aware siblings, calibration, and the temperature
that calibrates them.

Accuracy, balanced accuracy and macro-F1 come from core.statistics (the same definitions as their
intervals, and scikit-learn's); ECE, top-3 and per-class precision / recall from torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error, multiclass_precision, multiclass_recall

from transferlab.core.statistics import point_metrics

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # a fit outside it means too few validation images to say anything


@dataclass
class Calibration:
    """How a temperature was chosen: what metrics.json (`calibration/*`), checkpoints and config.json record."""

    method: str  # temperature | none
    rule: str  # fitted | capped_at_laplace_accuracy | no_held_out_images | none (multi-label: the rules' counts)
    temperature: Union[float, list[float]]  # multi-label: one per label
    held_out_images: int
    held_out_errors: int  # multi-label: wrong label decisions at 0.5
    fitted_temperature: Optional[Union[float, list[float]]] = None  # what the fit wanted, before the rule
    fitted_on: str = ""
    thresholds: Optional[list[float]] = None  # multi-label: each label's decision threshold on its calibrated probability
    threshold_rule: str = ""  # multi-label: f1 (max F1 on the held-out images) | fixed
    labels: Optional[list[str]] = None  # multi-label: the label of each temperature and threshold

    @property
    def calibrated(self) -> bool:
        """True when a temperature was chosen on held-out images (whatever value the rule kept)."""
        return self.method == "temperature" and self.held_out_images > 0

    def metrics(self) -> dict[str, Any]:
        """metrics.json's calibration keys; a multi-label model's per label (`calibration/temperature/<label>`,
        `threshold/<label>`), so every logger receives plain numbers."""
        found: dict[str, Any] = {
            "calibration/rule": self.rule,
            "calibration/held_out_errors": self.held_out_errors,
            "calibration/held_out_images": self.held_out_images,
        }
        if not isinstance(self.temperature, list):
            return {"calibration/temperature": self.temperature, **found}
        names = self.labels or [str(i) for i in range(len(self.temperature))]
        found.update({f"calibration/temperature/{name}": t for name, t in zip(names, self.temperature)})
        found.update({f"threshold/{name}": t for name, t in zip(names, self.thresholds or [])})
        return {**found, "threshold/rule": self.threshold_rule}

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "calibrated": self.calibrated}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], per_class: bool) -> dict[str, float]:
    """acc, balanced_acc, macro_f1, ece, nll, acc_top3 (more than 3 classes), and precision/<class>, recall/<class>."""
    if len(labels) == 0:
        return {}
    logits, labels = logits.float().cpu(), labels.long().cpu()
    num_classes = len(class_names)
    probs = logits.softmax(dim=-1)
    found: dict[str, float] = point_metrics(labels.tolist(), probs.argmax(dim=-1).tolist(), num_classes)
    found["ece"] = float(multiclass_calibration_error(probs, labels, num_classes, n_bins=ECE_BINS, norm="l1"))
    found["nll"] = float(F.cross_entropy(logits, labels))
    if num_classes > 3:
        found["acc_top3"] = float(multiclass_accuracy(probs, labels, num_classes, top_k=3, average="micro"))
    if per_class:
        precision = multiclass_precision(probs, labels, num_classes, average="none").tolist()
        recall = multiclass_recall(probs, labels, num_classes, average="none").tolist()
        for name, p, r in zip(class_names, precision, recall):
            found[f"precision/{name}"], found[f"recall/{name}"] = float(p), float(r)
    return found


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Only what a temperature changes: ECE and NLL."""
    probs = logits.float().softmax(dim=-1)
    return {
        "ece": float(multiclass_calibration_error(probs, labels.long(), num_classes, n_bins=ECE_BINS, norm="l1")),
        "nll": float(F.cross_entropy(logits.float(), labels.long())),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, prior_std: float = 1.0) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T), by L-BFGS on log T.

    One parameter, so it cannot change which class wins, only how sure the model says it is. A validation set the
    model gets entirely right has its NLL fall without end as T -> 0 (certainty about everything, which a later
    mistake pays for with an unbounded loss); a weak normal prior on log T (`prior_std`: T within e^±1 is
    unremarkable) makes it the MAP estimate, which a few hundred images with errors barely move.
    """
    logits, labels = logits.detach().double().cpu().clone(), labels.long().cpu().clone()  # not inference tensors
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    low, high = (math.log(v) for v in TEMPERATURE_RANGE)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(low, high).exp(), labels, reduction="sum") + 0.5 * (log_t / prior_std) ** 2
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().clamp(low, high).exp())


def mean_confidence(raw: torch.Tensor, temperature: float) -> float:
    return float((raw.double() / temperature).softmax(dim=-1).max(dim=-1).values.mean())


def choose_temperature(raw: torch.Tensor, labels: torch.Tensor, method: str, fitted_on: str = "") -> Calibration:
    """The calibration of a model from its raw logits on held-out images: temperature scaling (fit_temperature), with
    one limit on sharpening. A temperature below 1 may not make the mean held-out confidence exceed Laplace's
    estimate of the accuracy, (right + 1) / (images + 2): with no errors the NLL keeps falling as T -> 0, so a fit
    on a perfect held-out set would claim a certainty the data cannot show. Softening (T > 1) is never limited."""
    images = len(labels)
    errors = int((raw.argmax(dim=-1) != labels).sum()) if images else 0
    if method != "temperature":
        return Calibration(method, "none", 1.0, images, errors, None, fitted_on)
    if images == 0:
        return Calibration(method, "no_held_out_images", 1.0, 0, 0, None, fitted_on)
    fitted = fit_temperature(raw, labels)
    cap = (images - errors + 1) / (images + 2)
    if fitted >= 1.0 or mean_confidence(raw, fitted) <= cap:
        return Calibration(method, "fitted", fitted, images, errors, fitted, fitted_on)
    low, high = math.log(fitted), 0.0  # mean confidence falls as T rises: bisect log T for the cap
    if mean_confidence(raw, 1.0) > cap:
        low = 0.0
    for _ in range(60 if low < 0 else 0):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_confidence(raw, math.exp(middle)) > cap else (low, middle)
    return Calibration(method, "capped_at_laplace_accuracy", math.exp(high), images, errors, fitted, fitted_on)


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each confidence bin: what a reliability diagram draws."""
    confidence, predicted = probs.float().max(dim=-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    found = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        count = int(inside.sum())
        found.append((float(confidence[inside].mean()) if count else float((low + high) / 2), float(correct[inside].mean()) if count else 0.0, count))
    return found


def gather_in_order(
    batches: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, ...], label_shape: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (values [N, *shape], labels [N, *label_shape]: class indices, or multi-hot rows), or under DDP every
    rank's, put back in dataset order: rank r of n evaluated images r, r+n, r+2n, ... (data.sampling.EvaluationShardSampler)."""
    label_type = torch.float32 if label_shape else torch.long
    logits = torch.cat([b[0] for b in batches]) if batches else torch.zeros(0, *shape)
    labels = torch.cat([b[1] for b in batches]) if batches else torch.zeros(0, *label_shape, dtype=label_type)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return logits, labels
    world = torch.distributed.get_world_size()
    shards: list[Any] = [None] * world
    torch.distributed.all_gather_object(shards, (logits, labels))
    total = sum(len(shard[1]) for shard in shards)
    all_logits, all_labels = torch.zeros(total, *shape), torch.zeros(total, *label_shape, dtype=label_type)
    for rank, (shard_logits, shard_labels) in enumerate(shards):
        all_logits[rank::world], all_labels[rank::world] = shard_logits, shard_labels
    return all_logits, all_labels
