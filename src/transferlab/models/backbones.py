"""One factory for every pretrained backbone: torchvision `get_model` names and timm `create_model` names.

A Backbone maps images to pooled features and carries what timm/torchvision know about it: its
preprocessing, its ImageNet classifier (kept, so the network can still name ImageNet classes) and the
category names of that classifier.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from transferlab.data.preprocessing import Preprocessing
from transferlab.errors import ConfigError, close_matches
from transferlab.models.bundled import BUNDLED, load_bundled

log = logging.getLogger(__name__)

SOURCES = ("auto", "torchvision", "timm")


class Backbone(nn.Module):
    """`forward(images) -> features [N, num_features]`; `imagenet_head(features) -> ImageNet logits`."""

    def __init__(self, body: nn.Module, num_features: int, imagenet_head: Optional[nn.Module],
                 preprocessing: Preprocessing, categories: Optional[list[str]], name: str, source: str) -> None:
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


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def resolve_source(name: str, source: str = "auto") -> str:
    """Which library provides `name`; a mistyped name fails here with close matches."""
    if source not in SOURCES:
        raise ConfigError(f"backbone.source: expected one of {', '.join(SOURCES)}, got {source!r}")
    if source in ("auto", "torchvision") and name in _torchvision_names():
        return "torchvision"
    if source in ("auto", "timm") and name in _timm_names():
        return "timm"
    pool = _torchvision_names() | _timm_names() if source == "auto" else (_torchvision_names() if source == "torchvision" else _timm_names())
    where = "torchvision or timm" if source == "auto" else source
    raise ConfigError(f"backbone.name: unknown backbone {name!r} in {where}{close_matches(name, pool)}")


def _download_failed(name: str, exc: Exception) -> ConfigError:
    offline = ", ".join(BUNDLED)
    return ConfigError(
        f"backbone.weights=imagenet: could not download the pretrained weights of {name} ({type(exc).__name__}: {exc}); "
        f"use backbone.weights=none, a local state_dict path, or an offline backbone ({offline} with weights=bundled)"
    )


def _load_state_dict_file(model: nn.Module, path: str) -> None:
    from transferlab.checkpointing import read_checkpoint

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


def _build_torchvision(name: str, weights: str) -> Backbone:
    import torchvision

    default_weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=default_weights if weights == "imagenet" else None)
    except OSError as exc:  # URLError is an OSError
        raise _download_failed(name, exc) from exc
    if weights not in ("imagenet", "none"):
        _load_state_dict_file(model, weights)
    # The last Linear layer is the ImageNet classifier: cut it out, keep it beside the body.
    parent_name, linear = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parent_name, linear = module_name, module
    if linear is None:
        raise ConfigError(f"backbone.name: {name} has no Linear classifier to replace; choose another backbone")
    parent_path, _, attr = parent_name.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, nn.Identity())
    t = default_weights.transforms()
    preprocessing = Preprocessing(
        input_size=int(t.crop_size[0]), interpolation=t.interpolation.value, crop_pct=float(t.crop_size[0]) / float(t.resize_size[0]),
        mean=tuple(t.mean), std=tuple(t.std),
    )
    return Backbone(model, linear.in_features, linear, preprocessing, list(default_weights.meta["categories"]), name, "torchvision")


def _build_timm(name: str, weights: str) -> Backbone:
    import timm

    try:
        model = timm.create_model(name, pretrained=weights == "imagenet")
    except (OSError, RuntimeError) as exc:
        if weights == "imagenet":
            raise _download_failed(name, exc) from exc
        raise
    if weights == "bundled":
        load_bundled(name, model)
    elif weights not in ("imagenet", "none"):
        _load_state_dict_file(model, weights)
    head = model.get_classifier()
    head = head if isinstance(head, nn.Module) and not isinstance(head, nn.Identity) else None
    model.reset_classifier(0)  # forward() now returns pooled pre-logit features
    cfg = timm.data.resolve_data_config({}, model=model)
    preprocessing = Preprocessing(
        input_size=int(cfg["input_size"][-1]), interpolation=cfg["interpolation"], crop_pct=float(cfg["crop_pct"]),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
    )
    categories = None
    if head is not None and getattr(head, "out_features", None) == 1000:
        info = timm.data.ImageNetInfo()
        categories = [info.index_to_description(i) for i in range(1000)]
    return Backbone(model, model.num_features, head, preprocessing, categories, name, "timm")


def create_backbone(name: str, weights: str = "imagenet", source: str = "auto", input_size: Optional[int] = None) -> Backbone:
    """The one factory. `weights`: imagenet | none | bundled | path to a state_dict of the original model."""
    resolved = resolve_source(name, source)
    if weights == "bundled" and (resolved != "timm" or name not in BUNDLED):
        raise ConfigError(f"backbone.weights=bundled: only {', '.join(BUNDLED)} ship offline weights, not {name!r}")
    backbone = (_build_torchvision if resolved == "torchvision" else _build_timm)(name, weights)
    backbone.preprocessing = backbone.preprocessing.resized(input_size)
    log.info("Backbone %s (%s, weights=%s): %d features, input %d px", name, resolved, weights, backbone.num_features, backbone.preprocessing.input_size)
    return backbone
