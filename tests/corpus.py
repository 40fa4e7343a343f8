"""A dirty image collection made from the shared photos: every kind of file real archives hold.

`build_corpus(root)` writes an image_folder tree (cat/, dog/) and returns {relative path: expected reason
substring} for the files that must be refused, and the list of files that must be used.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import pet_photos

EXIF_ORIENTATION = 0x0112


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a 1x1 image): a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF0) claiming another size."""
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _photo(src: Path, size: int = 96) -> Image.Image:
    with Image.open(src) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        return img


def build_corpus(root: Path, locked: bool = True) -> tuple[dict[str, str], list[str]]:
    """(bad: relative path -> reason substring, good: relative paths). `locked` adds a file nobody may read."""
    cats, dogs = pet_photos(True, 8), pet_photos(False, 8)
    good: list[str] = []
    bad: dict[str, str] = {}

    def save(rel: str, img: Image.Image, **kwargs) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kwargs)
        good.append(rel)
        return path

    for label, photos in (("cat", cats), ("dog", dogs)):
        for src in photos[:5]:
            save(f"{label}/{src.stem}.jpg", _photo(src), quality=90)

    cat, dog = _photo(cats[5]), _photo(dogs[5])
    rgba = cat.convert("RGBA")
    alpha = np.full((cat.height, cat.width), 255, np.uint8)
    alpha[:, : cat.width // 2] = 0  # left half transparent
    rgba.putalpha(Image.fromarray(alpha))
    save("cat/alpha.png", rgba)
    save("cat/palette.png", cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("cat/grayscale.jpg", cat.convert("L"), quality=90)
    gray16 = (np.asarray(dog.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("dog/gray16.png", Image.fromarray(gray16))  # mode I;16
    save("dog/cmyk.jpg", dog.convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 CW to display": the stored pixels are the upright photo turned CCW
    save("dog/exif_rotated.jpg", dog.transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif.tobytes())
    save("dog/one_pixel.png", Image.new("RGB", (1, 1), (200, 120, 40)))

    good_jpeg = (root / good[0]).read_bytes()

    def write(rel: str, data: bytes, reason: str) -> Path:
        path = root / rel
        path.write_bytes(data)
        bad[rel] = reason
        return path

    write("cat/empty.jpg", b"", "empty file")
    write("cat/truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "truncated")
    write("dog/random_bytes.jpg", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "unknown binary format")
    write("dog/readme.jpg", b"This is not a picture.\n", "text file")
    write("cat/bomb.png", _png_with_size(30_000, 30_000), "decompression-bomb limit")
    write("dog/bomb_1x.png", _png_with_size(10_000, 9_500), "decompression-bomb limit")  # over the limit, under 2x: a warning in Pillow
    write("dog/bomb.jpg", _jpeg_with_size(good_jpeg, 40_000, 40_000), "decompression-bomb limit")
    write("cat/iphone.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "unsupported format HEIC")
    write("dog/drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n', "unsupported format SVG")
    loop = root / "cat" / "loop.jpg"
    os.symlink("loop.jpg", loop)
    bad["cat/loop.jpg"] = "Too many levels of symbolic links"
    if locked:
        write("dog/locked.jpg", good_jpeg, "Permission denied").chmod(0)
    return bad, good
