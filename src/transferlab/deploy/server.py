"""The HTTP app of transferlab-serve (FastAPI): POST /predict, GET /health, GET /metadata, GET / (a page), GET /docs.

A request goes: body limit (`max_request_mb`) → rate limit and key (deploy.access, when set) → the uploads read
(deploy.contract) → admitted to the queue (`queue_size`, else 503) → headers checked against the pixel budgets,
decoded on the bounded pool (deploy.admission) → batched forward passes (deploy.batcher) → one result per image,
in request order (a multi-label model's also hold the predicted `labels` and every label's `probabilities`).
Every refusal is `{"error": "<one line>"}` with the status /openapi.json declares for it, and
the server goes on. /docs is Swagger UI served from the package (fastapi-offline): it works without internet.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from transferlab.deploy.access import Keys, RateLimit
from transferlab.deploy.admission import Admission, Budgets, describe
from transferlab.deploy.batcher import Batcher
from transferlab.deploy.contract import Health, Metadata, PredictAnswer, ServeError, error_responses, json_images, predict_request_body
from transferlab.deploy.page import page_html
from transferlab.deploy.runtime import Predictor
from transferlab.models import package

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits and access rules, from conf/serve.yaml (values and ranges declared there and in the
    schema, checked before the server starts): no defaults here."""

    topk: int
    max_batch: int
    batch_wait_ms: float
    max_images: int
    max_request_bytes: int
    upload_timeout_s: float
    budgets: Budgets
    keys: tuple[str, ...]
    cors_origins: tuple[str, ...]
    rate_limit: Optional[float]

    def public(self) -> dict[str, Any]:
        """What /metadata shows: every limit, whether a key is needed, never the keys."""
        shown = {k: v for k, v in self.__dict__.items() if k not in ("keys", "budgets")}
        return {**shown, **describe(self.budgets), "cors_origins": list(self.cors_origins), "api_key_required": bool(self.keys)}


async def read_uploads(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in a multipart (`file`, repeatable) or JSON ({"image": b64} / {"images": [...]}) body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=16)
        except ServeError:
            raise
        except Exception as exc:  # noqa: BLE001 - starlette's parse errors (too many files, malformed parts)
            if "Too many files" in str(exc):
                raise ServeError(413, f"more than {max_images} images in one request (max_images); split the request") from None
            raise ServeError(400, f"the multipart body could not be read: {' '.join(str(exc).split())[:160]}") from None
        files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        if not files:
            raise ServeError(422, "field `file` is missing: send the image as multipart field `file` (curl -F file=@photo.jpg)")
        return [(item.filename or f"file {i + 1}", await item.read()) for i, item in enumerate(files)]
    if kind == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ServeError(400, "the body is not valid JSON") from None
        return json_images(body, max_images)
    raise ServeError(415, f"content-type {kind or 'none'}: send multipart/form-data (field `file`) or application/json (base64)")


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    from fastapi_offline import FastAPIOffline

    batcher = Batcher(predictor, settings.max_batch, settings.batch_wait_ms / 1000)
    transform, decode_size = predictor.preprocessing.eval_transform(), predictor.preprocessing.decode_size()
    admission = Admission(settings.budgets, transform, decode_size, lambda: batcher.recent_seconds_per_image)
    keys, limiter = Keys(settings.keys), RateLimit(settings.rate_limit) if settings.rate_limit else None
    served = package.transferlab_version()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()
        admission.shutdown()

    app = FastAPIOffline(
        title="transferlab-serve", summary="Image classification with a transferlab model", version=served, redoc_url=None, lifespan=lifespan
    )
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, upload_timeout=settings.upload_timeout_s)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]
        )
    names = predictor.class_names
    bearer = HTTPBearer(auto_error=False, scheme_name="apiKey", description="the server's key: `Authorization: Bearer <key>`")

    def limit(request: Request) -> None:
        wait = limiter.wait(request.client.host if request.client else "unknown") if limiter else 0.0
        if wait:
            seconds = max(1, round(wait + 0.5))
            raise ServeError(
                429,
                f"over rate_limit={settings.rate_limit:g} requests per minute from this address; retry in {seconds} s",
                {"Retry-After": str(seconds)},
            )

    async def keyed(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:  # noqa: B008 - FastAPI's idiom
        limit(request)  # first, so that guessing keys is rate-limited too
        if not keys.allows(credentials.credentials if credentials else None):
            why = "wrong key" if credentials else "no key"
            raise ServeError(
                401,
                f"{why}: send `Authorization: Bearer <key>` (the server's api_key or a line of its api_keys_file)",
                {"WWW-Authenticate": "Bearer"},
            )

    async def open_to_all(request: Request) -> None:  # async: the limiter is only touched from the event loop's thread
        limit(request)

    guard = keyed if keys else open_to_all
    guarded = ((401,) if keys else ()) + ((429,) if limiter else ())

    @app.exception_handler(ServeError)
    async def refused(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: the same error model
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.post(
        "/predict",
        summary="Top-k labels of one or more images (multipart field `file`, or JSON base64); multi-label: the predicted set too",
        response_model=PredictAnswer,
        response_model_exclude_none=True,
        responses=error_responses(400, *guarded, 408, 413, 415, 422, 503),
        openapi_extra=predict_request_body(settings.max_images),
        dependencies=[Depends(guard)],
    )
    async def predict_images(request: Request, topk: Optional[int] = Query(None, ge=1, description="labels per image")) -> dict[str, Any]:
        uploads = await read_uploads(request, settings.max_images)
        if len(uploads) > settings.max_images:
            raise ServeError(413, f"{len(uploads)} images in one request; at most {settings.max_images} (max_images): split the request")
        with admission.admitted(len(uploads)):
            probs = await batcher.probabilities(await admission.inputs(uploads))
        k = min(topk or settings.topk, len(names))
        results = []
        sets = predictor.label_sets(torch.stack(probs)) if predictor.multilabel and probs else []
        for i, ((name, _), p) in enumerate(zip(uploads, probs)):
            scores, top = p.topk(k)
            result: dict[str, Any] = {
                "file": name,
                "predictions": [{"label": names[j], "prob": round(float(s), 6)} for s, j in zip(scores, top.tolist())],
            }
            if predictor.multilabel:
                result.update(labels=sets[i], probabilities={label: round(float(v), 6) for label, v in zip(names, p.tolist())})
            results.append(result)
        return {"version": served, "results": results, **(results[0] if len(results) == 1 else {})}

    @app.get("/health", summary="Liveness: the model is loaded and answers", response_model=Health)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": served,
            "classes": len(names),
            "batches": batcher.batches,
            "images": batcher.images,
            "pending": admission.pending,
        }

    @app.get(
        "/metadata",
        summary="Classes, preprocessing, metrics, how the model runs and the server's limits",
        response_model=Metadata,
        responses=error_responses(*guarded),
        dependencies=[Depends(guard)],
    )
    async def metadata() -> dict[str, Any]:
        return {**predictor.metadata, "runtime": predictor.settings, "limits": settings.public(), "version": served}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html(names, predictor.metadata.get("metrics") or {}, needs_key=bool(keys), multilabel=predictor.multilabel)

    return app


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 without being kept; what was sent is read and dropped
    first, so the client sees the answer and not a reset connection. A body still incomplete `upload_timeout`
    seconds after it started gets 408 and its connection closed, so a stalled or trickling upload cannot hold a
    connection and its buffers for ever (uvicorn has no body-read timeout of its own)."""

    def __init__(self, app: Any, limit: int, upload_timeout: float) -> None:
        self.app, self.limit, self.upload_timeout = app, limit, upload_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(receive, send, f"{int(declared):,} bytes")
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.upload_timeout

        async def counted() -> dict:
            nonlocal seen, complete
            if complete:  # after the body: Starlette waiting for a disconnect, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise ServeError(
                    408, f"the upload did not complete within {self.upload_timeout:g} s (upload_timeout_s); send the body at once"
                ) from None
            complete = message.get("type") != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ServeError(413, f"request body over the limit of {self.limit:,} bytes (max_request_mb); send fewer or smaller images")
            return message

        try:
            await self.app(scope, counted, send)
        except ServeError as exc:  # raised outside a route: a chunked body over the limit, or a stalled one
            if exc.status == 408:
                return await self._answer(send, 408, exc.reason)
            await self._refuse(receive, send, f"over {seen:,} bytes")

    async def _refuse(self, receive: Any, send: Any, size: str) -> None:
        message: dict = {"more_body": True}
        while message.get("more_body") and message.get("type") != "http.disconnect":
            message = await receive()
        await self._answer(
            send, 413, f"request body of {size} is over the limit of {self.limit:,} bytes (max_request_mb); send fewer or smaller images"
        )

    @staticmethod
    async def _answer(send: Any, status: int, reason: str) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"error": reason}).encode()})
