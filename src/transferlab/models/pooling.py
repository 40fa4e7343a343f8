"""How a backbone's last layer becomes one feature vector (`backbone.pool`), and what its output looks like.

A convolutional network ends in a map [N, C, h, w] and is pooled by averaging it. A vision transformer ends in a
sequence of tokens [N, T, D]: `prefix` tokens first (the class token, DeiT's distillation token, DINOv2's
register tokens), then one token per image patch, row by row. Swin ends in a map stored channels-last
[N, h, w, C]. `layout_of` tells these apart from the model's own attributes (timm's `num_prefix_tokens`,
`output_fmt`), and the insight tools use it to turn tokens back into pictures.

`backbone.pool`:
- `auto`: what the weight's card recommends: the class token with the mean patch token for DINOv2/v3 (their linear
  probes), otherwise the model's own pooling (the class token of CLIP and DeiT, SigLIP's attention pool, a CNN's
  average).
- `cls`: the first token; `mean`: the mean of the patch tokens, every prefix token excluded; `cls_mean`: both,
  concatenated (2 x the width).
- `avg`: global average pooling: a CNN's (or Swin's) own; on a token model the same as `mean` (timm's
  global_pool=avg).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, cast

import torch
from torch import nn

from transferlab.core.errors import ConfigError

POOLS = ("auto", "cls", "mean", "cls_mean", "avg")
CARD_POOLS = {"dinov2": "cls_mean", "dinov3": "cls_mean"}  # name fragment -> what the family's card probes with


@dataclass(frozen=True)
class Layout:
    """`kind`: conv ([N, C, h, w]), tokens ([N, prefix + h*w, D]) or nhwc ([N, h, w, C]); `patch`: pixels per token."""

    kind: Literal["conv", "tokens", "nhwc"]
    prefix: int = 0
    patch: tuple[int, int] = (1, 1)
    class_token: bool = False

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns of an input of `height` x `width` pixels (non-square inputs included)."""
        return height // self.patch[0], width // self.patch[1]


def layout_of(model: nn.Module) -> Layout:
    """The output layout of a timm / torchvision model, from the attributes timm gives every token model."""
    if str(getattr(model, "output_fmt", "")).endswith("NHWC"):  # "NHWC", or timm's Format enum
        return Layout("nhwc")
    if hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed"):
        patch = getattr(model.patch_embed, "patch_size", (16, 16))
        patch = (int(patch), int(patch)) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        has_class = bool(getattr(model, "cls_token", None) is not None)
        return Layout("tokens", int(cast(Any, model).num_prefix_tokens), patch, has_class)
    return Layout("conv")


def chosen_pool(name: str, model: nn.Module, requested: Optional[str]) -> Optional[str]:
    """The pooling to apply on top of `forward_features`, or None for the model's own forward (its own pooling).
    Asking a model for what it cannot give (`cls` without a class token, token pooling of a CNN) fails here."""
    requested = requested or "auto"
    if requested not in POOLS:
        raise ConfigError(f"backbone.pool: expected one of {', '.join(POOLS)}, got {requested!r}")
    layout = layout_of(model)
    if requested == "auto":
        card = next((pool for fragment, pool in CARD_POOLS.items() if fragment in name), None)
        return card if card and layout.kind == "tokens" and layout.class_token else None
    if layout.kind != "tokens":
        if requested == "avg":
            return None  # a CNN's (and Swin's) own pooling is the global average
        raise ConfigError(f"backbone.pool={requested}: {name} is not a token model (its output is a feature map); use backbone.pool=avg or auto")
    if not hasattr(model, "forward_features"):
        raise ConfigError(f"backbone.pool={requested}: {name} has no forward_features (only timm models); use backbone.pool=auto")
    if requested in ("cls", "cls_mean") and not layout.class_token:
        raise ConfigError(f"backbone.pool={requested}: {name} has no class token; use backbone.pool=mean or auto (its own pooling)")
    return "mean" if requested == "avg" else requested


class TokenPool(nn.Module):
    """[N, T, D] tokens -> [N, D] (cls, mean) or [N, 2D] (cls_mean). No weights of its own: the model's fc_norm (timm
    applies it after pooling when its final norm is not applied to the tokens) is passed in, so the state_dict keeps
    the model's names. Traceable: exports to ONNX and TorchScript."""

    def __init__(self, kind: str, prefix: int) -> None:
        super().__init__()
        self.kind, self.prefix = kind, prefix

    def forward(self, tokens: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        cls, mean = tokens[:, 0], tokens[:, self.prefix :].mean(dim=1)
        if norm is not None:
            cls, mean = norm(cls), norm(mean)
        if self.kind == "cls":
            return cls
        if self.kind == "mean":
            return mean
        return torch.cat([cls, mean], dim=1)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, prefix={self.prefix}"


def pooled_features(body: nn.Module, pool: Optional[TokenPool], images: torch.Tensor) -> torch.Tensor:
    """The body's own forward (its own pooling), or `pool` over its `forward_features` tokens."""
    if pool is None:
        out: torch.Tensor = body(images)
        return out
    norm = getattr(body, "fc_norm", None)
    return pool(cast(Any, body).forward_features(images), norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None)


def pooled_width(width: int, kind: Optional[str]) -> int:
    return 2 * width if kind == "cls_mean" else width
