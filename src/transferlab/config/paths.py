"""Find conf/ whether transferlab runs from a source checkout (editable install) or a wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/transferlab (or site-packages/transferlab)


def config_dir() -> str:
    """The Hydra config directory: <repo>/conf in a checkout, <site-packages>/transferlab/conf in a wheel.

    In a checkout conf/experiment links to <repo>/experiments; the wheel copies the presets there.
    """
    for candidate in (_PACKAGE_DIR.parents[1] / "conf", _PACKAGE_DIR / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"transferlab's conf/ directory was not found next to {_PACKAGE_DIR}; reinstall transferlab")
