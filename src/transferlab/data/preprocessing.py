"""A backbone's own input pipeline (size, interpolation, crop, mean/std), stored with every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from transferlab.core.errors import ConfigError

_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Like timm's pretrained_cfg / torchvision's Weights.transforms(), as plain data."""

    input_size: int = 224
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items() if k in fields}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def resized(self, input_size: int | None) -> Preprocessing:
        return self if not input_size else dataclasses.replace(self, input_size=int(input_size))

    @property
    def _mode(self) -> v2.InterpolationMode:
        return _INTERPOLATIONS.get(self.interpolation, v2.InterpolationMode.BILINEAR)

    def _finish(self) -> list[v2.Transform]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop (timm's crop_pct convention)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def decode_size(self, augment: Mapping[str, Any] | None = None) -> int:
        """The short side (px) an image needs before the transform: the eval resize, or more when random crops
        zoom in (a crop keeps >= scale_min of the area, so sqrt(scale_min) of the side)."""
        scale_min = float(dict(augment or {}).get("scale_min", 1.0))
        return self.resize_size if scale_min >= 1.0 else int(math.ceil(self.resize_size / math.sqrt(max(scale_min, 1e-3))))

    def eval_transform(self) -> v2.Compose:
        """Resize the short side to size/crop_pct, centre-crop to size: what the weights were trained with."""
        return v2.Compose(
            [v2.ToImage(), v2.Resize(self.resize_size, interpolation=self._mode, antialias=True), v2.CenterCrop(self.input_size)] + self._finish()
        )

    def train_transform(self, augment: Mapping[str, Any] | None) -> v2.Compose:
        """The eval pipeline with random resized crops, flips and optional colour changes."""
        augment = dict(augment or {})
        scale_min = float(augment.get("scale_min", 1.0))
        steps: list[v2.Transform] = [v2.ToImage()]
        if scale_min < 1.0:
            steps.append(v2.RandomResizedCrop(self.input_size, scale=(scale_min, 1.0), interpolation=self._mode, antialias=True))
        else:
            steps += [v2.Resize(self.resize_size, interpolation=self._mode, antialias=True), v2.CenterCrop(self.input_size)]
        if augment.get("hflip", False):
            steps.append(v2.RandomHorizontalFlip())
        jitter = float(augment.get("color_jitter", 0.0) or 0.0)
        if jitter > 0:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        policy = str(augment.get("policy") or ("trivialaugment" if augment.get("trivial_augment") else "none"))
        if policy != "none":
            steps.append(augmentation_policy(policy))
        return v2.Compose(steps + self._finish())


POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")


def augmentation_policy(name: str) -> v2.Transform:
    """data.augment.policy: torchvision's RandAugment (2 ops, magnitude 9), TrivialAugmentWide, or AutoAugment's
    ImageNet policy, applied to the 8-bit image before normalisation. Their rotations and shears interpolate
    bilinearly: on tensors torchvision's affine warps support no bicubic mode (the backbone's resize keeps its own)."""
    interpolation = v2.InterpolationMode.BILINEAR
    if name == "randaugment":
        return v2.RandAugment(num_ops=2, magnitude=9, interpolation=interpolation)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide(interpolation=interpolation)
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
    raise ConfigError(f"data.augment.policy={name!r}: use one of {', '.join(POLICIES)}")
