"""What makes cached features differ, and how an image is recognised: the fingerprint of a store and image keys.

A store holds the features of one *fingerprint*: backbone name, a hash of its weights, the transform that made
its inputs (eval transform, or the augmentation pipeline + number of views + seed), the precision, and the
installed versions of torch, torchvision, timm and Pillow (a new release can change a kernel, a resize or a
decoder, hence the features). Any change of those gives another fingerprint, hence another store. Inside a store
rows are found by image key (resolved path, size, modification time), so a changed or added file is computed
again and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["FORMAT_VERSION", "LIBRARIES", "Inputs", "describe", "fingerprint", "image_key", "library_versions", "weights_digest"]

FORMAT_VERSION = 3  # 2: shards carry a checksum of their bytes; 3: large non-JPEG images box-reduced while decoding
LIBRARIES = ("torch", "torchvision", "timm", "Pillow")  # what computes the features: model code, transforms, decoding


@dataclass(frozen=True)
class Inputs:
    """How an image file becomes the backbone's input: the transform, the size it is decoded at, and `views`
    augmented copies of it (0: the eval transform once), the k-th drawn with a seed made from `seed`, key and k."""

    transform: Callable[[Any], torch.Tensor]
    decode_size: int
    views: int = 0
    seed: Optional[int] = None


def image_key(path: str | os.PathLike) -> str:
    """Identity of an image file as the integrity scan sees it: path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}"


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes): changes when any weight does."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def library_versions() -> dict[str, Optional[str]]:
    """The installed version of each library in LIBRARIES (None where one is not installed)."""
    versions: dict[str, Optional[str]] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(**parts: Any) -> str:
    """24 hex digits of sha256 over the store format and `parts` (describe's dict): the store's folder name."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def describe(backbone: Any, inputs: Inputs, precision: str, digest: str, versions: Optional[Mapping[str, Optional[str]]] = None) -> dict[str, Any]:
    """What makes features differ (the fingerprint's parts): the same for a training run and an audit of one data set.

    `backbone`: anything with `name` and `source` (models.backbone.Backbone); `digest`: weights_digest of its body;
    `versions`: library_versions() unless given (a test varies them without touching an installed library)."""
    pool = getattr(getattr(backbone, "pool", None), "kind", None)  # backbone.pool over tokens; absent: the model's own
    return {
        "backbone": backbone.name,
        "source": backbone.source,
        **({"pool": pool} if pool else {}),
        "weights_sha256": digest,
        "transform": repr(inputs.transform),
        "decode_size": inputs.decode_size,
        "precision": precision,
        "views": inputs.views,
        "seed": inputs.seed if inputs.views else None,
        "versions": dict(library_versions() if versions is None else versions),
    }
