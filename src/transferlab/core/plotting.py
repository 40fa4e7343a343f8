"""Pictures: matplotlib without a display, and PNG files sent to every logger that shows images."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (runs without a display, in workers and on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def log_images(loggers: list[Any], tag: str, paths: list[Path], step: int = 0, captions: list[str] | None = None) -> None:
    """PNG files to every logger that shows pictures: TensorBoard (one image per tag) and W&B (one key, a list)."""
    import numpy as np
    from PIL import Image

    for lg in loggers:
        kind = type(lg).__name__
        if kind == "TensorBoardLogger":
            for i, path in enumerate(paths):
                with Image.open(path) as img:
                    array = np.asarray(img.convert("RGB"))
                name = f"{tag}/{captions[i]}" if captions else (f"{tag}/{i}" if len(paths) > 1 else tag)
                lg.experiment.add_image(name, array, global_step=step, dataformats="HWC")
        elif kind == "WandbLogger":
            lg.log_image(tag, [str(p) for p in paths], **({"caption": captions} if captions else {}))
