"""Small files a run writes, and the one way transferlab replaces a file: atomically and durably.

`atomic_write` is used for JSON results (write_json, sweep job records), feature-cache shards and checkpoints:
a reader sees the old file or the new one, never half of one, and once it returns the new file survives a
power cut (file and folder fsynced).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Union

import torch

Writer = Callable[[IO[bytes]], Any]

# A folder fsync some filesystems refuse (network mounts, FUSE): the rename is done, only its durability is up to them.
_NO_FOLDER_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM}


def atomic_write(path: Path, data: Union[bytes, Writer]) -> None:
    """Write `data` (bytes, or a callback that writes into the open binary file: torch.save streams a checkpoint that
    way, with no second copy in memory) to a temporary `.<name>.<random>.tmp` beside `path`, fsync it, rename it
    over `path`, then fsync the folder so the rename itself is durable. On any error (a full disk included) the
    temporary file is removed and `path` is left as it was; only a kill can leave a temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. Windows cannot open a folder to fsync it (NTFS journals the rename)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_SYNC:
            raise


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
