"""timm's models by `timm.create_model` name (a weight tag included: `vit_small_patch14_dinov2.lvd142m`), with their
pretrained_cfg preprocessing (mean and std differ by weight: CLIP's, SigLIP's 0.5, ImageNet's) and the class names
of whatever classifier the weight came with (ImageNet-1k, ImageNet-21k, ...)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional

from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.data.preprocessing import Preprocessing
from transferlab.models.backbone import PRETRAINED, Backbone, load_state_dict_file
from transferlab.models.sources.registry import BackboneSource, download_failed, register


def head_categories(model: Any, head: Optional[nn.Module]) -> Optional[list[str]]:
    """The names of the classifier's classes, where timm knows the label set the weight was trained on."""
    import timm.data

    outputs = getattr(head, "out_features", None)
    if head is None or outputs is None:
        return None
    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        return None
    info = timm.data.ImageNetInfo(subset)
    if info.num_classes() != outputs:
        return None
    return [info.index_to_description(i) for i in range(outputs)]


def as_backbone(model: Any, name: str, pretrained: bool = False) -> Backbone:
    """A timm model (weights loaded) as a Backbone: its classifier kept beside the pooled-feature body; `pretrained`:
    the weights are timm's own download, whose tag the Backbone then records."""
    import timm

    head = model.get_classifier()
    head = head if isinstance(head, nn.Module) and not isinstance(head, nn.Identity) else None
    model.reset_classifier(0)  # forward() now returns pooled pre-logit features
    cfg = timm.data.resolve_data_config({}, model=model)
    preprocessing = Preprocessing(
        input_size=int(cfg["input_size"][-1]),
        interpolation=cfg["interpolation"],
        crop_pct=float(cfg["crop_pct"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    # The pooled features' width: `head_hidden_size` where a model has layers between pooling and the classifier
    # (MobileNetV3's conv head: 1024 wide after a 288-channel body), else num_features.
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag") or None if pretrained else None
    return Backbone(model, width, head, preprocessing, head_categories(model, head), name, "timm", tag=tag)


def size_arguments(name: str, model_args: Mapping[str, Any], input_size: Optional[int]) -> dict[str, Any]:
    """`img_size` for a model built at another size than its weight's (a DINOv2 ViT, made at 518 px, probed at 224):
    timm then resamples the position embedding when it loads the weights. Models without `img_size` ignore it."""
    import timm

    if input_size is None or "img_size" in model_args:
        return {}
    cfg = timm.models.get_pretrained_cfg(name)
    native = getattr(cfg, "input_size", None) if cfg is not None else None
    return {} if native is not None and int(native[-1]) == input_size else {"img_size": input_size}


class TimmSource(BackboneSource):
    name = "timm"
    auto_priority = 10

    @functools.cache  # noqa: B019 - one instance, registered once
    def names(self) -> frozenset[str]:
        import timm

        return frozenset(timm.list_models(pretrained=True)) | frozenset(timm.list_models())

    def build(self, name: str, weights: str, model_args: Mapping[str, Any], input_size: Optional[int]) -> Backbone:
        import timm

        pretrained = weights in PRETRAINED
        sized = size_arguments(name, model_args, input_size)
        try:
            try:
                model = timm.create_model(name, pretrained=pretrained, **{**sized, **model_args})
            except TypeError:
                if not sized:
                    raise
                model = timm.create_model(name, pretrained=pretrained, **model_args)  # a model whose size is not an argument
        except TypeError as exc:
            raise ConfigError(f"backbone.model_args: timm's {name} does not take {dict(model_args)} ({exc})") from None
        except (OSError, RuntimeError) as exc:
            if pretrained:
                raise download_failed(name, exc) from exc
            raise
        if not pretrained and weights != "none":
            load_state_dict_file(model, weights)
        return as_backbone(model, name, pretrained)


register(TimmSource())
