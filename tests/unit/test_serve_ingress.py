"""The FastAPI ingress in-process: overload and model failures as JSON 503/500, an OpenAPI spec that
declares what the API answers, and /docs and /redoc that load nothing from the internet."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from cxrcore.decode import decode_upload
from cxrcore.labels import CLASSES
from tests.bad_inputs import GOOD_PNG, LocalClassifier, api_client
from tests.e2e.uploads import dicom_bytes, write_checkpoint


class Failing:
    """A classifier handle whose every call raises `exc`, as Serve's handle raises it in the ingress."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.predict = self.explain = self.info = self

    async def remote(self, *args: Any) -> Any:
        raise self.exc


def _in_a_replica(exc: Exception) -> Exception:
    """`exc` as it reaches the ingress when it was raised inside the Classifier replica."""
    return RayTaskError("Classifier.predict", "Traceback: ...", exc).as_instanceof_cause()


MISSING_FILE = FileNotFoundError(2, "No such file", "/srv/reg/x/v1/model.pt")
"""A replica's error that names a file on the server."""


def _post(client: httpx.Client, **params: str) -> httpx.Response:
    return client.post("/v1/predict", content=GOOD_PNG, headers={"content-type": "image/png"}, params=params)


@pytest.mark.parametrize("where", ["ingress-queue", "segmenter-queue"])
def test_a_full_queue_answers_503_overloaded_json_with_retry_after(where: str) -> None:
    full = BackPressureError(num_queued_requests=8, max_queued_requests=8, retry_after_s=2.5)
    exc = full if where == "ingress-queue" else _in_a_replica(full)
    with api_client(Failing(exc), retry_after_s=2.5) as client:
        for response in (_post(client), _post(client, explain="true")):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "3"  # whole seconds, rounded up
            body = response.json()
            assert body["error"] == "overloaded" and "max_queued_requests=8" in body["detail"]
        assert client.get("/healthz").json() == {"status": "ok"}  # the API itself still answers


@pytest.mark.parametrize(
    ("exc", "status", "error", "words"),
    [
        (_in_a_replica(ValueError("shapes do not match")), 500, "prediction_failed", "shapes do not match"),
        (RuntimeError("no replica could be reached"), 503, "model_unavailable", "no replica"),
        (_in_a_replica(MISSING_FILE), 500, "prediction_failed", "No such file: '…/v1/model.pt'"),
    ],
    ids=["bug-in-the-model", "classifier-unreachable", "a-servers-path"],
)
def test_model_failures_answer_json_that_names_them(
    exc: Exception, status: int, error: str, words: str
) -> None:
    with api_client(Failing(exc)) as client:
        for response in (_post(client), client.get("/v1/model")):
            assert response.status_code == status, response.text
            body = response.json()
            assert body["error"] == error and words in body["detail"], body
            assert "/srv" not in body["detail"]  # the server's folders by their last components only
            assert ("retry-after" in response.headers) == (status == 503)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
        assert ready.headers["retry-after"] == "1"


def test_a_dicom_decoder_that_cannot_start_answers_503_and_the_next_upload_is_served(
    classifier: LocalClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine out of processes when a compressed DICOM needs the decoder's child: the server's
    trouble, not the upload's, so 503 with Retry-After (a client tries again), not 400 "corrupt"."""
    import subprocess

    from cxrcore import decoder_process
    from tests.e2e.uploads import compressed_dicom, xray_dicom

    dicom = compressed_dicom(xray_dicom(15), "1.2.840.10008.1.2.4.70")  # JPEG Lossless SV1
    real_popen = subprocess.Popen

    def refused(*args: object, **kwargs: object) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(decoder_process, "_shared", None)
    with api_client(classifier) as client:
        monkeypatch.setattr(subprocess, "Popen", refused)
        response = client.post("/v1/predict", content=dicom, headers={"content-type": "application/dicom"})
        assert response.status_code == 503 and "retry-after" in response.headers, response.text
        body = response.json()
        assert body["error"] == "decoder_unavailable" and "could not be started" in body["detail"], body
        monkeypatch.setattr(subprocess, "Popen", real_popen)
        try:
            again = client.post("/v1/predict", content=dicom, headers={"content-type": "application/dicom"})
            assert again.status_code == 200, again.text
        finally:
            if decoder_process._shared is not None:
                decoder_process._shared.close()


def test_health_readiness_and_model_answer_their_declared_schemas(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"]["name"] == "tiny_cnn_lstm"
    model = client.get("/v1/model").json()
    assert model["model"] == ready["model"] and model["card"]["classes"] == list(CLASSES)


def test_openapi_declares_every_answer_and_nothing_else(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/v1/predict"]["post"]
    assert set(predict["responses"]) == {"200", "400", "408", "413", "415", "4XX", "500", "503"}
    ok = spec["components"]["schemas"]["Prediction"]["properties"]
    assert ok["label"]["enum"] == list(CLASSES)
    assert ok["probabilities"]["required"] == list(CLASSES)
    assert ok["probabilities"]["additionalProperties"] is False
    assert "Retry-After" in predict["responses"]["503"]["headers"]
    assert set(predict["requestBody"]["content"]) >= {"multipart/form-data", "image/png", "application/dicom"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)  # validation errors answer 400
            for status, response in operation["responses"].items():
                if status != "200":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_every_asset_from_the_app_itself(client: httpx.Client, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.findall(r"https?://", html), "the page must work offline"
    assert '<html lang="en">' in html  # for a screen reader to pronounce it
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(asset.endswith(".js") for asset in assets), assets
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200 and len(served.content) > 1000, asset
    spec_url = re.search(r"""(?:url: '|spec-url=")([^'"]+)""", html)
    assert spec_url and client.get(spec_url.group(1)).json()["info"]["title"] == "cxr"


def test_unknown_routes_and_methods_answer_json(client: httpx.Client) -> None:
    missing = client.get("/v2/predict")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong = client.get("/v1/predict")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["detail"] == "GET /v1/predict: this path answers POST"  # many clients show the body
    # every error code the API answers is one its OpenAPI document lists, for a typed client to switch on
    codes = client.get("/openapi.json").json()["components"]["schemas"]["ErrorBody"]["properties"]["error"]
    source = (Path(__file__).parents[2] / "serve" / "ingress.py").read_text()
    used = re.findall(r'(?:ApiError|_upload_error|_error_response)\(\s*\d+,\s*"([a-z_]+)"', source)
    used += re.findall(r'\d{3}: "([a-z_]+)"', source)  # the 404 and 405 of _http_error
    assert len(set(used)) >= 15 and set(used) <= set(codes["enum"]), set(used) - set(codes["enum"])
    # and names its operations as a generated client's methods
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/v1/predict"]["post"]["operationId"] == "predict"
    assert paths["/v1/model"]["get"]["operationId"] == "model"


def test_uploads_reach_the_model_at_its_base_size_and_score_as_the_original_does(tmp_path: Path) -> None:
    """The ingress resizes uploads to the model's base size (learnt from the first answer), also after a
    swap to a model of another size, and every answer is what the Predictor gives for the original."""
    classifier = LocalClassifier(write_checkpoint(tmp_path, "tiny_cnn_lstm", 2))
    original = decode_upload(GOOD_PNG, "image/png")
    assert original.shape == (300, 250) and classifier.predictor.base_size == 64

    def served() -> np.ndarray:
        response = _post(client)
        assert response.status_code == 200, response.text
        return np.array(list(response.json()["probabilities"].values()))

    with api_client(classifier) as client:
        for _ in range(3):
            np.testing.assert_array_equal(served(), classifier.predictor.predict_proba([original])[0])
        assert [image.shape for image in classifier.images] == [(300, 250), (64, 64), (64, 64)]
        classifier.predictor.base_size = 80  # a swap to a model trained at 80 px
        for _ in range(2):
            np.testing.assert_array_equal(served(), classifier.predictor.predict_proba([original])[0])
        # The image sized for the old model is refused and the original sent; then the new size is used.
        assert [image.shape for image in classifier.images[3:]] == [(64, 64), (300, 250), (80, 80)]


def _post_stalling(
    api: Any, first: bytes | None, headers: list[tuple[bytes, bytes]], then: str = "stall"
) -> tuple[int, dict[str, Any]]:
    """POST /v1/predict straight through ASGI, from a client that sends `first` (None: no body at all),
    then nothing (`then` "stall"), closes its connection ("disconnect") or ends its body ("end")."""
    import asyncio
    import json

    async def call() -> tuple[int, dict[str, Any]]:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent and first is not None:
                sent = True
                return {"type": "http.request", "body": first, "more_body": True}
            if then == "disconnect":
                return {"type": "http.disconnect"}
            if then == "end":
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)  # the client stalls
            raise AssertionError("the ingress waited for a stalled upload")

        answer: dict[str, Any] = {"body": b""}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            else:
                answer["body"] += message.get("body", b"")

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        await asyncio.wait_for(api(scope, receive, send), timeout=10)
        return answer["status"], json.loads(answer["body"])

    return asyncio.run(call())


@pytest.mark.parametrize("multipart", [False, True])
def test_a_stalled_upload_is_answered_408_and_frees_its_place(
    classifier: LocalClassifier, multipart: bool
) -> None:
    """A client that stops sending mid-upload (a dropped network, a slow-loris) must not hold one of the
    ingress's bounded places for as long as its connection lasts."""
    from serve.ingress import ApiLimits, create_api

    api = create_api(classifier, ApiLimits(upload_idle_timeout_s=0.2))
    kind = b"multipart/form-data; boundary=x" if multipart else b"image/png"
    headers = [(b"content-type", kind), (b"content-length", b"1000000")]
    status, body = _post_stalling(api, GOOD_PNG[:100], headers)
    assert status == 408 and body["error"] == "upload_timeout"
    assert body["detail"] == "the upload sent nothing for 0.2 s (100 bytes received); send it again"
    # A client that sends its headers and then no byte of the body: the slow-loris's first move.
    status, body = _post_stalling(api, None, headers)
    assert (status, body["detail"]) == (
        408,
        "the upload sent nothing for 0.2 s (0 bytes received); send it again",
    )
    trickle = create_api(classifier, ApiLimits(upload_idle_timeout_s=60, upload_timeout_s=0.2))
    status, body = _post_stalling(trickle, GOOD_PNG[:100], headers)
    assert (status, body["detail"]) == (
        408,
        "the upload took longer than 0.2 s (100 bytes received); send it again",
    )


@pytest.mark.parametrize("multipart", [False, True])
def test_a_client_gone_mid_upload_is_not_a_server_error(
    classifier: LocalClassifier, multipart: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled upload (a closed browser tab, Ctrl-C in `cxr predict`) was answered, logged and counted
    as a 500 `internal_error`, which error-rate alerts read as the server failing."""
    from cxrcore import telemetry
    from serve.ingress import create_api

    counted: list[tuple[str, int]] = []
    monkeypatch.setattr(
        telemetry, "record_request_error", lambda error, status: counted.append((error, status))
    )
    kind = b"multipart/form-data; boundary=x" if multipart else b"image/png"
    headers = [(b"content-type", kind), (b"content-length", b"1000000")]
    status, body = _post_stalling(create_api(classifier), GOOD_PNG[:100], headers, then="disconnect")
    assert (status, body["error"]) == (499, "client_disconnected")
    assert body["detail"] == "the client closed the connection mid-upload (100 bytes received)"
    assert counted == [("client_disconnected", 499)]


@pytest.mark.parametrize(
    "part",
    [
        {"files": {"file": (None, GOOD_PNG, "image/png")}},  # requests/httpx: a file part without a filename
        {"files": {"file": (None, GOOD_PNG)}},  # nor a type: `curl -F 'file=<x.png'`
    ],
    ids=["typed", "untyped"],
)
def test_a_file_sent_as_a_form_field_without_a_filename_is_read(
    client: httpx.Client, classifier: LocalClassifier, part: dict[str, Any]
) -> None:
    """Starlette reads such a part as text (and refused one over 1 MB as a malformed body): its bytes are
    the upload all the same."""
    original = decode_upload(GOOD_PNG, "image/png")
    expected = classifier.predictor.predict_proba([original])[0]
    answer = client.post("/v1/predict", **part)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(list(answer.json()["probabilities"].values()), expected, atol=1e-6)
    large = GOOD_PNG + bytes(2 << 20)  # trailing bytes after IEND: still the same PNG, over Starlette's 1 MB
    with api_client(classifier, max_upload_bytes=4 << 20) as roomy:
        assert roomy.post("/v1/predict", files={"file": (None, large, "image/png")}).status_code == 200


def test_a_viewers_form_with_its_study_fields_is_read_and_a_misnamed_file_is_named(
    client: httpx.Client,
) -> None:
    """A viewer plugin sends the study's UIDs beside the image (9 fields were "malformed"); a file in a field
    of another name was "no file", not which field it came in; a gzip body was read as the image."""
    fields = {f"uid{i}": f"1.2.840.{i}" for i in range(20)}
    answer = client.post("/v1/predict", data=fields, files={"file": (None, GOOD_PNG, "image/png")})
    assert answer.status_code == 200, answer.text
    misnamed = client.post("/v1/predict", data={"uid": "1"}, files={"File": ("x.png", GOOD_PNG, "image/png")})
    assert misnamed.status_code == 400 and misnamed.json()["error"] == "missing_file"
    assert "no file in a field named 'file' (its fields: 'File', and 1 other)" in misnamed.json()["detail"]
    zipped = client.post(
        "/v1/predict",
        content=gzip.compress(GOOD_PNG),
        headers={"content-type": "image/png", "content-encoding": "gzip"},
    )
    assert zipped.status_code == 415 and "Content-Encoding gzip is not supported" in zipped.json()["detail"]


def test_a_body_without_its_length_is_told_so(classifier: LocalClassifier) -> None:
    """An HTTP/1.0 client that ends its body by closing the connection: the server reads no body, and had
    answered "empty file (0 bytes)" to 54 KB sent."""
    from serve.ingress import create_api

    status, body = _post_stalling(create_api(classifier), None, [(b"content-type", b"image/png")], then="end")
    assert (status, body["error"]) == (411, "length_required")
    assert "send the Content-Length header" in body["detail"]


def test_clients_calling_the_routes_other_ways_are_answered(client: httpx.Client) -> None:
    """A trailing slash was a 307 with an empty body (httpx and curl do not follow it by default); HEAD, as
    uptime monitors send it, a 405; a bare `?explain` a 400 (now the explanation it asks for)."""
    slash = client.post("/v1/predict/", content=GOOD_PNG, headers={"content-type": "image/png"})
    assert slash.status_code == 404 and slash.json()["error"] == "not_found"
    assert "no route POST /v1/predict/; this API answers POST /v1/predict" in slash.json()["detail"]
    for path in ("/healthz", "/readyz", "/v1/model"):
        head = client.head(path)
        assert head.status_code == 200 and head.headers["content-type"] == "application/json", path
        refused = client.delete(path)  # the Allow header names HEAD too, a route of its own
        assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD", path
    bare = client.post("/v1/predict?explain", content=GOOD_PNG, headers={"content-type": "image/png"})
    assert bare.status_code == 200 and bare.json()["explanation"] is not None
    spec = client.get("/openapi.json").json()
    assert "head" not in spec["paths"]["/healthz"]
    dicom = dicom_bytes(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) % 4096, preamble=False)
    legacy = client.post("/v1/predict", content=dicom, headers={"content-type": "application/x-dicom"})
    assert legacy.status_code == 200, legacy.text


def test_cxr_predict_reads_folders_and_names_each_failure_below_its_table(
    client: httpx.Client, tmp_path: Path
) -> None:
    from cxrcore.cli import predict_files

    (tmp_path / "study/series").mkdir(parents=True)
    (tmp_path / "study/series/IM0001.png").write_bytes(GOOD_PNG)
    (tmp_path / "study/notes.txt").write_text("not sent: not an image")
    (tmp_path / "study/series/lung masks").mkdir()
    (tmp_path / "study/series/lung masks/IM0001.png").write_bytes(GOOD_PNG)  # not sent: a mask, not an X-ray
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(GOOD_PNG[:40])
    names = [str(tmp_path / "study"), str(tmp_path / "broken.png"), str(tmp_path / "empty")]
    table, problems, _ = predict_files(client, "/v1/predict", names)
    header, _, sent, broken = table.splitlines()
    assert header.split()[:3] == ["file", "label", "COVID"] and header.split()[-2:] == ["model", "ms"]
    image = str(tmp_path / "study/series/IM0001.png")
    assert sent.startswith(image) and any(sent[len(image) :].strip().startswith(c) for c in CLASSES)
    assert broken.split() == [str(tmp_path / "broken.png"), "error", "400"]
    # the folder's other files are counted, not left out unsaid (a review, session 53)
    assert (
        problems[0]
        == f"{tmp_path / 'study'}: 1 file(s) not sent, not images by their suffix or bytes (.txt 1)"
    )
    assert problems[1].startswith(f"{tmp_path / 'broken.png'}: HTTP 400 undecodable_image: ")
    assert problems[2] == f"{tmp_path / 'empty'}: no image file in this folder"

    # A proxy's own answer is not JSON (Serve's plain-text 503 when even the ingress is full).
    overloaded = httpx.MockTransport(
        lambda request: httpx.Response(503, text="Request dropped due to backpressure")
    )
    with httpx.Client(transport=overloaded) as busy:
        table, problems, _ = predict_files(busy, "http://server/v1/predict", [str(tmp_path / "study")])
    assert table.splitlines()[2].split()[1:] == ["error", "503"]
    assert problems[1:] == [
        f"{tmp_path / 'study/series/IM0001.png'}: HTTP 503: Request dropped due to backpressure"
    ]

    # Another server on that port answers 200 with something else: named, not a KeyError traceback.
    other = httpx.MockTransport(lambda request: httpx.Response(200, json={"label": "Normal", "forged": 1}))
    with httpx.Client(transport=other) as impostor:
        table, problems, _ = predict_files(impostor, "http://server/v1/predict", [str(tmp_path / "study")])
    assert table.splitlines()[2].split()[1:] == ["error"]
    assert problems[1].endswith("the answer is not a cxr prediction: \"{'label': 'Normal', 'forged': 1}\"")


def test_answers_say_whether_the_upload_is_like_the_training_images(
    client: httpx.Client, tmp_path: Path
) -> None:
    """A phantom like the checkpoint's reference passes the input check; noise does not, and `cxr predict`
    marks it and warns, with the figures, without failing the run: the model still answered."""
    from cxrcore.cli import predict_files
    from cxrcore.data.synthetic import render_phantom
    from tests.e2e.uploads import png_bytes

    phantom = render_phantom("Normal", np.random.default_rng(11), size=299, mask_size=64)[0]
    noise = np.random.default_rng(12).integers(0, 256, (299, 299), dtype=np.uint8)
    (tmp_path / "phantom.png").write_bytes(png_bytes(phantom))
    (tmp_path / "noise.png").write_bytes(png_bytes(noise))
    checks = {}
    for name in ("phantom", "noise"):
        answer = client.post(
            "/v1/predict", files={"file": (f"{name}.png", (tmp_path / f"{name}.png").read_bytes())}
        )
        assert answer.status_code == 200, answer.text
        checks[name] = answer.json()["input_check"]
    assert checks["phantom"]["unusual"] is False and checks["noise"]["unusual"] is True
    # what a record of an answer keeps: the request's id (the client's, outside Serve) and when, in UTC
    traced = client.post("/v1/predict", files={"file": ("p.png", (tmp_path / "phantom.png").read_bytes())},
                         headers={"X-Request-ID": "study-42"})  # fmt: skip
    from datetime import datetime, timedelta

    assert traced.json()["request_id"] == "study-42"
    assert datetime.fromisoformat(traced.json()["answered_at"]).utcoffset() == timedelta(0)
    assert checks["phantom"]["score"] <= checks["phantom"]["threshold"] < checks["noise"]["score"]

    explained = client.post(
        "/v1/predict",
        params={"explain": "true"},
        files={"file": ("n.png", (tmp_path / "noise.png").read_bytes())},
    )
    assert explained.status_code == 200 and explained.json()["input_check"] == checks["noise"]

    answers: list[dict[str, Any]] = []
    table, problems, unusual = predict_files(client, "/v1/predict", [str(tmp_path)], answers)
    # `cxr predict --json`: each answer whole, for a record of the predictions
    assert {a["file"] for a in answers} == {str(tmp_path / "noise.png"), str(tmp_path / "phantom.png")}
    assert all(a["status"] == 200 and a["input_sha256"] and a["answered_at"] for a in answers)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(GOOD_PNG[:40])
    failed: list[dict[str, Any]] = []
    predict_files(client, "/v1/predict", [str(tmp_path / "empty"), str(tmp_path / "broken.png")], failed)
    assert failed[0] == {
        "file": str(tmp_path / "empty"),
        "status": None,
        "problem": "no image file in this folder",
    }
    assert failed[1]["status"] == 400 and failed[1]["error"] == "undecodable_image" and failed[1]["detail"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert table.splitlines()[0].split()[-3:] == ["input", "model", "ms"]
    assert (
        rows[str(tmp_path / "noise.png")][-3] == "UNUSUAL"
        and rows[str(tmp_path / "phantom.png")][-3] == "usual"
    )
    assert problems == [] and len(unusual) == 1
    assert unusual[0].startswith(
        f"{tmp_path / 'noise.png'}: unlike the images tiny_cnn_lstm trained on (input check: "
    )


def test_cxr_predict_sends_a_tiff_or_bmp_as_the_pixels_ingest_reads_from_it(
    client: httpx.Client, classifier: LocalClassifier, tmp_path: Path
) -> None:
    """Ingest reads TIFF, BMP, WebP and JPEG 2000 datasets, the API refuses them (415): `cxr predict` sends
    their pixels as a PNG, so a file is scored as served as `cxr evaluate` scored it."""
    import io

    from PIL import Image

    from cxrcore.cli import predict_files
    from cxrcore.data.layout import decode_image
    from cxrcore.data.transforms import resize_image

    levels = (np.arange(96 * 80, dtype=np.uint16).reshape(96, 80) * 7) % 4096  # 12 bits in 16
    eight = (levels >> 4).astype(np.uint8)
    files = {  # WebP and JPEG 2000 too, which ingest reads since session 49 (a demo --real crashed on them)
        "deep.tif": (levels, "TIFF"), "flat.bmp": (eight, "BMP"), "web.webp": (eight, "WEBP"),
        "wave.jp2": (eight, "JPEG2000"),
    }  # fmt: skip
    for name, (pixels, kind) in files.items():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=kind, **({"lossless": True} if kind == "WEBP" else {}))
        (tmp_path / name).write_bytes(buffer.getvalue())
        assert client.post("/v1/predict", content=buffer.getvalue()).status_code == 415
    (tmp_path / "torn.tif").write_bytes(b"II*\x00" + bytes(40))
    before = len(classifier.images)
    table, problems, _ = predict_files(client, "/v1/predict", [str(tmp_path)])
    received = classifier.images[before:]
    answered = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:]}
    assert len(received) == 4 and [answered[name] == "error" for name in sorted(answered)] == [
        False, False, True, False, False,  # torn.tif alone
    ]  # fmt: skip
    for image, name in zip(received, sorted(files), strict=True):
        buffer = io.BytesIO()  # the PNG of what ingest decodes from the file, as a client could send it
        Image.fromarray(decode_image((tmp_path / name).read_bytes(), name)).save(buffer, format="PNG")
        assert client.post("/v1/predict", content=buffer.getvalue()).status_code == 200
        # The ingress sends the model's base size once it has learnt it, the original before.
        base = classifier.predictor.base_size
        np.testing.assert_array_equal(
            *(x if len(x) == base else resize_image(x, base) for x in (image, classifier.images[-1]))
        )
    assert len(problems) == 1 and problems[0].startswith(
        f"{tmp_path / 'torn.tif'}: not sent: unreadable TIFF file: "
    )


def test_browsers_of_the_origins_allowed_read_answers_and_others_do_not(classifier: LocalClassifier) -> None:
    """A web viewer served from another host calls the API across origins: only with cors_origins."""
    viewer = "https://viewer.hospital.example"
    preflight = {
        "origin": viewer,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    with api_client(classifier) as closed:
        refused = closed.options("/v1/predict", headers=preflight)
        assert refused.status_code == 405 and refused.json()["error"] == "method_not_allowed"
        # the page sees a network error; the server's log and the answer say what to change
        assert f"--arg cors_origins={viewer}" in refused.json()["detail"]
        assert "access-control-allow-origin" not in _post(closed).headers
    with api_client(classifier, cors_origins=(viewer,)) as open_to_viewer:
        allowed = open_to_viewer.options("/v1/predict", headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == viewer
        answer = open_to_viewer.post(
            "/v1/predict", content=GOOD_PNG, headers={"content-type": "image/png", "origin": viewer}
        )
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == viewer
        assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
        other = open_to_viewer.options(
            "/v1/predict", headers={**preflight, "origin": "https://elsewhere.example"}
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        assert other.json()["error"] == "cors_refused"  # JSON, as every error, naming what is allowed
        assert f"allowed: {viewer}" in other.json()["detail"]
        put = open_to_viewer.options(
            "/v1/predict", headers={**preflight, "access-control-request-method": "PUT"}
        )  # an origin allowed, a method not: the method is named, not the origin blamed
        assert put.status_code == 400 and "PUT asked; this API answers GET and POST" in put.json()["detail"]


def test_cxr_predict_without_a_server_says_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder of 40 files printed 40 ConnectErrors and no hint."""
    import socket

    from cxrcore.cli import main

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(GOOD_PNG)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["predict", "--url", f"http://127.0.0.1:{port}", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0] and "is `cxr serve` running there?" in err[0]
    assert main(["predict", "--url", f"127.0.0.1:{port}", str(tmp_path)]) == 2
    assert "--url: expected http://HOST:PORT" in capsys.readouterr().err


class Silent:
    """A classifier handle with no replica to run on: every call waits, as Serve's handle then waits."""

    def __init__(self) -> None:
        self.predict = self.explain = self.info = self

    async def remote(self, *args: Any) -> Any:
        import asyncio

        await asyncio.Event().wait()


def test_a_model_with_no_replica_answers_503_model_unavailable_in_bounded_time() -> None:
    """A replica that cannot start (its registry gone) left predictions and /v1/model waiting until the
    client gave up; the queue then filled and the rest were told the model was at capacity."""
    with api_client(Silent(), model_timeout_s=0.2, retry_after_s=2.0) as client:
        for response in (_post(client), _post(client, explain="true"), client.get("/v1/model")):
            assert response.status_code == 503 and response.headers["retry-after"] == "2"
            body = response.json()
            assert body["error"] == "model_unavailable"
            assert body["detail"].startswith(
                "the model did not answer within 0.2 s: its replicas are starting"
            )
        assert client.get("/healthz").json() == {"status": "ok"}


def test_an_error_answer_is_logged_with_its_code_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    """Serve's access line has the status and the request id only: a complaint traced by its id found a
    400 and not why."""
    import logging

    with caplog.at_level(logging.INFO, logger="ray.serve"), api_client(Silent()) as client:
        response = client.post("/v1/predict", content=b"not an image", headers={"content-type": "image/png"})
    assert response.status_code == 400
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("answered 400")]
    assert logged == [f"answered 400 {response.json()['error']}: {response.json()['detail']}"]


def test_cxr_predict_sends_a_file_whose_name_is_not_utf8(tmp_path: Path) -> None:
    """A Latin-1 name (`caf\\xe9-7.png`, as old Windows exports write them) ended `cxr predict` of a folder in
    httpx's UnicodeEncodeError before any other file was sent; ingest and evaluate read such names."""

    import httpx

    from cxrcore.cli import _post_file

    sent: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.read())
        return httpx.Response(200, json={"label": "COVID"})

    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9-7.png")
    with open(name, "wb") as file:
        file.write(GOOD_PNG)
    with httpx.Client(transport=httpx.MockTransport(answer), base_url="http://cxr") as client:
        status, body = _post_file(client, "/v1/predict", os.fsdecode(name))
    assert (status, body) == (200, {"label": "COVID"})
    assert b'filename="caf\xef\xbf\xbd-7.png"' in sent[0] and GOOD_PNG in sent[0]


def test_an_audit_log_line_per_prediction_when_asked_for(classifier: LocalClassifier, tmp_path: Path) -> None:
    """An audit (session 51): the replica's log said a request was answered, not which weights said what of
    which file; `--arg audit_log=true` writes that, one JSON line each, without pixels or file names, to a
    file of the replica's own. A privacy review (session 52) found that it wrote nothing: the logger was at
    WARNING in a replica, and this test had raised its level itself (caplog), so here nothing but the file
    is read. A line that cannot be written fails its prediction, and /readyz says so (a verifier, session
    52: a removed folder answered 500 after the prediction was computed)."""
    import hashlib
    import json

    with api_client(classifier, audit_dir=str(tmp_path / "off")) as quiet:
        assert _post(quiet).status_code == 200
    assert not (tmp_path / "off").exists()  # off by default
    trail = tmp_path / "audit"
    limits = {"audit_log": True, "audit_dir": str(trail), "audit_user_header": "X-Auth-Request-User"}
    with api_client(classifier, **limits) as audited:
        headers = {"X-Request-ID": "r-42", "X-Forwarded-For": "6.6.6.6, 10.9", "X-Auth-Request-User": "d",
                   "X-Forwarded-User": "mallory"}  # fmt: skip
        files = {"file": ("patient-0042.png", GOOD_PNG)}
        answer = audited.post("/v1/predict", files=files, headers=headers).json()
        assert audited.post("/v1/predict", content=b"not an image").status_code == 400  # not a prediction
        (file,) = trail.iterdir()
        assert file.name.startswith("cxr_audit_") and file.suffix == ".jsonl"
        (text,) = file.read_text().splitlines()
        file.rename(tmp_path / "rotated.jsonl")  # moved away by logrotate: the next line makes it anew
        assert _post(audited).status_code == 200 and len(file.read_text().splitlines()) == 1
        file.unlink()
        trail.rmdir()  # the folder removed: made again
        assert _post(audited).status_code == 200 and file.is_file()
        file.unlink()
        trail.rmdir()
        trail.write_text("")  # not a folder (as a full disk or a read-only mount): refused, and not ready
        refused = _post(audited)
        assert refused.status_code == 503 and refused.json()["error"] == "audit_unavailable"
        assert "could not be recorded in the audit trail" in refused.json()["detail"]
        ready = audited.get("/readyz")
        assert ready.status_code == 503 and f"{trail} is not a folder" in ready.json()["detail"]
    line = json.loads(text)
    assert line["request_id"] == "r-42" and line["answered_at"] == answer["answered_at"]
    assert line["input_sha256"] == hashlib.sha256(GOOD_PNG).hexdigest() and line["label"] == answer["label"]
    assert line["weights_sha256"] == answer["model"]["weights_sha256"] and line["unusual"] is not None
    # the peer as connected, X-Forwarded-For as sent, the user from the gateway's header alone
    assert (line["peer"], line["forwarded_for"], line["user"]) == ("testclient", "6.6.6.6, 10.9", "d")
    assert "patient-0042" not in text


def test_a_bare_explain_asks_for_the_explanation_and_a_wrong_word_is_refused(client: Any) -> None:
    """The README writes `/v1/predict?explain`; as a plain boolean parameter its empty value was refused 400
    `invalid_request` (a long-standing review note)."""
    for query, explained in (("?explain", True), ("?explain=On", True), ("?explain=0", False), ("", False)):
        response = client.post(f"/v1/predict{query}", files={"file": ("x.png", GOOD_PNG)})
        assert response.status_code == 200, (query, response.text)
        assert (response.json()["explanation"] is not None) is explained, query
    refused = client.post("/v1/predict?explain=maybe", files={"file": ("x.png", GOOD_PNG)})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request"
    assert "'maybe' is neither true nor false; send ?explain alone" in refused.json()["detail"]
