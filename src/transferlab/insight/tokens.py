"""Pictures of what a token backbone (ViT, DeiT, DINOv2 with registers, CLIP, SigLIP, EVA, Swin) sees.

A vision transformer's blocks output token sequences [N, prefix + h*w, D], not maps. For class activation maps
and feature maps the patch tokens are put back on their grid ([N, D, h, w]; the class, distillation and register
tokens dropped), so every picture a CNN gets has a token-model counterpart:
- `token_layers`: the modules whose output is one token per patch (a block, a block's `norm1`, the final norm). The
  default CAM layer of a model pooled from its patch tokens (backbone.pool=mean / cls_mean, DINOv2's auto, Swin,
  EVA) is the last block's output, as a CNN's is its last spatial layer; not the final norm after it, which scales
  every token to the same size and spreads the map over the background (measured with Grad-CAM on a four-block,
  mean-pooled ViT trained on a two-class version of tests/evidence.py: 0.59-0.75 of the mass on the evidence,
  0.36-0.70 after the norm). A class-token
  model's is the last block's `norm1`, the patch tokens as they enter the last attention: after the last block
  only the class token reaches the head, so every patch token's gradient is zero there (pytorch-grad-cam's ViT
  tutorial picks `blocks[-1].norm1` for this reason).
- `ToGrid`: pytorch-grad-cam's `reshape_transform` (tokens -> [N, D, h, w] for the current input's grid, so
  non-square inputs work too).
- `class_attention`: the class token's attention over the patches per block, averaged over heads, recomputed from
  each attention module's input (timm's fused attention never materialises the weights), and attention rollout
  (Abnar & Zuidema 2020): the product over blocks of (A + I) / 2, rows normalised.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from transferlab.core.errors import ConfigError, close_matches
from transferlab.core.plotting import pyplot, save_figure
from transferlab.insight.feature_maps import module_outputs
from transferlab.models.pooling import Layout, layout_of

BLOCK = re.compile(r"^(blocks|layers|stages)\.\d+$")  # a transformer block, a Swin stage

__all__ = [
    "ToGrid",
    "check_token_layers",
    "class_attention",
    "layout_of",
    "on_grid",
    "render_attention",
    "render_components",
    "token_blocks",
    "token_layers",
]


def token_layers(body: nn.Module, size: int) -> list[str]:
    """Modules whose output holds one token per patch, in completion order: [1, prefix + h*w, D] for token models,
    [1, h, w, C] for channels-last ones (Swin); attention internals ([1, heads, tokens, dim]) never qualify."""
    layout = layout_of(body)
    if layout.kind == "conv":
        return []
    if layout.kind == "nhwc":
        names = [  # the stages and the final norm; the patch embedding's convolution is still channels-first
            name for name, shape in module_outputs(body, size) if len(shape) == 4 and name.count(".") <= 1 and not name.startswith("patch_embed")
        ]
        return list(reversed(dict.fromkeys(reversed(names))))
    grid = layout.grid(size, size)
    tokens = layout.prefix + grid[0] * grid[1]
    names = [name for name, shape in module_outputs(body, size) if len(shape) == 3 and shape[1] == tokens and ".attn." not in name + "."]
    return list(reversed(dict.fromkeys(reversed(names))))


def check_token_layers(body: nn.Module, size: int, layers: Sequence[str], key: str) -> None:
    """Named layers of a token model must give one token per patch (a block, a norm, an MLP layer), not an
    attention internal such as `blocks.11.attn.k_norm` ([N, heads, tokens, dim]), which has no picture."""
    valid = token_layers(body, size)
    for layer in layers:
        if layer not in valid:
            blocks = [name for name in valid if BLOCK.match(name)]
            raise ConfigError(
                f"{key}: {layer!r} does not give one token per patch{close_matches(layer, valid)}; use blocks or stages such as {', '.join(blocks[-4:])}"
            )


def pools_patch_tokens(backbone: Any) -> bool:
    """Whether the backbone's pooled feature is made of its last patch tokens (mean, cls_mean, avg pooling, Swin's
    average), so that their gradient carries the class evidence; a class-token (or attention-pooled) model's is not."""
    if getattr(backbone, "pool", None) is not None:
        return str(backbone.pool.kind) in ("mean", "cls_mean")
    return layout_of(backbone.body).kind == "nhwc" or str(getattr(backbone.body, "global_pool", "")) in ("avg", "avgmax", "max")


def default_cam_layer(layers: Sequence[str], patch_pooled: bool) -> str:
    """The last block's output where the pooled feature is made of patch tokens, else the last block's `norm1`
    (see the module docstring)."""
    norms = [name for name in layers if name.endswith(".norm1")]
    if norms and not patch_pooled:
        return norms[-1]
    blocks = [name for name in layers if BLOCK.match(name)]
    return blocks[-1] if blocks else layers[-1]


def on_grid(tokens: torch.Tensor, layout: Layout, height: int, width: int) -> torch.Tensor:
    """[N, prefix + h*w, D] tokens (or [N, h, w, C] channels-last maps) -> [N, D, h, w] patch maps."""
    if layout.kind == "nhwc":
        return tokens.permute(0, 3, 1, 2)
    if layout.kind == "conv" or tokens.ndim != 3:
        return tokens
    rows, cols = layout.grid(height, width)
    patches = tokens[:, layout.prefix :]
    if patches.shape[1] != rows * cols:  # a model that pads its input to whole patches
        side = int(round(patches.shape[1] ** 0.5))
        rows, cols = side, patches.shape[1] // side
    return patches.reshape(tokens.shape[0], rows, cols, tokens.shape[-1]).permute(0, 3, 1, 2)


class ToGrid:
    """pytorch-grad-cam's `reshape_transform` for a token model; `size` is set to the input's (height, width) before
    each batch, so the grid follows the input."""

    def __init__(self, layout: Layout, size: tuple[int, int]) -> None:
        self.layout, self.size = layout, size

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return on_grid(tokens, self.layout, *self.size)


def attention_modules(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks' self-attention modules whose weights can be recomputed from their input: timm's `Attention` (ViT,
    DeiT, DINOv2, CLIP, SigLIP): qkv projection, q/k norms and scale, no rotary embedding."""
    found = []
    for name, module in body.named_modules():
        if type(module).__name__ == "Attention" and all(hasattr(module, a) for a in ("qkv", "num_heads", "scale", "q_norm", "k_norm")):
            found.append((name, module))
    return found


def _weights(module: Any, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm Attention for its input x [N, T, D], averaged over heads: [N, T, T]."""
    batch, count, _ = x.shape
    qkv = module.qkv(x).reshape(batch, count, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
    return ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


def class_attention(body: nn.Module, images: torch.Tensor, rollout: bool = False) -> Optional[torch.Tensor]:
    """[N, h, w]: the class token's attention over the patches in the last block (or rolled out over all blocks),
    averaged over heads; None for a model without a class token or without recomputable attention."""
    layout = layout_of(body)
    modules = attention_modules(body)
    if layout.kind != "tokens" or not layout.class_token or not modules:
        return None
    inputs: list[torch.Tensor] = []
    handles = [module.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for _, module in modules]
    try:
        with torch.no_grad():
            body(images)
            maps = [_weights(module, x) for (_, module), x in zip(modules, inputs)]
    finally:
        for handle in handles:
            handle.remove()
    if rollout:
        eye = torch.eye(maps[0].shape[-1], device=maps[0].device)
        joint = eye.expand_as(maps[0])
        for weights in maps:
            mixed = (weights + eye) / 2
            joint = (mixed / mixed.sum(dim=-1, keepdim=True)) @ joint
        chosen = joint
    else:
        chosen = maps[-1]
    rows, cols = layout.grid(images.shape[-2], images.shape[-1])
    return chosen[:, 0, layout.prefix :].reshape(-1, rows, cols).float().cpu()


def principal_components(maps: torch.Tensor, count: int = 3) -> torch.Tensor:
    """[D, h, w] patch maps -> [h, w, count] in [0, 1]: each patch's first principal components (the DINOv2 pictures:
    parts of one object get one colour)."""
    features = maps.flatten(1).T.float()  # [h*w, D]
    centred = features - features.mean(dim=0)
    _, _, vectors = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vectors[:count].T
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    return ((projected - low) / (high - low).clamp_min(1e-8)).reshape(*maps.shape[1:], count)


def token_blocks(body: nn.Module, size: int, count: int) -> list[str]:
    """`count` blocks (or Swin stages) evenly spaced from the first to the last, for per-block feature maps."""
    blocks = [name for name in token_layers(body, size) if BLOCK.match(name)]
    if len(blocks) <= count:
        return blocks
    step = (len(blocks) - 1) / max(count - 1, 1)
    return list(dict.fromkeys(blocks[round(i * step)] for i in range(count)))


def render_components(image: torch.Tensor, maps: torch.Tensor, title: str, path: Path) -> Path:
    """The input beside its patches coloured by their first three principal components, one PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[1].imshow(principal_components(maps).numpy(), interpolation="nearest")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(
        f"{title}: {maps.shape[0]}-d patch tokens on a {maps.shape[1]}x{maps.shape[2]} grid, first 3 principal components as RGB", fontsize=8
    )
    return save_figure(fig, path, dpi=100)


def render_attention(image: torch.Tensor, attention: torch.Tensor, title: str, path: Path) -> Path:
    """The class token's attention over the patches (upsampled to the crop), over the input, one PNG."""
    plt = pyplot()
    size = image.shape[-2:]
    upsampled = torch.nn.functional.interpolate(attention[None, None], size=tuple(size), mode="nearest")[0, 0]
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[1].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[1].imshow(upsampled.numpy(), cmap="inferno", alpha=0.6)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{title} ({attention.shape[0]}x{attention.shape[1]} patches)", fontsize=8)
    return save_figure(fig, path, dpi=100)
