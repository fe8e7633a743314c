"""Bad input never gets a 500: the corpus through the real FastAPI app, the decoder under hypothesis, and
a schema-driven fuzzer (schemathesis) that finds no 5xx and no answer the OpenAPI spec does not declare.

The app runs in-process (httpx through Starlette's TestClient) around a real tiny model; only Serve's
handle is replaced (tests/bad_inputs.py). tests/e2e/test_serve.py sends part of the corpus over HTTP.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from cxrcore.decode import ImageDecodeError, UnsupportedImageTypeError, decode_upload
from cxrcore.labels import CLASSES
from serve.ingress import ApiLimits
from tests.bad_inputs import CORPUS, GOOD_PNG, MAX_UPLOAD_BYTES, Case, LocalClassifier
from tests.e2e.uploads import dicom_bytes, jpeg_bytes, png_bytes

# Bounded and reproducible: the same examples on every run, and nothing written to .hypothesis/.
FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def spec(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def declared_schema(spec: dict[str, Any], status: int) -> dict[str, Any]:
    """The JSON schema /openapi.json declares for POST /v1/predict answering `status`."""
    responses = spec["paths"]["/v1/predict"]["post"]["responses"]
    response = responses.get(str(status)) or responses[f"{str(status)[0]}XX"]
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}


def assert_four_probabilities(body: dict[str, Any]) -> None:
    probabilities = body["probabilities"]
    assert list(probabilities) == list(CLASSES)
    assert all(0 <= p <= 1 for p in probabilities.values())
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert body["label"] == max(probabilities, key=probabilities.get)


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_every_bad_upload_gets_a_4xx_json_error_or_four_probabilities(
    client: httpx.Client, spec: dict[str, Any], case: Case
) -> None:
    response = client.post("/v1/predict", **case.request)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    Draft202012Validator(declared_schema(spec, case.status)).validate(body)  # what the spec promises
    if case.status == 200:
        assert_four_probabilities(body)
    else:
        assert body["error"] == case.error, body
        if case.error != "invalid_request":  # an upload problem: the answer also says what is accepted
            assert body["detail"].endswith(ApiLimits(max_upload_bytes=MAX_UPLOAD_BYTES).accepted), body
    assert client.post("/v1/predict", **case.request).status_code == case.status  # the same again
    good = client.post("/v1/predict", content=GOOD_PNG, headers={"content-type": "image/png"})
    assert good.status_code == 200, good.text  # and serving goes on


def test_corpus_covers_the_issue_list() -> None:
    names = {case.name for case in CORPUS}
    wanted = [
        "empty-body", "truncated-png", "random-bytes", "png-bomb-81-megapixels", "png-header-60000x60000",
        "json-body", "multipart-garbage", "multipart-without-file-field", "dicom-without-pixel-data",
        "dicom-htj2k-without-decoder", "dicom-jpeg-lossless-aborting-the-decoder", "png-16-bit", "png-rgba",
        "png-palette", "png-1x1", "gif", "webp", "bmp", "tiff",
    ]  # fmt: skip
    assert not set(wanted) - names
    assert {case.status for case in CORPUS} == {200, 400, 413, 415}


def test_refused_uploads_never_reach_the_model(classifier: LocalClassifier, client: httpx.Client) -> None:
    before = len(classifier.images)
    for case in CORPUS:
        if case.status != 200:
            client.post("/v1/predict", **case.request)
    assert len(classifier.images) == before


def test_explain_answers_a_heatmap_of_the_models_input_size(client: httpx.Client) -> None:
    response = client.post("/v1/predict", params={"explain": "true"}, files={"file": ("x.png", GOOD_PNG)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_four_probabilities(body)
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["explanation"]["heatmap_png"])))
    assert heatmap.size == (64, 64) and body["explanation"]["target"] == body["label"]


# The decoder under hypothesis: whatever the bytes, a uint8 H×W image or one of the two errors.


def decoded_or_refused(data: bytes, content_type: str | None) -> np.ndarray | None:
    try:
        image = decode_upload(data, content_type)
    except (ImageDecodeError, UnsupportedImageTypeError) as exc:
        assert str(exc)  # says why
        event(f"refused: {type(exc).__name__}")  # `pytest --hypothesis-show-statistics` shows the mix
        return None
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8, type(image)
    assert image.ndim == 2 and min(image.shape) >= 1, image.shape
    event("decoded")
    return image


CONTENT_TYPES = st.sampled_from(
    [None, "", "image/png", "image/jpeg", "application/dicom", "application/octet-stream", "text/plain",
     "image/gif", "multipart/form-data", "image/png; charset=utf-8"]
)  # fmt: skip
SMALL = (np.random.default_rng(1).random((40, 48)) * 255).astype(np.uint8)
SEEDS = {
    "png": png_bytes(SMALL),
    "png-16-bit": png_bytes(SMALL.astype(np.uint16) * 257),
    "png-rgba": png_bytes(SMALL, "RGBA"),
    "jpeg": jpeg_bytes(SMALL),
    "dicom": dicom_bytes(SMALL.astype(np.uint16) * 16),
    "dicom-monochrome1": dicom_bytes(SMALL.astype(np.uint16), "MONOCHROME1", slope=0.5, intercept=-1024),
}


@FUZZ
@given(data=st.binary(max_size=4096), content_type=CONTENT_TYPES)
def test_arbitrary_bytes_decode_or_are_refused(data: bytes, content_type: str | None) -> None:
    decoded_or_refused(data, content_type)


@st.composite
def mutated_files(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A valid PNG, JPEG or DICOM with a few bytes flipped, overwritten, inserted, deleted or cut off,
    mostly in the headers, where the decoders' size and type checks live."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        head = draw(st.booleans())
        position = draw(st.integers(0, min(len(data), 400) - 1 if head else len(data) - 1))
        operation = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        if operation == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "overwrite":
            data[position] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            del data[max(position, 1) :]
        if not data:
            data = bytearray(b"\0")
    return bytes(data), draw(CONTENT_TYPES)


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")  # pydicom says what it repairs in mutated files
@FUZZ
@given(mutated_files())
def test_mutated_files_decode_or_are_refused(upload: tuple[bytes, str | None]) -> None:
    decoded_or_refused(*upload)


@FUZZ
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    fmt_mode=st.sampled_from(
        [("PNG", mode) for mode in ("L", "RGB", "RGBA", "LA", "P", "1", "I;16")]
        + [("JPEG", mode) for mode in ("L", "RGB", "CMYK")]
    ),
    seed=st.integers(0, 2**16),
)
def test_valid_images_of_any_mode_and_size_decode_to_their_size(
    height: int, width: int, fmt_mode: tuple[str, str], seed: int
) -> None:
    fmt, mode = fmt_mode
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    decoded = decoded_or_refused(buffer.getvalue(), f"image/{fmt.lower()}")
    assert decoded is not None and decoded.shape == (height, width)


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")
@FUZZ
@given(
    rows=st.integers(0, 80),
    columns=st.integers(0, 80),
    pixels=st.one_of(st.none(), st.integers(0, 80 * 80)),  # None: as many bytes as the header says
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "bogus"]),
    bits=st.sampled_from([(8, 8), (16, 12), (16, 16), (32, 32), (1, 1)]),
    signed=st.booleans(),
    slope=st.floats(-1e6, 1e6, allow_nan=False),
    intercept=st.floats(-1e6, 1e6, allow_nan=False),
    window=st.one_of(st.none(), st.tuples(st.floats(-1e5, 1e5), st.floats(-10, 1e5))),
    frames=st.sampled_from([None, 0, 1, 2]),
)
def test_dicom_with_any_header_values_decodes_or_is_refused(
    rows: int, columns: int, pixels: int | None, photometric: str, bits: tuple[int, int], signed: bool,
    slope: float, intercept: float, window: tuple[float, float] | None, frames: int | None,
) -> None:  # fmt: skip
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(dicom_bytes(np.zeros((4, 4), np.uint16))))
    ds.Rows, ds.Columns, ds.PhotometricInterpretation = rows, columns, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits[0], bits[1], bits[1] - 1
    ds.PixelRepresentation, ds.SamplesPerPixel = int(signed), 3 if photometric in ("RGB", "YBR_FULL") else 1
    ds.RescaleSlope, ds.RescaleIntercept = round(slope, 4), round(intercept, 4)
    if window:
        ds.WindowCenter, ds.WindowWidth = round(window[0], 3), round(window[1], 3)
    if frames is not None:
        ds.NumberOfFrames = frames
    size = pixels if pixels is not None else -(-rows * columns * ds.SamplesPerPixel * bits[0] // 8)
    ds.PixelData = np.random.default_rng(size).integers(0, 256, size + size % 2, dtype=np.uint8).tobytes()
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    decoded_or_refused(buffer.getvalue(), "application/dicom")


# Schema-driven fuzzing: schemathesis generates requests from /openapi.json (valid and invalid bodies,
# every declared content type, query values) and checks each answer: no 5xx, a declared status code,
# content type and headers, and a body matching the declared schema.


OPERATIONS = [("POST", "/v1/predict"), ("GET", "/v1/model"), ("GET", "/healthz"), ("GET", "/readyz")]
# Invalid requests only where there is something to get wrong (the GETs take no parameters).
FUZZED = [(*operation, GenerationMode.POSITIVE) for operation in OPERATIONS]
FUZZED.append(("POST", "/v1/predict", GenerationMode.NEGATIVE))


@pytest.mark.parametrize(("method", "path", "mode"), FUZZED, ids=[f"{p}-{m.value}" for _, p, m in FUZZED])
def test_schema_driven_fuzzing_finds_no_5xx_and_no_undeclared_answer(
    client: httpx.Client, spec: dict[str, Any], method: str, path: str, mode: GenerationMode
) -> None:
    assert {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops} == set(OPERATIONS)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)  # type: ignore[attr-defined]
    calls: list[int] = []

    # A schema cannot say "a decodable chest X-ray": random bytes are a schema-valid upload that the
    # API rightly refuses with its declared 400/415, so only there "valid data is accepted" is not checked.
    excluded = [positive_data_acceptance] if path == "/v1/predict" else []

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=40, derandomize=True, database=None, deadline=None)
    def fuzz(case: Any) -> None:
        calls.append(case.call_and_validate(excluded_checks=excluded).status_code)

    fuzz()
    assert calls and max(calls) < 500
