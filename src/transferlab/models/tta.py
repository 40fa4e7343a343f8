"""Test-time augmentation (`tta=none|hflip|five_crop`): the class probabilities of a few fixed views of each image,
averaged, as timm, MMPretrain and fastai offer it.

- hflip: the image and its mirror image (2 views);
- five_crop: the four corners and the centre, each 7/8 of the side, resized back to the model's input (5 views,
  torchvision's five_crop) plus the whole image (6 views): a zoom-in that keeps the resolution the model expects.

The result is returned as log-probabilities, so everything downstream (softmax, argmax, metrics) reads it as logits.
Calibration composes with the views one way only: each view's raw logits are divided by the temperature, then the
probabilities are averaged, p = mean over views of softmax(z_v / T) (`combine_views`); the log of that average is
not a logit that a temperature can be multiplied back into.
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


def combine_views(raw: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """log of the mean over views of softmax(raw_v / temperature); one view: raw / temperature itself."""
    if len(raw) == 1:
        return raw[0] / temperature
    probabilities = torch.stack([(view / temperature).softmax(dim=-1) for view in raw]).mean(dim=0)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def averaged_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str) -> torch.Tensor:
    """log of the mean over views of softmax(forward(view)); `forward` returns calibrated logits (a package's)."""
    return combine_views([forward(batch).float() for batch in views(images, mode)], 1.0)


def mean_sigmoids(calibrated: list[torch.Tensor]) -> torch.Tensor:
    """A multi-label model's views combined: each label's probability, sigmoid(calibrated logit), averaged over the
    views (the training step, predict and serve all combine views this way)."""
    probabilities = [view.float().sigmoid() for view in calibrated]
    return probabilities[0] if len(probabilities) == 1 else torch.stack(probabilities).mean(dim=0)
