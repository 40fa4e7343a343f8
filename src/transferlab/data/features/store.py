"""Where cached features live: shards that check themselves, and a lock so concurrent runs fill a store once.

On disk a store is a folder `<cache_dir>/features/<fingerprint>/` of shards: `<name>.npy` (float32, [N, D] or
[N, views, D], read memory-mapped) and `<name>.keys.json` ({"keys": image keys, "rows", "sha256" of the .npy
file's bytes}), each written through core.files.atomic_write (temporary file, fsync, rename, folder fsync), the key file
last: a shard exists only once both are complete, so a process killed at any moment leaves no half shard behind. Opening a shard re-hashes it; one
whose bytes changed is set aside (`*.corrupt`, one warning) and its rows are computed again. Rows holding NaN or
inf are never stored nor used. Fillers take `fill.lock` (an OS file lock, released by the kernel when its holder
dies): a second run on a cold store waits and then reuses what the first one computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from filelock import FileLock, Timeout

from transferlab.core.files import atomic_write

log = logging.getLogger(__name__)

__all__ = ["FeatureStore", "file_sha256", "finite_rows"]

STALE_TEMP_SECONDS = 3600  # a writer holds a temporary file for the seconds one shard takes to write
CHUNK_ROWS = 4096


class FeatureStore:
    """Rows of features by image key, in memory (root=None) or in memory-mapped shards under root/key."""

    def __init__(self, root: Optional[Path], key: str, description: Optional[dict[str, Any]] = None) -> None:
        self.key = key
        self.folder = Path(root) / key if root is not None else None
        self._shards: list[np.ndarray] = []
        self._index: dict[str, tuple[int, int]] = {}
        self._seen: set[str] = set()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            info = self.folder / "fingerprint.json"
            if description is not None and not info.exists():
                atomic_write(info, json.dumps(description, indent=2, sort_keys=True, default=str).encode())
            _remove_stale_temporaries(self.folder)
            self.refresh()

    def __len__(self) -> int:
        return len(self._index)

    def refresh(self) -> None:
        """Pick up shards written since (by another rank or another run), each verified before use."""
        if self.folder is None:
            return
        for keys_file in sorted(self.folder.glob("*.keys.json")):
            if keys_file.name not in self._seen:
                self._seen.add(keys_file.name)
                self._open_shard(keys_file)

    def _open_shard(self, keys_file: Path) -> None:
        array_file = keys_file.with_name(keys_file.name[: -len(".keys.json")] + ".npy")
        try:
            meta = json.loads(keys_file.read_text())
            keys, expected = list(meta["keys"]), str(meta["sha256"])
            actual = file_sha256(array_file)
            array = np.load(array_file, mmap_mode="r") if actual == expected else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Feature cache: ignoring unreadable shard %s (%s); its images are computed again", array_file, exc)
            return
        if array is None or len(array) != len(keys):
            why = "its bytes changed since it was written (checksum mismatch)" if array is None else f"{len(keys)} keys, {len(array)} rows"
            log.warning("Feature cache: discarding shard %s: %s; its %d image(s) are computed again", array_file, why, len(keys))
            _set_aside(keys_file, array_file)
            return
        finite = finite_rows(array)
        if not finite.all():
            log.warning("Feature cache: %d row(s) of shard %s hold NaN or inf; they are not used and are computed again", (~finite).sum(), array_file)
        self._add_shard([k for k, ok in zip(keys, finite) if ok], array, np.flatnonzero(finite))

    def _add_shard(self, keys: Sequence[str], array: np.ndarray, rows: Optional[Iterable[int]] = None) -> None:
        shard = len(self._shards)
        self._shards.append(array)
        for key, row in zip(keys, range(len(keys)) if rows is None else rows):
            self._index[key] = (shard, int(row))

    def missing(self, keys: Iterable[str]) -> list[str]:
        """`keys` without a usable row here, each once, in their first order."""
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def add(self, keys: Sequence[str], features: np.ndarray, name: str) -> int:
        """Store the finite rows for `keys` (on disk: one new shard called `name`); returns how many were not finite."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        finite = finite_rows(features)
        if not finite.all():
            keys, features = [k for k, ok in zip(keys, finite) if ok], features[finite]
        if self.folder is None:
            self._add_shard(keys, features)
        elif len(keys):
            buffer = io.BytesIO()
            np.save(buffer, features)
            data = buffer.getvalue()
            atomic_write(self.folder / f"{name}.npy", data)
            meta = {"keys": list(keys), "rows": len(keys), "sha256": hashlib.sha256(data).hexdigest()}
            atomic_write(self.folder / f"{name}.keys.json", json.dumps(meta).encode())
            self.refresh()
        return int((~finite).sum())

    def rows(self, keys: Sequence[str]) -> list[tuple[np.ndarray, int]]:
        return [(self._shards[self._index[k][0]], self._index[k][1]) for k in keys]

    def stack(self, keys: Sequence[str]) -> np.ndarray:
        return np.stack([array[row] for array, row in self.rows(keys)]) if keys else np.zeros((0,), dtype=np.float32)

    @contextlib.contextmanager
    def filling(self, take_lock: bool = True) -> Iterator[None]:
        """Hold the store's fill lock (disk stores; `take_lock=False`: a DDP rank whose rank 0 holds it for the run)."""
        if self.folder is None or not take_lock:
            yield
            return
        lock = FileLock(str(self.folder / "fill.lock"))
        try:
            lock.acquire(timeout=1)
        except Timeout:
            log.info("Feature cache: another process is filling %s; waiting for it, then reusing what it computed", self.folder)
            started = time.perf_counter()
            lock.acquire()
            log.info("Feature cache: waited %.1f s for %s", time.perf_counter() - started, self.folder)
        try:
            self.refresh()
            yield
        finally:
            lock.release()


def finite_rows(array: np.ndarray) -> np.ndarray:
    """Boolean [N]: rows without NaN / inf, checked a chunk at a time (a memory map is never read whole)."""
    if not len(array):
        return np.zeros(0, dtype=bool)
    axes = tuple(range(1, array.ndim))
    return np.concatenate([np.isfinite(array[i : i + CHUNK_ROWS]).all(axis=axes) for i in range(0, len(array), CHUNK_ROWS)])


def file_sha256(path: Path) -> str:
    """sha256 of a file read a MiB at a time: what a shard's key file records and what opening it re-checks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set_aside(*files: Path) -> None:
    """Rename a bad shard's files to `*.corrupt`: out of use, kept for a look, warned about once."""
    for path in files:
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writers that were killed mid-write (live writers' files are seconds old)."""
    now = time.time()
    for temp in folder.glob("*.tmp"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                temp.unlink()
