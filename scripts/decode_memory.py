"""Bytes of memory per decoded pixel, by format, for transferlab-serve's memory bound (docs/deploy.md).

Each format is measured in a fresh process: the kernel's high-water mark of that process (VmHWM) rises by this
much while `data.images.decode_rgb` turns one 4400 x 4400 image into the model's decode size (256), divided by
the pixels decoded. JPEGs are decoded in the DCT domain at a reduced size, so their figure is per declared pixel.

    python scripts/decode_memory.py
"""

from __future__ import annotations

import subprocess
import sys

CASES = [
    ("JPEG", "RGB"),
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "P"),
    ("PNG", "L"),
    ("PNG", "I;16"),
    ("TIFF", "RGB"),
    ("BMP", "RGB"),
    ("GIF", "P"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
]

ONE = """
import io, sys
import numpy as np
from PIL import Image
fmt, mode, side = sys.argv[1], sys.argv[2], 4400
small = np.random.default_rng(0).integers(0, 255, (side // 8, side // 8, 4), dtype=np.uint8)
img = Image.fromarray(small, "RGBA").resize((side, side))
img = img.convert("L").convert("I;16") if mode == "I;16" else img if mode == "RGBA" else img.convert(mode)
buffer = io.BytesIO()
img.save(buffer, fmt)
data = buffer.getvalue()
del img, small
from transferlab.data.images import decode_rgb

def peak():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

open("/proc/self/clear_refs", "w").write("5")
before = peak()
decode_rgb(data, 256)
print(f"{(peak() - before) / side**2:.1f}")
"""


def main() -> None:
    print("| format | mode | bytes per decoded pixel |\n| --- | --- | --- |")
    for fmt, mode in CASES:
        done = subprocess.run([sys.executable, "-c", ONE, fmt, mode], capture_output=True, text=True, check=True)
        print(f"| {fmt} | {mode} | {done.stdout.strip()} |")


if __name__ == "__main__":
    main()
