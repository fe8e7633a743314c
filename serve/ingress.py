"""The HTTP API (FastAPI ingress): uploads in, predictions out; errors as JSON, bad input never a 500.

`create_api` builds the FastAPI app around a classifier handle. The `Api` deployment builds one per
replica (Serve's late-bound ingress, `__serve_build_asgi_app__`); tests build one around an in-process
classifier and call it through httpx's ASGI transport.
"""

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastapi_offline
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

import cxrcore
from cxrcore import telemetry
from cxrcore.data.transforms import resize_image
from cxrcore.decode import (
    SUPPORTED_TYPES,
    DecoderUnavailableError,
    ImageDecodeError,
    UnsupportedImageTypeError,
    decode_upload,
)
from serve.deployments import public_text, replica_handle
from serve.schemas import ErrorBody, Explanation, Health, ModelDetails, ModelInfo, Prediction, Readiness

log = logging.getLogger("ray.serve")

# Room for the multipart envelope around a file of the maximum size.
MULTIPART_SLACK_BYTES = 64 * 1024
READY_TIMEOUT_S = 5.0
# A replica that dies (SIGKILL, OOM kill, a lost node) fails the requests it was working on with a
# RayActorError (ActorDiedError, ActorUnavailableError), also when it was a replica further down (the
# segmenter's); Serve's router re-sends only those it had not accepted yet. A prediction changes
# nothing, so the ingress asks again after a short backoff, and the router picks a live replica. Model
# errors and a full queue are answered at once.
REPLICA_ATTEMPTS = 3
MAX_FORM_FIELDS = 64
"""Text fields a multipart upload may carry beside its file (a viewer's study and series UIDs, an accession
number); the file part's own size limit bounds the memory, these the parser's work."""
REPLICA_RETRY_BACKOFF_S = 0.05
# Swagger UI and ReDoc as files of the fastapi-offline package, served by the app: /docs and /redoc
# work on a cluster without internet access.
DOCS_ASSETS_URL = "/docs-assets"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


@dataclass(frozen=True)
class ApiLimits:
    """What the API accepts, and what it tells a client to wait after a 503."""

    max_upload_bytes: int = 64 * 1024**2
    min_image_side: int = 64
    retry_after_s: float = 1.0
    upload_idle_timeout_s: float = 15.0
    """An upload that sends nothing for this long is refused (408): a stalled or trickling client must
    not hold one of the ingress's places, which are bounded, for as long as its connection lasts."""
    upload_timeout_s: float = 120.0
    """An upload still arriving after this long is refused (408): 64 MB takes 38 s at 14 Mbit/s."""
    cors_origins: tuple[str, ...] = ()
    """Web origins whose pages may call the API from a browser (CORS; "*" for any): a viewer served from
    another host than the API. None by default: a browser then keeps every answer from such a page."""
    model_timeout_s: float = 30.0
    """A request the classifier has not answered after this long gets 503 `model_unavailable`: with no
    replica running (one failing to start, say its registry gone) a request waited for one without end,
    and a review's clients all ran into their own 60 s timeouts without an answer."""
    audit_log: bool = False
    """One JSON line per answered prediction (`audit_line`) in a file of `audit_dir` (`AuditTrail`)."""
    audit_dir: str = ""
    """Where the audit files are; "" is Serve's log folder of the node (`RAY_SESSION/logs/serve`)."""
    audit_user_header: str = ""
    """The header an authenticating gateway in front sets to the signed-in user, recorded as `user`."""

    @property
    def accepted(self) -> str:
        """The sentence every upload error ends with."""
        side, megabytes = self.min_image_side, self.max_upload_bytes / 1024**2
        return (
            f"Send one PNG, JPEG or DICOM image, at least {side}×{side} pixels and at most "
            f"{megabytes:g} MB, as the request body or as the multipart field 'file'."
        )

    @property
    def retry_after(self) -> dict[str, str]:
        """The Retry-After header (whole seconds, rounded up) of every 503."""
        return {"Retry-After": str(max(0, math.ceil(self.retry_after_s)))}


class ApiError(Exception):
    """An error answer: HTTP status, a short code, a sentence saying what was wrong, extra headers."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _error_response(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    telemetry.record_request_error(error, status)
    # Serve's access line gives the status and the request id; this, in the same replica log, says why.
    log.info("answered %d %s: %s", status, error, detail)
    return JSONResponse(status_code=status, content={"error": error, "detail": detail}, headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error_response(exc.status, exc.error, exc.detail, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
        + (" (true or false)" if e["type"] == "bool_parsing" else "")
        for e in exc.errors()
    )
    return _error_response(400, "invalid_request", detail)


ROUTES = "POST /v1/predict, GET /v1/model, GET /healthz, GET /readyz and the API's docs at GET /docs"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail, headers = str(exc.detail), exc.headers
    if exc.status_code == 404:  # a trailing slash or a typo: say what there is
        detail = f"no route {request.method} {request.url.path}; this API answers {ROUTES}"
    if exc.status_code == 405:  # every method of the path: HEAD is a route of its own beside GET
        allowed = sorted(
            {
                method
                for route in request.app.router.routes
                if (match := getattr(route, "path_regex", None)) and match.match(request.url.path)
                for method in getattr(route, "methods", None) or ()
            }
        )
        headers = {**(headers or {}), "Allow": ", ".join(allowed)} if allowed else headers
        # many clients show the body alone, not the Allow header
        detail = f"{request.method} {request.url.path}: this path answers {', '.join(allowed)}"
        origin = request.headers.get("origin")
        if request.method == "OPTIONS" and origin and request.headers.get("access-control-request-method"):
            # a browser's preflight to a server that allows no other origin: the page sees a network error
            detail = (
                f"a browser's cross-origin request from {origin}: this server allows none; start it with "
                f"--arg cors_origins={origin} (serve/README.md, Browsers)"
            )
    return _error_response(exc.status_code, error, detail, headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(500, "internal_error", _describe(exc))


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


def _multipart_boundary(content_type: str) -> str | None:
    """The boundary parameter of a multipart/form-data content type (quoted or not), or None."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "boundary" and value.strip():
            return value.strip().strip('"')
    return None


class _UploadParser(MultiPartParser):
    """Starlette's multipart parser, keeping each field's bytes as sent (`fields`: name → bytes and the
    part's Content-Type): a file part without a filename, as `curl -F 'file=<x.png'`, Go's `CreateFormField`
    or OkHttp's `addFormDataPart(name, value)` send it, is a text field to Starlette, decoded to text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields: dict[str, tuple[bytes, str | None]] = {}

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            declared = dict(part.item_headers).get(b"content-type")
            self.fields[part.field_name] = (
                bytes(part.data),
                declared.decode("latin-1") if declared else None,
            )
        super().on_part_end()


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _describe(exc: BaseException) -> str:
    """An exception as an error answer tells it: its first line, with the server's paths shortened (the
    server's log keeps them whole)."""
    return public_text(_first_line(exc))


HASH_IN_LOOP_BYTES = 1 << 20
"""Uploads up to this size are hashed in the event loop (a 299 px PNG of 100 KB: 0.1 ms); larger ones in a
thread (hashlib lets go of the GIL), so that a detector-sized DICOM does not hold the other requests up."""


USUAL_FIELD_NAMES = frozenset({
    "file", "image", "images", "img", "upload", "uploads", "files", "file[]", "files[]", "data", "dicom",
    "xray", "x-ray", "picture", "photo", "attachment", "body",
})  # fmt: skip
"""Field names a client may have sent its image under by mistake: named in the `missing_file` answer."""


def _fields_said(sent: list[str]) -> str:
    """The multipart fields a body without 'file' had, as its error says them: usual names by name, others
    counted. A field named after the file (`curl -F "Smith_John_MRN-0043.dcm=@x.dcm"`) was echoed into the
    answer and the replica's log (a privacy review, session 52): a file name may name a patient.

    >>> _fields_said(["image"]), _fields_said(["Doe_Jane_MRN-1.dcm", "image"]), _fields_said(["a", "b"])
    (" (its fields: 'image')", " (its fields: 'image', and 1 other)", ' (its fields: 2 others)')
    """
    if not sent:
        return ""
    usual = [repr(name) for name in sent if name.strip().lower() in USUAL_FIELD_NAMES]
    others = len(sent) - len(usual)
    other = f"{others} other{'s' if others > 1 else ''}" if others else ""
    said = ", ".join(usual) + (", and " if usual and other else "") + other
    return f" (its fields: {said})"


_TRUE, _FALSE = frozenset({"", "true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


def explain_flag(value: str | None) -> bool:
    """The `explain` query parameter: present alone (`?explain`, as the README writes it) or a yes is true.

    As a plain boolean, `/v1/predict?explain` (an empty value) was refused 400 `invalid_request`, while the
    documentation and every example wrote it that way.

    >>> explain_flag(None), explain_flag(""), explain_flag("TRUE"), explain_flag("0")
    (False, True, True, False)
    """
    if value is None:
        return False
    word = value.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ApiError(
        400, "invalid_request", f"query.explain: {value[:40]!r} is neither true nor false; send ?explain "
        "alone or ?explain=true to explain, leave it out (or ?explain=false) not to"
    )  # fmt: skip


def _caller(request: Request, user_header: str) -> dict[str, str | None]:
    """Who asked, for the audit line, as the request says it: the peer's address (behind Serve's HAProxy,
    the proxy's), the X-Forwarded-For header as sent (the hop a proxy in front appended is its last entry;
    the entries before it are what the client said), and the user the gateway's `user_header` names (none
    where unset: a header any client can send is no identity unless a gateway in front sets it)."""
    forwarded = request.headers.get("X-Forwarded-For")
    user = request.headers.get(user_header) if user_header else None
    return {
        "peer": request.client.host if request.client else None,
        "forwarded_for": forwarded[:256] if forwarded else None,  # as the client sent them: bounded
        "user": user[:256] if user else None,
    }


AUDIT_FILE = "cxr_audit_{replica}.jsonl"


class AuditTrail:
    """One JSON line per answered prediction, appended to this replica's own file in `folder` (Serve's log
    folder where ""), which is opened for each line: a file moved away (rotated) is made anew, and so is a
    folder removed. A line that cannot be written fails its prediction (`write` raises ApiError 503
    `audit_unavailable`), and /readyz says not ready: a site that asked for a trail gets no answer the trail
    lacks (a verifier, session 52: with the folder removed, a logging handler answered 500 after the
    prediction was computed, and a full disk would have lost lines with 200s).

    It had been the `cxr.audit` logger, which a replica keeps at WARNING: `--arg audit_log=true` wrote
    nothing (a privacy review, session 52; the unit test had raised the level itself)."""

    def __init__(self, folder: str = "", retry_after: dict[str, str] | None = None) -> None:
        if not folder:
            from ray.serve._private.logging_utils import get_serve_logs_dir

            folder = get_serve_logs_dir()
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (tests, an embedded app)
            replica = f"pid{os.getpid()}"
        self.path = Path(folder).expanduser().absolute() / AUDIT_FILE.format(replica=replica)
        self._retry_after = retry_after or {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log.info("audit trail: one line per prediction in %s", self.path)

    def write(self, line: str) -> None:
        try:
            self._append(line)
        except FileNotFoundError:  # its folder removed: made again
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._append(line)
            except OSError as exc:
                raise self._unavailable(exc) from exc
        except OSError as exc:
            raise self._unavailable(exc) from exc

    def problem(self) -> str | None:
        """Why a line could not be written now (for /readyz), or None."""
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            return f"the audit trail's folder {folder} is not a folder"
        existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
        if not os.access(existing, os.W_OK):
            return f"the audit trail's folder {folder} is not writable"
        return None

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")

    def _unavailable(self, exc: OSError) -> ApiError:
        log.error("audit trail %s: a line not written (%s), its prediction not answered", self.path, exc)
        return ApiError(
            503,
            "audit_unavailable",
            f"the prediction could not be recorded in the audit trail ({type(exc).__name__}: "
            f"{exc.strerror or exc}), so it is not answered; retry once the trail's folder is writable",
            self._retry_after,
        )


def audit_line(prediction: Prediction, caller: Mapping[str, str | None] | None = None) -> str:
    """A prediction as one JSON line for a hospital's audit trail: which request, when, which weights (and
    segmenter) answered which file (by its sha256), what they said; no pixels, no file name.

    >>> from serve.schemas import ModelInfo
    >>> model = ModelInfo(name="cnn_lstm", version="3", ref="cnn_lstm:3", weights_sha256="ab" * 32)
    >>> probabilities = {"COVID": 0.1, "Lung_Opacity": 0.2, "Normal": 0.6, "Viral Pneumonia": 0.1}
    >>> line = audit_line(Prediction(label="Normal", probabilities=probabilities, model=model,
    ...     input_sha256="cd" * 32, latency_ms=12.0, request_id="r-1", answered_at="2026-12-06T01:00Z"))
    >>> json.loads(line)["probability"], json.loads(line)["model"]
    (0.6, 'cnn_lstm:3')
    """
    check = prediction.input_check
    return json.dumps(
        {
            "request_id": prediction.request_id,
            "answered_at": prediction.answered_at,
            "model": prediction.model.ref,
            "weights_sha256": prediction.model.weights_sha256,
            "segmenter_weights_sha256": prediction.model.segmenter.weights_sha256
            if prediction.model.segmenter
            else None,
            "input_sha256": prediction.input_sha256,
            "label": prediction.label,
            "probability": prediction.probabilities[prediction.label],
            "unusual": None if check is None else check.unusual,
            "explain": prediction.explanation is not None,
            **(caller or {}),
        },
        separators=(",", ":"),
    )


def _request_id(request: Request) -> str | None:
    """The id Serve gave this request (its X-Request-ID header and access log line); the client's own
    X-Request-ID where Serve's context has none (the app called outside Serve)."""
    with contextlib.suppress(Exception):  # Serve's request context is not public API
        from ray.serve.context import _get_serve_request_context

        if found := _get_serve_request_context().request_id:
            return str(found)
    return request.headers.get("x-request-id")


async def _sha256(data: bytes) -> str:
    """The upload's sha256, hex (Prediction.input_sha256)."""
    if len(data) <= HASH_IN_LOOP_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "undecodable image, image too small or a malformed request"},
    408: {"model": ErrorBody, "description": "`upload_timeout`: the upload stalled or took too long"},
    413: {"model": ErrorBody, "description": "upload larger than the configured limit"},
    415: {"model": ErrorBody, "description": "not a PNG, JPEG or DICOM file"},
    # Declaring the class of client errors also keeps FastAPI from adding a 422 this API never sends.
    "4XX": {"model": ErrorBody, "description": "any other client error (every error is this JSON)"},
    500: {"model": ErrorBody, "description": "a bug in the server; the body says what failed"},
    503: {
        "model": ErrorBody,
        "description": "`overloaded` (the queue for the model is full), no model replica could answer, "
        "`decoder_unavailable` (the server could not start the decoder of a compressed DICOM) or "
        "`shutting_down` (the server is stopping)",
        "headers": _RETRY_AFTER,
    },
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


class _Routes:
    """The endpoints, bound to one classifier handle and one set of limits."""

    def __init__(self, classifier: Any, limits: ApiLimits) -> None:
        self._classifier = classifier
        self._limits = limits
        self._audit = AuditTrail(limits.audit_dir, limits.retry_after) if limits.audit_log else None
        self._input_size: int | None = None  # the model's base size, from the classifier's answers
        self._in_flight = 0
        self._draining = False

    async def predict(
        self,
        request: Request,
        explain: str | None = Query(
            None,
            description="add a Grad-CAM heatmap and the lung mask used: `?explain` alone, or "
            "`?explain=true` (`1`, `yes`, `on`); `false` (`0`, `no`, `off`) or none answers without",
            openapi_examples={"on": {"value": "true"}, "off": {"value": "false"}},
        ),
    ) -> Prediction:
        """Class probabilities of one chest X-ray; 503 `overloaded` with Retry-After when at capacity."""
        explained = explain_flag(explain)
        if self._draining:
            # The upload is read first: a server that answers and closes while its client still sends the
            # body may reset the connection, and the client then sees no 503 at all.
            with contextlib.suppress(ApiError):
                await self._read_upload(request)
            raise ApiError(
                503,
                "shutting_down",
                "the server is shutting down and takes no new request; send it again to a server that runs",
                {**self._limits.retry_after, "Connection": "close"},
            )
        self._in_flight += 1  # changed only by the handlers, on the app's event loop; drain only reads it
        try:
            return await self._answer(request, explained)
        finally:
            self._in_flight -= 1

    async def drain(self, timeout_s: float) -> int:
        """Refuse new predictions (503 `shutting_down`, and /readyz 503) and wait, at most `timeout_s`, for
        those in flight to be answered; return how many still are. `cxr serve` calls it on Ctrl-C or
        SIGTERM before Serve stops, which drops the connections of requests still in flight."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self._in_flight

    async def _answer(self, request: Request, explain: bool) -> Prediction:
        start = time.perf_counter()
        data, content_type = await self._read_upload(request)
        if explain:
            image = await asyncio.to_thread(self._decode, data, content_type)
            result = await self._ask("explain", image)
        else:
            result = await self._predict(data, content_type)
        probabilities = result["probabilities"]
        explanation = None
        if explain:
            explanation = Explanation(
                target=result["target"],
                heatmap_png=_png_base64(result["heatmap"]),
                heatmap_empty=result["heatmap_empty"],
                mask_png=None if result["mask"] is None else _png_base64(result["mask"]),
            )
        model, label = ModelInfo(**result["model"]), max(probabilities, key=probabilities.__getitem__)
        digest = await _sha256(data)
        latency_ms = (time.perf_counter() - start) * 1000
        check = result.get("input_check")
        unusual = None if check is None else bool(check.get("unusual"))
        telemetry.record_prediction(model.name, model.version, label, latency_ms, explain, unusual)
        prediction = Prediction(
            label=label,
            probabilities=probabilities,
            model=model,
            input_sha256=digest,
            latency_ms=latency_ms,
            explanation=explanation,
            input_check=result.get("input_check"),
            request_id=_request_id(request),
            answered_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )
        if self._audit is not None:
            self._audit.write(audit_line(prediction, _caller(request, self._limits.audit_user_header)))
        return prediction

    async def _predict(self, data: bytes, content_type: str | None) -> Any:
        """The classifier's answer for an upload, sent at the model's base size once that is known.

        The size is learnt from the answers (`serve.deployments.classify`); after a swap to a model of
        another size, the one stale answer makes the ingress send the original upload instead.
        """
        size = self._input_size
        image, sent = await asyncio.to_thread(self._decode_for, data, content_type, size)
        result = await self._ask("predict", sent, size if sent is not image else None)
        if "probabilities" not in result:  # resized for a model no longer served
            result = await self._ask("predict", image, None)
        self._input_size = result["input_size"]
        return result

    def _decode_for(
        self, data: bytes, content_type: str | None, size: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The decoded upload, and the same resized to `size` as the classifier would resize it."""
        image = self._decode(data, content_type)
        return image, image if size is None else resize_image(image, size)

    async def model(self) -> ModelDetails:
        """The serving model and its card."""
        return ModelDetails(**await self._ask("info"))

    async def healthz(self) -> Health:
        """The API process is up (it may still be waiting for a model: see /readyz)."""
        return Health()

    async def readyz(self) -> Readiness:
        """A classifier replica answers with a loaded model."""
        if self._draining:
            raise ApiError(503, "not_ready", "the server is shutting down", self._limits.retry_after)
        if self._audit is not None and (problem := self._audit.problem()):
            raise ApiError(503, "not_ready", f"{problem}: predictions are refused", self._limits.retry_after)
        try:
            info = await asyncio.wait_for(self._classifier.info.remote(), READY_TIMEOUT_S)
        except Exception as exc:
            what = f"no classifier replica answered: {_describe(exc)}"
            raise ApiError(503, "not_ready", what, self._limits.retry_after) from exc
        return Readiness(model=ModelInfo(**info["model"]))

    async def _ask(self, method: str, *args: Any) -> Any:
        """The classifier's `method(*args)`, asked again (REPLICA_ATTEMPTS in all) while replicas die, for
        at most `model_timeout_s`: then 503 `model_unavailable`."""
        timeout = self._limits.model_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._ask_replicas(method, *args)
        except TimeoutError as exc:
            raise ApiError(
                503,
                "model_unavailable",
                f"the model did not answer within {timeout:g} s: its replicas are starting (after a failure, "
                "see /readyz) or too busy; retry later",
                self._limits.retry_after,
            ) from exc

    async def _ask_replicas(self, method: str, *args: Any) -> Any:
        attempt = 1
        while True:
            try:
                return await getattr(self._classifier, method).remote(*args)
            except RayActorError as exc:
                if attempt == REPLICA_ATTEMPTS:
                    raise self._model_error(exc) from exc
                log.warning(
                    "%s: a replica died (%s); asking again (%d of %d)",
                    method, _first_line(exc), attempt + 1, REPLICA_ATTEMPTS,
                )  # fmt: skip
                await asyncio.sleep(REPLICA_RETRY_BACKOFF_S * 2 ** (attempt - 1))
                attempt += 1
            except Exception as exc:
                raise self._model_error(exc) from exc

    def _model_error(self, exc: Exception) -> ApiError:
        """A failure behind the handle: 503 when the model is at capacity or unreachable, 500 for a bug."""
        # First: a full queue further down (the segmenter's) arrives wrapped in a RayTaskError.
        if isinstance(exc, BackPressureError):
            return ApiError(
                503,
                "overloaded",
                f"the model's queue is full (its replicas are busy, or not running: see /readyz); retry "
                f"after {self._limits.retry_after['Retry-After']} s ({exc.message})",
                self._limits.retry_after,
            )
        if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
            return ApiError(500, "prediction_failed", _describe(exc.cause if exc.cause else exc))
        return ApiError(503, "model_unavailable", _describe(exc), self._limits.retry_after)

    def _upload_error(self, status: int, error: str, what: str) -> ApiError:
        return ApiError(status, error, f"{what.rstrip('.')}. {self._limits.accepted}")

    async def _read_upload(self, request: Request) -> tuple[bytes, str | None]:
        """The uploaded file's bytes and declared type; refuses more than the limit without reading it all."""
        limit = self._limits.max_upload_bytes
        content_type = request.headers.get("content-type", "")
        multipart = content_type.split(";")[0].strip().lower() == "multipart/form-data"
        body_limit = limit + (MULTIPART_SLACK_BYTES if multipart else 0)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > body_limit:
            raise self._too_large(int(declared))
        # Joined once at the end: growing one buffer chunk by chunk, then copying it, took 6-7 ms of CPU
        # per 8 MB upload (a detector's DICOM) against 0.6 ms.
        chunks: list[bytes] = []
        received = 0
        loop = asyncio.get_running_loop()
        idle, whole = self._limits.upload_idle_timeout_s, self._limits.upload_timeout_s
        end = loop.time() + whole
        try:
            # timeout_at: a point in time, as reschedule takes (asyncio.timeout's delay of loop.time() + idle,
            # hours, let a client that sent its headers and then nothing hold its place without end).
            async with asyncio.timeout_at(min(end, loop.time() + idle)) as deadline:
                async for chunk in request.stream():
                    deadline.reschedule(min(end, loop.time() + idle))
                    chunks.append(chunk)
                    received += len(chunk)
                    if received > body_limit:
                        raise self._too_large(received, exact=False)
        except ClientDisconnect:
            # The client's choice (a cancelled upload, a dropped network), not a fault here.
            raise ApiError(
                499,
                "client_disconnected",
                f"the client closed the connection mid-upload ({received} bytes received)",
            ) from None
        except TimeoutError:
            late = loop.time() >= end
            what = f"took longer than {whole:g} s" if late else f"sent nothing for {idle:g} s"
            raise ApiError(
                408,
                "upload_timeout",
                f"the upload {what} ({received} bytes received); send it again",
                {"Connection": "close"},  # the rest of its body would arrive as the next request
            ) from None
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # the bytes would be read as the image itself; refused once read whole
            what = f"Content-Encoding {encoding} is not supported; send the file uncompressed"
            raise self._upload_error(415, "unsupported_media_type", what)
        if not body and not ({"content-length", "transfer-encoding"} & set(request.headers.keys())):
            # an HTTP/1.0 client that ends its body by closing the connection: the server reads none of it
            what = (
                "no Content-Length and no chunked Transfer-Encoding, so no body could be read (a body ended "
                "by closing the connection is not one); send the Content-Length header"
            )
            raise self._upload_error(411, "length_required", what)
        if not multipart:
            return body, content_type
        parser = _UploadParser(
            request.headers, _once(body), max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=limit
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            many = exc.message.startswith("Too many")  # fields beside the file: a viewer's study UIDs
            what = "multipart body with too many parts" if many else "malformed multipart body"
            what = f"{what}: {exc.message}"
            raise self._upload_error(400, "invalid_multipart", what) from exc
        upload = form.get("file")
        if isinstance(upload, UploadFile):
            data, declared_type = await upload.read(), upload.content_type
        elif "file" in parser.fields:  # sent without a filename: `curl -F file=<x.png`, Go's CreateFormField
            data, declared_type = parser.fields["file"]
        else:
            await form.close()
            boundary = _multipart_boundary(content_type)
            if boundary and f"--{boundary}--".encode() not in body:
                # A body cut short (a client that stopped mid-upload and closed cleanly) loses its last
                # part, the file among them: say so, rather than that no file was sent.
                what = "malformed multipart body: it ends before its closing boundary (cut short?)"
                raise self._upload_error(400, "invalid_multipart", what)
            named = _fields_said(sorted({*form.keys(), *parser.fields}))
            what = f"the multipart body has no file in a field named 'file'{named}; name the image's 'file'"
            raise self._upload_error(400, "missing_file", what)
        await form.close()
        if len(data) > limit:
            raise self._too_large(len(data))
        return data, declared_type

    def _too_large(self, size: int, exact: bool = True) -> ApiError:
        """413; `exact` False when `size` is what arrived before the limit was passed, not the whole."""
        upload = f"upload of {size} bytes" if exact else f"upload of more than {size} bytes"
        what = f"{upload} exceeds the limit of {self._limits.max_upload_bytes} bytes"
        return self._upload_error(413, "payload_too_large", what)

    def _decode(self, data: bytes, content_type: str | None) -> np.ndarray:
        try:
            image = decode_upload(data, content_type)
        except UnsupportedImageTypeError as exc:
            raise self._upload_error(415, "unsupported_media_type", str(exc)) from exc
        except ImageDecodeError as exc:
            raise self._upload_error(400, "undecodable_image", str(exc)) from exc
        except DecoderUnavailableError as exc:  # the server's trouble, not the file's: try again later
            raise ApiError(503, "decoder_unavailable", str(exc), self._limits.retry_after) from exc
        height, width = image.shape
        side = self._limits.min_image_side
        if min(height, width) < side:
            raise self._upload_error(
                400, "image_too_small", f"image is {width}×{height}; each side needs {side}+ pixels"
            )
        if image.min() == image.max():  # as ingest refuses it: no model output would mean anything
            raise self._upload_error(
                400,
                "blank_image",
                f"blank image: every pixel is {image.min()} after decoding (an empty exposure, or a DICOM "
                "whose rescale or window is not a finite number)",
            )
        return image


def _add_docs(api: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc from files the app serves itself: no CDN, no fonts."""
    api.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    def assets(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{DOCS_ASSETS_URL}"

    def page(request: Request, render: Callable[..., HTMLResponse], **files: Any) -> HTMLResponse:
        """A docs page of the API's own schema and files, its <html> in English for screen readers."""
        root = request.scope.get("root_path", "")
        shown = render(openapi_url=f"{root}{api.openapi_url}", title=f"{api.title} API", **files)
        body = bytes(shown.body).replace(b"<html>", b'<html lang="en">', 1)
        return HTMLResponse(body, status_code=shown.status_code)

    async def swagger_ui(request: Request) -> HTMLResponse:
        return page(
            request,
            get_swagger_ui_html,
            swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets(request)}/swagger-ui.css",
            swagger_favicon_url=f"{assets(request)}/favicon.png",
            oauth2_redirect_url=None,
            # Swagger UI would otherwise fetch a validity badge from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    async def redoc(request: Request) -> HTMLResponse:
        return page(
            request,
            get_redoc_html,
            redoc_js_url=f"{assets(request)}/redoc.standalone.js",
            redoc_favicon_url=f"{assets(request)}/favicon.png",
            with_google_fonts=False,
        )

    api.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    api.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    api.docs_url, api.redoc_url = "/docs", "/redoc"  # read by Serve to link the docs in its dashboard


def create_api(classifier: Any, limits: ApiLimits | None = None) -> FastAPI:
    """The FastAPI app answering with `classifier`: a Classifier DeploymentHandle (or anything whose
    `predict/explain/info.remote(...)` are awaitable the same way)."""
    limits = limits or ApiLimits()
    routes = _Routes(classifier, limits)
    api = FastAPI(
        title="cxr",
        version=cxrcore.__version__,
        description="Chest X-ray classification (COVID, Lung_Opacity, Normal, Viral Pneumonia) with Ray "
        f"Serve. Uploads: {limits.accepted} Every error is JSON `{{error, detail}}`.",
        docs_url=None,
        redoc_url=None,
        # A 307 to the path without its slash answers a whole upload with an empty body that httpx and curl
        # do not follow by default (and names http:// behind a TLS terminator): a JSON 404 says what to call.
        redirect_slashes=False,
        exception_handlers={
            ApiError: _api_error,
            RequestValidationError: _validation_error,
            HTTPException: _http_error,
            Exception: _internal_error,  # a bug still answers JSON (and is logged by Serve)
        },
    )
    api.add_api_route(
        "/v1/predict",
        routes.predict,
        operation_id="predict",
        methods=["POST"],
        response_model=Prediction,
        responses=_ERRORS,
        openapi_extra={"requestBody": _UPLOAD_BODY},
        summary="Classify a chest X-ray (PNG, JPEG or DICOM; any size, 8/16-bit, gray/RGB/RGBA)",
    )
    api.add_api_route(
        "/v1/model",
        routes.model,
        operation_id="model",
        methods=["GET"],
        response_model=ModelDetails,
        responses={status: _ERRORS[status] for status in ("4XX", 500, 503)},
    )
    # operation ids by name: what a generated Java or .NET client calls its methods
    api.add_api_route(
        "/healthz", routes.healthz, methods=["GET"], response_model=Health, operation_id="healthz"
    )
    api.add_api_route(
        "/readyz",
        routes.readyz,
        methods=["GET"],
        response_model=Readiness,
        responses={503: _ERRORS[503]},
        operation_id="readyz",
    )
    # HEAD, as uptime monitors and `curl -I` ask (the server sends the headers only).
    for path, endpoint in (
        ("/healthz", routes.healthz),
        ("/readyz", routes.readyz),
        ("/v1/model", routes.model),
    ):
        api.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
    _add_docs(api)
    api.state.routes = routes  # the Api deployment drains them (`Api.drain`)
    if limits.cors_origins:
        api.add_middleware(
            _JsonCors,
            allow_origins=list(limits.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["Retry-After", "X-Request-ID"],  # a page can quote the id Serve logs
            max_age=600,
        )
    return api


class _JsonCors(CORSMiddleware):
    """Starlette's CORS, whose refusal of a preflight (an origin or method not allowed) is this API's JSON
    naming what is allowed, as every error is (a browser keeps a refused preflight from the page: this is
    for the developer's curl and the server's log)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode("utf-8", "replace")
        origin = request_headers.get("origin", "")
        if not self.is_allowed_origin(origin):
            allowed = ", ".join(self.allow_origins) or "none"
            detail = (
                f"{refused} (origin {origin!r}; allowed: {allowed}, compared exactly, without a trailing "
                "slash); start the server with --arg cors_origins=ORIGIN for a page from another origin"
            )
        else:  # the method or a header: this API answers GET and POST
            method = request_headers.get("access-control-request-method", "")
            detail = f"{refused} ({method or 'no method'} asked; this API answers GET and POST)"
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        return _error_response(response.status_code, "cors_refused", detail, headers)


# No CPU reserved, as for Serve's own proxies: the model replicas take the whole CPUs, so that a 2-core
# machine runs the app with `serve run`; decoding is light next to a forward pass. build_app sets
# max_ongoing_requests and max_queued_requests from the classifier's capacity.
@serve.deployment(name="Api", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Api:
    """Decodes uploads, asks the Classifier deployment, answers JSON."""

    def __init__(self, classifier: DeploymentHandle, limits: ApiLimits | None = None) -> None:
        self._api = create_api(replica_handle(classifier), limits)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """This replica's predictions drained (see `_Routes.drain`): its id, and how many are still in
        flight after `timeout_s`."""
        left = await self._api.state.routes.drain(timeout_s)
        return {"replica": serve.get_replica_context().replica_id.unique_id, "in_flight": left}
