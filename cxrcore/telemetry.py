"""cxr's custom Prometheus metrics (`ray.util.metrics`): names, descriptions, labels and buckets in one place.

Ray exports each metric on every node's metrics endpoint (`ray start --metrics-export-port`, found by
Prometheus through Ray's service-discovery file) as `ray_<name>`: a counter as `ray_<name>_total`, a
histogram as `ray_<name>_bucket`, `_sum` (rebuilt from bucket midpoints) and `_count`. Ray adds
labels of its own (`WorkerId`, `NodeAddress`, `SessionName`, ...), so queries sum over ours.
`cluster/grafana/cxr-dashboard.json` charts every metric here.

A metric is created on first use in a process connected to Ray (one created before `ray.init`, or
at import, fails). Recording never raises: outside Ray it does nothing, and a failure is logged once
per metric, so telemetry can never break a request, an ingest or a training step. A gauge stays on
the endpoint for two export intervals (`RAY_metrics_report_interval_ms`, 10 s by default) after it
is set: the training gauges are one sample per epoch.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    """What one metric is: its kind, the sentence Prometheus shows, its label names, its buckets."""

    kind: Literal["counter", "histogram", "gauge"]
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


LATENCY_MS_BOUNDARIES = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0)
"""From a batched tiny model on a GPU (a few ms) to Grad-CAM of a large one on a busy CPU (seconds)."""
BATCH_SIZE_BOUNDARIES = (0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5)
"""Ray's exporter rebuilds a histogram's `_sum` from bucket midpoints: these make the midpoint of each
bucket the mean of the batch sizes in it (1, 2, 3.5, 6.5, ...), so `_sum / _count` is the mean size."""

METRICS: dict[str, MetricSpec] = {
    "cxr_predictions": MetricSpec(
        "counter", "Predictions answered, by predicted class and model version", ("model", "version", "label")
    ),
    "cxr_checked_inputs": MetricSpec(
        "counter",
        "Predictions whose upload the input check checked (the model's checkpoint has its reference), by "
        "model version: the base of cxr_unusual_inputs' share",
        ("model", "version"),
    ),
    "cxr_unusual_inputs": MetricSpec(
        "counter",
        "Predictions whose upload the input check found unlike the model's training images (input_check."
        "unusual), by model version: about 1 in 100 of images like the training ones, more when the inputs "
        "changed",
        ("model", "version"),
    ),
    "cxr_predict_latency_ms": MetricSpec(
        "histogram",
        "Time from receiving a /v1/predict request to its answer, for answered predictions (ms)",
        ("model", "version", "explain"),
        LATENCY_MS_BOUNDARIES,
    ),
    "cxr_request_errors": MetricSpec(
        "counter",
        "Requests answered with an error, by the JSON body's error code (undecodable_image, "
        "unsupported_media_type, payload_too_large, overloaded, ...) and HTTP status",
        ("error", "status"),
    ),
    "cxr_batch_size": MetricSpec(
        "histogram",
        "Images in each batch the classifier runs (Serve dynamic batching)",
        ("model", "version"),
        BATCH_SIZE_BOUNDARIES,
    ),
    "cxr_model_loads": MetricSpec(
        "counter",
        "Models a classifier replica loaded or failed to load, by model, version and outcome: loaded, failed "
        "(the model it served stays), fallback (a replica started since a failed swap serves the app's own)",
        ("model", "version", "outcome"),
    ),
    "cxr_model_served": MetricSpec(
        "gauge",
        "1 for each classifier replica, labelled with the model version it serves; set at each health check "
        "(every 10 s), so a replica swapped to another version leaves the old label within two exports",
        ("model", "version"),
    ),
    "cxr_ingest_images": MetricSpec("counter", "Images ingested into a dataset", ("dataset",)),
    "cxr_ingest_rejects": MetricSpec(
        "counter", "Images an ingest refused, by reason (see the report's `rejected`)", ("dataset", "reason")
    ),
    "cxr_train_images_per_s": MetricSpec(
        "gauge", "Training images per second of the last epoch, all workers together", ("run", "model")
    ),
    "cxr_train_epoch": MetricSpec("gauge", "Epochs a training run has completed", ("run", "model")),
}

# Why an ingest refused an image, from the start of the report's message (messages carry file details
# that would make a label per file); anything else is `undecodable`.
REJECT_REASONS = (
    ("cannot read file", "unreadable"),
    ("empty file", "empty"),
    ("image too large", "too_large"),
    ("image too small", "too_small"),
    ("blank image", "blank"),
    ("not an image", "not_an_image"),
    ("corrupt", "corrupt"),
)

_created: dict[str, Any] = {}
_failed: set[str] = set()
_lock = threading.Lock()


def record_prediction(
    model: str, version: str | None, label: str, latency_ms: float, explain: bool, unusual: bool | None = None
) -> None:
    """One answered prediction: its class, its latency from request to answer, and what the input check
    found of the upload (None: not checked, the model having no reference)."""
    tags = {"model": model, "version": version or "none"}
    _record("cxr_predictions", 1, {**tags, "label": label})
    if unusual is not None:
        _record("cxr_checked_inputs", 1, tags)
    if unusual:
        _record("cxr_unusual_inputs", 1, tags)
    _record("cxr_predict_latency_ms", latency_ms, {**tags, "explain": str(explain).lower()})


def record_request_error(error: str, status: int) -> None:
    """One request answered with an error (the code in the JSON body, and the HTTP status)."""
    _record("cxr_request_errors", 1, {"error": error, "status": str(status)})


def record_batch(size: int, model: str, version: str | None) -> None:
    """One batch the classifier ran, of `size` images."""
    _record("cxr_batch_size", size, {"model": model, "version": version or "none"})


def record_model_load(ref: str, outcome: Literal["loaded", "failed", "fallback"]) -> None:
    """A model a replica loaded, or failed to: a registry's "name:N" as the model and version labels the
    other serving metrics carry (which the dashboard joins on), any other reference (an alias that did not
    resolve, a checkpoint's location) whole as the model, version "none"."""
    name, colon, number = ref.rpartition(":")
    model, version = (name, number) if colon and number.isdigit() and "/" not in ref else (ref, "none")
    _record("cxr_model_loads", 1, {"model": model, "version": version, "outcome": outcome})


def record_model_served(model: str, version: str | None) -> None:
    """A classifier replica's health check: the version it serves now (summed over replicas, a count)."""
    _record("cxr_model_served", 1, {"model": model, "version": version or "none"})


def record_ingest(dataset: str, ingested: int, rejected: Iterable[str]) -> None:
    """A finished ingest: the images written and the messages of those refused."""
    if ingested:
        _record("cxr_ingest_images", ingested, {"dataset": dataset})
    for reason, count in Counter(map(reject_reason, rejected)).items():
        _record("cxr_ingest_rejects", count, {"dataset": dataset, "reason": reason})


def record_epoch(run: str, model: str, epoch: int, images_per_s: float) -> None:
    """A finished training epoch (call on rank 0 only): its number and the throughput of all workers."""
    tags = {"run": run, "model": model}
    _record("cxr_train_epoch", epoch, tags)
    _record("cxr_train_images_per_s", images_per_s, tags)


def reject_reason(message: str) -> str:
    """The label of an ingest rejection message.

    >>> reject_reason("image too small (30×30, minimum side 64)"), reject_reason("DICOM image has no size")
    ('too_small', 'undecodable')
    """
    return next((reason for start, reason in REJECT_REASONS if message.startswith(start)), "undecodable")


def ascii_tag(value: str) -> str:
    """A label value as Ray's metrics take it: ASCII, anything else escaped. A dataset folder named
    `ds 中文` failed every ingest's metric ("'ascii' codec can't encode"), with a traceback on the console.

    >>> print(ascii_tag("/data/ds 中文 é"))
    /data/ds \\u4e2d\\u6587 \\xe9
    """
    return value if value.isascii() else value.encode("ascii", "backslashreplace").decode("ascii")


def _record(name: str, value: float, tags: dict[str, str]) -> None:
    tags = {key: ascii_tag(str(tag)) for key, tag in tags.items()}
    try:
        metric = _metric(name)
        if metric is None:
            return
        kind = METRICS[name].kind
        if kind == "counter":
            metric.inc(value, tags)
        elif kind == "histogram":
            metric.observe(value, tags)
        else:
            metric.set(value, tags)
    except Exception:
        if name not in _failed:
            _failed.add(name)
            log.warning("could not record %s; its further failures are not logged", name, exc_info=True)


def _metric(name: str) -> Any:
    """The process's metric `name`, created on first use; None outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    with _lock:
        if name not in _created:
            from ray.util import metrics

            spec = METRICS[name]
            if spec.kind == "histogram":
                _created[name] = metrics.Histogram(name, spec.description, list(spec.boundaries), spec.tags)
            elif spec.kind == "counter":
                _created[name] = metrics.Counter(name, spec.description, spec.tags)
            else:
                _created[name] = metrics.Gauge(name, spec.description, spec.tags)
        return _created[name]
