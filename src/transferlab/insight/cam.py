"""Class activation maps (Grad-CAM, Grad-CAM++, Score-CAM) of any backbone, by pytorch-grad-cam.

The model is an insight.pixels.PixelClassifier (pixels in [0, 1], normalisation inside), so a map lies over
exactly the crop the model saw. The target layer of a convolutional network is picked as feature maps pick
theirs: the module with a spatial (4-d) output that finishes last, i.e. the final convolutional stage (`bn2` of an
EfficientNet, `layer4` of a ResNet, the end of `features` of a VGG). A token model's (ViT, DINOv2, CLIP, Swin) is
its last block's patch tokens (insight.tokens), put back on the patch grid by a `reshape_transform`: the map is
computed on the grid and upsampled to the input crop, so its file has the same shape as a CNN's. A name given
instead is checked before any work is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from transferlab.core.errors import ConfigError, close_matches, require_packages
from transferlab.insight.feature_maps import module_outputs
from transferlab.insight.tokens import ToGrid, default_cam_layer, layout_of, pools_patch_tokens, token_layers

METHODS = ("auto", "gradcam", "gradcam++", "scorecam", "hirescam")


def resolved_method(method: str, body: nn.Module) -> str:
    """`auto`: Grad-CAM on a CNN; HiResCAM on a token model. Grad-CAM weighs each channel by its gradient averaged
    over the positions, which assumes non-negative, local activations (a CNN's, after ReLU). A transformer's tokens
    are signed and layer-normed: measured on tiny ViTs trained on a task with a known answer (tests/evidence.py),
    Grad-CAM's map of one class lands on the evidence and the other class's on everything but the evidence, while
    HiResCAM (gradient x activation per position, Draelos & Carin 2020) puts both on the evidence."""
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}{close_matches(method, METHODS)}")
    if method != "auto":
        return method
    return "hirescam" if layout_of(body).kind != "conv" else "gradcam"


def spatial_layers(body: nn.Module, size: int) -> list[str]:
    """Module names with a spatial output (more than one cell), in the order their forward passes finish; none when
    the body ends in token sequences (a vision transformer: its 4-d patch embedding is no place for a CAM)."""
    outputs = module_outputs(body, size)
    maps_or_tokens = [shape for _, shape in outputs if len(shape) >= 3]
    if not maps_or_tokens or len(maps_or_tokens[-1]) != 4:
        return []
    names = [name for name, shape in outputs if len(shape) == 4 and shape[-1] > 1 and shape[-2] > 1]
    return list(reversed(dict.fromkeys(reversed(names))))  # a module run twice counts where it last finished


def backbone_of(model: nn.Module) -> Any:
    """The Backbone inside a PixelClassifier (a checkpoint's or an ImageNet one)."""
    logits: Any = model.logits
    return logits.classifier.backbone if hasattr(logits, "classifier") else logits.backbone


def body_of(model: nn.Module) -> nn.Module:
    """The backbone body inside a PixelClassifier."""
    body: nn.Module = backbone_of(model).body
    return body


def target_layer(backbone: Any, size: int, name: Optional[str], key: str = "target_layer") -> str:
    """The given layer of the `backbone` (a Backbone, or a bare body), checked, or the default one (the last
    spatial layer; a token model's last patch tokens, insight.tokens); a wrong name fails listing the valid ones."""
    body: nn.Module = getattr(backbone, "body", backbone)
    tokens = layout_of(body).kind != "conv"
    layers = token_layers(body, size) if tokens else spatial_layers(body, size)
    if not layers:
        raise ConfigError(
            f"{key}: {type(body).__name__} has no layer with a spatial output or one token per patch; no class activation map can be drawn"
        )
    if name is None:
        return default_cam_layer(layers, pools_patch_tokens(backbone) if body is not backbone else False) if tokens else layers[-1]
    if name not in layers:
        shown = layers[-8:]
        what = "one token per patch" if tokens else "a spatial output"
        raise ConfigError(
            f"{key}: {name!r} is not a layer with {what} in the backbone{close_matches(name, layers)}; "
            f"valid: {', '.join(shown)}" + (f" (and {len(layers) - len(shown)} earlier ones)" if len(layers) > len(shown) else "")
        )
    return name


def _cam_class(method: str) -> Any:
    require_packages(f"method={method} (class activation maps)", "insight", "pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, ScoreCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM, "hirescam": HiResCAM}[method]


class CamExplainer:
    """`explainer(pixels [N, 3, S, S], targets) -> maps [N, S, S]` float32 in [0, 1] (each map scaled to its max)."""

    def __init__(self, model: nn.Module, body: nn.Module, layer: str, method: str, batch_size: int = 32) -> None:
        """`model`: pixels -> logits (PixelClassifier); `body`: the backbone module that holds `layer`; `method`: one of
        METHODS (`auto` resolved here: `self.method` is what runs)."""
        self.model, self.layer, self.method = model, layer, resolved_method(method, body)
        layout = layout_of(body)
        self.to_grid = ToGrid(layout, (0, 0)) if layout.kind != "conv" else None
        self.cam = _cam_class(self.method)(model=model, target_layers=[dict(body.named_modules())[layer]], reshape_transform=self.to_grid)
        self.cam.batch_size = batch_size  # Score-CAM: masked copies scored per forward pass

    def __call__(self, pixels: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        device = next(self.model.parameters()).device
        inputs = pixels.detach().to(device).float().requires_grad_(True)  # gradients reach the layer when every weight is frozen
        if self.to_grid is not None:
            self.to_grid.size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        with torch.enable_grad():
            maps = self.cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return np.nan_to_num(np.asarray(maps, dtype=np.float32)).clip(0, 1)

    def close(self) -> None:
        """Remove the hooks pytorch-grad-cam put on the model (it is still being trained, in the callback)."""
        self.cam.activations_and_grads.release()


def overlay(pixels: torch.Tensor, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The map (jet colours) over the model's input crop [3, S, S] in [0, 1]: uint8 [S, S, 3]."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = pixels.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float32)
    return show_cam_on_image(image, cam, use_rgb=True, image_weight=image_weight)


def masked(pixels: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """The image with the pixels where `keep` is False replaced by its mean colour (the faithfulness check)."""
    mean = pixels.mean(dim=(1, 2), keepdim=True)
    mask = torch.from_numpy(keep).to(pixels.device)[None]
    return torch.where(mask, pixels, mean)
