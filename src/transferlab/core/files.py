"""Small files a run writes: JSON results, replaced atomically so that a reader never sees half of one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path` (readers see the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as fh:
        fh.write(data)
    os.replace(fh.name, path)


def to_float_dict(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """Metrics (tensors or numbers) as JSON-ready floats; NaN and inf become None (JSON has neither)."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
        out[key] = number if math.isfinite(number) else None
    return out


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    atomic_write(path, (json.dumps(values, indent=2, sort_keys=True) + "\n").encode())


def file_digests(path: Path, *algorithms: str, chunk: int = 1 << 20) -> dict[str, str]:
    """Hex digests of a file for each hashlib algorithm, in one read (a dataset archive can be gigabytes)."""
    digests = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def sha256_of(path: Path) -> str:
    return file_digests(path, "sha256")["sha256"]
