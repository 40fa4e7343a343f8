"""`backbone=ensemble`: several backbones side by side, their pooled features concatenated (for the frozen probe),
each seeing the image through its own preprocessing.

The data pipeline delivers one tensor per image: the central square of the image at the largest member's resize
size, in [0, 1] (crop_pct 1, no normalisation). Each member then takes what its own eval transform would have: that
square resized to its resize size (the central square of its resized image), centre-cropped to its input size,
normalised with its mean and std. Up to one extra resampling, that is the member's own preprocessing.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from transferlab.data.preprocessing import Preprocessing
from transferlab.models.backbone import Backbone
from transferlab.models.pooling import pooled_features


class MemberView(nn.Module):
    """A member's preprocessing on the ensemble's carrier tensor, then the member."""

    def __init__(self, member: Backbone) -> None:
        super().__init__()
        self.body, self.pool = member.body, member.pool  # the pool has no weights: the state_dict's names stay
        prep = member.preprocessing
        self.resize, self.crop, self.interpolation = prep.resize_size, prep.input_size, prep.interpolation
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, carrier: torch.Tensor) -> torch.Tensor:
        mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
        view = carrier if carrier.shape[-1] == self.resize else TF.resize(carrier, [self.resize, self.resize], interpolation=mode, antialias=True)
        view = TF.center_crop(view, [self.crop, self.crop])
        return pooled_features(self.body, self.pool, (view - self.mean) / self.std)


class EnsembleBody(nn.Module):
    def __init__(self, members: list[Backbone]) -> None:
        super().__init__()
        self.members = nn.ModuleList([MemberView(member) for member in members])

    def forward(self, carrier: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(carrier) for member in self.members], dim=1)


def ensemble_backbone(members: list[Backbone]) -> Backbone:
    """One Backbone over `members` (no ImageNet head of its own: visualisations and attacks use a single backbone)."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two backbones")
    side = max(member.preprocessing.resize_size for member in members)
    carrier = Preprocessing(
        input_size=side, interpolation=members[0].preprocessing.interpolation, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    )
    name = "ensemble(" + ",".join(member.name for member in members) + ")"
    return Backbone(EnsembleBody(members), sum(m.num_features for m in members), None, carrier, None, name, "ensemble")
