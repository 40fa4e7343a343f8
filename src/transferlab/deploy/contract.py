"""The HTTP contract of transferlab-serve, as /openapi.json publishes it: request bodies, answers and every error.

A client generated from the schema (openapi-python-client) and a fuzzer (Schemathesis, `schemathesis.toml`) see
exactly what the server does: both request bodies of POST /predict (multipart field `file`, repeatable; JSON
base64), every status code with its headers, and one error model, `{"error": "<one line>"}`. The JSON body is
checked here, against the same limits the schema declares, so what the schema calls invalid the server refuses.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class ServeError(Exception):
    """A request the server refuses: its status, one line for the client, and headers (Retry-After, ...)."""

    def __init__(self, status: int, reason: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


class Error(BaseModel):
    error: str = Field(description="why the request was refused, in one line")


class Prediction(BaseModel):
    label: str
    prob: float = Field(ge=0, le=1, description="calibrated probability")


LABELS = "multi-label models only: the predicted set, every label whose calibrated probability is at or over its threshold (class order; empty: none)"
PROBABILITIES = "multi-label models only: every label's calibrated probability (its own sigmoid: they need not sum to 1)"


class ImageResult(BaseModel):
    file: str = Field(description="the upload's file name (multipart) or `image N` (JSON, 1-based)")
    predictions: list[Prediction] = Field(description="top-k labels, most probable first")
    labels: Optional[list[str]] = Field(None, description=LABELS)
    probabilities: Optional[dict[str, float]] = Field(None, description=PROBABILITIES)


class PredictAnswer(BaseModel):
    version: str = Field(description="the transferlab version that answered")
    results: list[ImageResult] = Field(description="one entry per image, in request order")
    file: Optional[str] = Field(None, description="only when exactly one image was sent: results[0].file")
    predictions: Optional[list[Prediction]] = Field(None, description="only when exactly one image was sent: results[0].predictions")
    labels: Optional[list[str]] = Field(None, description="only when exactly one image was sent: results[0].labels (multi-label models)")
    probabilities: Optional[dict[str, float]] = Field(
        None, description="only when exactly one image was sent: results[0].probabilities (multi-label models)"
    )


class Health(BaseModel):
    status: str
    version: str
    classes: int = Field(description="labels the model knows")
    batches: int = Field(description="forward passes since the start")
    images: int = Field(description="images answered since the start")
    pending: int = Field(description="images admitted and not answered yet (at most queue_size)")


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    class_names: list[str]
    task: str = Field("single", description="single (one class per image, softmax) or multilabel (a set of labels; `thresholds` per label)")
    runtime: dict[str, Any] = Field(description="how the model runs (runtime, device, precision, ...)")
    limits: dict[str, Any] = Field(description="the server's request limits (conf/serve.yaml)")
    version: str


_STATUS = {
    400: "the body or an image is unreadable (truncated, empty, bad base64 or JSON)",
    401: "`Authorization: Bearer <key>` is missing or wrong (only when the server has keys)",
    408: "the body did not arrive within upload_timeout_s; the connection is closed",
    413: "over a limit: max_request_mb, max_images, max_image_pixels, max_request_pixels",
    415: "not an image, or a content type other than multipart/form-data and application/json",
    422: "a missing or malformed field or parameter",
    429: "over rate_limit requests per minute from this address (only when rate_limit is set)",
    503: "the queue is full (queue_size images waiting); retry after Retry-After seconds",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds until a request is allowed again", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds after which to retry", "schema": {"type": "integer"}}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these statuses: the error model, the meaning, the headers each one carries."""
    return {
        status: {"model": Error, "description": _STATUS[status], **({"headers": _HEADERS[status]} if status in _HEADERS else {})}
        for status in statuses
    }


def predict_request_body(max_images: int) -> dict[str, Any]:
    """The `requestBody` of POST /predict (FastAPI's `openapi_extra`): the route reads the body itself, so that a
    bad upload gets one line instead of a validation dump, and this is its description."""
    image = {
        "type": "string",
        "minLength": 1,
        "contentEncoding": "base64",
        "description": "an image's bytes in base64 (a data: URL prefix is allowed)",
    }
    files = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": max_images}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "title": "Uploads",
                        "properties": {"file": {**files, "description": f"one to {max_images} images, the field repeated"}},
                        "required": ["file"],
                    },
                    "encoding": {"file": {"contentType": "image/*, application/octet-stream"}},
                },
                "application/json": {
                    "schema": {
                        "title": "Base64Images",
                        "type": "object",
                        "description": 'one image, {"image": ...}, or several, {"images": [...]}',
                        "properties": {"image": image, "images": {"type": "array", "items": image, "minItems": 1, "maxItems": max_images}},
                        "additionalProperties": False,
                        "minProperties": 1,
                    }
                },
            },
        }
    }


def json_images(body: Any, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of a JSON body {"image": b64} or {"images": [b64, ...]} ("images" wins when both are sent)."""
    if not isinstance(body, dict) or not ("image" in body or "images" in body):
        raise ServeError(422, 'JSON needs "image": "<base64>" or "images": ["<base64>", ...]')
    unknown = sorted(set(body) - {"image", "images"})
    if unknown:
        raise ServeError(422, f'unknown JSON field {unknown[0]!r}: send only "image" or "images"')
    if "image" in body and not isinstance(body["image"], str):
        raise ServeError(422, '"image" must be a base64 string')
    encoded = body.get("images", [body.get("image")])
    if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
        raise ServeError(422, '"images" must be a list of base64 strings')
    if not encoded:
        raise ServeError(422, f'"images" is empty: send 1 to {max_images} base64 strings')
    if len(encoded) > max_images:
        raise ServeError(413, f"{len(encoded)} images in one request; at most {max_images} (max_images): split the request")
    try:
        return [(f"image {i + 1}", base64.b64decode(e.split(",", 1)[-1], validate=True)) for i, e in enumerate(encoded)]
    except (binascii.Error, ValueError):
        raise ServeError(400, "an image is not valid base64") from None
