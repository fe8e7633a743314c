"""The cluster manifests parse, pin the Ray version we test with, and name entrypoints that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import ray
import yaml

CLUSTER = Path(__file__).parents[2] / "cluster"


def _documents() -> dict[str, dict]:
    return {str(p.relative_to(CLUSTER)): yaml.safe_load(p.read_text()) for p in CLUSTER.rglob("*.yaml")}


def test_kuberay_manifests_pin_the_installed_ray_and_enable_token_auth() -> None:
    docs = _documents()
    kuberay = {name: doc for name, doc in docs.items() if name.startswith("kuberay/")}
    assert kuberay
    for name, doc in kuberay.items():
        assert doc["apiVersion"] == "ray.io/v1", name
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"]["mode"] == "token", name


def test_job_entrypoints_name_modules_that_exist() -> None:
    entrypoints = [doc["spec"]["entrypoint"] for doc in _documents().values() if doc.get("kind") == "RayJob"]
    modules = {m for entrypoint in entrypoints for m in re.findall(r"python -m ([\w.]+)", entrypoint)}
    assert modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    assert ray.__version__ in (CLUSTER / "Dockerfile").read_text()


def test_rayservice_runs_the_serve_application() -> None:
    service = _documents()["kuberay/rayservice.yaml"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "serve.app:build_app"
    from serve.schemas import ServeArgs

    ServeArgs.model_validate(app["args"])  # the manifest's args are valid ServeArgs
