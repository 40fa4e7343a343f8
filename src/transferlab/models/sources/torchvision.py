"""torchvision's models by `torchvision.models.get_model` name, with their Weights' transforms and categories."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional

from torch import nn

from transferlab.core.errors import ConfigError
from transferlab.data.preprocessing import Preprocessing
from transferlab.models.backbone import PRETRAINED, Backbone, load_state_dict_file
from transferlab.models.sources.registry import BackboneSource, download_failed, register


class TorchvisionSource(BackboneSource):
    name = "torchvision"
    auto_priority = 0

    @functools.cache  # noqa: B019 - one instance, registered once
    def names(self) -> frozenset[str]:
        import torchvision

        return frozenset(torchvision.models.list_models(module=torchvision.models))

    def build(self, name: str, weights: str, model_args: Mapping[str, Any], input_size: Optional[int]) -> Backbone:
        import torchvision

        default_weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            model = torchvision.models.get_model(name, weights=default_weights if weights in PRETRAINED else None, **model_args)
        except OSError as exc:  # URLError is an OSError
            raise download_failed(name, exc) from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"backbone.model_args: torchvision's {name} does not take {dict(model_args)} ({exc})") from None
        if weights not in (*PRETRAINED, "none"):
            load_state_dict_file(model, weights)
        # The last Linear layer is the ImageNet classifier: cut it out, keep it beside the body.
        parent_name, linear = "", None
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                parent_name, linear = module_name, module
        if linear is None:
            raise ConfigError(f"backbone.name: {name} has no Linear classifier to replace; choose another backbone")
        parent_path, _, attr = parent_name.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, nn.Identity())
        t = default_weights.transforms()
        preprocessing = Preprocessing(
            input_size=int(t.crop_size[0]),
            interpolation=t.interpolation.value,
            crop_pct=float(t.crop_size[0]) / float(t.resize_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
        )
        return Backbone(model, linear.in_features, linear, preprocessing, list(default_weights.meta["categories"]), name, "torchvision")


register(TorchvisionSource())
