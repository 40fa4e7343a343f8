"""Models that take pixels in [0, 1] (normalisation inside), 8-bit image files, targets by name or index.

Attacks and visualisations optimise and clip in pixel space; a result only counts once it has been saved as an
8-bit PNG and measured again from that file, because that is the picture a person shares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from transferlab.core.errors import ConfigError, DataError, close_matches
from transferlab.data.images import load_rgb
from transferlab.data.preprocessing import Preprocessing

if TYPE_CHECKING:
    from transferlab.models.backbone import Backbone
    from transferlab.models.classifier import TransferClassifier

_PIL_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


class PixelClassifier(nn.Module):
    """`forward(pixels in [0, 1]) -> logits` for one classifier: a backbone's ImageNet head or a trained head.

    `class_names` are display names; `aliases[i]` every name class i answers to (ImageNet synonyms). A multi-label
    head (`multilabel`) answers with a sigmoid per label: its probabilities are the calibrated ones (each label's
    logit over its own `temperature`), since its `thresholds` (label -> cut, the run's decisions) apply to those;
    a single-label head keeps the softmax of its raw logits (the temperature never changes which class wins).
    """

    logits: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    temperature: torch.Tensor

    def __init__(
        self,
        logits: nn.Module,
        preprocessing: Preprocessing,
        class_names: Sequence[str],
        aliases: Optional[Sequence[Sequence[str]]] = None,
        name: str = "",
        multilabel: bool = False,
        temperature: Optional[torch.Tensor] = None,
        thresholds: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.logits = logits
        self.preprocessing = preprocessing
        self.class_names = list(class_names)
        self.aliases = [list(a) for a in aliases] if aliases is not None else [[n] for n in self.class_names]
        self.name = name
        self.multilabel = multilabel
        self.thresholds = [float(t) for t in thresholds] if thresholds is not None else [0.5] * len(self.class_names)
        device = next(logits.parameters()).device
        self.register_buffer("mean", torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1), persistent=False)
        scale = torch.ones(()) if temperature is None else temperature.detach().float().clone()
        self.register_buffer("temperature", scale.to(device), persistent=False)

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.logits((pixels - self.mean) / self.std).float()

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self(pixels.to(self.mean.device))
            return (logits / self.temperature).sigmoid() if self.multilabel else logits.softmax(dim=-1)

    def predicted(self, probs: torch.Tensor) -> list[int]:
        """A multi-label head's labels for one image's probabilities [K]: each at or over its threshold."""
        return [k for k, (p, cut) in enumerate(zip(probs.tolist(), self.thresholds)) if p >= cut]

    def resolve_target(self, target: str | int, key: str = "target") -> int:
        """A class index from an index, a class name or (ImageNet) any synonym, case-insensitively."""
        text = str(target).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < len(self.class_names):
                raise ConfigError(f"{key}: class index {index} is out of range 0..{len(self.class_names) - 1} for {self.name}")
            return index
        wanted = text.lower()
        for index, names in enumerate(self.aliases):
            if wanted in (n.lower() for n in names):
                return index
        pool = [n for names in self.aliases for n in names]
        raise ConfigError(
            f"{key}: {text!r} is not a class of {self.name}{close_matches(text, pool)}; give a class name or an index 0..{len(self.class_names) - 1}"
        )

    def top(self, pixels: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        """[(name, prob)] for one image [3, H, W] or [1, 3, H, W]."""
        probs = self.probabilities(pixels if pixels.dim() == 4 else pixels[None])[0]
        values, indices = probs.topk(min(k, probs.numel()))
        return [(self.class_names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


class _ImagenetLogits(nn.Module):
    backbone: Backbone

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.imagenet_logits(images)


class _TrainedLogits(nn.Module):
    """head(backbone(x)) with gradients flowing to the input even when the backbone is frozen."""

    classifier: TransferClassifier

    def __init__(self, classifier: TransferClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.head(self.classifier.backbone(images))


@contextlib.contextmanager
def inspecting(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients while a callback looks inside a model that is being trained."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    module.requires_grad_(False).eval()
    try:
        yield module
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        module.train(was_training)


def imagenet_classifier(backbone: Backbone) -> PixelClassifier:
    """The pretrained backbone with its own ImageNet classifier."""
    if backbone.imagenet_head is None or not backbone.categories:
        raise ConfigError(f"backbone.name: {backbone.name} has no ImageNet classifier with class names; use ckpt_path= or another backbone")
    aliases = [[n.strip() for n in c.split(",")] for c in backbone.categories]
    return PixelClassifier(_ImagenetLogits(backbone), backbone.preprocessing, [a[0] for a in aliases], aliases, backbone.name)


def trained_classifier(classifier: TransferClassifier) -> PixelClassifier:
    """A trained transferlab classifier (TransferClassifier) with its own class names (multi-label: its per-label
    temperatures and thresholds, 0.5 for a label without one, e.g. while it is still being trained)."""
    multilabel = bool(classifier.task.multilabel)
    return PixelClassifier(
        _TrainedLogits(classifier),
        classifier.backbone.preprocessing,
        classifier.class_names,
        name=f"{classifier.backbone.name} checkpoint",
        multilabel=multilabel,
        temperature=classifier.temperature if multilabel else None,
        thresholds=[classifier.thresholds.get(name, 0.5) for name in classifier.class_names] if multilabel else None,
    )


def build_pixel_classifier(backbone_cfg: Optional[dict], ckpt_path: Optional[str]) -> PixelClassifier:
    """A checkpoint when `ckpt_path` is given, else the ImageNet head of the configured backbone."""
    if ckpt_path:
        from transferlab.models.classifier import load_checkpoint

        return trained_classifier(load_checkpoint(ckpt_path)[0]).requires_grad_(False).eval()
    from transferlab.models.backbones import create_backbone

    return imagenet_classifier(create_backbone(**(backbone_cfg or {}))).requires_grad_(False).eval()


def second_opinion(name: str) -> PixelClassifier:
    """A second ImageNet model by name, for held-out / transfer checks: bundled weights when it ships them."""
    from transferlab.models.backbones import create_backbone
    from transferlab.models.sources.bundled import BUNDLED

    return imagenet_classifier(create_backbone(name, weights="bundled" if name in BUNDLED else "imagenet")).requires_grad_(False).eval()


def ranked(model: PixelClassifier, pixels: torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
    return [{"name": name, "prob": round(prob, 6)} for name, prob in model.top(pixels, k)]


def resized_for(model: PixelClassifier, pixels: torch.Tensor) -> torch.Tensor:
    """[1, 3, S, S] at another model's input size (bicubic, antialiased), still in [0, 1]."""
    if pixels.shape[-1] == model.input_size:
        return pixels[None]
    return torch.nn.functional.interpolate(pixels[None], size=model.input_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def opinion_of(other: PixelClassifier, target_name: str, pixels: torch.Tensor, key: str) -> dict[str, Any]:
    """What a second model says about an image (at its own input size), and its probability for `target_name`."""
    index = other.resolve_target(target_name, key)
    image = resized_for(other, pixels.to(other.mean.device))
    return {"name": other.name, "target_prob": float(other.probabilities(image)[0, index]), "top5": ranked(other, image[0])}


# -- 8-bit images ------------------------------------------------------------------------------------------
def load_pixels(path: str | Path, preprocessing: Preprocessing, crop: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[3, S, S] in [0, 1] on the 8-bit grid: the eval geometry, or `crop` (left, top, right, bottom) then resize."""
    file = Path(path).expanduser()
    try:
        image = load_rgb(file)
    except FileNotFoundError:
        raise DataError(f"input: {file} does not exist") from None
    except Exception as exc:
        raise DataError(f"input: {file} is not a readable image ({type(exc).__name__}: {exc})") from exc
    size = preprocessing.input_size
    resample = _PIL_RESAMPLE.get(preprocessing.interpolation, Image.Resampling.BILINEAR)
    if crop is not None:
        box = [int(v) for v in crop]
        w, h = image.size
        if len(box) != 4 or not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
            raise ConfigError(f"crop: {list(crop)} must be [left, top, right, bottom] inside the {w}x{h} image {file.name}")
        image = image.crop((box[0], box[1], box[2], box[3]))
        short = size
    else:
        short = int(size / preprocessing.crop_pct)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return to_pixels(image)


def to_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def quantize(pixels: torch.Tensor) -> torch.Tensor:
    """The values an 8-bit file will hold."""
    return (pixels.detach().clamp(0, 1) * 255).round() / 255


def save_png(pixels: torch.Tensor, path: Path) -> torch.Tensor:
    """Save [3, H, W] as an 8-bit PNG, read it back, check it is what was meant, return what was read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (quantize(pixels).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    with Image.open(path) as img:
        reread = to_pixels(img)
    if not torch.equal(reread, quantize(pixels).cpu()):
        raise DataError(f"{path}: the saved PNG does not hold the image that was written")
    return reread


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """mean|dx| + mean|dy| over pixels in [0, 1] (the measure the lesson's pictures are compared by)."""
    return (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean() + (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean()
