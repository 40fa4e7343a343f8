"""Peak memory of transferlab-serve under the request that once took it from 0.9 to 6.3 GB (docs/deploy.md).

Four 9,000 x 9,000 PNGs (81 Mpx each, about 1.5 MB together) in one request, sent to a server this script starts
on a free loopback port; the server's kernel high-water mark (VmHWM) is read before and after.

    python scripts/serve_memory.py <checkpoint or package> [serve overrides, e.g. max_image_pixels=90000000 ...]
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw


def big_png(side: int = 9000) -> bytes:
    img = Image.new("RGB", (side, side), (200, 180, 160))
    draw = ImageDraw.Draw(img)
    for i in range(0, side // 2, 97):
        draw.ellipse((i, i, side - i, side - i), outline=(i % 255, 90, 40), width=9)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def main(ckpt: str, overrides: list[str]) -> None:
    png = big_png()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = Path(tempfile.mkdtemp(prefix="serve_memory_"))
    cmd = [sys.executable, "-m", "transferlab.serve", f"ckpt_path={ckpt}", f"port={port}", f"hydra.run.dir={run}", *overrides]
    server = subprocess.Popen(cmd, stdout=open(run / "server.out", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, (run / "server.out").read_text()[-2000:]
                time.sleep(0.3)

        def peak() -> float:
            return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{server.pid}/status").read_text()).group(1)) / 2**20

        warm = Image.new("RGB", (640, 480), (120, 90, 60))
        buffer = io.BytesIO()
        warm.save(buffer, "JPEG")
        httpx.post(f"{url}/predict", files={"file": ("warm.jpg", buffer.getvalue())}, timeout=60)
        print(f"request body {4 * len(png) / 2**20:.1f} MiB; server peak when warm {peak():.2f} GiB")
        started = time.monotonic()
        answer = httpx.post(f"{url}/predict", files=[("file", (f"{i}.png", png, "image/png")) for i in range(4)], timeout=300)
        reason = answer.json().get("error", "answered")
        print(f"{answer.status_code} in {time.monotonic() - started:.2f} s ({reason[:120]}); server peak {peak():.2f} GiB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
