"""Fetch an archive, verify its checksum, and extract it (zip or tar) without letting any member escape the target."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from transferlab.core.errors import DataError
from transferlab.core.files import file_digests

log = logging.getLogger(__name__)


def download_file(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0, md5: str | None = None) -> Path:
    """Download to dest (via a .part file, so a broken transfer never looks complete); verify sha256 (or md5, for
    datasets that only publish that)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("Downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from exc
    digests = file_digests(part, "sha256", *(["md5"] if md5 else []))
    actual = digests["sha256"]
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        got = digests.get(algorithm, "")
        if expected and got.lower() != expected.lower():
            part.unlink(missing_ok=True)
            raise DataError(f"checksum mismatch for {url}: expected {algorithm} {expected}, got {got}; the file was discarded")
    os.replace(part, dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{actual}  {dest.name}\n")
    if not sha256 and not md5:
        log.warning("No checksum configured for %s; downloaded file has sha256 %s (recorded beside it)", url, actual)
    return dest


def _unsafe(archive: Path, name: str, why: str) -> DataError:
    return DataError(
        f"{archive}: refusing unsafe member {name!r} ({why}); nothing was extracted. The archive is "
        f"damaged or hostile: download it again from the dataset's official page"
    )


def _check_member_path(archive: Path, name: str, target: Path) -> Path:
    """The member's destination, or an error for absolute paths, drive letters and '..' escapes."""
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise _unsafe(archive, name, "absolute path")
    dest = (target / name).resolve()
    if not dest.is_relative_to(target):
        raise _unsafe(archive, name, f"path outside {target}")
    return dest


def safe_extract_tar(archive: Path, target: Path) -> None:
    """Extract a .tar(.gz) after checking every member: no absolute paths, no '..', links only to places inside
    target, no devices; members are then written through tarfile's own `data` filter as a second guard."""
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    try:
        with tarfile.open(archive) as tar:
            links: list[str] = []
            for member in tar.getmembers():
                dest = _check_member_path(archive, member.name, target)
                if any(member.name == link or member.name.startswith(link.rstrip("/") + "/") for link in links):
                    raise _unsafe(archive, member.name, "written through a link member of the same archive")
                if member.issym() or member.islnk():
                    base = dest.parent if member.issym() else target
                    if member.linkname.startswith("/") or not (base / member.linkname).resolve().is_relative_to(target):
                        raise _unsafe(archive, member.name, f"link to {member.linkname!r}, outside {target}")
                    links.append(member.name)
                elif not (member.isfile() or member.isdir()):
                    raise _unsafe(archive, member.name, "device, fifo or other special file")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tar.extractall(target, filter="data")
            else:  # pragma: no cover - older Pythons: the checks above are the guard
                tar.extractall(target)
    except tarfile.TarError as exc:
        raise DataError(f"{archive}: not a valid tar archive or refused by tarfile ({exc}); delete it and download again") from exc


def safe_extract_zip(archive: Path, target: Path) -> None:
    """Extract after checking every member: CRCs valid, no absolute paths, no '..', no symlinks."""
    target = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            broken = zf.testzip()
            if broken is not None:
                raise DataError(f"{archive}: member {broken!r} fails its CRC check; delete the archive and download again")
            for info in zf.infolist():
                _check_member_path(archive, info.filename, target)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise _unsafe(archive, info.filename, "a symbolic link")
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive ({exc}); delete it and download again") from exc
