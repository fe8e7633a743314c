"""The Serve application's typed arguments, its config file and model references (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cxrcore.cli import main
from serve.app import build_app
from serve.deployments import public_location, public_text, resolve_model, resolve_segmenter
from serve.schemas import ServeArgs
from tests.e2e.uploads import write_checkpoint, write_checkpoints, write_registry

CONFIG = Path(__file__).parents[2] / "serve/config.yaml"


def test_config_file_is_a_valid_serve_deploy_config_with_valid_args() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.model == "production" and args.max_ongoing_requests >= args.max_batch_size
    assert "max_queued_requests" in app.args and "retry_after_s" in app.args  # the overload bound, visible


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"max_batch_size": 64, "max_ongoing_requests": 32}, "max_ongoing_requests"),
        ({"num_cpus": 0}, "num_cpus"),
        ({"max_upload_mb": -1}, "max_upload_mb"),
        ({"modle": "x"}, "modle"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"retry_after_s": -1}, "retry_after_s"),
    ],
)
def test_bad_args_are_refused_naming_the_field(overrides: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ServeArgs.model_validate(overrides)


def test_max_batch_size_defaults_by_device_and_a_given_one_is_kept() -> None:
    from serve.schemas import MAX_BATCH_SIZE

    assert ServeArgs().max_batch_size == MAX_BATCH_SIZE["cpu"]
    assert ServeArgs(num_gpus=0.5).max_batch_size == MAX_BATCH_SIZE["cuda"]
    assert ServeArgs(max_batch_size=1).max_batch_size == 1  # batching off stays off
    assert ServeArgs(max_batch_size=24).max_batch_size == 24
    with pytest.raises(ValidationError, match="max_batch_size"):
        ServeArgs(max_batch_size=-1)


def test_checkpoint_folders_resolve_without_a_registry(tmp_path: Path) -> None:
    checkpoints = write_checkpoints(tmp_path)
    dual = resolve_model(None, str(checkpoints.dual))
    assert dual.needs_mask and dual.info.name == "tiny_dual_cnn" and dual.info.version == "1"
    assert not resolve_model(None, str(checkpoints.cnn_lstm)).needs_mask
    with pytest.raises(FileNotFoundError, match="not a cxr checkpoint"):
        resolve_model(None, str(tmp_path))


def test_build_app_refuses_a_mask_model_without_a_segmenter(tmp_path: Path) -> None:
    orphan = write_checkpoint(tmp_path / "orphan", "tiny_dual_cnn", 5)
    with pytest.raises(ValueError, match="names no segmenter"):
        build_app(ServeArgs(model=str(orphan)))


def test_serving_the_lung_segmenter_is_refused_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every replica failed on it, three deployments over, and the traceback ended in a hint about CPUs."""
    unet = write_checkpoints(tmp_path).unet
    assert main(["serve", "--model", str(unet), "--port", "0"]) == 2
    assert "is a segment model (a lung segmenter), not a classifier" in capsys.readouterr().err


def test_build_app_bounds_the_classifier_queue_and_the_ingress(tmp_path: Path) -> None:
    from serve.app import INGRESS_HEADROOM
    from serve.ingress import ApiLimits

    checkpoint = write_checkpoint(tmp_path / "cnn_lstm", "tiny_cnn_lstm", 2)
    args = ServeArgs(model=str(checkpoint), max_replicas=3, max_ongoing_requests=16, max_queued_requests=7)
    api = build_app(args.model_copy(update={"retry_after_s": 2.5}))._bound_deployment
    classifier = api.init_args[0]._bound_deployment
    assert classifier.name == "Classifier" and classifier.max_queued_requests == 7
    assert classifier.backpressure_config.retry_after_s == 2.5
    # The ingress holds all the classifier can (3 × 16 running + 7 queued) and room to refuse the rest.
    assert api.max_ongoing_requests == 3 * 16 + 7 + INGRESS_HEADROOM
    assert api.max_queued_requests == INGRESS_HEADROOM and api.backpressure_config.retry_after_s == 2.5
    assert api.init_args[1] == ApiLimits(args.max_upload_bytes, args.min_image_side, 2.5)
    assert api.num_replicas == 1
    more = build_app(args.model_copy(update={"ingress_replicas": 3}))._bound_deployment
    assert more.name == "Api" and more.num_replicas == 3
    assert more.init_args[0]._bound_deployment._deployment_config.autoscaling_config.max_replicas == 3


def test_registry_references_pin_to_a_version(tmp_path: Path) -> None:
    from cxrcore.registry import ModelRegistry, RegistryError

    registry = str(write_registry(tmp_path))
    production = resolve_model(registry, "production")
    assert production.ref == "tiny_dual_cnn:1" and production.info.version == "1" and production.needs_mask
    assert resolve_model(registry, "tiny_dual_cnn").ref == "tiny_dual_cnn:2"  # a name means its latest
    unet = str(ModelRegistry(registry).local_checkpoint("tiny_unet:1"))
    assert resolve_segmenter(registry, "tiny_unet:1") == unet == resolve_segmenter(registry, unet)
    with pytest.raises(RegistryError, match="nope"):
        resolve_model(registry, "nope")


def test_a_moved_registry_still_finds_its_dual_channel_versions_segmenter(tmp_path: Path) -> None:
    """A card records a local registry's segmenter by its folder: after `mv REG REG2` (or an rsync to a
    serving node at another path) `cxr serve` and `cxr evaluate` refused every dual-channel version."""
    import shutil

    from cxrcore.evaluate.evaluation import _registry_segmenter
    from cxrcore.registry import ModelRegistry

    old = write_registry(tmp_path / "a")
    moved = shutil.move(old, tmp_path / "moved")
    card = resolve_model(str(moved), "production").card
    assert card.segmenter is not None and card.segmenter.startswith(str(old))  # the old place, gone
    unet = str(ModelRegistry(str(moved)).local_checkpoint("tiny_unet:1"))
    assert resolve_segmenter(str(moved), card.segmenter) == unet
    assert _registry_segmenter(ModelRegistry(str(moved)), "tiny_dual_cnn:1", card.segmenter) == unet
    build_app(ServeArgs(registry=str(moved), model="production"))
    ModelRegistry(str(moved)).promote("tiny_dual_cnn:2", "staging")
    # A segmenter that is nowhere is named with the version whose card names it, and no alias moves to it.
    shutil.rmtree(moved / "tiny_unet")
    with pytest.raises(ValueError, match=r"^tiny_dual_cnn:1's card names a lung segmenter that cannot be"):
        build_app(ServeArgs(registry=str(moved), model="production"))
    with pytest.raises(KeyError, match=r"tiny_dual_cnn:2 is a dual-channel model whose lung segmenter"):
        ModelRegistry(str(moved)).promote("tiny_dual_cnn:2", "staging")
    ModelRegistry(str(moved)).promote("tiny_cnn_lstm:1", "staging")  # one channel: nothing to find


def test_cxr_serve_refuses_bad_arguments_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = str(write_registry(tmp_path))
    assert main(["serve", "--registry", registry, "--model", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["serve", "--registry", registry, "--arg", "max_replicas"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["serve", "--registry", registry, "--arg", "max_replica=3", "--arg", "max_replicas=x"]) == 2
    err = capsys.readouterr().err  # one line, each setting named (pydantic's own ran over eight)
    assert err.startswith("cxr: error: --arg max_replicas: Input should be a valid integer")
    assert "; --arg max_replica: no such setting (serve/README.md lists the settings)" in err
    assert len(err.strip().splitlines()) == 1


def test_a_port_in_use_is_named_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("cxrcore.runtime.init_ray", lambda *args, **kwargs: pytest.fail("Ray started"))
    # an orphaned HAProxy another Serve on this machine left (a CI run beside a killed server) is no line here
    monkeypatch.setattr("serve.server.stop_stray_haproxy", lambda node_id=None: 0)
    registry = str(write_registry(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--registry", registry, "--model", "production", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--port: 127.0.0.1:{port} is in use (Address already in use)" in err and err.count("\n") == 1
        assert main(["demo", "--work-dir", str(tmp_path / "demo"), "--port", str(port)]) == 2
        assert f"127.0.0.1:{port} is in use" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("grpc", [True, False])
def test_a_handle_built_in_the_driver_calls_as_the_replica_is_set_to(
    grpc: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve.run` in a driver that imported Serve outside high-throughput mode pickles handles that
    call by Ray actor calls; in a replica of that mode they must call over gRPC, and the other way round."""
    import pickle

    import ray.serve._private.constants as constants
    from ray.serve.handle import DeploymentHandle

    from serve.deployments import replica_handle

    driver = pickle.loads(pickle.dumps(DeploymentHandle("Classifier", "cxr")))
    driver.handle_options = driver.handle_options.copy_and_update(_by_reference=grpc)  # the other mode
    monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", grpc)
    handle = replica_handle(driver)
    assert handle.handle_options._by_reference is (not grpc)
    assert handle.deployment_id == driver.deployment_id and not handle.is_initialized
    assert pickle.loads(pickle.dumps(handle)).handle_options._by_reference is (not grpc)
    assert replica_handle(handle) is handle  # already right: kept as it is


def test_the_http_api_names_locations_by_their_last_components(tmp_path: Path) -> None:
    """What a client sees of the server: which checkpoint, segmenter and dataset, not the folders (or bucket)
    they are in; `cxr models show` on the cluster gives the whole path."""
    assert public_location("/srv/cxr/registry/tiny_unet/v1") == "…/tiny_unet/v1"
    assert public_location("s3://hospital-bucket/registry/tiny_unet/v1/") == "…/tiny_unet/v1"
    assert public_location("file:///srv/data/ds") == "…/data/ds"
    assert public_location("tiny_dual_cnn:1") == "tiny_dual_cnn:1"  # a registry reference as it is
    assert public_location("2026-12-03T15:06:11+00:00") == "2026-12-03T15:06:11+00:00"
    # In a sentence, such as the text of the exception that kept a model from loading (GET /v1/model).
    missing = "[Errno 2] No such file or directory: '/srv/cxr/registry/tiny_unet/v1/card.json'"
    assert public_text(missing) == "[Errno 2] No such file or directory: '…/v1/card.json'"
    remote = "no card at s3://hospital-bucket/reg/x/v3 (or file:///srv/reg/x/v3, ~/reg/x/v3)"
    assert public_text(remote) == "no card at …/x/v3 (or …/x/v3, …/x/v3)"
    assert public_text("directory:/srv/reg/x") == "directory:…/reg/x"
    kept = "expected 4 classes, got 3 in runs/ddp; lr 1/2; at 15:06:11; see …/x/v3"
    assert public_text(kept) == kept  # relative paths, ratios, times and named locations as they are

    unet = write_checkpoint(tmp_path / "site" / "unet", "tiny_unet", 0)
    folder = write_checkpoint(tmp_path / "site" / "runs" / "dual", "tiny_dual_cnn", 1, segmenter=unet)
    resolved = resolve_model(None, str(folder))
    assert resolved.ref == str(folder)  # the server's own logs keep the path
    assert resolved.info.ref == "…/runs/dual"
    card = resolved.public_card()
    assert card["segmenter"] == "…/site/unet" and card["model"] == resolved.card.to_dict()["model"]
    assert str(tmp_path) not in repr(card)


def test_serve_without_a_registry_or_with_a_mistyped_one_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--port", "0"]) == 2
    assert "--model production: no registry to look it up in (pass --registry REG" in capsys.readouterr().err
    assert main(["serve", "--registry", "regsitry", "--port", "0"]) == 2
    assert f"no registry at {tmp_path / 'regsitry'} (no such folder here)" in capsys.readouterr().err


def test_an_app_that_needs_more_gpus_than_the_local_cluster_has_is_refused_saying_how_to_fit(
    tmp_path: Path,
) -> None:
    """A dual-channel model's segmenter holds num_gpus beside the classifier: with num_gpus=1 on a one-GPU
    machine one deployment waited for a second GPU until the start timed out, 300 s later."""
    from serve.app import check_gpus

    checkpoints = write_checkpoints(tmp_path)
    dual, single = str(checkpoints.dual), str(checkpoints.cnn_lstm)
    check_gpus(ServeArgs(model=dual), 0)  # on the CPU: no GPU needed
    check_gpus(ServeArgs(model=single, num_gpus=1), 1)
    check_gpus(ServeArgs(model=dual, num_gpus=0.5), 1)  # both fit on one GPU
    check_gpus(ServeArgs(model=dual, num_gpus=1, min_replicas=0), 0)  # nothing held until requests come
    with pytest.raises(ValueError) as refused:
        check_gpus(ServeArgs(model=dual, num_gpus=1), 1)
    message = str(refused.value)
    assert "needs 2 GPU(s) to start" in message and "a lung segmenter replica" in message
    assert message.endswith("this cluster has 1: --arg num_gpus=0.5")
    with pytest.raises(ValueError, match=r"has 0: run it where there is a GPU, or without num_gpus"):
        check_gpus(ServeArgs(model=single, num_gpus=1, min_replicas=2), 0)
    with pytest.raises(ValueError, match=r"needs 2 GPU\(s\).*has 1: --arg num_gpus=0.5"):
        check_gpus(ServeArgs(model=single, num_gpus=1, min_replicas=2), 1)


def test_a_served_model_says_what_the_registry_knows_against_it(tmp_path: Path) -> None:
    from cxrcore.checkpoint import ModelCard
    from serve.deployments import ResolvedModel

    card = ModelCard(model={"name": "tiny_cnn_lstm"}, input_spec={}, data={})
    clean = ResolvedModel("m:1", tmp_path, card, "1", test={"beats_commonest_class": True})
    assert clean.warnings == []
    card.data["sources_separate_classes"] = "every source holds one class only: a model can tell"
    test = {"beats_commonest_class": False, "accuracy": 0.5, "accuracy_ci95": [0.3, 0.7], "images": 20,
            "commonest_class_accuracy": 0.5}  # fmt: skip
    warned = ResolvedModel("m:1", tmp_path, card, "1", test=test).warnings
    assert warned[0].startswith("its registered test accuracy, 0.500 (95% CI 0.30–0.70) on 20 images, is not")
    assert warned[1] == "in the dataset it trained on, every source holds one class only: a model can tell"


def test_a_checkpoint_folder_is_served_as_one_with_a_registry_set(tmp_path: Path) -> None:
    """With CXR_REGISTRY set for every command, `cxr serve --model runs/x/checkpoint_epoch_003` was an
    unknown registry reference."""
    registry = write_registry(tmp_path / "models")
    folder = write_checkpoint(tmp_path / "runs" / "checkpoint_epoch_003", "tiny_cnn_lstm", 5)
    resolved = resolve_model(str(registry), str(folder))
    assert resolved.checkpoint == folder.resolve() and resolved.card.name == "tiny_cnn_lstm"
    assert resolve_model(str(registry), "production").ref == "tiny_dual_cnn:1"  # references as before
    with pytest.raises(FileNotFoundError, match="nosuch"):  # a mistyped path is said to be one
        resolve_model(str(registry), str(tmp_path / "runs" / "nosuch" / "checkpoint_epoch_001"))


def test_cors_origins_are_written_as_browsers_send_them_or_refused() -> None:
    """Browsers compare an Origin exactly: `https://viewer.example/` (from the address bar) never matched,
    and a viewer's every call failed with nothing said at start (a long-standing review note)."""
    import pydantic

    assert ServeArgs(cors_origins=" https://Viewer.Example/ ,http://10.0.0.5:8080").cors_origins == (
        "https://viewer.example,http://10.0.0.5:8080"
    )
    assert ServeArgs(cors_origins="*").cors_origins == "*" and ServeArgs().cors_origins == ""
    for wrong in ("viewer.example", "https://viewer.example/app", "ftp://viewer.example"):
        with pytest.raises(pydantic.ValidationError, match=f"cors_origins: '{wrong}' is not an origin"):
            ServeArgs(cors_origins=wrong)


def test_an_audit_dir_that_cannot_be_made_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """A verifier (session 52): `--arg audit_dir=<a file>/sub` failed each ingress replica's deploy after Ray
    had started, at the end of a traceback."""
    from serve.app import build_app

    (tmp_path / "file").write_text("")
    args = ServeArgs(model=str(tmp_path / "none"), audit_log=True, audit_dir=str(tmp_path / "file" / "sub"))
    with pytest.raises(ValueError, match=r"audit_dir .*file/sub: cannot make it \(Not a directory\)"):
        build_app(args)


def test_an_audit_trail_in_the_ray_session_is_noted_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review (session 57): without `audit_dir` the trail is written into the Ray session's log folder,
    which the next session does not keep and which the README's advice on old sessions deletes."""
    import cxrcore.runtime
    from serve.server import AUDIT_IN_SESSION_NOTE, serve_foreground

    class Started(Exception):
        pass

    def init_ray(*args: object, **kwargs: object) -> None:
        raise Started

    monkeypatch.setattr(cxrcore.runtime, "init_ray", init_ray)
    registry = str(write_registry(tmp_path))
    for audit_dir, noted in (("", True), (str(tmp_path / "audit"), False)):
        args = {"registry": registry, "model": "tiny_cnn_lstm", "audit_log": True, "audit_dir": audit_dir}
        with pytest.raises(Started):
            serve_foreground(args, address="127.0.0.1:1")  # a cluster's: no local HAProxy or port to look at
        assert (f"note: {AUDIT_IN_SESSION_NOTE}" in capsys.readouterr().err) is noted
