"""Find conf/ whether transferlab runs from a source checkout (editable install) or a wheel."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/transferlab (or site-packages/transferlab)


def quickstart_sample() -> str:
    """The photos that ship inside the package (3 per Oxford-IIIT Pet breed, downscaled; CC BY-SA 4.0, see its
    LICENSE.md): what `experiment=quickstart` trains on without network or data of one's own."""
    return str(_PACKAGE_DIR / "data" / "quickstart_sample")


# `${transferlab_sample:}` in the configs (experiments/quickstart.yaml); registered wherever configs are composed.
OmegaConf.register_new_resolver("transferlab_sample", quickstart_sample, replace=True)


def config_dir() -> str:
    """The Hydra config directory: <repo>/conf in a checkout, <site-packages>/transferlab/conf in a wheel.

    In a checkout conf/experiment links to <repo>/experiments; the wheel copies the presets there.
    """
    for candidate in (_PACKAGE_DIR.parents[1] / "conf", _PACKAGE_DIR / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"transferlab's conf/ directory was not found next to {_PACKAGE_DIR}; reinstall transferlab")
