"""What every backbone source builds: pretrained features plus the preprocessing and ImageNet head they came with."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.core.safe_load import read_checkpoint
from transferlab.data.preprocessing import Preprocessing
from transferlab.models.pooling import TokenPool, pooled_features

PRETRAINED = ("pretrained", "imagenet")  # backbone.weights: the weight tag's own pretrained weights (imagenet: the old word)


class Backbone(nn.Module):
    """`forward(images) -> features [N, num_features]`; `imagenet_head(features) -> ImageNet logits`.

    `pool` (backbone.pool, models.pooling): None = the body's own pooling, else a TokenPool over its tokens;
    `tag`: the pretrained weight's tag (timm's `lvd142m`, `openai`, ...) where the library names one;
    `categories`: the class names of `imagenet_head` (ImageNet-1k, ImageNet-21k, ... whatever the weight's head has)."""

    body: nn.Module
    imagenet_head: Optional[nn.Module]
    pool: Optional[TokenPool]

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        imagenet_head: Optional[nn.Module],
        preprocessing: Preprocessing,
        categories: Optional[list[str]],
        name: str,
        source: str,
        pool: Optional[TokenPool] = None,
        tag: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.imagenet_head = imagenet_head
        if imagenet_head is not None:  # never trained (not on the path to the features): under DDP it would be an unused parameter
            imagenet_head.requires_grad_(False)
        self.num_features = num_features
        self.preprocessing = preprocessing
        self.categories = categories
        self.name, self.source, self.tag = name, source, tag
        self.pool = pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.body, self.pool, images)

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.imagenet_head is None:
            raise ValueError(f"backbone {self.name} has no ImageNet classifier")
        return self.imagenet_head(self.body(images))  # the body's own pooling: what its classifier was trained on


# Prefixes that wrappers put before a model's own parameter names: DataParallel / DDP, Lightning modules,
# Hugging Face's TimmWrapper (`timm_model.`), and transferlab's own classifier (`backbone.body.`).
KEY_PREFIXES = ("module.", "model.", "timm_model.", "backbone.body.", "backbone.", "encoder.")
CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")  # where training scripts nest the weights


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from `.safetensors` (safetensors, no pickle) or a torch file (`weights_only=True`)."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"backbone.weights: {file} is not a readable safetensors file ({' '.join(str(exc).split())[:160]})") from None
    state = read_checkpoint(file, key="backbone.weights")
    for key in CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}


def matching_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """`state` as is when its names are the model's, else with the one wrapper prefix removed that makes them so."""
    if expected <= set(state):
        return state
    for prefix in KEY_PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and expected <= set(stripped):
            return stripped
    return state


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """backbone.weights=<file>: a state_dict of the source's original model (ImageNet head included), in
    `.safetensors`, `.pth`, `.pt`, `.bin` or a checkpoint holding one; wrapper prefixes are removed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"backbone.weights: {file} is not a file; use pretrained, none, bundled or a .safetensors / .pth state_dict path")
    expected = set(model.state_dict())
    state = matching_keys(read_state_dict(file), expected)
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(
            f"backbone.weights: {file} does not fit {type(model).__name__}: it lacks {len(missing)} of its {len(expected)} tensors "
            f"(e.g. {', '.join(missing[:3])}); give a state_dict of the original model, ImageNet head included"
        )
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else "")
        raise ConfigError(f"backbone.weights: {file} does not fit {type(model).__name__}: {reason}") from exc


def is_convolutional(module: nn.Module) -> bool:
    """What `channels_last: auto` asks: convolutions gain from the NHWC layout, token models do not."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1
