"""The Serve application over real HTTP: `serve deploy` to a `ray start` cluster, then httpx.

One deployment serves the module: the registry's `production` model, a dual-channel CNN whose masks
come from the Segmenter deployment. The autoscaling and model-swap tests come last because they
change it (and put it back).
`cxr serve` runs first, before the module's app exists, on its own local Ray.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from pydicom.uid import JPEGLosslessSV1

from cxrcore.cli import main
from cxrcore.data.transforms import decode_gray, scale_to_uint8
from cxrcore.decode import decode_upload
from cxrcore.inference import Predictor
from cxrcore.registry import ModelRegistry
from cxrcore.telemetry import LATENCY_MS_BOUNDARIES
from tests.e2e.conftest import BIN, CONSOLE_SETTINGS, RayCluster, deploy_shipped_config, free_port, wait_until
from tests.e2e.uploads import (
    ABORTS_GDCM,
    chest,
    compressed_dicom,
    dicom_bytes,
    jpeg_bytes,
    png_bytes,
    png_header_only,
    write_registry,
    xray_dicom,
)
from tests.http_client import HTTP
from tests.processes import command_line, group_of, listening, wait_until_gone
from tests.scrape import scrape, total, wait_for

pytestmark = pytest.mark.e2e
APP = "cxr"
PRODUCTION = "tiny_dual_cnn:1"  # what the `production` alias names, pinned when the app is built
MAX_UPLOAD_MB = 1
# Fast autoscaling for the test (notes §4.2): metrics every 0.5 s, decisions after 1 s up / 3 s down.
TEST_ARGS: dict[str, Any] = {
    "num_cpus": 0.25,
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
    "max_batch_size": 8,
    "max_ongoing_requests": 8,
    "max_queued_requests": 16,  # more than the 12 clients of the autoscaling test: none is refused
    "max_upload_mb": MAX_UPLOAD_MB,
}
METRICS_ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
GRAY = scale_to_uint8(chest(0))
GOOD_PNG = png_bytes(GRAY)


@dataclass
class Server:
    url: str
    cluster: RayCluster
    config: dict[str, Any]
    registry: Path
    offline: Predictor = field(repr=False)

    def details(self) -> dict[str, Any]:
        """The app's status from the dashboard's Serve REST API (what `serve status` shows)."""
        response = HTTP.get(f"{self.cluster.address}/api/serve/applications/", headers=_auth(self.cluster))
        response.raise_for_status()
        app: dict[str, Any] = response.json()["applications"].get(APP, {})
        return app

    def replicas(self, deployment: str) -> list[str]:
        replicas = self.details()["deployments"][deployment]["replicas"]
        return sorted(r["replica_id"] for r in replicas if r["state"] == "RUNNING")

    def deploy(self, config: dict[str, Any]) -> None:
        """What `serve deploy` does: PUT the config to the dashboard."""
        response = HTTP.put(
            f"{self.cluster.address}/api/serve/applications/",
            json=config,
            headers=_auth(self.cluster),
            timeout=30,
        )
        assert response.status_code == 200, response.text

    def predict(self, data: bytes, content_type: str = "image/png", **params: Any) -> httpx.Response:
        return HTTP.post(
            f"{self.url}/v1/predict",
            content=data,
            headers={"content-type": content_type},
            params=params,
            timeout=60,
        )


def _auth(cluster: RayCluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.token}"}


def _probabilities(body: dict[str, Any]) -> np.ndarray:
    return np.array(list(body["probabilities"].values()))


@pytest.fixture(scope="package")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="package")
def server(
    ray_cluster: RayCluster, registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The shipped serve/config.yaml with test arguments, deployed with the `serve deploy` CLI.

    It lives as long as the e2e cluster and goes with its node: deleting the app first took 8.7-9 s (Serve
    gives the ingress its drain period plus 5 s to stop) for a node stopped right after. An e2e module that
    runs after this one and needs the cluster's CPUs deletes the app itself."""
    port, config = deploy_shipped_config(
        ray_cluster,
        tmp_path_factory.mktemp("serve"),
        {"registry": str(registry), "model": "production", **TEST_ARGS},
        {"env_vars": METRICS_ENV},
    )
    server = Server(
        url=f"http://127.0.0.1:{port}",
        cluster=ray_cluster,
        config=config,
        registry=registry,
        offline=Predictor.from_checkpoint(ModelRegistry(registry).local_checkpoint("production")),
    )

    def running() -> bool:
        status = server.details().get("status")
        if status == "DEPLOY_FAILED":
            pytest.fail(f"deploy failed: {server.details().get('message')}")
        return status == "RUNNING"

    wait_until(running, timeout=240, what="the cxr app to be RUNNING")  # `serve deploy` returns first
    yield server


def _post(url: str) -> httpx.Response:
    return HTTP.post(f"{url}/v1/predict", content=GOOD_PNG, headers={"content-type": "image/png"}, timeout=60)


def test_cxr_serve_runs_in_the_foreground_and_stops_cleanly(registry: Path, scratch: Path) -> None:
    """`cxr serve` as the README has it, on a local Ray of its own started with a known auth token: it
    serves, drains on SIGTERM and stops with nothing left behind; the token is never printed, logged or on a
    command line, and the dashboard (and job API) it starts answers only with it, on loopback only."""
    port, token = free_port(), uuid.uuid4().hex
    ray_dir, home, log = scratch / "ray", scratch / "home", scratch / "output.txt"
    ray_dir.mkdir()
    home.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # a local cluster of its own
        "RAY_TMPDIR": str(ray_dir),  # short socket paths
        "HOME": str(home),  # keep ~/.ray/auth_token out of it
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for name in CONSOLE_SETTINGS:
        env.pop(name, None)  # the defaults a user has
    command = [
        str(BIN / "cxr"), "serve", "--registry", str(registry), "--model", "tiny_cnn_lstm",
        "--port", str(port), "--arg", "num_cpus=0.25", "--arg", "max_replicas=1",
        "--arg", "audit_log=true", "--arg", f"audit_dir={scratch / 'audit'}",
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: process.poll() is None and HTTP.get(f"{url}/readyz", timeout=5).status_code == 200,
            timeout=180,
            what="`cxr serve` to become ready",
        )
        response = HTTP.post(
            f"{url}/v1/predict", files={"file": ("x.png", GOOD_PNG, "image/png")}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json()["model"]["name"] == "tiny_cnn_lstm"
        # The audit trail, in a real replica (where the logger had been at WARNING and wrote nothing)
        (trail,) = (scratch / "audit").glob("cxr_audit_*.jsonl")
        (line,) = [json.loads(text) for text in trail.read_text().splitlines()]
        answer = response.json()
        assert (line["request_id"], line["label"]) == (answer["request_id"], answer["label"])

        # The dashboard it started: the token or 401, on loopback only; no process shows the token.
        dashboard = wait_until(  # named in the line `cxr serve` prints once its app answers
            lambda: re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace")),
            timeout=60,
            what="`cxr serve` to print where it serves",
        )
        without = HTTP.get(f"{dashboard[1]}/api/version", timeout=5)
        with_token = HTTP.get(
            f"{dashboard[1]}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert (without.status_code, with_token.status_code) == (401, 200)
        group = group_of(process.pid)
        assert len(group) > 5 and listening(group).get(int(dashboard[1].rsplit(":", 1)[1])) == "127.0.0.1"
        assert [command_line(pid).split()[0] for pid in group if token in command_line(pid)] == []
        # HAProxy's admin socket, which Ray writes mode 666 (level admin), lies in a folder only this
        # user may enter: no other local user can point its backends at a listener of their own.
        from serve.server import haproxy_processes

        def session(pid: int) -> int:  # Ray's actors lead process groups of their own, in this session
            return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[3])

        ours = [command for pid, _, command in haproxy_processes() if session(pid) == process.pid]
        configs = [re.search(r" -f (\S+)", command) for command in ours]
        assert configs and all(found for found in configs)
        assert {oct(Path(found[1]).parent.stat().st_mode & 0o777) for found in configs if found} == {"0o700"}

        # A request in flight when the server is told to stop is answered; one that comes after is refused
        # in JSON, and /readyz says so, until Serve stops.
        on_the_wire, release, answers = threading.Event(), threading.Event(), []

        def upload() -> Iterator[bytes]:
            yield GOOD_PNG[:100]
            on_the_wire.set()
            release.wait(60)
            yield GOOD_PNG[100:]

        def slow_client() -> None:
            headers = {"content-type": "image/png"}
            answers.append(HTTP.post(f"{url}/v1/predict", content=upload(), headers=headers, timeout=60))

        slow = threading.Thread(target=slow_client)
        slow.start()
        assert on_the_wire.wait(30)
        assert _post(url).status_code == 200  # a request behind it went through: it has reached the ingress
        process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: HTTP.get(f"{url}/readyz", timeout=5).status_code == 503, timeout=30, what="draining"
        )
        refused = _post(url)
        assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
        release.set()
        slow.join(60)
        assert answers and answers[0].status_code == 200, answers and answers[0].text
        assert process.wait(timeout=90) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text(errors="replace")
    assert f"at http://127.0.0.1:{port}" in output and "answering the requests in flight first" in output
    assert "still in flight" not in output and "Traceback" not in output
    assert "will not be applied" not in output  # Serve's notice that read as if --port had been ignored
    assert f"at http://127.0.0.1:{port} through HAProxy" in output  # the local default front end
    # the name resolved at start, and that a promotion will not reach this server
    assert f"serving tiny_cnn_lstm (tiny_cnn_lstm:1) at http://127.0.0.1:{port}" in output
    assert "promoting another version later does not change what this server answers with" in output
    with pytest.raises(httpx.HTTPError):  # nothing, HAProxy included, listens on the port any more
        HTTP.get(f"{url}/healthz", timeout=2)
    assert wait_until_gone(str(ray_dir)) == []  # its Ray stopped with it
    # Where the token shows up, never the token itself: not printed, not in any of the session's files
    # (gcs, raylet, dashboard, Serve's controller, proxy and replicas, HAProxy's configuration).
    assert token not in output
    files = [p for p in ray_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert [str(p) for p in files if token.encode() in p.read_bytes()] == []
    assert not (home / ".ray").exists()  # a token from the environment is not saved anywhere


def test_app_composes_ingress_classifier_and_segmenter(server: Server) -> None:
    assert set(server.details()["deployments"]) == {"Api", "Classifier", "Segmenter"}
    assert HTTP.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = HTTP.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["model"]["ref"] == PRODUCTION
    model = HTTP.get(f"{server.url}/v1/model").json()
    # The weights that answer, as the registry recorded them when it stored the version: a prediction
    # kept in a hospital's records traces back to one file.
    weights = Path(ModelRegistry(server.registry).local_checkpoint(PRODUCTION)) / "model.safetensors"
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ModelRegistry(server.registry).get(PRODUCTION).card.weights_sha256 == sha256
    # and the segmenter whose masks it reads, likewise
    unet_version = ModelRegistry(server.registry).get("tiny_unet")
    segmenter = {"ref": unet_version.ref, "weights_sha256": unet_version.card.weights_sha256}
    served = {"name": "tiny_dual_cnn", "version": "1", "ref": PRODUCTION, "weights_sha256": sha256}
    assert model["model"] == {**served, "segmenter": segmenter} and segmenter["weights_sha256"]
    # The card names its segmenter, dataset and run folder by their last components: no server path.
    unet = Path(ModelRegistry(server.registry).local_checkpoint("tiny_unet"))
    assert model["card"]["segmenter"] == f"…/{unet.parent.name}/{unet.name}"
    assert str(server.registry) not in json.dumps(model, ensure_ascii=False)
    assert model["max_batch_size"] == 8 and model["swap_error"] is None
    # Its registered test figures, next to the card's validation ones: 12 of 20 (interval 0.39-0.78)
    # does not beat answering the commonest class (8 of 20).
    test = model["test"]
    assert test["images"] == 20 and test["accuracy"] == 0.6 and test["dataset_fingerprint"] == "f1n93rpr1n7"
    assert test["commonest_class_accuracy"] == 0.4 and test["beats_commonest_class"] is False
    assert 0.38 < test["accuracy_ci95"][0] < 0.4 < 0.78 < test["accuracy_ci95"][1] < 0.8
    assert model["probability_prior"] is None  # a card that says neither class weights nor its class mix
    assert model["warnings"] == [
        "its registered test accuracy, 0.600 (95% CI 0.39–0.78) on 20 images, is not shown to beat always "
        "answering the commonest class (0.400): do not serve it on this evidence"
    ]
    # The replica measured its forward at 1-8 images at load and runs passes of the fastest size.
    sweep = model["forward_sweep"]
    assert set(sweep["images_per_s"]) == {"1", "2", "4", "8"} and sweep["rounds"] >= 1
    assert model["forward_batch_size"] == sweep["best"] in (1, 2, 4, 8)
    openapi = HTTP.get(f"{server.url}/openapi.json").json()
    assert "multipart/form-data" in openapi["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    docs = HTTP.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "http://" not in docs.text and "https://" not in docs.text  # offline
    assert HTTP.get(f"{server.url}/docs-assets/swagger-ui-bundle.js").status_code == 200


FORMATS = {
    "png": (GOOD_PNG, "image/png"),
    "png-rgb": (png_bytes(scale_to_uint8(chest(1)), "RGB"), "image/png"),
    "png-rgba": (png_bytes(scale_to_uint8(chest(2)), "RGBA"), "image/png"),
    "png-16bit": (png_bytes((chest(3) * 65535).astype(np.uint16)), "image/png"),
    "png-large": (png_bytes(scale_to_uint8(chest(4, 1800, 1500, noise=0.0))), "image/png"),
    # A detector-sized radiograph: 7.5 MB once decoded, more than gRPC's default 4 MiB message between
    # replicas in Serve's throughput-optimized mode.
    "png-detector": (png_bytes(scale_to_uint8(chest(8, 3000, 2500, noise=0.0))), "image/png"),
    "jpeg": (jpeg_bytes(scale_to_uint8(chest(5))), "image/jpeg"),
    "dicom-monochrome1": (xray_dicom(6, "MONOCHROME1"), "application/dicom"),
    "dicom-monochrome2": (xray_dicom(7, "MONOCHROME2"), "application/octet-stream"),
    # As a hospital's PACS exports an X-ray; decoded in the replica's decoder process.
    "dicom-jpeg-lossless": (compressed_dicom(xray_dicom(9), JPEGLosslessSV1), "application/dicom"),
}


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_predicts_exactly_what_the_offline_predictor_does(
    server: Server, name: str, multipart: bool
) -> None:
    data, content_type = FORMATS[name]
    if multipart:
        files = {"file": (f"upload.{name.split('-')[0]}", data, content_type)}
        response = HTTP.post(f"{server.url}/v1/predict", files=files, timeout=60)
    else:
        response = server.predict(data, content_type)
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body["probabilities"]) == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    expected = server.offline.predict_proba([decode_upload(data, content_type)])[0]
    np.testing.assert_allclose(_probabilities(body), expected, atol=1e-5)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["model"]["ref"] == PRODUCTION and body["latency_ms"] > 0
    assert body["input_sha256"] == hashlib.sha256(data).hexdigest()  # the file as sent, multipart or not
    assert body["explanation"] is None
    # the input check as the offline Predictor makes it: the same image at the same base size
    assert body["input_check"] == server.offline.input_checks([decode_upload(data, content_type)])[0]


def test_real_xrays_predict_what_the_offline_predictor_does(server: Server, real_sample: Path) -> None:
    files = [
        path for folder in sorted(real_sample.glob("*/images")) for path in sorted(folder.glob("*.png"))[:3]
    ]
    assert files
    for path in files:
        response = HTTP.post(
            f"{server.url}/v1/predict", files={"file": (path.name, path.read_bytes())}, timeout=60
        )
        assert response.status_code == 200, (path, response.text)
        expected = server.offline.predict_proba([decode_gray(path.read_bytes())])[0]  # ingest's decoder
        np.testing.assert_allclose(_probabilities(response.json()), expected, atol=1e-5, err_msg=str(path))


def test_explain_adds_a_heatmap_and_the_lung_mask_used(server: Server) -> None:
    plain = server.predict(GOOD_PNG).json()
    response = server.predict(GOOD_PNG, explain="true")
    assert response.status_code == 200, response.text
    body = response.json()
    np.testing.assert_allclose(_probabilities(body), _probabilities(plain), atol=1e-5)
    explanation = body["explanation"]
    assert explanation["target"] == body["label"]
    heatmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["heatmap_png"]))))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["mask_png"]))))
    assert heatmap.shape == mask.shape == (64, 64)  # the model's input size
    assert explanation["heatmap_empty"] is bool(heatmap.max() == 0) and heatmap.max() == 255
    assert set(np.unique(mask)) <= {0, 255}


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(GRAY).save(buffer, format="GIF")
    return buffer.getvalue()


def _raw(data: bytes, content_type: str | None = "image/png", **params: str) -> dict[str, Any]:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": data, "headers": headers, "params": params}


def _multipart(data: bytes, content_type: str, field: str = "file") -> dict[str, Any]:
    return {"files": {field: ("upload", data, content_type)}}


TOO_LARGE = GOOD_PNG + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024)
NOISE = np.random.default_rng(0).bytes(4096)  # seeded: never starts like a format it would name
DICOM_BOMB = dicom_bytes(np.zeros((4, 4), np.uint16), rows=60_000, columns=60_000)
BAD_INPUTS = {
    "empty": (_raw(b""), 400, "undecodable_image"),
    "truncated-png": (_raw(GOOD_PNG[:300]), 400, "undecodable_image"),
    "garbage": (_raw(NOISE, "application/octet-stream"), 400, "undecodable_image"),
    "text": (_raw(b"hello", "text/plain"), 415, "unsupported_media_type"),
    "gif": (_multipart(_gif(), "image/gif"), 415, "unsupported_media_type"),
    "pdf": (_raw(b"%PDF-1.4\n" + b"0" * 100, "application/pdf"), 415, "unsupported_media_type"),
    "png-bomb": (_raw(png_header_only(30_000, 30_000)), 400, "undecodable_image"),
    "dicom-bomb": (_raw(DICOM_BOMB, None), 400, "undecodable_image"),
    # GDCM aborts its process on this file: the replica's decoder process, not the replica.
    "dicom-aborting-the-decoder": (_raw(ABORTS_GDCM.read_bytes(), None), 400, "undecodable_image"),
    "too-small": (_raw(png_bytes(GRAY[:16, :16])), 400, "image_too_small"),
    "too-large": (_raw(TOO_LARGE), 413, "payload_too_large"),
    "too-large-multipart": (_multipart(TOO_LARGE, "image/png"), 413, "payload_too_large"),
    "no-file-field": (_multipart(GOOD_PNG, "image/png", field="image"), 400, "missing_file"),
    "bad-query": (_raw(GOOD_PNG, explain="maybe"), 400, "invalid_request"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_its_status_and_a_json_error_then_serving_goes_on(server: Server, name: str) -> None:
    request, status, error = BAD_INPUTS[name]
    response = HTTP.post(f"{server.url}/v1/predict", timeout=60, **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["detail"]
    assert server.predict(GOOD_PNG).status_code == 200


def test_predictions_errors_latency_and_batches_reach_the_metrics_endpoint(server: Server) -> None:
    """cxr's serving metrics on the head node's Prometheus endpoint, with the labels the dashboard sums by."""
    model = {"model": "tiny_dual_cnn", "version": "1"}  # the production alias, pinned at build time
    before = scrape(server.cluster.metrics_url)
    labels = {server.predict(GOOD_PNG).json()["label"] for _ in range(2)}
    assert len(labels) == 1  # the same image twice
    errors = [BAD_INPUTS[name] for name in ("text", "garbage", "too-large")]
    for request, status, _ in errors:
        assert HTTP.post(f"{server.url}/v1/predict", timeout=60, **request).status_code == status
    expected = [
        ("ray_cxr_predictions_total", {**model, "label": labels.pop()}, 2),
        ("ray_cxr_predict_latency_ms_count", {**model, "explain": "false"}, 2),
        ("ray_cxr_batch_size_count", model, 2),  # one at a time: a batch of 1 each
        ("ray_cxr_batch_size_sum", model, 2),  # the buckets' midpoints are the sizes
        *(("ray_cxr_request_errors_total", {"error": e, "status": str(s)}, 1) for _, s, e in errors),
        # GOOD_PNG's blobs are unlike the phantoms the test models' input check was fitted on
        ("ray_cxr_unusual_inputs_total", model, 2),
        ("ray_cxr_checked_inputs_total", model, 2),
    ]

    def grown(samples: list[Any]) -> list[Any] | None:
        def growth(name: str, labels: dict[str, str]) -> float:
            return (total(samples, name, **labels) or 0) - (total(before, name, **labels) or 0)

        # every classifier replica says which version it serves, at its health check (every 10 s)
        served = (total(samples, "ray_cxr_model_served", **model) or 0) >= 1
        return samples if served and all(growth(name, labels) >= n for name, labels, n in expected) else None

    samples = wait_for(server.cluster.metrics_url, grown, 30, "the serving metrics to count the requests")
    buckets = {float(s.labels["le"]) for s in samples if s.name == "ray_cxr_predict_latency_ms_bucket"}
    assert buckets == {*LATENCY_MS_BOUNDARIES, math.inf}


def test_cxr_predict_prints_a_table(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(GOOD_PNG)
    (tmp_path / "b.dcm").write_bytes(xray_dicom(1))
    (tmp_path / "notes.txt").write_text("not an image")
    files = [str(tmp_path / name) for name in ("a.png", "b.dcm", "notes.txt")]
    assert main(["predict", "--url", server.url, *files]) == 1  # one file failed
    out, err = capsys.readouterr()
    header, _, *rows = out.splitlines()
    assert header.split()[:3] == ["file", "label", "COVID"]
    assert "tiny_dual_cnn:1" in rows[0] and "tiny_dual_cnn:1" in rows[1]
    assert rows[2].split() == [files[2], "error", "415"]  # the reason below the table, not in its columns
    assert err.splitlines()[-1].startswith(f"{files[2]}: HTTP 415 unsupported_media_type: ")
    # GOOD_PNG's blobs are not the phantoms the model's input check was fitted on: marked, and warned of
    assert rows[0].split()[-3] == "UNUSUAL"
    assert err.startswith(f"WARNING: {files[0]}: unlike the images tiny_dual_cnn trained on (input check: ")


class Load:
    """`clients` threads posting one image in a loop until stopped, recording status and model ref."""

    def __init__(self, server: Server, clients: int) -> None:
        self.server = server
        self.results: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(
                        f"{self.server.url}/v1/predict",
                        content=GOOD_PNG,
                        headers={"content-type": "image/png"},
                    )
                    ref = response.json()["model"]["ref"] if response.status_code == 200 else None
                    self.results.append((response.status_code, ref))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))


def test_autoscaling_adds_classifier_replicas_under_load_and_removes_them_after(server: Server) -> None:
    wait_until(
        lambda: len(server.replicas("Classifier")) == 1, timeout=60, what="the classifier at 1 replica"
    )
    with Load(server, clients=12) as load:
        wait_until(
            lambda: len(server.replicas("Classifier")) > 1, timeout=60, what="a second classifier replica"
        )
    assert load.results and all(status == 200 for status, _ in load.results), load.results[-5:]
    wait_until(lambda: len(server.replicas("Classifier")) == 1, timeout=60, what="the classifier back at 1")


def test_model_swap_in_place_without_failed_requests(server: Server) -> None:
    before = server.replicas("Classifier")

    def serving(ref: str) -> bool:
        return bool(HTTP.get(f"{server.url}/v1/model", timeout=10).json()["model"]["ref"] == ref)

    with Load(server, clients=3) as load:
        # The same `args` with a new classifier `user_config`: a lightweight update, as `serve deploy`
        # of such a config does; `reconfigure` loads the version on the live replicas.
        for model, ref in [("tiny_dual_cnn:2", "tiny_dual_cnn:2"), ("tiny_cnn_lstm", "tiny_cnn_lstm:1")]:
            swapped = yaml.safe_load(yaml.safe_dump(server.config))
            swapped["applications"][0]["deployments"] = [
                {"name": "Classifier", "user_config": {"model": model}}
            ]
            server.deploy(swapped)
            wait_until(lambda ref=ref: serving(ref), timeout=60, what=f"the classifier to serve {ref}")
            wait_until(lambda ref=ref: (200, ref) in load.results, timeout=30, what=f"an answer from {ref}")
        broken = yaml.safe_load(yaml.safe_dump(server.config))
        broken["applications"][0]["deployments"] = [
            {"name": "Classifier", "user_config": {"model": f"{server.registry}/nope/v1"}}
        ]
        server.deploy(broken)  # a folder that is not there: the serving model stays
        failed = wait_until(
            lambda: re.search("nope", HTTP.get(f"{server.url}/v1/model").json()["swap_error"] or ""),
            timeout=60,
            what="the classifier to report the failed swap",
        )
        assert str(server.registry) not in failed.string, failed.string  # the server's folders stay its own
        assert serving("tiny_cnn_lstm:1")
        server.deploy(server.config)  # back to the version the app was built with
        wait_until(
            lambda: serving(PRODUCTION), timeout=60, what=f"the classifier to serve {PRODUCTION} again"
        )
    statuses = [status for status, _ in load.results]
    assert statuses and set(statuses) == {200}, [r for r in load.results if r[0] != 200][:5]
    assert {ref for _, ref in load.results} >= {PRODUCTION, "tiny_dual_cnn:2", "tiny_cnn_lstm:1"}
    assert HTTP.get(f"{server.url}/v1/model").json()["swap_error"] is None
    # Swapped in place: the replicas that served before still run (the load may have added one).
    assert set(before) <= set(server.replicas("Classifier"))


def test_a_burst_beyond_capacity_gets_fast_json_503s_and_serving_goes_on(server: Server) -> None:
    """128 explanations at once (one at a time per replica, unbatched) against at most 2 replicas × 8
    running + 16 queued: the rest are refused at once with 503 `overloaded` and Retry-After."""

    async def one(client: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
        start = time.perf_counter()
        response = await client.post(
            "/v1/predict", content=GOOD_PNG, headers={"content-type": "image/png"}, params={"explain": "true"}
        )
        return response.status_code, time.perf_counter() - start, response

    async def burst() -> list[tuple[int, float, httpx.Response]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=server.url, timeout=25, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(128)))

    results = asyncio.run(asyncio.wait_for(burst(), timeout=28))
    statuses = [status for status, _, _ in results]
    assert set(statuses) == {200, 503}, statuses
    for status, _, response in results:
        if status == 503:
            assert response.json()["error"] == "overloaded" and response.headers["retry-after"] == "1"
    accepted = sorted(seconds for status, seconds, _ in results if status == 200)
    refused = sorted(seconds for status, seconds, _ in results if status == 503)
    # Refusals do not wait for the model: the typical refusal comes back before the accepted requests
    # that queued behind the running ones (the slowest quarter). Against the accepted median, this was
    # flaky on 2 cores, where 128 connections at once slow every answer alike (1.48 s vs 1.41 s once).
    assert refused[len(refused) // 2] < accepted[3 * len(accepted) // 4]
    assert server.predict(GOOD_PNG).status_code == 200
