"""How much one request can make transferlab-serve hold, bounded before any pixel is decoded.

- `max_image_pixels`: the pixels an image would decode to, read from its header (a JPEG's DCT-reduced size, since
  JPEGs are decoded straight to about the size the model needs; other formats whole), over it → 413;
- `max_request_pixels`: the same total over the images of one request, checked before the first decode;
- `decode_workers`: the images decoded at once, whatever the number of requests (a pool of that many threads);
- `queue_size`: images admitted and not answered yet; a request that would pass it gets 503 with Retry-After.

So the decoding peak is at most decode_workers x max_image_pixels x bytes per decoded pixel (measured in
docs/deploy.md: at most 17 for 8-bit images, 26 for 16-bit ones) above the loaded model.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError

from transferlab.data.images import PixelBudgetError, check_pixel_budget, decode_rgb, describe_failure, open_image, pixels_to_decode
from transferlab.deploy.contract import ServeError

BYTES_PER_DECODED_PIXEL = 26  # the worst measured (16-bit greyscale PNG); 8-bit formats stay at or under 17


@dataclass(frozen=True)
class Budgets:
    """conf/serve.yaml's limits on what a request may cost (checked by the config schema before the server starts)."""

    max_image_pixels: int
    max_request_pixels: int
    decode_workers: int
    queue_size: int


class Admission:
    """Admits images up to `queue_size` and turns uploads into model inputs on a pool of `decode_workers` threads.

    `admitted` is used only from the event loop's thread, so its count needs no lock."""

    def __init__(
        self, budgets: Budgets, transform: Callable[[torch.Tensor], torch.Tensor], decode_size: int, seconds_per_image: Callable[[], float]
    ) -> None:
        self.budgets, self.transform, self.decode_size, self.seconds_per_image = budgets, transform, decode_size, seconds_per_image
        self.pool = ThreadPoolExecutor(budgets.decode_workers, thread_name_prefix="decode")
        self.pending = 0

    @contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        """Hold `count` places of the queue while a request is answered; 503 with Retry-After when they are not free."""
        if self.pending + count > self.budgets.queue_size:
            wait = max(1, math.ceil((self.pending + count - self.budgets.queue_size) * self.seconds_per_image()))
            raise ServeError(
                503,
                f"busy: {self.pending} images are waiting and the queue holds {self.budgets.queue_size} (queue_size); retry in {wait} s",
                {"Retry-After": str(wait)},
            )
        self.pending += count
        try:
            yield
        finally:
            self.pending -= count

    async def inputs(self, uploads: Sequence[tuple[str, bytes]]) -> list[torch.Tensor]:
        """The model inputs of a request's images, every header checked against the budgets before any decode."""
        loop = asyncio.get_running_loop()
        pixels = await asyncio.gather(*(loop.run_in_executor(self.pool, self._measure, name, data) for name, data in uploads))
        if sum(pixels) > self.budgets.max_request_pixels:
            raise ServeError(
                413,
                f"refused, not decoded: the {len(uploads)} images decode to {sum(pixels):,} pixels together, over "
                f"max_request_pixels={self.budgets.max_request_pixels:,}; send fewer or smaller images per request",
            )
        return list(await asyncio.gather(*(loop.run_in_executor(self.pool, self._prepare, name, data) for name, data in uploads)))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _measure(self, name: str, data: bytes) -> int:
        if not data:
            raise ServeError(400, f"{name}: empty file (0 bytes)")
        try:
            with open_image(data) as img:
                declared, pixels = img.size, pixels_to_decode(img, self.decode_size)
                check_pixel_budget(img, declared, self.budgets.max_image_pixels)  # each image's reason before the total's
                return pixels
        except Exception as exc:  # noqa: BLE001 - every failure becomes the request's reason
            raise refusal(name, data, exc) from None

    def _prepare(self, name: str, data: bytes) -> torch.Tensor:
        try:
            return self.transform(decode_rgb(data, self.decode_size, self.budgets.max_image_pixels))
        except Exception as exc:  # noqa: BLE001 - every failure becomes the request's reason
            raise refusal(name, data, exc) from None


def refusal(name: str, data: bytes, exc: Exception) -> ServeError:
    """A failure to read an upload as the request's answer: 413 over a budget, 415 not an image, else 400."""
    status = 413 if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning, PixelBudgetError)) else 400
    status = 415 if isinstance(exc, UnidentifiedImageError) else status
    return ServeError(status, f"{name}: {describe_failure(exc, data)}")


def describe(budgets: Budgets) -> dict[str, Any]:
    return {**budgets.__dict__, "bytes_per_decoded_pixel_at_most": BYTES_PER_DECODED_PIXEL}
