"""The checkpoint callback that Lightning's own ModelCheckpoint cannot be configured to be."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` at the end of every epoch, whatever the metrics did: what `ckpt_path=last|auto` resumes from.

    ModelCheckpoint(save_last=True) cannot do it in Lightning 2.6 (it refreshes last.ckpt only together with a new
    best), and a plain second ModelCheckpoint would clash with any monitor-less one a user adds (same state key).
    """

    def __init__(self, dirpath: str, filename: str = "last", **kwargs: Any) -> None:
        kwargs = {"monitor": None, "save_top_k": 1, "enable_version_counter": False, **kwargs}
        super().__init__(dirpath=dirpath, filename=filename, **kwargs)
