"""The HTTP API (FastAPI ingress): uploads in, predictions out; errors as JSON, bad input never a 500.

Everything the Api class calls is defined above it: `@serve.ingress` captures the class, with the
module globals it can see, when the decorator runs.
"""

import asyncio
import base64
import io
import time
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

import cxrcore
from cxrcore.decode import SUPPORTED_TYPES, ImageDecodeError, UnsupportedImageTypeError, decode_upload
from serve.schemas import ErrorBody, Explanation, ModelDetails, ModelInfo, Prediction

# Room for the multipart envelope around a file of the maximum size.
MULTIPART_SLACK_BYTES = 64 * 1024
READY_TIMEOUT_S = 5.0


class ApiError(Exception):
    """An error answer: HTTP status, a short code and a sentence saying what was wrong."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _error_response(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail})


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error_response(exc.status, exc.error, exc.detail)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _error_response(400, "invalid_request", detail)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(exc.status_code, error, str(exc.detail))


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"upload of {size} bytes exceeds the limit of {limit} bytes")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _model_error(exc: Exception) -> ApiError:
    """A failure behind the handle: 503 when no replica could take it, 500 when the model code failed."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        return ApiError(500, "prediction_failed", _describe(exc.cause if exc.cause else exc))
    return ApiError(503, "model_unavailable", _describe(exc))


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(500, "internal_error", _describe(exc))


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "undecodable image, image too small or a malformed request"},
    413: {"model": ErrorBody, "description": "upload larger than the configured limit"},
    415: {"model": ErrorBody, "description": "not a PNG, JPEG or DICOM file"},
    503: {"model": ErrorBody, "description": "no model replica could answer"},
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_UPLOAD_BODY = {
    "required": True,
    "description": "the image as multipart field `file`, or as the raw body with its content type",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        **{content_type: _BINARY for content_type in SUPPORTED_TYPES},
        "application/octet-stream": _BINARY,
    },
}

api = FastAPI(
    title="cxr",
    version=cxrcore.__version__,
    description="Chest X-ray classification (COVID, Lung_Opacity, Normal, Viral Pneumonia) with Ray Serve.",
    exception_handlers={
        ApiError: _api_error,
        RequestValidationError: _validation_error,
        HTTPException: _http_error,
        Exception: _internal_error,  # a bug still answers JSON (and is logged by Serve)
    },
)


# No CPU reserved, as for Serve's own proxies: the model replicas take the whole CPUs, so that a 2-core
# machine runs the app with `serve run`; decoding is light next to a forward pass.
@serve.deployment(name="Api", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    """Decodes uploads, asks the Classifier deployment, answers JSON."""

    def __init__(
        self, classifier: DeploymentHandle, max_upload_bytes: int = 20 * 1024**2, min_image_side: int = 64
    ) -> None:
        self._classifier = classifier
        self._max_upload_bytes = max_upload_bytes
        self._min_image_side = min_image_side

    @api.post(
        "/v1/predict",
        response_model=Prediction,
        responses=_ERRORS,
        openapi_extra={"requestBody": _UPLOAD_BODY},
        summary="Classify a chest X-ray (PNG, JPEG or DICOM; any size, 8/16-bit, gray/RGB/RGBA)",
    )
    async def predict(
        self,
        request: Request,
        explain: bool = Query(False, description="add a Grad-CAM heatmap and the lung mask used"),
    ) -> Prediction:
        start = time.perf_counter()
        data, content_type = await self._read_upload(request)
        image = await asyncio.to_thread(self._decode, data, content_type)
        try:
            if explain:
                result = await self._classifier.explain.remote(image)
            else:
                result = await self._classifier.predict.remote(image)
        except Exception as exc:
            raise _model_error(exc) from exc
        probabilities = result["probabilities"]
        explanation = None
        if explain:
            explanation = Explanation(
                target=result["target"],
                heatmap_png=_png_base64(result["heatmap"]),
                mask_png=None if result["mask"] is None else _png_base64(result["mask"]),
            )
        return Prediction(
            label=max(probabilities, key=probabilities.__getitem__),
            probabilities=probabilities,
            model=ModelInfo(**result["model"]),
            latency_ms=(time.perf_counter() - start) * 1000,
            explanation=explanation,
        )

    @api.get("/v1/model", response_model=ModelDetails, responses={503: _ERRORS[503]})
    async def model(self) -> ModelDetails:
        """The serving model and its card."""
        try:
            info = await self._classifier.info.remote()
        except Exception as exc:
            raise _model_error(exc) from exc
        return ModelDetails(**info)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """The API process is up (it may still be waiting for a model: see /readyz)."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: _ERRORS[503]})
    async def readyz(self) -> dict[str, Any]:
        """A classifier replica answers with a loaded model."""
        try:
            info = await asyncio.wait_for(self._classifier.info.remote(), READY_TIMEOUT_S)
        except Exception as exc:
            raise ApiError(503, "not_ready", f"no classifier replica answered: {_describe(exc)}") from exc
        return {"status": "ready", "model": info["model"]}

    async def _read_upload(self, request: Request) -> tuple[bytes, str | None]:
        """The uploaded file's bytes and declared type; refuses more than the limit without reading it all."""
        limit = self._max_upload_bytes
        content_type = request.headers.get("content-type", "")
        multipart = content_type.split(";")[0].strip().lower() == "multipart/form-data"
        body_limit = limit + (MULTIPART_SLACK_BYTES if multipart else 0)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > body_limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > body_limit:
                raise _too_large(len(body), limit)
        if not multipart:
            return bytes(body), content_type
        try:
            form = await MultiPartParser(
                request.headers, _once(bytes(body)), max_files=1, max_fields=8
            ).parse()
        except MultiPartException as exc:
            raise ApiError(400, "invalid_multipart", exc.message) from exc
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            await form.close()
            raise ApiError(
                400, "missing_file", "the multipart upload needs a field named 'file' holding the image"
            )
        data = await upload.read()
        await form.close()
        if len(data) > limit:
            raise _too_large(len(data), limit)
        return data, upload.content_type

    def _decode(self, data: bytes, content_type: str | None) -> np.ndarray:
        try:
            image = decode_upload(data, content_type)
        except UnsupportedImageTypeError as exc:
            raise ApiError(415, "unsupported_media_type", str(exc)) from exc
        except ImageDecodeError as exc:
            raise ApiError(400, "undecodable_image", str(exc)) from exc
        except Exception as exc:  # a decoder failing in a way it does not name is still a bad upload
            raise ApiError(400, "undecodable_image", f"cannot decode the upload: {_describe(exc)}") from exc
        height, width = image.shape
        if min(height, width) < self._min_image_side:
            raise ApiError(
                400,
                "image_too_small",
                f"image is {width}×{height}; each side needs {self._min_image_side}+ pixels",
            )
        return image
