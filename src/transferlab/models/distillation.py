"""finetune=distill: the student's loss, Hinton et al. (2015) knowledge distillation.

    loss = ce_weight * CE(student, labels) + kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher's logits come with each training batch (callbacks.distill_cache caches them once per image and view,
next to the student's cached features of the same view); T^2 keeps the soft term's gradients on the scale of the
hard term's whatever the temperature (the soft gradients shrink as 1 / T^2). Validation, calibration and the test
use the ordinary cross-entropy / NLL of models.tasks: distillation changes only what the head is fitted to.
Single-label tasks only (softmax KD); config.validation refuses a multi-label one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F

from transferlab.models.tasks import MultiLabel, SingleLabel
from transferlab.models.tasks import make_task as plain_task

__all__ = ["DistillationLoss", "effective_mode", "kd_term", "make_task"]


def effective_mode(finetune: Mapping[str, Any]) -> str:
    """How the student's backbone trains: finetune=distill is `finetune.student` (frozen), every other mode itself."""
    mode = str(finetune["mode"])
    return str(finetune.get("student") or "frozen") if mode == "distill" else mode


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (float32 throughout)."""
    t = float(temperature)
    log_student = F.log_softmax(student.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(SingleLabel):
    """A single-label task whose training loss also pulls the student towards the teacher's softened probabilities."""

    def __init__(self, finetune: Mapping[str, Any], weights: Optional[torch.Tensor]) -> None:
        """finetune.temperature / kd_weight / ce_weight as conf/finetune/distill.yaml sets them (config.validation checks them)."""
        super().__init__(finetune, weights)
        self.temperature = float(finetune["temperature"])
        self.kd_weight, self.ce_weight = float(finetune["kd_weight"]), float(finetune["ce_weight"])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, teacher: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`teacher`: the cached teacher logits of exactly the views in the batch ([N, classes])."""
        if teacher is None:
            raise RuntimeError("finetune=distill: a training batch came without the teacher's logits (the distillation cache did not run)")
        hard = super().loss(logits, targets) if self.ce_weight else logits.new_zeros(())
        soft = kd_term(logits, teacher.to(logits.device), self.temperature) if self.kd_weight else logits.new_zeros(())
        return self.ce_weight * hard + self.kd_weight * soft


def make_task(task: str, finetune: Mapping[str, Any], weights: Optional[torch.Tensor]) -> SingleLabel | MultiLabel:
    """models.tasks.make_task, with the distillation loss for finetune=distill (single-label only)."""
    if str(finetune.get("mode")) == "distill" and task == "single":
        plain_task(task, finetune, weights)  # its checks of finetune.loss
        return DistillationLoss(finetune, weights)
    return plain_task(task, finetune, weights)
