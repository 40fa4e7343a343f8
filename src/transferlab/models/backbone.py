"""What every backbone source builds: pretrained features plus the preprocessing and ImageNet head they came with."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.core.safe_load import read_checkpoint
from transferlab.data.preprocessing import Preprocessing


class Backbone(nn.Module):
    """`forward(images) -> features [N, num_features]`; `imagenet_head(features) -> ImageNet logits`."""

    body: nn.Module
    imagenet_head: Optional[nn.Module]

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        imagenet_head: Optional[nn.Module],
        preprocessing: Preprocessing,
        categories: Optional[list[str]],
        name: str,
        source: str,
    ) -> None:
        super().__init__()
        self.body = body
        self.imagenet_head = imagenet_head
        self.num_features = num_features
        self.preprocessing = preprocessing
        self.categories = categories
        self.name, self.source = name, source

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.imagenet_head is None:
            raise ValueError(f"backbone {self.name} has no ImageNet classifier")
        return self.imagenet_head(self.body(images))


def load_state_dict_file(model: nn.Module, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"backbone.weights: {file} is not a file; use imagenet, none, bundled or a state_dict path")
    state = read_checkpoint(file, key="backbone.weights")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"backbone.weights: {file} does not fit {type(model).__name__}: {first}") from exc


def is_convolutional(module: nn.Module) -> bool:
    """What `channels_last: auto` asks: convolutions gain from the NHWC layout, token models do not."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1
