"""The HTTP app of transferlab-serve (FastAPI): POST /predict, GET /health, GET /metadata, GET / (the page).

Images of concurrent requests are decoded in threads and their forward passes batched (`Batcher`: up to
`max_batch` images, waiting at most `batch_wait_ms` for more), so throughput under load approaches the
runtime's batch speed. Every bad input is a 4xx answer `{"error": "<one line>"}` and the server goes on:
not an image (415), truncated or empty (400), a decompression bomb or a body over `max_request_mb` (413),
a missing field or bad JSON (422 / 400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from transferlab.data.images import decode_rgb, describe_failure
from transferlab.deploy.page import page_html
from transferlab.deploy.runtime import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits, from conf/serve.yaml (the values and their ranges are declared there and in the
    schema, checked before the server starts): no defaults here."""

    topk: int
    max_batch: int
    batch_wait_ms: float
    max_images: int
    max_request_bytes: int


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Batcher:
    """One forward pass at a time (its own thread), over the images of every request waiting for it."""

    def __init__(self, predictor: Predictor, max_batch: int, wait_s: float) -> None:
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.batches = self.images = 0
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
            try:
                probs = await loop.run_in_executor(self.engine, self.predictor.probabilities, torch.stack([image for image, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - the requests of this batch get a 500, the server goes on
                log.exception("Forward pass failed for a batch of %d image(s)", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches, self.images = self.batches + 1, self.images + len(batch)
            for (_, future), p in zip(batch, probs):
                if not future.done():
                    future.set_result(p)


def prepare(transform: Any, decode_size: int, data: bytes, name: str) -> torch.Tensor:
    """One upload as the model's input; a bad one raises BadRequest with the reason."""
    if not data:
        raise BadRequest(400, f"{name}: empty file (0 bytes)")
    try:
        return transform(decode_rgb(data, decode_size))
    except Exception as exc:  # noqa: BLE001 - every failure becomes the request's reason
        status = 413 if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)) else 400
        status = 415 if isinstance(exc, UnidentifiedImageError) else status
        raise BadRequest(status, f"{name}: {describe_failure(exc, data)}") from None


async def _uploads(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in a multipart (`file`, repeatable) or JSON ({"image": b64} / {"images": [...]}) body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images + 1, max_fields=16)
        except BadRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - starlette's parse errors (too many files, malformed parts)
            if "Too many files" in str(exc):
                raise BadRequest(413, f"more than {settings.max_images} images in one request (max_images); split the request") from None
            raise BadRequest(400, f"the multipart body could not be read: {' '.join(str(exc).split())[:160]}") from None
        files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        if not files:
            raise BadRequest(422, "field `file` is missing: send the image as multipart field `file` (curl -F file=@photo.jpg)")
        return [(item.filename or f"file {i + 1}", await item.read()) for i, item in enumerate(files)]
    if kind == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest(400, "the body is not valid JSON") from None
        encoded = body.get("images", [body.get("image")] if "image" in body else None) if isinstance(body, dict) else None
        if not isinstance(encoded, list) or not encoded or not all(isinstance(e, str) for e in encoded):
            raise BadRequest(422, 'JSON needs "image": "<base64>" or "images": ["<base64>", ...]')
        try:
            return [(f"image {i + 1}", base64.b64decode(e.split(",", 1)[-1], validate=True)) for i, e in enumerate(encoded)]
        except (binascii.Error, ValueError):
            raise BadRequest(400, "an image is not valid base64") from None
    raise BadRequest(415, f"content-type {kind or 'none'}: send multipart/form-data (field `file`) or application/json (base64)")


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    batcher = Batcher(predictor, settings.max_batch, settings.batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="transferlab-serve", summary="Image classification with a transferlab model", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    names = predictor.class_names
    transform, decode_size = predictor.preprocessing.eval_transform(), predictor.preprocessing.decode_size()

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.post("/predict", summary="Top-k labels of one or more images (multipart field `file`, or JSON base64)")
    async def predict_images(request: Request, topk: Optional[int] = Query(None, ge=1, description="labels per image")) -> dict[str, Any]:
        uploads = await _uploads(request, settings)
        if len(uploads) > settings.max_images:
            raise BadRequest(413, f"{len(uploads)} images in one request; at most {settings.max_images} (split the request)")
        images = await asyncio.gather(*(asyncio.to_thread(prepare, transform, decode_size, data, name) for name, data in uploads))
        probs = await batcher.probabilities(list(images))
        k = min(topk or settings.topk, len(names))
        results = []
        for (name, _), p in zip(uploads, probs):
            scores, top = p.topk(k)
            results.append({"file": name, "predictions": [{"label": names[j], "prob": round(float(s), 6)} for s, j in zip(scores, top.tolist())]})
        return {**results[0], "results": results} if len(results) == 1 else {"predictions": results[0]["predictions"], "results": results}

    @app.get("/health", summary="Liveness: the model is loaded and answers")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "classes": len(names), "batches": batcher.batches, "images": batcher.images}

    @app.get("/metadata", summary="Classes, preprocessing, metrics and how the model runs")
    async def metadata() -> dict[str, Any]:
        return {**predictor.metadata, "runtime": predictor.settings, "limits": settings.__dict__}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html(names, predictor.metadata.get("metrics") or {})

    return app


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 without being kept; what was sent is read and dropped
    first, so the client sees the answer and not a reset connection."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(receive, send, f"{int(declared):,} bytes")
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BadRequest(413, f"request body over the limit of {self.limit:,} bytes (max_request_mb); send fewer or smaller images")
            return message

        try:
            await self.app(scope, counted, send)
        except BadRequest:  # a chunked body without Content-Length that grew over the limit
            await self._refuse(receive, send, f"over {seen:,} bytes")

    async def _refuse(self, receive: Any, send: Any, size: str) -> None:
        message: dict = {"more_body": True}
        while message.get("more_body") and message.get("type") != "http.disconnect":
            message = await receive()
        reason = f'{{"error": "request body of {size} is over the limit of {self.limit:,} bytes (max_request_mb); send fewer or smaller images"}}'
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": reason.encode()})
