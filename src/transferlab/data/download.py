"""Fetch an archive, verify it, and extract it without letting any member escape the target folder."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from transferlab.errors import DataError

log = logging.getLogger(__name__)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download to dest (via a .part file, so a broken transfer never looks complete); verify sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("Downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from exc
    actual = sha256_of(part)
    if sha256 and actual.lower() != sha256.lower():
        part.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; the file was discarded")
    os.replace(part, dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{actual}  {dest.name}\n")
    if not sha256:
        log.warning("No sha256 configured for %s; downloaded file has sha256 %s", url, actual)
    return dest


def safe_extract_zip(archive: Path, target: Path) -> None:
    """Extract after checking every member: CRCs valid, no absolute paths, no '..', no symlinks."""
    target = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            broken = zf.testzip()
            if broken is not None:
                raise DataError(f"{archive}: member {broken!r} fails its CRC check; delete the archive and download again")
            for info in zf.infolist():
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                dest = (target / info.filename).resolve()
                if is_link or info.filename.startswith(("/", "\\")) or not dest.is_relative_to(target):
                    raise DataError(f"{archive}: refusing unsafe member {info.filename!r} (path outside {target} or a link)")
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive ({exc}); delete it and download again") from exc
