"""Reading images the same way everywhere: EXIF orientation applied, RGB, truncated files refused.

Training and evaluation decode with `decode_rgb` (uint8 CHW tensors): JPEGs through torchvision's
libjpeg-turbo decoder (about 1.5x a Pillow open/convert/resize loop on one core, scripts/benchmark.py), large
JPEGs through Pillow's DCT-domain downscaling (`draft`) when the transform will shrink them anyway, anything
else through Pillow.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from transferlab.errors import DataError

Sample = tuple[Path, int]  # (image file, class index)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (so truncation raises here, not inside a transform), honour EXIF rotation, return RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data" on files that decode fine
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _draft_decode(path: Path, min_short_side: int) -> Optional[torch.Tensor]:
    """Pillow decode at 1/2, 1/4 or 1/8 scale in the DCT domain when the image is at least twice what is needed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as img:
            if img.format != "JPEG" or min(img.size) < 2 * min_short_side:
                return None
            scale = min(img.size) / min_short_side
            img.draft("RGB", (max(1, int(img.width / scale)), max(1, int(img.height / scale))))
            img.load()
            return _pil_to_tensor(ImageOps.exif_transpose(img))


def decode_rgb(path: str | Path, min_short_side: Optional[int] = None) -> torch.Tensor:
    """uint8 [3, H, W] tensor with EXIF orientation applied; `min_short_side` allows a cheaper reduced decode."""
    path = Path(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        if min_short_side:
            reduced = _draft_decode(path, min_short_side)
            if reduced is not None:
                return reduced
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except Exception:  # noqa: BLE001 - CMYK, progressive oddities, mislabelled files: Pillow decides
            pass
    return _pil_to_tensor(load_rgb(path))


def check_image(path: str | Path) -> str | None:
    """None when the file decodes completely, else the reason it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))  # DCT-scaled: fast, still reads every byte
                img.load()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported reason
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"{type(exc).__name__}: {reason}"


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file below folder, sorted; the integrity scan decides which are images."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class ImageDataset(Dataset):
    """(transformed image, label); decodes at no less than `min_short_side` px, or takes pre-decoded images."""

    def __init__(self, samples: Sequence[Sample], transform: Any, min_short_side: Optional[int] = None,
                 decoded: Optional[list[torch.Tensor]] = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.min_short_side = min_short_side
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]
        try:
            return decode_rgb(path, self.min_short_side)
        except Exception as exc:
            raise DataError(f"{path}: cannot be read any more ({exc}); it passed the integrity scan, so it changed during the run") from exc

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.decoded[index] if self.decoded is not None else self.decode(index)
        return self.transform(image), self.samples[index][1]


def decode_all(dataset: ImageDataset, workers: int) -> list[torch.Tensor]:
    """The decoded-image cache: every image decoded once and shrunk to its short side (threads; decoders drop the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.transforms.v2 import functional as TF

    def one(index: int) -> torch.Tensor:
        image = dataset.decode(index)
        if dataset.min_short_side and min(image.shape[-2:]) > dataset.min_short_side:
            image = TF.resize(image, dataset.min_short_side, antialias=True)
        return image

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, range(len(dataset))))
