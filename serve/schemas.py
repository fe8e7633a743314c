"""Typed arguments of the Serve application and the JSON the HTTP API answers with."""

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cxrcore.labels import CLASSES

_PROBABILITY: dict[str, Any] = {"type": "number", "minimum": 0, "maximum": 1}

MAX_BATCH_SIZE = {"cpu": 8, "cuda": 16}
"""The default max_batch_size by the replica's device. On a CPU thread a convolution's activations
outgrow the core's cache as the batch grows, so images/s fall past a few images a batch (cnn_lstm at
128 px, one thread, one run: 102-107 images/s at batch 1-2, 97 at 4 and 8, 87 at 16, 68 at 32), while each
batch saves Serve's per-call work. One cnn_lstm replica at concurrency 32 answered 69.7-75.8 requests/s
with batches of up to 8, 57.3-64.3 with 4 and 48.6-60.1 with 16 (53-55 with batching off in the same
runs); dual_cnn with its U-Net 8.9 with 8, 7.8-8.4 with 4 and 8.4-9.0 with 16 (cxrcore/bench/README.md).
A GPU is left at 16, as before: unmeasured here, and it wants larger batches. Each replica now runs a
batch as forward passes of the size it measures fastest at load (`forward_batch_size`), so the cap
chiefly bounds how many requests share Serve's per-call work and how long the last of them waits."""


class ServeArgs(BaseModel):
    """Arguments of `serve.app:build_app`: `args:` in serve/config.yaml, or the flags of `cxr serve`.

    >>> args = ServeArgs(registry="cxr-demo/registry", model="dual_cnn:3")
    >>> args.max_upload_mb, args.max_batch_size, ServeArgs(num_gpus=1).max_batch_size
    (64.0, 8, 16)
    """

    model_config = ConfigDict(extra="forbid")

    registry: str | None = Field(
        default=None,
        description="model registry (folder or URI); without one, `model` is a checkpoint folder",
    )
    model: str = Field(
        default="production",
        description="registry alias, name:N or name (its latest version); an absolute checkpoint folder "
        "when there is no registry. Pinned to a version when the app is built",
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per classifier and segmenter replica")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per classifier and segmenter replica")
    min_replicas: int = Field(default=1, ge=0, description="autoscaling floor of the model deployments")
    max_replicas: int = Field(default=2, ge=1, description="autoscaling ceiling of the model deployments")
    ingress_replicas: int = Field(
        default=1,
        ge=1,
        description="replicas of the HTTP ingress (Api), which reads and decodes every upload before the "
        "model sees it; on a cluster, more of them for large uploads (a 2048 px DICOM costs it 60-70 ms of "
        "CPU, and the event loop's share of that does not spread over a node's cores)",
    )
    target_ongoing_requests: float = Field(
        default=8.0,
        gt=0,
        description="queued + running requests per classifier replica that autoscaling aims at",
    )
    upscale_delay_s: float = Field(default=10.0, ge=0, description="sustained load before adding replicas")
    downscale_delay_s: float = Field(
        default=300.0, ge=0, description="sustained idleness before removing some"
    )
    look_back_period_s: float = Field(default=30.0, gt=0, description="window the load is averaged over")
    max_batch_size: int = Field(
        default=0,
        ge=0,
        description="requests per batch at most (1 turns batching off; 0: 8 on a CPU replica, 16 on a GPU); "
        "a batch runs as forward passes of forward_batch_size images",
    )
    forward_batch_size: int = Field(
        default=0,
        ge=0,
        description="images per forward pass at most: a larger batch runs as several (0: measured when each "
        "replica loads its model, the size up to max_batch_size at which its forward runs fastest per image)",
    )
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="how long a batch that is not full waits for more requests once the model is free "
        "(0: the requests queued by then, so none waits while the model idles)",
    )
    max_ongoing_requests: int = Field(
        default=32, ge=1, description="requests one classifier replica accepts at once (>= max_batch_size)"
    )
    max_queued_requests: int = Field(
        default=64,
        ge=1,
        description="requests the ingress holds for the classifier when every replica is at "
        "max_ongoing_requests; beyond that it answers 503 `overloaded` at once, with Retry-After",
    )
    retry_after_s: float = Field(
        default=1.0, ge=0, description="the Retry-After (seconds, rounded up) of every 503 answer"
    )
    max_upload_mb: float = Field(
        default=64.0,
        gt=0,
        description="larger uploads are refused with HTTP 413; an uncompressed DICOM from a 43×43 cm "
        "detector at 100 µm (4300² pixels, 16 bits) is 37 MB",
    )
    min_image_side: int = Field(default=64, ge=1, description="smaller images are refused with HTTP 400")
    upload_idle_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="an upload that sends no byte for this long is refused with HTTP 408, freeing its place",
    )
    upload_timeout_s: float = Field(
        default=120.0, gt=0, description="an upload still arriving after this long is refused with HTTP 408"
    )
    model_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a request the model has not answered after this long gets HTTP 503 model_unavailable "
        "(no replica running, or one too busy), rather than waiting without end",
    )
    cors_origins: str = Field(
        default="",
        description="web origins, comma-separated (or *), whose pages may call the API from a browser "
        "(CORS); none by default",
    )
    audit_log: bool = Field(
        default=False,
        description="write one JSON line per answered prediction to a file of the ingress replica's own, "
        "cxr_audit_<replica>.jsonl in audit_dir: request_id, answered_at, the model's ref and weights (and "
        "segmenter's), input_sha256, label, probability, input_check.unusual, the peer's address, the "
        "X-Forwarded-For header as sent and the user audit_user_header names; no pixels, no file names. A "
        "prediction whose line cannot be written is answered 503 audit_unavailable. Off by default: a line "
        "a request costs CPU on the serving path",
    )
    audit_dir: str = Field(
        default="",
        description="the folder of the audit files on each node (made where missing; a relative one from "
        "where the app is built); default Serve's log folder, RAY_SESSION/logs/serve, which a new Ray "
        "session does not keep",
    )
    audit_user_header: str = Field(
        default="",
        description="the header an authenticating gateway in front of the API sets to the signed-in user "
        "(X-Forwarded-User, X-Auth-Request-User, ...), recorded as the audit line's user; none by default, "
        "as any client can send such a header where no gateway replaces it",
    )

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if not self.max_batch_size:
            self.max_batch_size = MAX_BATCH_SIZE[self.device]
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        self.cors_origins = ",".join(_origin(item) for item in self.cors_origins.split(",") if item.strip())
        if self.audit_dir:  # every replica then writes where the command that built the app meant
            self.audit_dir = os.path.abspath(os.path.expanduser(self.audit_dir))
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _origin(text: str) -> str:
    """One `cors_origins` entry as browsers send an Origin: `scheme://host[:port]`, lower-case, no path.

    Browsers compare it exactly, so an entry with a trailing slash or a path (`https://viewer.example/`,
    pasted from the address bar) never matched: the viewer's calls all failed with nothing said at start.
    A trailing slash is dropped; a path, a missing scheme or another scheme than http(s) is refused.

    >>> _origin(" https://Viewer.Example/ "), _origin("http://10.0.0.5:8080"), _origin("*")
    ('https://viewer.example', 'http://10.0.0.5:8080', '*')
    """
    from urllib.parse import urlsplit

    origin = text.strip()
    if origin == "*":
        return origin
    parts = urlsplit(origin.rstrip("/"))
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ValueError(
            f"cors_origins: {origin!r} is not an origin; give scheme://host[:port] as the page's address bar "
            "starts (https://viewer.example), without a path, comma-separated, or *"
        )
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


class ClassifierConfig(BaseModel):
    """The classifier's `user_config`: changing it swaps the model or batching without a restart."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="registry reference (name:N or an alias) or checkpoint folder to serve")
    max_batch_size: int = Field(default=16, ge=1)
    forward_batch_size: int = Field(
        default=0, ge=0, description="0: measured at load (Predictor.fit_forward_batch)"
    )
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)


class SegmenterInfo(BaseModel):
    """The lung segmenter whose mask a dual-channel classifier read."""

    ref: str = Field(
        description="its registry reference (name:N), or its checkpoint folder by its last two components"
    )
    weights_sha256: str | None = Field(
        default=None, description="sha256 of its weights file, as for the model"
    )


class ModelInfo(BaseModel):
    """Which model answered."""

    name: str = Field(description="architecture name from the model card")
    version: str | None = Field(description="registry version number, or the card's version")
    ref: str = Field(
        description="registry reference (name:N), or the checkpoint's folder by its last two components"
    )
    weights_sha256: str | None = Field(
        default=None,
        description="sha256 of the weights file that answered: the one the registry recorded when it stored "
        "the version, which the replica checked when it loaded it (a prediction stored today traces back to "
        "these exact weights)",
    )
    segmenter: SegmenterInfo | None = Field(
        default=None,
        description="the lung segmenter that drew the mask the model read (dual-channel models); null for a "
        "model that reads the image alone",
    )


class Explanation(BaseModel):
    """Why the model said what it said, at the model's input size."""

    target: str = Field(description="the class the heatmap explains (the predicted one)")
    heatmap_png: str = Field(
        description="Grad-CAM heatmap of the last convolutional block, base64 grayscale PNG, 255 where the "
        "evidence for `target` is strongest. It is the model's input size, a square: the upload was resized "
        "to it without padding, so stretch the map to the upload's width and height to overlay it"
    )
    heatmap_empty: bool = Field(
        description="true where no region adds to the target's score more than another: the heatmap is blank "
        "because Grad-CAM found nothing to show, or because the model's last feature map is one cell (a "
        "small input through a deep network), not because the image holds no evidence"
    )
    mask_png: str | None = Field(
        description="lung mask fed to the model, base64 PNG at the heatmap's size; null if it takes none"
    )


class InputCheck(BaseModel):
    """How unlike the model's training images the upload is (`cxrcore.inputcheck`): a photograph, a screen
    capture, noise, an inverted or turned film scores far above chest X-rays like the training ones."""

    score: float = Field(
        description="the share of the upload's 16×16 standardised thumbnail that the training images' "
        "principal patterns leave unexplained: about 0.1–0.5 for chest X-rays, about 1 for a photograph, "
        "noise or a blank image"
    )
    threshold: float = Field(description="the score's threshold (`input_reference.threshold` on the card)")
    pattern_distance: float = Field(
        description="how far from the training images the upload lies within those patterns (Hotelling's "
        "T²): a ramp or a blob they explain, in amounts no chest X-ray has"
    )
    pattern_threshold: float = Field(description="the pattern distance's threshold")
    unusual: bool = Field(
        description="either above its threshold, which about 1 in 100 images like the training ones are (the "
        "card's `input_reference.expected_share`, more for a model trained on few images): the upload is "
        "unlike the images the model trained on, and its probabilities may mean nothing; check it is a "
        "frontal chest X-ray of the kind the model was made for"
    )


class Prediction(BaseModel):
    """The answer of POST /v1/predict."""

    label: str = Field(description="the most probable class", json_schema_extra={"enum": list(CLASSES)})
    probabilities: dict[str, float] = Field(
        description="every class, in the canonical order",
        json_schema_extra={
            "properties": {name: _PROBABILITY for name in CLASSES},
            "required": list(CLASSES),
            "additionalProperties": False,
        },
    )
    model: ModelInfo
    input_sha256: str = Field(
        description="sha256 of the uploaded file's bytes as the server received them (`sha256sum FILE`): "
        "with `model`, what a record of this answer needs to trace it to its image and weights"
    )
    latency_ms: float = Field(description="time spent in the server, from request to answer")
    explanation: Explanation | None = Field(default=None, description="with ?explain=true")
    request_id: str | None = Field(
        default=None,
        description="the id Serve gave the request (as its X-Request-ID header and the server's log lines "
        "carry it): with `model`, `input_sha256` and `answered_at`, what a record of this answer keeps to "
        "find it in the server's logs",
    )
    answered_at: str | None = Field(
        default=None, description="when the server answered, UTC (ISO 8601 with its +00:00 offset)"
    )
    input_check: InputCheck | None = Field(
        default=None,
        description="how unlike the training images the upload is; null where the model's checkpoint has "
        "no reference to check against (a checkpoint an earlier cxr saved, or one trained on fewer than 20 "
        "images)",
    )

    @field_validator("probabilities")
    @classmethod
    def _four_classes(cls, probabilities: dict[str, float]) -> dict[str, float]:
        # What the OpenAPI schema promises: the four classes in order, each a probability.
        if tuple(probabilities) != CLASSES or not all(0 <= p <= 1 for p in probabilities.values()):
            raise ValueError(f"probabilities must be {CLASSES} in [0, 1], got {probabilities}")
        return probabilities


class ForwardSweepInfo(BaseModel):
    """What a replica measured at load to choose its images per forward pass (`fit_forward`)."""

    images_per_s: dict[str, float] = Field(description="the forward's images/s by batch size (median)")
    best: int | None = Field(description="the largest size within 3 % of the fastest; null: not measured")
    rounds: int = Field(description="rounds measured in turns within the time budget")
    seconds: float = Field(description="how long the measurement took")


class TestEvidence(BaseModel):
    """The test figures of the evaluation report registered with the served version: how well it did on
    images it never trained on or was chosen by (the card's figures are validation ones)."""

    dataset_fingerprint: str | None = Field(
        description="the fingerprint of the dataset whose test split was scored"
    )
    images: int | None = Field(description="images scored")
    accuracy: float
    accuracy_ci95: list[float] | None = Field(description="its Wilson 95% interval [low, high]")
    commonest_class_accuracy: float | None = Field(
        description="the accuracy of always answering the split's commonest class"
    )
    beats_commonest_class: bool | None = Field(
        description="whether the accuracy interval's low end lies above commonest_class_accuracy; false: "
        "not shown to have learned the task on these images"
    )
    balanced_accuracy: float | None = None
    macro_f1: float | None = None
    macro_auroc: float | None = None
    recall: dict[str, float | None] = Field(description="each class's recall (sensitivity)")


class ModelDetails(BaseModel):
    """The answer of GET /v1/model."""

    model: ModelInfo
    card: dict = Field(
        description="the serving checkpoint's model card, each location in it by its last two components"
    )
    test: TestEvidence | None = Field(
        default=None,
        description="the test figures registered with the version (`cxr models register --report`, or a "
        "Tune comparison's registration); null for a checkpoint folder, a version registered without one, "
        "or one whose report scored other data or cannot be read (`cxr models show` says which)",
    )
    probability_prior: dict[str, float] | None = Field(
        default=None,
        description="the class mix the probabilities are made for: equal shares where the model trained "
        "with class weights, else its training split's shares. At a site whose prevalence π differs, read "
        "p_k as p_k·π_k/prior_k, renormalised over the classes; null where the card does not say",
    )
    evaluations: list[dict] = Field(
        default_factory=list,
        description="evaluations added to the version since its registration (`cxr models add-evaluation`: "
        "another hospital's data above all), oldest first: what each scored (dataset fingerprint, relation, "
        "split, images), its figures, its verdict and whether that is a warning (`alarming`), when and by "
        "whom; `changed` true where its metrics.json is no longer the one added",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what the registry knows against serving this model, in sentences: registered test "
        "figures not shown to beat always answering the commonest class, a training dataset whose sources "
        "separate classes; empty where nothing is known against it",
    )
    max_batch_size: int
    batch_wait_timeout_s: float
    forward_batch_size: int | None = Field(
        default=None,
        description="images per forward pass at most (a larger batch runs as several); null: whole batches",
    )
    forward_sweep: ForwardSweepInfo | None = Field(
        default=None,
        description="the load-time measurement that chose forward_batch_size; null if it was set",
    )
    swap_error: str | None = Field(
        default=None,
        description="why the last requested model could not be loaded (the previous one serves on)",
    )


ERROR_CODES = (
    "undecodable_image", "image_too_small", "blank_image", "unsupported_media_type", "invalid_multipart",
    "missing_file", "length_required", "payload_too_large", "upload_timeout", "invalid_request",
    "not_found", "method_not_allowed", "cors_refused", "http_error", "overloaded", "model_unavailable",
    "not_ready", "decoder_unavailable", "shutting_down", "prediction_failed", "internal_error",
    "client_disconnected", "audit_unavailable",
)  # fmt: skip
"""Every `error` an answer of the API carries (client_disconnected is only counted and logged: the client
has gone). A typed client may switch on them; a new one is an addition to the API."""


class ErrorBody(BaseModel):
    """Every error answer: a short machine-readable code and a sentence for people."""

    error: str = Field(
        description="what went wrong, one of a fixed set of codes: undecodable_image, "
        "unsupported_media_type, payload_too_large, ...",
        json_schema_extra={"enum": list(ERROR_CODES)},
    )
    detail: str = Field(description="what was wrong and, for an upload, what is accepted")


class Health(BaseModel):
    """The answer of GET /healthz."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """The answer of GET /readyz when a classifier replica answers."""

    status: Literal["ready"] = "ready"
    model: ModelInfo
