"""timm's models by `timm.create_model` name, with their pretrained_cfg preprocessing and ImageNet class names."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from transferlab.data.preprocessing import Preprocessing
from transferlab.models.backbone import Backbone, load_state_dict_file
from transferlab.models.sources.registry import BackboneSource, download_failed, register


def as_backbone(model: Any, name: str) -> Backbone:
    """A timm model (weights loaded) as a Backbone: its classifier kept beside the pooled-feature body."""
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
    categories = None
    if head is not None and getattr(head, "out_features", None) == 1000:
        info = timm.data.ImageNetInfo()
        categories = [info.index_to_description(i) for i in range(1000)]
    # The pooled features' width: `head_hidden_size` where a model has layers between pooling and the classifier
    # (MobileNetV3's conv head: 1024 wide after a 288-channel body), else num_features.
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return Backbone(model, width, head, preprocessing, categories, name, "timm")


class TimmSource(BackboneSource):
    name = "timm"
    auto_priority = 10

    @functools.cache  # noqa: B019 - one instance, registered once
    def names(self) -> frozenset[str]:
        import timm

        return frozenset(timm.list_models())

    def build(self, name: str, weights: str) -> Backbone:
        import timm

        try:
            model = timm.create_model(name, pretrained=weights == "imagenet")
        except (OSError, RuntimeError) as exc:
            if weights == "imagenet":
                raise download_failed(name, exc) from exc
            raise
        if weights not in ("imagenet", "none"):
            load_state_dict_file(model, weights)
        return as_backbone(model, name)


register(TimmSource())
