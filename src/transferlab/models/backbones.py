"""One factory for every pretrained backbone, over the registry of sources (transferlab.models.sources).

A Backbone maps images to pooled features and carries what its library knows about it: its preprocessing,
its ImageNet classifier (kept, so the network can still name ImageNet classes) and that classifier's category
names. `backbone.source=auto` finds the name in torchvision first, then timm; `backbone.weights=bundled`
selects the source that ships those weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional, cast

from transferlab.core.errors import ConfigError, close_matches
from transferlab.models.backbone import Backbone
from transferlab.models.ensemble import ensemble_backbone
from transferlab.models.pooling import TokenPool, chosen_pool, layout_of, pooled_width
from transferlab.models.sources import SOURCES, BackboneSource, by_name

__all__ = ["Backbone", "create_backbone", "resolve_source"]

log = logging.getLogger(__name__)


def resolve_source(name: str, source: str = "auto", weights: str = "pretrained") -> BackboneSource:
    """The source that builds `name` with `weights`; a mistyped name or source fails here with close matches."""
    chosen = next((s for s in SOURCES.values() if s.selected_by_weights and s.selected_by_weights == weights), None)
    if chosen is not None and name in chosen.names() and source in ("auto", "timm", chosen.name):
        return chosen
    candidates = by_name()
    if source != "auto":
        if source not in SOURCES or SOURCES[source].selected_by_weights:
            names = ["auto", *(s.name for s in candidates)]
            raise ConfigError(f"backbone.source: expected one of {', '.join(names)}, got {source!r}{close_matches(source, names)}")
        candidates = [SOURCES[source]]
    for candidate in candidates:
        if name in candidate.names():
            if chosen is not None:  # a known model, but not one whose weights ship with a package
                raise ConfigError(f"backbone.weights={weights}: only {', '.join(sorted(chosen.names()))} ship offline weights, not {name!r}")
            return candidate
    pool = frozenset().union(*(s.names() for s in candidates))
    where = " or ".join(s.name for s in candidates)
    raise ConfigError(f"backbone.name: unknown backbone {name!r} in {where}{close_matches(name, pool)}")


def create_backbone(
    name: str,
    weights: str = "pretrained",
    source: str = "auto",
    input_size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    members: Optional[Sequence[str]] = None,
    pool: Optional[str] = None,
    model_args: Optional[Mapping[str, Any]] = None,
) -> Backbone:
    """The one factory. `weights`: pretrained (imagenet, the older word) | none | bundled | path to a state_dict of the
    original model; `input_size` / `crop_pct` replace the pretrained preprocessing's; `members` (name=ensemble): the
    backbones whose features are concatenated (models.ensemble), each built with these weights, source and pool;
    `pool`: backbone.pool (models.pooling); `model_args`: keyword arguments of the library's model constructor."""
    if members:
        if name != "ensemble":
            raise ConfigError(f"backbone.members: only backbone.name=ensemble has members, not {name!r}; remove backbone.members")
        parts = [create_backbone(member, weights, source, input_size, crop_pct, pool=pool) for member in members]
        return ensemble_backbone(parts)
    if name == "ensemble":
        raise ConfigError(
            "backbone.members: backbone=ensemble needs a list of backbones, e.g. backbone.members=[tf_efficientnet_lite0,tf_efficientnet_lite2]"
        )
    chosen = resolve_source(name, source, weights)
    backbone = chosen.build(name, weights, dict(model_args or {}), input_size)
    if backbone.tag and "." not in name:  # the library's default weight for the name: recorded by its tag
        backbone.name = f"{name}.{backbone.tag}"
    kind = chosen_pool(name, backbone.body, pool)
    if kind is not None:
        backbone.pool = TokenPool(kind, layout_of(backbone.body).prefix)
        backbone.num_features = pooled_width(int(cast(Any, backbone.body).num_features), kind)
    backbone.preprocessing = backbone.preprocessing.resized(input_size)
    if crop_pct is not None:
        backbone.preprocessing = dataclasses.replace(backbone.preprocessing, crop_pct=float(crop_pct))
    log.info(
        "Backbone %s (%s, weights=%s%s): %d features (pool %s), input %d px",
        backbone.name,
        chosen.name,
        weights,
        f", tag {backbone.tag}" if backbone.tag else "",
        backbone.num_features,
        kind or f"{pool or 'auto'}: the model's own",
        backbone.preprocessing.input_size,
    )
    return backbone
