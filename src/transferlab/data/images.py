"""Reading images the same way everywhere: EXIF orientation applied, RGB, truncated files and bombs refused.

Training and evaluation decode with `decode_rgb` (uint8 CHW tensors): JPEGs through torchvision's
libjpeg-turbo decoder (about 1.5x a Pillow open/convert/resize loop on one core, scripts/benchmark.py), large
JPEGs through Pillow's DCT-domain downscaling (`draft`) when the transform will shrink them anyway, anything
else through Pillow. Every path first opens the header with Pillow, so an image over Pillow's
decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) is refused before a single pixel is decoded.
16-bit images are scaled to 8 bits (not clipped) and transparent pixels are composited on white.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from transferlab.core.errors import DataError
from transferlab.data.labels import Label, target

Sample = tuple[Path, Label]  # (image file, class index or label set: data.labels)


Source = str | Path | bytes  # a file, or an image's bytes (an upload to transferlab-serve)


@contextlib.contextmanager
def open_image(source: Source) -> Iterator[Image.Image]:
    """Pillow's lazy open (header only), an image over Pillow's decompression-bomb limit refused as an error.

    Pillow itself raises only past twice the limit and merely warns between 1x and 2x. Turning that warning into an
    error with a warnings filter is not enough: the filters are process-wide and `catch_warnings` is not thread-safe,
    so the integrity scan's threads could restore each other's filters and decode a bomb (seen under load). The
    header's size is therefore checked here, in Pillow's own words (describe_failure reads the pixel count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data" on files that decode fine
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise Image.DecompressionBombError(
                    f"Image size ({img.width * img.height} pixels) exceeds limit of {limit} pixels, could be decompression bomb DOS attack."
                )
            yield img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB without surprises: 16/32-bit grey scaled to 8 bits, alpha and palette transparency over white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (so truncation raises here, not inside a transform), honour EXIF rotation, return RGB."""
    with open_image(path) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _plan_draft(img: Image.Image, min_short_side: Optional[int]) -> bool:
    """Ask Pillow for a decode at 1/2, 1/4 or 1/8 scale in the DCT domain when a JPEG is at least twice what is
    needed; `img.size` becomes the size that will be decoded, before a single pixel is."""
    if img.format != "JPEG" or not min_short_side or min(img.size) < 2 * min_short_side:
        return False
    scale = min(img.size) / min_short_side
    img.draft("RGB", (max(1, int(img.width / scale)), max(1, int(img.height / scale))))
    return True


def _reduced(img: Image.Image, min_short_side: Optional[int]) -> Image.Image:
    """A decoded image at least four times what is needed, box-reduced by a whole factor in Pillow (formats without
    a DCT-domain decode) to between two and four times it, so the copies that follow (orientation, RGB, tensor)
    are small; the transform's antialiased resize then does the rest, as Pillow's `reducing_gap` does. The model
    input moves by about a quarter of an 8-bit level on average (tests/test_serve_limits.py)."""
    factor = min(img.size) // (2 * min_short_side) if min_short_side else 1
    if factor < 2:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = to_rgb(img)  # 16-bit and float images: scaled to 8 bits first, as to_rgb always does
    return img.reduce(factor)  # RGBA/LA: averaged premultiplied, exact before compositing


class PixelBudgetError(ValueError):
    """An image that would decode to more pixels than the caller allows (transferlab-serve's max_image_pixels)."""


def pixels_to_decode(img: Image.Image, min_short_side: Optional[int]) -> int:
    """How many pixels decoding this (header-only) image allocates: a JPEG's DCT-reduced size, else its size."""
    _plan_draft(img, min_short_side)
    return img.width * img.height


def check_pixel_budget(img: Image.Image, declared: tuple[int, int], max_pixels: int) -> None:
    """PixelBudgetError when the (planned) decode of a header-only image is over `max_pixels`."""
    if img.width * img.height > max_pixels:
        reduced = f" (its {declared[0]}x{declared[1]} reduced in decoding)" if img.size != declared else ""
        raise PixelBudgetError(
            f"refused, not decoded: a {img.format or 'image'} of {img.width}x{img.height} = {img.width * img.height:,} pixels{reduced} "
            f"is over max_image_pixels={max_pixels:,}; send a smaller image (JPEGs are reduced while decoding)"
        )


def decode_rgb(source: Source, min_short_side: Optional[int] = None, max_pixels: Optional[int] = None) -> torch.Tensor:
    """uint8 [3, H, W] tensor of a file or of bytes, EXIF orientation applied. `min_short_side` allows a cheaper
    reduced decode (the transform shrinks the image anyway); `max_pixels` refuses, from the header, an image that
    would decode to more pixels (PixelBudgetError), so memory stays within max_pixels x a few bytes."""
    with open_image(source) as img:  # the header: format, size, and the bomb check
        declared = img.size
        drafted = _plan_draft(img, min_short_side)
        if max_pixels is not None:
            check_pixel_budget(img, declared, max_pixels)
        if img.format == "JPEG" and not drafted:
            from torchvision.io import ImageReadMode, decode_jpeg, read_file

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = torch.frombuffer(bytearray(source), dtype=torch.uint8) if isinstance(source, bytes) else read_file(str(source))
                    return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            except Exception:  # noqa: BLE001 - CMYK, progressive oddities: Pillow decides
                pass
        img.load()
        return _pil_to_tensor(ImageOps.exif_transpose(_reduced(img, min_short_side)))


_SIGNATURES = [
    (b"<svg", "SVG (vector graphics)"),
    (b"<?xml", "XML/SVG"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"8BPS", "Photoshop PSD"),
]
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"isom": "MP4 video", b"qt  ": "QuickTime video"}


def sniff_format(source: Source) -> str:
    """What an unidentifiable file looks like, from its first bytes: named formats, text, or unknown."""
    if isinstance(source, bytes):
        head = source[:512]
    else:
        with open(source, "rb") as fh:
            head = fh.read(512)
    if not head:
        return "empty file (0 bytes)"
    if head[4:8] == b"ftyp":
        return f"unsupported format {_ISO_BRANDS.get(head[8:12], head[8:12].decode('latin-1').strip())}"
    for magic, name in _SIGNATURES:
        if head.lstrip().startswith(magic):
            return f"unsupported format {name}"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a text file, not an image"
    return "not an image (unknown binary format)"


def describe_failure(exc: BaseException, path: Source) -> str:
    """One line on why an image cannot be used, without repeating its path."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(size.group(1)):,} pixels" if size else "the image"
        return (
            f"refused, not decoded: {pixels} is over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,}; "
            f"raise PIL.Image.MAX_IMAGE_PIXELS only for files you trust"
        )
    if isinstance(exc, PixelBudgetError):
        return str(exc)
    if isinstance(exc, UnidentifiedImageError):
        try:
            return sniff_format(path)
        except OSError:
            pass
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    text = " ".join((str(exc) if isinstance(path, bytes) else str(exc).replace(str(path), "<file>")).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def check_image(path: str | Path) -> str | None:
    """None when the file decodes completely, else the reason it cannot be used."""
    try:
        with open_image(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))  # DCT-scaled: fast, still reads every byte
            img.load()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported reason
        return describe_failure(exc, path)


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file below folder, sorted, broken links included: the integrity scan decides and reports."""
    return sorted(
        p
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink() and not p.is_dir()) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class ImageDataset(Dataset):
    """(transformed image, label); decodes at no less than `min_short_side` px, or takes pre-decoded images."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Any,
        min_short_side: Optional[int] = None,
        decoded: Optional[list[torch.Tensor]] = None,
        num_labels: Optional[int] = None,
    ) -> None:
        """`num_labels`: K of a multi-label task (labels yielded as multi-hot vectors), None for class indices."""
        self.samples = list(samples)
        self.num_labels = num_labels
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

    def target(self, index: int) -> Any:
        """The image's class index, or its multi-hot label vector (data.labels.target)."""
        return target(self.samples[index][1], self.num_labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image = self.decoded[index] if self.decoded is not None else self.decode(index)
        return self.transform(image), self.target(index)


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
