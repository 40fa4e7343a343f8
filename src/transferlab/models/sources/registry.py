"""The registry of backbone sources: where a `backbone.name` can come from (torchvision, timm, bundled, ...).

A new source is one file in this folder with a `BackboneSource` subclass and a `register(...)` call, plus its
import in `__init__.py`; `transferlab.models.backbones.create_backbone` then finds it by name or weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from transferlab.core.errors import ConfigError
from transferlab.models.backbone import Backbone


class BackboneSource:
    """Builds Backbones by model name. `selected_by_weights`: a source picked by `backbone.weights=<that value>`
    (offline weights that ship in a package) rather than by the model name."""

    name: str = ""
    selected_by_weights: Optional[str] = None
    auto_priority: int = 100  # `backbone.source=auto` tries sources by this, lowest first

    def names(self) -> frozenset[str]:
        """The model names this source can build."""
        raise NotImplementedError

    def build(self, name: str, weights: str, model_args: Mapping[str, Any], input_size: Optional[int]) -> Backbone:
        """`weights`: pretrained (imagenet) | none | a state_dict file (| this source's `selected_by_weights` value);
        `model_args`: the library's own keyword arguments for the model (backbone.model_args); `input_size`: the size
        the model will see, for models whose architecture depends on it (a vision transformer's position embedding)."""
        raise NotImplementedError


SOURCES: dict[str, BackboneSource] = {}


def register(source: BackboneSource) -> BackboneSource:
    SOURCES[source.name] = source
    return source


def by_name() -> list[BackboneSource]:
    """The sources `backbone.source=auto` tries for a model name, in order."""
    return sorted((s for s in SOURCES.values() if s.selected_by_weights is None), key=lambda s: s.auto_priority)


def download_failed(name: str, exc: Exception) -> ConfigError:
    """The line for pretrained weights that could not be downloaded (no network, no hub access), with offline choices."""
    offline = ", ".join(sorted(n for s in SOURCES.values() if s.selected_by_weights for n in s.names()))
    return ConfigError(
        f"backbone.weights=pretrained: could not download the pretrained weights of {name} ({type(exc).__name__}: {exc}); "
        f"use backbone.weights=none, a local state_dict path, or an offline backbone ({offline} with weights=bundled)"
    )
