"""Checkpoints that survive crashes: atomic writes, and finding the one to resume from (loading: core.safe_load).

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin) streams `<name>.ckpt` through core.files.atomic_write
  (a temporary file in the same folder, fsynced, renamed over the old one, folder fsynced): a kill, a power cut
  or a full disk during a save leaves the previous checkpoint as it was, never a truncated one.
- `resume_checkpoint` turns `ckpt_path` (`last`, `auto`, a run folder or a file) into a verified file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transferlab.core.errors import ConfigError, DataError, ResourceError, disk_full
from transferlab.core.files import atomic_write
from transferlab.core.safe_load import read_checkpoint

log = logging.getLogger(__name__)


def _progress(ckpt: dict[str, Any]) -> tuple[int, int]:
    return int(ckpt.get("epoch", -1)), int(ckpt.get("global_step", -1))


def newest_checkpoint(folder: Path) -> Optional[Path]:
    """The most advanced readable *.ckpt in folder (by epoch and step; on a tie last.ckpt, which is written at the
    very end of an epoch, then the newest); unreadable ones are skipped with a warning."""
    ranked = []
    for file in sorted(folder.glob("*.ckpt")):
        try:
            ranked.append((_progress(read_checkpoint(file)), file.name == "last.ckpt", file.stat().st_mtime_ns, file))
        except DataError as exc:
            log.warning("Not resuming from %s: %s", file, exc)
    return max(ranked)[-1] if ranked else None


def resume_checkpoint(ckpt_path: Optional[str], out_dir: Path) -> Optional[str]:
    """`last`: the run's last.ckpt; `auto`: the newest checkpoint of this run dir, or a fresh start; a folder: the
    newest checkpoint in it (or in its checkpoints/); a file: that file. Every choice is read once (safely) here."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path in ("auto", "last"):
        folder = out_dir / "checkpoints"
        chosen = newest_checkpoint(folder) if ckpt_path == "auto" and folder.is_dir() else None
        if ckpt_path == "auto":
            log.info("ckpt_path=auto: %s", f"resuming from {chosen}" if chosen else f"no checkpoint in {folder}, starting fresh")
            return str(chosen) if chosen else None
        chosen = folder / "last.ckpt"
    else:
        chosen = Path(ckpt_path).expanduser()
        if chosen.is_dir():
            folder = chosen / "checkpoints" if (chosen / "checkpoints").is_dir() else chosen
            newest = newest_checkpoint(folder)
            if newest is None:
                raise ConfigError(f"ckpt_path: no readable .ckpt in {folder}; give a checkpoint file or a run folder that has one")
            chosen = newest
    if not chosen.is_file():
        raise ConfigError(f"ckpt_path: {chosen} does not exist; expected last, auto, a run folder or a .ckpt file")
    read_checkpoint(chosen)
    return str(chosen)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into `.<name>.<random>.tmp`, fsync, rename: the old checkpoint stays whole until the new one is.

    Lightning's own writer is atomic on local disks too (an fsspec transaction), but it first serialises the
    whole checkpoint into memory (two copies), never fsyncs, and a full disk surfaces as a bare OSError. This
    one streams to disk, makes file and rename durable, clears temporary files of killed runs, and says what to
    do when the disk is full.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):  # object stores: Lightning's own (fsspec) writer
            return super().save_checkpoint(checkpoint, str(path), storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a run killed while saving
            stale.unlink(missing_ok=True)
        try:
            atomic_write(target, lambda fh: torch.save(checkpoint, fh))  # streamed: no second copy in memory
        except BaseException as exc:
            if disk_full(exc):
                kept = "the previous one is intact" if target.exists() else "no earlier checkpoint existed"
                raise ResourceError(
                    f"paths.output_dir: no space left on the device while saving checkpoint {target} "
                    f"({kept}); free some space or point hydra.run.dir at a larger disk, then resume with "
                    f"ckpt_path=last"
                ) from exc
            raise
