"""The cluster manifests parse, pin the Ray version we test with, name entrypoints and configs that exist."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import ray
import yaml

from cxrcore.config import IngestConfig, TuneConfig, load_config
from cxrcore.data.transforms import MAX_IMAGE_PIXELS
from cxrcore.runtime import LOG_BUFFER_SIZE

ROOT = Path(__file__).parents[2]
CLUSTER = ROOT / "cluster"


def _documents() -> dict[str, dict]:
    return {str(p.relative_to(CLUSTER)): yaml.safe_load(p.read_text()) for p in CLUSTER.rglob("*.yaml")}


def test_kuberay_manifests_pin_the_installed_ray_and_enable_token_auth() -> None:
    docs = _documents()
    kuberay = {
        name: doc for name, doc in docs.items() if name.startswith("kuberay/") and name != "kuberay/pvc.yaml"
    }
    assert kuberay
    # The shared volume they all mount, writable from pods on different nodes.
    pvc = docs["kuberay/pvc.yaml"]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert all(f"claimName: {pvc['metadata']['name']}" in (CLUSTER / name).read_text() for name in kuberay)
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


def test_the_image_pins_torch_within_the_projects_bounds() -> None:
    """Exact versions (what the suite ran with when they were set), inside pyproject.toml's bounds."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    pinned = dict(re.findall(r"^ARG (TORCH|TORCHVISION)=(\d+\.\d+\.\d+)$", dockerfile, re.MULTILINE))
    assert set(pinned) == {"TORCH", "TORCHVISION"}, pinned
    assert '"torch==${TORCH}" "torchvision==${TORCHVISION}"' in dockerfile
    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]
    bounds = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    assert (
        Version(pinned["TORCH"]) in bounds["torch"]
        and Version(pinned["TORCHVISION"]) in bounds["torchvision"]
    )


def test_rayservice_runs_the_serve_application() -> None:
    service = _documents()["kuberay/rayservice.yaml"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "serve.app:build_app"
    from serve.schemas import ServeArgs

    ServeArgs.model_validate(app["args"])  # the manifest's args are valid ServeArgs
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:  # the high-throughput mode (HAProxy, optimized replicas) on every node, or on none
        (container,) = pod["template"]["spec"]["containers"]
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in container.get("env", [])
        assert {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"} in container.get("env", [])
        grpc_limit = {"name": "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", "value": str(2 * MAX_IMAGE_PIXELS)}
        assert grpc_limit in container.get("env", [])  # the largest decoded upload passes between replicas
        log_buffer = {"name": "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "value": LOG_BUFFER_SIZE}
        assert log_buffer in container.get("env", [])  # replicas' warnings reach their logs as they happen


def test_vm_launcher_starts_every_node_in_the_high_throughput_serving_mode() -> None:
    launcher = _documents()["cluster.yaml"]
    mode = {
        "RAY_AUTH_MODE": "token",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2 * MAX_IMAGE_PIXELS),
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": LOG_BUFFER_SIZE,
    }
    for node in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [command for command in launcher[node] if "ray start" in command]
        assignments = dict(re.findall(r"(\w+)=(\S+)\s", start.split("ray start")[0]))
        assert assignments == mode, node  # the same settings on every node, before `ray start` reads them


def test_tune_rayjob_runs_the_checked_in_configs_on_one_4_gpu_node() -> None:
    job = _documents()["kuberay/rayjob-tune.yaml"]
    entrypoint = job["spec"]["entrypoint"]
    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    # KubeRay runs `bash -c "ray job submit ... -- <entrypoint>"` in its submitter pod, the entrypoint pasted
    # unquoted: a shell operator outside quotes would run what follows it there, not as the Ray job.
    words = shlex.split(entrypoint)
    assert not {"&&", "||", ";", "|", "&"} & set(words), words
    assert words[:2] == ["bash", "-c"] and len(words) == 3
    assert workdir and words[2].startswith(f"cd {workdir[1]} &&")  # where the image has jobs/configs/
    steps = re.findall(r"python -m jobs\.(\w+) --config (\S+)", words[2])
    assert [name for name, _ in steps] == ["ingest", "tune"]
    ingest = load_config(IngestConfig, ROOT / dict(steps)["ingest"])
    tune = load_config(TuneConfig, ROOT / dict(steps)["tune"])
    assert tune.data == ingest.out
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == 4 and group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    assert tune.gpu and tune.max_concurrent is not None
    assert tune.max_concurrent * tune.workers_per_trial == gpus  # one trial per GPU, none waiting for one
    # Everything the job reads and writes is on the volume every pod mounts at /data.
    assert {"mountPath": "/data", "name": "data"} in container["volumeMounts"]
    assert all(path.startswith("/data/") for path in (ingest.raw, ingest.out, tune.registry, tune.pretrained))


def test_a_submitted_job_ships_nothing_git_ignores() -> None:
    """`ray job submit --runtime-env cluster/runtime_env.yaml` uploads the working directory: not the venv,
    the caches (mypy's ~70 MB after `make lint`) or the outputs of local runs."""
    excludes = set(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"])
    lines = (ROOT / ".gitignore").read_text().splitlines()
    ignored = {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")}
    assert ignored | {".git"} <= excludes, sorted(ignored - excludes)
