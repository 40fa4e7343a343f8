"""Loading files a user names (checkpoints, state_dicts) without ever running code from them.

`read_checkpoint` loads with `weights_only=True`: tensors and plain containers only. A file whose unpickling
would call a function (the classic pickle exploit) is refused with one line naming the file and the function.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from transferlab.core.errors import DataError


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint's dict (tensors memory-mapped, so a look at its metadata costs no full read)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"{key}: {file} is not a file; give the path of a .ckpt (e.g. <run>/checkpoints/last.ckpt) or of a model package folder (transferlab-export)"
        )
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # files from torch.save(_use_new_zipfile_serialization=False) cannot be mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - sorted into the two causes a user can act on
        text = " ".join(str(exc).split())
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)", text)
        if unsafe or "Weights only load failed" in text:
            what = (unsafe.group(1) or unsafe.group(2)) if unsafe else "an object that is not a tensor"
            raise DataError(
                f"{key}: {file} refused: loading it would call {what} (a pickle can run arbitrary code); "
                f"transferlab only loads tensors and plain values (torch.load weights_only=True). "
                f"Use checkpoints from sources you trust, saved by transferlab or as a plain state_dict"
            ) from None
        raise DataError(f"{key}: {file} is not a readable checkpoint (truncated, or not a .ckpt: {text[:160]})") from None
