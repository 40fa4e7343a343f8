"""Find files that cannot be used (empty, truncated, not an image) once, remember the answer, delete nothing.

Results are cached per file by (size, mtime) in a JSON file under the cache directory, so a second run over
25,000 photos only stats them; a changed or new file is checked again. The same entry keeps the file's sha256
(`sizes_and_digests`): what a run's stored split (data.stored_splits) records to recognise its files later.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from transferlab.core.files import sha256_of
from transferlab.core.progress import progress
from transferlab.data.images import check_image


@dataclass
class ScanReport:
    """Usable files and the skipped ones with their reasons."""

    good: list[Path] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # path -> reason
    checked: int = 0  # files actually decoded this time (the rest came from the cache)


def _cache_file(cache_dir: Path, root: Path) -> Path:
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "integrity" / f"{root.name or 'root'}-{digest}.json"


def _checked(path: Path) -> tuple[str | None, str | None]:
    """(reason it cannot be used or None, sha256 of its bytes or None when unreadable)."""
    return check_image(path), _safe_sha(path)


def _read_cache(cache_path: Path | None) -> dict[str, list]:
    if cache_path and cache_path.is_file():
        try:
            found = json.loads(cache_path.read_text())
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}
    return {}


def _write_cache(cache_path: Path | None, entries: dict[str, list]) -> None:
    if not cache_path:
        return
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_path) + ".lock"):
        merged = {**_read_cache(cache_path), **entries}  # another process's entries stay
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged))
        os.replace(tmp, cache_path)


def sizes_and_digests(files: list[Path], root: Path, cache_dir: str | os.PathLike | None) -> dict[str, tuple[int, str]]:
    """{path: (size, sha256)} of every readable file, from the scan's cache where (size, mtime) still match."""
    cache_path = _cache_file(Path(cache_dir), root) if cache_dir else None
    cached = _read_cache(cache_path)
    found: dict[str, tuple[int, str]] = {}
    todo: list[tuple[Path, tuple[int, int]]] = []
    for path in files:
        try:
            info = path.stat()
        except OSError:
            continue
        entry = cached.get(str(path)) or []
        if entry[:2] == [info.st_size, info.st_mtime_ns] and len(entry) > 3 and entry[3]:
            found[str(path)] = (info.st_size, entry[3])
        else:
            todo.append((path, (info.st_size, info.st_mtime_ns)))
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        digests = list(pool.map(_safe_sha, [path for path, _ in todo]))
    updates = {}
    for (path, stat), digest in zip(todo, digests):
        if digest is None:
            continue
        found[str(path)] = (stat[0], digest)
        entry = cached.get(str(path)) or []
        if entry[:2] == list(stat) and len(entry) > 2:  # a current verdict of the scan: keep the digest beside it
            updates[str(path)] = [*stat, entry[2], digest]
    if updates:
        _write_cache(cache_path, updates)
    return found


def _safe_sha(path: Path) -> str | None:
    try:
        return sha256_of(path)
    except OSError:
        return None


def scan_images(files: list[Path], root: Path, cache_dir: str | os.PathLike | None, workers: int | None = None) -> ScanReport:
    """Check every file (decoding in threads; Pillow releases the GIL), reusing cached verdicts; hash it meanwhile."""
    cache_path = _cache_file(Path(cache_dir), root) if cache_dir else None
    cached = _read_cache(cache_path)

    stats: dict[Path, tuple[int, int] | None] = {}
    for path in files:
        try:
            info = path.stat()
            stats[path] = (info.st_size, info.st_mtime_ns)
        except OSError as exc:
            stats[path] = None
            cached[str(path)] = [-1, -1, f"{type(exc).__name__}: {exc.strerror}"]

    todo = [p for p in files if (st := stats[p]) is not None and cached.get(str(p), [None, None])[:2] != list(st)]
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        for path, (reason, digest) in zip(todo, progress(pool.map(_checked, todo), len(todo), "Checking images")):
            cached[str(path)] = [*(stats[path] or (-1, -1)), reason, digest]

    report = ScanReport(checked=len(todo))
    for path in files:
        reason = cached[str(path)][2]
        if reason is None:
            report.good.append(path)
        else:
            report.bad[str(path)] = reason

    if todo:
        _write_cache(cache_path, {str(p): cached[str(p)] for p in files})
    return report
