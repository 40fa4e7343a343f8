"""Test-time augmentation (`tta=none|hflip|five_crop`): the class probabilities of a few fixed views of each image,
averaged, as timm, MMPretrain and fastai offer it.

- hflip: the image and its mirror image (2 views);
- five_crop: the four corners and the centre, each 7/8 of the side, resized back to the model's input (5 views,
  torchvision's five_crop) plus the whole image (6 views): a zoom-in that keeps the resolution the model expects.

The result is returned as log-probabilities, so everything downstream (softmax, argmax, metrics) reads it as logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms.v2 import functional as TF

MODES = ("none", "hflip", "five_crop")
CROP_FRACTION = 0.875


def views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The batches [N, 3, H, W] whose predictions are averaged."""
    if mode not in MODES:
        raise ValueError(f"tta={mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return [images]
    if mode == "hflip":
        return [images, TF.horizontal_flip(images)]
    size = list(images.shape[-2:])
    crop = [max(1, round(side * CROP_FRACTION)) for side in size]
    crops = TF.five_crop(images, crop)
    return [images] + [TF.resize(c, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True) for c in crops]


def averaged_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str) -> torch.Tensor:
    """log of the mean over views of softmax(forward(view)); `forward` returns (calibrated) logits."""
    if mode == "none":
        return forward(images)
    batches = views(images, mode)
    probabilities = torch.stack([forward(batch).float().softmax(dim=-1) for batch in batches]).mean(dim=0)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
