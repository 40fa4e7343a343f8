"""Find files that cannot be used (empty, truncated, not an image) once, remember the answer, delete nothing.

Results are cached per file by (size, mtime) in a JSON file under the cache directory, so a second run over
25,000 photos only stats them; a changed or new file is checked again.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

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


def scan_images(files: list[Path], root: Path, cache_dir: str | os.PathLike | None, workers: int | None = None) -> ScanReport:
    """Check every file (decoding in threads; Pillow releases the GIL), reusing cached verdicts."""
    cache_path = _cache_file(Path(cache_dir), root) if cache_dir else None
    cached: dict[str, list] = {}
    if cache_path and cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cached = {}

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
        for path, reason in zip(todo, progress(pool.map(check_image, todo), len(todo), "Checking images")):
            cached[str(path)] = [*(stats[path] or (-1, -1)), reason]

    report = ScanReport(checked=len(todo))
    for path in files:
        reason = cached[str(path)][2]
        if reason is None:
            report.good.append(path)
        else:
            report.bad[str(path)] = reason

    if cache_path and todo:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_path) + ".lock"):
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({str(p): cached[str(p)] for p in files}))
            os.replace(tmp, cache_path)
    return report
