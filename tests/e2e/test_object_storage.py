"""Every location an s3:// URI on a local S3 server (moto), nothing on local disk but caches.

The `cxr` commands run as a user types them, each in its own process, on the e2e tests' Ray cluster
(`ray start --head`, its node holding the credentials), from an empty working directory and with the
node's HOME, a folder of its own: afterwards the working directory is still empty, HOME holds caches
only, and what they wrote is in the bucket. Ingest, training and evaluation of a checkpoint run in the
default suite, as does a registry on S3 (no Ray); `cxr tune` (segmenter first, then the dual-channel model,
both registered), evaluation of the registered model and `cxr serve` from the S3 registry take minutes
and are `slow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest

from tests.e2e.conftest import BIN, CHATTER, ObjectStorage, RayCluster, free_port, wait_until
from tests.http_client import HTTP

pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")

pytestmark = pytest.mark.e2e
BUCKET = "cxr"
S3 = f"s3://{BUCKET}"
HOME_ENTRIES = {".cache", ".config", ".ray"}
"""What the commands may leave in HOME: caches (cxr's copies of remote checkpoints and reports,
matplotlib's font cache and config folder) and Ray's auth token."""


@dataclass(frozen=True)
class Storage:
    """The S3 server, and where the commands run: an empty working directory and a HOME of their own."""

    filesystem: pafs.S3FileSystem
    env: dict[str, str]
    root: Path
    work: Path
    home: Path
    ray_dir: Path  # the session files of the cluster the commands join
    data_logs: dict[Path, str]  # Ray Data's log files there, as the module's first command found them

    def objects(self, prefix: str) -> set[str]:
        """Keys under `prefix` in the bucket, relative to it."""
        selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        return {i.path[len(f"{BUCKET}/{prefix}/") :] for i in infos if i.type == pafs.FileType.File}

    def read_json(self, key: str) -> Any:
        with self.filesystem.open_input_stream(f"{BUCKET}/{key}") as stream:
            return json.loads(stream.read())

    def cxr(self, *args: str, timeout: float = 300) -> str:
        """Run `cxr ARGS` from the empty working directory; what it printed (stdout, then stderr), after
        checking it exited 0 and printed none of Ray's per-dataset and per-worker chatter (CHATTER)."""
        result = subprocess.run(
            [str(BIN / "cxr"), *args], cwd=self.work, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert result.returncode == 0, (
            f"cxr {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
        )
        printed = result.stdout + result.stderr
        assert [line for line in printed.splitlines() if any(c in line for c in CHATTER)] == []
        assert "DeprecationWarning" not in printed  # e.g. Train's shard options (trainer._shard_options)
        return printed

    def assert_only_caches_on_disk(self) -> None:
        assert list(self.work.iterdir()) == []
        assert {p.name for p in self.home.iterdir()} <= HOME_ENTRIES


def data_logs(ray_dir: Path, since: dict[Path, str]) -> dict[Path, str]:
    """Ray Data's log files in a cluster's session folder: what each holds beyond its text in `since`."""
    return {p: p.read_text(errors="replace")[len(since.get(p, "")) :] for p in ray_dir.rglob("ray-data.log")}


@pytest.fixture(scope="module")
def storage(
    ray_cluster: RayCluster, object_storage: ObjectStorage | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Storage]:
    """A bucket on the e2e cluster's S3 server, which this process and the commands reach through the
    standard AWS variables, as the cluster's node does; the commands join that cluster, with its HOME.

    The module once had a cluster of its own (a second `ray start` and its daemons beside the package's
    idle one): on the package's, the setup takes about 10 s less."""
    import boto3

    assert object_storage is not None  # moto is importable: this module would have been skipped
    aws = object_storage.env
    root = tmp_path_factory.mktemp("object-storage")
    work, home = root / "work", Path(ray_cluster.env["HOME"])
    work.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in aws.items():
            patch.setenv(name, value)
        for name in object_storage.foreign_settings():
            patch.delenv(name)
        boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        host = aws["AWS_ENDPOINT_URL"].removeprefix("http://")
        filesystem = pafs.S3FileSystem(
            endpoint_override=host, scheme="http", access_key="testing", secret_key="testing",
            region="us-east-1",
        )  # fmt: skip
        env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address}
        ray_dir = ray_cluster.temp_dir
        yield Storage(filesystem, env, root, work, home, ray_dir, data_logs(ray_dir, {}))


@pytest.fixture(scope="module")
def dataset(storage: Storage) -> str:
    """Phantoms written locally (raw input may be local), ingested at 64 px into the bucket."""
    raw = storage.root / "raw"
    storage.cxr("data", "synth", str(raw), "--per-class", "12", "--seed", "0")
    out = storage.cxr("data", "ingest", str(raw), f"{S3}/ds", "--size", "64")
    assert "ingested 48 of 48 images" in out
    keys = storage.objects("ds")
    assert "ingest_report.json" in keys and any(k.startswith("split=train/") for k in keys), keys
    assert not storage.objects("ds.partial")  # the staging folder is gone
    return f"{S3}/ds"


def local_paths(document: Any, *roots: Path) -> list[str]:
    """Every string in a JSON document that names a path on this machine."""
    if isinstance(document, dict):
        return [p for value in document.values() for p in local_paths(value, *roots)]
    if isinstance(document, list):
        return [p for value in document for p in local_paths(value, *roots)]
    if isinstance(document, str) and (
        document.startswith(("/", "~", "file:")) or any(str(root) in document for root in roots)
    ):
        return [document]
    return []


def test_a_registry_on_s3_names_the_segmenter_by_its_place_in_the_registry(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Tune run trains the dual-channel model with this machine's cached copy of the registered U-Net;
    the card registered records where the U-Net is in the registry, and loads from there anywhere."""
    from cxrcore.data.storage import resolve, write_text
    from cxrcore.inference import Predictor
    from cxrcore.registry import ModelRegistry, RegistryError
    from tests.e2e.uploads import write_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the checkpoint cache: tmp_path/cxr/checkpoints
    registry = ModelRegistry(f"{S3}/unit-registry", cache_dir=tmp_path / "registry-cache")
    unet = registry.register(write_checkpoint(tmp_path / "unet", "tiny_unet", 0))
    cached = registry.local_checkpoint(unet.ref)
    assert cached.is_relative_to(tmp_path / "registry-cache")
    dual = registry.register(write_checkpoint(tmp_path / "dual", "tiny_dual_cnn", 1, cached))
    assert dual.card.segmenter == unet.uri == f"{S3}/unit-registry/tiny_unet/v1"
    assert storage.read_json("unit-registry/tiny_dual_cnn/v1/card.json")["segmenter"] == unet.uri

    # A folder only this machine has: refused, with no version number used up.
    with pytest.raises(RegistryError, match="other machines cannot read"):
        registry.register(write_checkpoint(tmp_path / "dual2", "tiny_dual_cnn", 2, tmp_path / "unet"))
    assert [v.ref for v in registry.versions("tiny_dual_cnn")] == ["tiny_dual_cnn:1"]

    predictor = Predictor.from_checkpoint(dual.uri)  # weights and segmenter fetched into the cache
    assert predictor.segmenter is not None and predictor.segmenter.card.name == "tiny_unet"
    image = np.random.default_rng(0).integers(0, 255, (96, 96), dtype=np.uint8)
    assert predictor.predict_proba([image]).shape == (1, 4)
    assert (tmp_path / "cxr/checkpoints/s3/cxr/unit-registry/tiny_unet/v1/model.safetensors").is_file()

    # What a registration killed midway leaves on S3 (its claim marker, half the weights) is listed,
    # then freed down to a tombstone, and its number stays used.
    fs, path = resolve(f"{S3}/unit-registry/tiny_unet/v2")
    write_text(fs, f"{path}/.claim-0123", "0123")
    write_text(fs, f"{path}/model.safetensors", "x" * 1000)
    [left] = registry.interrupted()
    assert (left.uri, left.files, left.bytes) == (f"{S3}/unit-registry/tiny_unet/v2", 2, 1004)
    assert left.age_s is not None and left.age_s < 600
    assert registry.clean(3600) == [] and [i.uri for i in registry.clean(0)] == [left.uri]
    assert registry.interrupted() == []
    assert storage.objects("unit-registry/tiny_unet/v2") == {".interrupted"}
    assert registry.register(write_checkpoint(tmp_path / "unet3", "tiny_unet", 3)).ref == "tiny_unet:3"


def test_ingest_train_and_evaluate_with_every_location_on_s3(storage: Storage, dataset: str) -> None:
    trained = storage.cxr(
        "train", "--data", dataset, "--model", "tiny_cnn_lstm", "--epochs", "1", "--workers", "1",
        "--out", f"{S3}/runs",
    )  # fmt: skip
    kept = sorted(k for k in storage.objects("runs/tiny_cnn_lstm") if k.endswith("/card.json"))
    assert len(kept) == 1 and f"{kept[0].rpartition('/')[0]}/model.safetensors" in storage.objects(
        "runs/tiny_cnn_lstm"
    )
    checkpoint = f"{S3}/runs/tiny_cnn_lstm/{kept[0].rpartition('/')[0]}"
    assert f"best checkpoint: {checkpoint}" in trained  # a URI the next command takes
    assert "tiny_cnn_lstm epoch 1/1: train loss" in trained  # cxr's own progress line, Ray's chatter not
    # What the console left out (of the ingest and the training) is in the cluster's log files.
    assert "Starting execution of Dataset" in "".join(data_logs(storage.ray_dir, storage.data_logs).values())
    card = storage.read_json(f"runs/tiny_cnn_lstm/{kept[0]}")
    assert card["data"]["dataset"] == dataset and not local_paths(card, storage.root)

    out = storage.cxr(
        "evaluate", "--checkpoint", checkpoint, "--data", dataset, "--out", f"{S3}/eval/cnn_lstm"
    )
    assert f"report: {S3}/eval/cnn_lstm/report.html" in out
    assert {"metrics.json", "report.html"} <= storage.objects("eval/cnn_lstm")
    metrics = storage.read_json("eval/cnn_lstm/metrics.json")
    assert metrics["evaluated"]["checkpoint"] == checkpoint and metrics["n"] > 0
    assert not local_paths(metrics, storage.root)
    storage.assert_only_caches_on_disk()


@pytest.mark.slow
def test_tune_registers_portable_cards_then_serves_from_s3(storage: Storage, dataset: str) -> None:
    registry = f"{S3}/registry"
    storage.cxr(
        "tune", "--data", dataset, "--models", "tiny_dual_cnn", "--trials", "1", "--epochs", "1",
        "--pretrained", "none", "--registry", registry, "--out", f"{S3}/tune", timeout=600,
    )  # fmt: skip
    keys = storage.objects("registry")
    assert {"aliases.json", "tiny_dual_cnn/v1/card.json", "tiny_unet/v1/card.json"} <= keys, keys
    assert "tiny_dual_cnn/v1/report/metrics.json" in keys
    assert {"comparison.json", "comparison.html"} <= storage.objects("tune/compare")
    card = storage.read_json("registry/tiny_dual_cnn/v1/card.json")
    assert card["segmenter"] == f"{registry}/tiny_unet/v1"  # not the tuning machine's cached copy
    assert not local_paths(card, storage.root, storage.home)
    comparison = storage.read_json("tune/compare/comparison.json")
    assert comparison["production"] == "tiny_dual_cnn:1"
    assert not local_paths(comparison, storage.root, storage.home)

    out = storage.cxr(
        "evaluate", "--model", "production", "--registry", registry, "--data", dataset,
        "--out", f"{S3}/eval/production",
    )  # fmt: skip
    assert "evaluated tiny_dual_cnn:1" in out and "metrics.json" in storage.objects("eval/production")

    port = free_port()
    command = [
        str(BIN / "cxr"), "serve", "--registry", registry, "--model", "production", "--port", str(port),
        "--arg", "num_cpus=0.25", "--arg", "max_replicas=1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=storage.work, env=storage.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is None and HTTP.get(f"{url}/readyz", timeout=5).status_code == 200,
            timeout=240,
            what="`cxr serve` from the S3 registry to become ready",
        )
        png = next((storage.root / "raw").rglob("*.png")).read_bytes()
        response = HTTP.post(f"{url}/v1/predict", files={"file": ("x.png", png, "image/png")}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["ref"] == "tiny_dual_cnn:1" and len(body["probabilities"]) == 4
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
        served = HTTP.get(f"{url}/v1/model", timeout=10).json()
        assert served["card"]["segmenter"] == "…/tiny_unet/v1"  # the bucket's card, by its last components
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
        assert process.returncode == 0, output[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    storage.assert_only_caches_on_disk()
