"""One forward pass at a time over the images of every request waiting for it (transferlab-serve).

Concurrent requests' images share forward passes: up to `max_batch` images, the first waiting at most
`batch_wait_ms` for others, so throughput under load approaches the runtime's batch speed. How many images may
wait is bounded before they get here (deploy.admission's queue_size).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from transferlab.deploy.runtime import Predictor

log = logging.getLogger(__name__)


class Batcher:
    """One forward pass at a time (its own thread), over the images of every request waiting for it."""

    def __init__(self, predictor: Predictor, max_batch: int, wait_s: float) -> None:
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.batches = self.images = 0
        self.recent_seconds_per_image = 0.05  # an average over recent batches: the 503 answer's Retry-After
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.engine.shutdown(wait=True)

    async def probabilities(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures):
            self.queue.put_nowait((image, future))
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            started = loop.time()
            try:
                probs = await loop.run_in_executor(self.engine, self.predictor.probabilities, torch.stack([image for image, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - the requests of this batch get a 500, the server goes on
                log.exception("Forward pass failed for a batch of %d image(s)", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches, self.images = self.batches + 1, self.images + len(batch)
            per_image = (loop.time() - started) / len(batch)
            self.recent_seconds_per_image = 0.8 * self.recent_seconds_per_image + 0.2 * per_image
            for (_, future), p in zip(batch, probs):
                if not future.done():
                    future.set_result(p)
