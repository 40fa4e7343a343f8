"""Training-batch regularisers of the fine-tuning recipe: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019)
from torchvision.transforms.v2, one of the two drawn per batch when both are on, as timm's Mixup does. They turn the
labels into class probabilities; the loss takes those (and label smoothing) directly. Only training steps call it:
validation, test, calibration and prediction see the images as they are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torchvision.transforms import v2

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(mixup: Any, cutmix: Any, num_classes: int) -> Optional[BatchMixer]:
    """`mixup` / `cutmix`: the Beta(alpha, alpha) parameter of each (0 or null = off)."""
    found: list[Any] = []
    if mixup:
        found.append(v2.MixUp(alpha=float(mixup), num_classes=num_classes))
    if cutmix:
        found.append(v2.CutMix(alpha=float(cutmix), num_classes=num_classes))
    if not found:
        return None
    return found[0] if len(found) == 1 else v2.RandomChoice(found)
