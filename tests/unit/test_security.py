"""Weights that would run code on load are refused everywhere a weights file is accepted; what cxr
starts listens on loopback by default, with token auth on."""

from __future__ import annotations

import inspect
import os
import pickle
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from cxrcore.checkpoint import (
    TRAIN_STATE_NAME,
    WEIGHTS_NAME,
    ModelCard,
    UnsafeWeightsError,
    load_model,
    load_train_state,
    save_checkpoint,
)
from cxrcore.cli import build_parser
from cxrcore.config import ConfigError
from cxrcore.inference import Predictor
from cxrcore.models import create_model, get_build_args, get_input_spec
from cxrcore.models.pretrained import load_pretrained
from cxrcore.registry import ModelRegistry, RegistryError
from cxrcore.train.trainer import check_pretrained

REPO = Path(__file__).parents[2]


class Payload:
    """Unpickling this calls os.system, which creates `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_malicious(path: Path, marker: Path, how: str) -> Path:
    """A weights file whose loading by torch.load(weights_only=False) or pickle runs the payload."""
    state = {"conv.weight": torch.zeros(1), "evil": Payload(marker)}
    if how == "torch.save":
        torch.save(state, path)  # the zip format every .pt/.pth is today
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))  # a bare (legacy) pickle
    return path


def tiny_checkpoint(directory: Path, name: str, **card: object) -> Path:
    model = create_model(name)
    spec = get_input_spec(model).to_dict()
    save_checkpoint(directory, model, ModelCard(model=get_build_args(model), input_spec=spec, **card))
    return directory


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_the_payload_is_real(tmp_path: Path, marker: Path, how: str) -> None:
    """The control: loading these files the unsafe way does run the payload."""
    path = write_malicious(tmp_path / "weights.pth", marker, how)
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_checkpoint_weights_and_train_state_refuse_a_pickle(tmp_path: Path, marker: Path, how: str) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", "tiny_cnn_lstm")
    write_malicious(checkpoint / WEIGHTS_NAME, marker, how)  # a pickle under the safetensors name
    with pytest.raises(UnsafeWeightsError, match=r"refusing to load .*model\.safetensors: it is not a valid"):
        load_model(checkpoint)
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        Predictor.from_checkpoint(checkpoint)

    write_malicious(checkpoint / TRAIN_STATE_NAME, marker, how)  # what a resumed run reads
    with pytest.raises(UnsafeWeightsError, match=r"train_state\.pt: it holds more than tensors"):
        load_train_state(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_pretrained_file_refuses_a_pickle(tmp_path: Path, marker: Path, suffix: str) -> None:
    """`--pretrained FILE`: refused by the driver's check before any worker starts, with a clear error."""
    path = write_malicious(tmp_path / f"imagenet{suffix}", marker, "torch.save")
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        load_pretrained(create_model("tiny_resnet"), path)
    with pytest.raises(ConfigError, match=rf"--pretrained {path}: refusing to load") as error:
        check_pretrained("resnet18", str(path))
    assert "weights_only=False" not in str(error.value)  # torch's advice to unpickle is not passed on
    assert not marker.exists()


def test_registry_version_and_segmenter_refuse_a_pickle(tmp_path: Path, marker: Path) -> None:
    """The registry refuses a pickle under a .safetensors name (its header is none: read, not loaded), and
    loading it (as Serve does) refuses too."""
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", "tiny_cnn_lstm")
    write_malicious(checkpoint / WEIGHTS_NAME, marker, "torch.save")
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(RegistryError, match=r"cannot be loaded \(its header claims .*not safetensors\)"):
        registry.register(checkpoint, alias="production")
    assert registry.versions() == []
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        load_model(checkpoint)

    segmenter = tiny_checkpoint(tmp_path / "segmenter", "tiny_unet")
    write_malicious(segmenter / WEIGHTS_NAME, marker, "pickle")
    dual = tiny_checkpoint(tmp_path / "dual", "tiny_dual_cnn", segmenter=str(segmenter))
    with pytest.raises(UnsafeWeightsError, match=r"segmenter/model\.safetensors"):
        Predictor.from_checkpoint(dual)  # the segmenter a dual-channel card names
    assert not marker.exists()


def test_what_cxr_starts_listens_on_loopback_with_token_auth() -> None:
    """Serve's HTTP and the cluster launcher's dashboard bind 127.0.0.1 unless told otherwise.

    The dashboard `cxr` itself starts is checked for real in tests/e2e/test_serve.py (the foreground serve).
    """
    from serve.server import demo_predictions, serve_foreground

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    for function in (serve_foreground, demo_predictions):
        assert inspect.signature(function).parameters["host"].default == "127.0.0.1"
    assert yaml.safe_load((REPO / "serve/config.yaml").read_text())["http_options"]["host"] == "127.0.0.1"

    launcher = yaml.safe_load((REPO / "cluster/cluster.yaml").read_text())
    (head,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head
    starts = [
        c
        for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)
    for path in [REPO / "serve/config.yaml", *(REPO / "cluster").rglob("*")]:
        if path.is_file():
            assert "RAY_AUTH_MODE=disabled" not in path.read_text().replace(" ", ""), path
