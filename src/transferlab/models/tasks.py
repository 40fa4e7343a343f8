"""What kind of answer the head gives: one class of K (softmax) or a set of labels (K sigmoids), and everything that
follows from it: the training loss, the held-out NLL, how probabilities of test-time views are averaged and which
metrics a split's logits give. `TransferClassifier` holds one of the two and never asks which.

Multi-label losses (`finetune.loss`): `bce` = binary cross-entropy with logits per label, with a `pos_weight` per
label when data.class_weights=balanced (each label's negatives / positives among the training images); `asl` =
the asymmetric loss of Ridnik et al. (ICCV 2021): positives weighted by (1 - p)^gamma_pos, negatives by
p_m^gamma_neg with the probability shifted down by `asl_clip` (p_m = max(p - clip, 0)), so the many easy negatives
of a multi-label image stop dominating the gradient; defaults gamma_neg 4, gamma_pos 0, clip 0.05 (the paper's).
`finetune.label_smoothing` e moves every multi-label target to y (1 - e) + e / 2, as timm's BinaryCrossEntropy does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from transferlab.core.errors import ConfigError
from transferlab.models import multilabel_metrics as ml
from transferlab.models.evaluation import classification_metrics
from transferlab.models.tta import combine_views, mean_sigmoids

LOSSES = {"single": ("auto", "ce"), "multilabel": ("auto", "bce", "asl")}


class SingleLabel:
    """One class per image: softmax, cross-entropy (class weights, label smoothing), accuracy and its siblings."""

    multilabel = False

    def __init__(self, finetune: Mapping[str, Any], weights: Optional[torch.Tensor]) -> None:
        self.smoothing = float(finetune.get("label_smoothing") or 0.0)  # training loss only
        self.weights = weights

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss; `targets` are class indices, or class probabilities after mixup / CutMix."""
        weights = self.weights.to(logits.device) if self.weights is not None else None
        return F.cross_entropy(logits, targets, weight=weights, label_smoothing=self.smoothing)

    def nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    def combine_views(self, raw: list[torch.Tensor], temperature: torch.Tensor) -> torch.Tensor:
        return combine_views(raw, float(temperature))

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str], per_class: bool, **_: Any) -> dict[str, float]:
        return classification_metrics(logits, labels, names, per_class=per_class)


class MultiLabel:
    """A set of labels per image: K independent sigmoids, BCE or ASL, mAP and F1 at per-label thresholds."""

    multilabel = True

    def __init__(self, finetune: Mapping[str, Any], weights: Optional[torch.Tensor]) -> None:
        self.kind = "bce" if str(finetune.get("loss") or "auto") == "auto" else str(finetune.get("loss"))
        self.smoothing = float(finetune.get("label_smoothing") or 0.0)  # each target pulled towards 1/2 (timm's BinaryCrossEntropy)
        self.pos_weight = weights
        self.gamma_neg = float(finetune.get("asl_gamma_neg", 4.0) or 0.0)
        self.gamma_pos = float(finetune.get("asl_gamma_pos", 0.0) or 0.0)
        self.clip = float(finetune.get("asl_clip", 0.05) or 0.0)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over images of the summed per-label loss (targets in [0, 1]: multi-hot, or mixed by mixup / CutMix)."""
        targets = targets.to(logits.dtype) * (1 - self.smoothing) + self.smoothing / 2
        if self.kind == "asl":
            return asymmetric_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.clip)
        weight = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight, reduction="sum") / max(len(logits), 1)

    def nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy per image and label (what ml.multilabel_metrics calls nll)."""
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def combine_views(self, raw: list[torch.Tensor], temperature: torch.Tensor) -> torch.Tensor:
        """The logit of the mean over views of each label's calibrated probability (one view: raw / T itself)."""
        temperature = temperature.to(raw[0].device)
        if len(raw) == 1:
            return raw[0] / temperature
        mean = mean_sigmoids([view / temperature for view in raw])
        return torch.logit(mean.double(), eps=1e-12).to(raw[0].dtype)

    def metrics(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        names: Sequence[str],
        per_class: bool,
        thresholds: Optional[Sequence[float]] = None,
        mask: Optional[np.ndarray] = None,
    ) -> dict[str, float]:
        """map, f1_micro/macro, ... at `thresholds` (0.5 for every label until they are chosen on held-out images)."""
        if len(labels) == 0:
            return {}
        probs = logits.float().sigmoid().cpu().numpy()
        chosen = np.asarray(thresholds if thresholds is not None else [0.5] * len(names), dtype=np.float64)
        return ml.multilabel_metrics(probs, labels.cpu().numpy(), chosen, list(names), per_label=per_class, mask=mask)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float, eps: float = 1e-8) -> torch.Tensor:
    """ASL (Ridnik et al. 2021), as their reference AsymmetricLoss: mean over images of the summed per-label loss."""
    p = logits.float().sigmoid()
    p_neg = (p - clip).clamp_min(0) if clip > 0 else p  # probability shifting: easy negatives (p < clip) cost nothing
    positive = targets * torch.log(p.clamp_min(eps)) * (1 - p) ** gamma_pos
    negative = (1 - targets) * torch.log((1 - p_neg).clamp_min(eps)) * p_neg**gamma_neg
    return -(positive + negative).sum() / max(len(logits), 1)


def make_task(task: str, finetune: Mapping[str, Any], weights: Optional[torch.Tensor]) -> SingleLabel | MultiLabel:
    """The task object of a classifier; `finetune.loss` checked against the task in one line."""
    if task not in LOSSES:
        raise ConfigError(f"data.task: expected single or multilabel, got {task!r}")
    loss = str(finetune.get("loss") or "auto")
    if loss not in LOSSES[task]:
        hint = "set data.task=multilabel for label sets" if task == "single" else "bce (binary cross-entropy) or asl (asymmetric loss)"
        raise ConfigError(f"finetune.loss={loss}: not a loss of a {task}-label task (expected {' or '.join(LOSSES[task])}); {hint}")
    return MultiLabel(finetune, weights) if task == "multilabel" else SingleLabel(finetune, weights)
