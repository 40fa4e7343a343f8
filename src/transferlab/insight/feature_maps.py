"""Feature maps: which layers to look at, their activations for a few images, and pictures of them.

Layers are picked by output stride (4, 8, 16, 32 px per cell), which works for every CNN family without a
table of names: per stride, the outermost module that produces it, last in execution order — `layer1..4` on
a ResNet, `blocks.N` and the final `bn2` on an EfficientNet, the end of `features` on a VGG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from transferlab.core.errors import ConfigError, close_matches
from transferlab.core.plotting import pyplot, save_figure

DEFAULT_STRIDES = (4, 8, 16, 32)


def module_outputs(body: nn.Module, size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) of every module with a tensor output, in the order their forward passes finish."""
    found: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in body.named_modules():
        if not name or isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):  # a pooled map is not a feature map
            continue

        def hook(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor):
                found.append((name, tuple(out.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        was_training = body.training
        body.eval()
        with torch.no_grad():
            body(torch.zeros(1, 3, size, size, device=next(body.parameters()).device))
        body.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return found


def spatial_outputs(body: nn.Module, size: int) -> list[tuple[str, int, int]]:
    """(module name, stride, channels) for every module whose output is a 4-d map, in completion order."""
    return [(name, max(1, round(size / shape[-1])), int(shape[1])) for name, shape in module_outputs(body, size) if len(shape) == 4 and shape[-1] > 0]


def pick_layers(body: nn.Module, size: int, strides: Sequence[int] = DEFAULT_STRIDES) -> list[str]:
    """Per stride, the outermost (fewest dots) module with that output stride that finishes last."""
    outputs = spatial_outputs(body, size)
    chosen = []
    for stride in strides:
        candidates = [(name.count("."), -order, name) for order, (name, s, _) in enumerate(outputs) if s == stride]
        if candidates:
            chosen.append(min(candidates)[2])
    if not chosen:
        raise ConfigError(f"feature maps: {type(body).__name__} has no layer with a spatial output; set callbacks.feature_maps.layers")
    return chosen


def check_layers(body: nn.Module, layers: Sequence[str], key: str) -> None:
    """Unknown names fail with close matches and the top-level modules to start from."""
    names = dict(body.named_modules())
    for layer in layers:
        if layer not in names:
            top = [n for n in names if n and "." not in n]
            nested = next((n for n in names if "." in n), "")
            raise ConfigError(
                f"{key}: no layer {layer!r} in the backbone{close_matches(layer, names)}; "
                f"top-level modules: {', '.join(top)}" + (f" (nested names use dots, e.g. {nested})" if nested else "")
            )


def capture(body: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """{layer: activations [N, C, h, w]} for normalised images, without gradients."""
    modules = dict(body.named_modules())
    acts: dict[str, torch.Tensor] = {}
    handles = [
        modules[layer].register_forward_hook(lambda _m, _i, out, layer=layer: acts.__setitem__(layer, out.detach().float().cpu())) for layer in layers
    ]
    try:
        with torch.no_grad():
            body(images)
    finally:
        for h in handles:
            h.remove()
    return acts


def render_channels(image: torch.Tensor, acts: torch.Tensor, title: str, path: Path, channels: int = 16) -> Path:
    """The input beside the `channels` most active maps of one layer (by mean activation), one PNG."""
    plt = pyplot()
    top = acts.mean(dim=(1, 2)).topk(min(channels, acts.shape[0])).indices.tolist()
    cols = math.ceil(math.sqrt(len(top)))
    rows = math.ceil(len(top) / cols)
    fig, axes = plt.subplots(rows, cols + rows, figsize=(1.6 * (cols + rows), 1.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    big = fig.add_subplot(1, cols + rows, (1, rows), frame_on=False)  # input spans the first `rows` columns
    big.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    big.set_xticks([])
    big.set_yticks([])
    for j, channel in enumerate(top):
        ax = axes[j // cols, rows + j % cols]
        ax.imshow(acts[channel].numpy(), cmap="viridis")
        ax.set_title(f"ch {channel}", fontsize=7)
    fig.suptitle(f"{title}: {acts.shape[0]} channels, {acts.shape[1]}x{acts.shape[2]}, top {len(top)} by mean activation", fontsize=8)
    return save_figure(fig, path, dpi=100)


def render_lesson_view(acts: torch.Tensor, title: str, path: Path) -> Path:
    """The lesson's picture of the last conv block: the [C, h, w] tensor shown as a (h*w) x C matrix."""
    plt = pyplot()
    matrix = acts.reshape(-1, acts.shape[0]).numpy()
    fig, ax = plt.subplots(figsize=(15, 3))
    ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_title(f"{title}: output {list(acts.shape)} viewed as {matrix.shape[0]}x{matrix.shape[1]} (as in the lesson)", fontsize=9)
    return save_figure(fig, path, dpi=80)
