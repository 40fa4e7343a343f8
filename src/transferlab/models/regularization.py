"""Training-batch regularisers of the fine-tuning recipe: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019)
from torchvision.transforms.v2, one of the two drawn per batch when both are on, as timm's Mixup does. They turn the
labels into class probabilities; the loss takes those (and label smoothing) directly. Multi-label targets (multi-hot
vectors) are mixed the same way, by the same weight as the pixels: mixup's lambda, CutMix's pasted area (as timm's
Mixup does), so a label present in one image only becomes a soft target. Only training steps call it: validation,
test, calibration and prediction see the images as they are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torchvision.transforms import v2

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(mixup: Any, cutmix: Any, num_classes: int, multilabel: bool = False) -> Optional[BatchMixer]:
    """`mixup` / `cutmix`: the Beta(alpha, alpha) parameter of each (0 or null = off)."""
    if multilabel:
        alphas = [a for a in ((float(mixup or 0), "mixup"), (float(cutmix or 0), "cutmix")) if a[0] > 0]
        return (lambda images, targets: mix_label_sets(images, targets, alphas)) if alphas else None
    found: list[Any] = []
    if mixup:
        found.append(v2.MixUp(alpha=float(mixup), num_classes=num_classes))
    if cutmix:
        found.append(v2.CutMix(alpha=float(cutmix), num_classes=num_classes))
    if not found:
        return None
    return found[0] if len(found) == 1 else v2.RandomChoice(found)


def mix_label_sets(images: torch.Tensor, targets: torch.Tensor, alphas: list[tuple[float, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one, drawn per batch) of images with multi-hot targets [N, K]: each image mixed with the batch
    rolled by one, targets mixed by the weight of each image's pixels."""
    alpha, kind = alphas[int(torch.randint(len(alphas), ()))]
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    other = images.roll(1, 0)
    if kind == "mixup":
        mixed = images * lam + other * (1 - lam)
    else:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = other[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)
    targets = targets.float()
    return mixed, targets * lam + targets.roll(1, 0) * (1 - lam)
