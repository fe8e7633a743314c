"""Model registry, architectures, transfer learning and segmentation metrics (CPU, tiny inputs)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file

from cxrcore.labels import NUM_CLASSES
from cxrcore.models import (
    InputSpec,
    create_model,
    dice_score,
    get_build_args,
    get_input_spec,
    get_model_entry,
    iou_score,
    list_models,
)

TINY_MODELS = list_models("tiny_*")


def _batch(name: str, size: int, batch: int = 2) -> torch.Tensor:
    spec = get_input_spec(name)
    images = torch.rand(batch, spec.num_channels, size, size)
    if "mask" in spec.channels:
        mask = spec.channels.index("mask")
        images[:, mask] = (images[:, mask] > 0.5).float()
    return images


def _num_params(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def test_registry_lists_every_family_with_a_tiny_variant() -> None:
    names = list_models()
    for family in ("cnn_lstm", "dual_cnn", "resnet18", "resnet34", "resnet50", "unet"):
        assert family in names
    # the shipped ones (an architecture a contributor adds leaves this test as it is)
    assert {"tiny_cnn_lstm", "tiny_dual_cnn", "tiny_resnet", "tiny_unet"} <= set(TINY_MODELS)
    assert {"tiny_unet", "unet"} <= set(list_models(task="segment"))
    assert all(name.startswith("tiny_") for name in TINY_MODELS) and "unet" not in TINY_MODELS
    assert all(get_model_entry(name).description for name in names)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_finite_on_small_inputs(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    spec = get_input_spec(model)
    assert spec == get_input_spec(name)
    for size in (32, 64):
        with torch.no_grad():
            out = model(_batch(name, size))
        expected = (2, 1, size, size) if spec.task == "segment" else (2, NUM_CLASSES)
        assert out.shape == expected
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_are_small_and_train(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    assert _num_params(model) < 200_000
    out = model(_batch(name, 32))
    out.square().mean().backward()
    assert all(param.grad is not None for param in model.parameters())


@pytest.mark.parametrize("name", ["cnn_lstm", "dual_cnn", "resnet18", "unet", *TINY_MODELS])
def test_models_are_built_channels_last_and_compute_what_the_usual_layout_does(
    name: str, tmp_path: Path
) -> None:
    """Every convolution weight is NHWC (the layout oneDNN and cuDNN run fastest), the outputs and the
    gradients are those of the same weights in the usual layout, and a checkpoint keeps the layout."""
    from cxrcore.checkpoint import ModelCard, load_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(name)
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    usual = create_model(name)
    usual.load_state_dict(model.state_dict())
    usual = usual.to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in usual.parameters())
    # Continuous inputs: a binary mask's flat regions tie in max pooling, where either layout may route
    # the gradient to a different one of the equal inputs (both are gradients of the same function).
    inputs = torch.rand(3, get_input_spec(name).num_channels, 64, 64)
    for net in (model, usual):
        torch.manual_seed(1)  # the same dropout masks
        net.train()
        net(inputs).square().mean().backward()
    torch.testing.assert_close(model.eval()(inputs), usual.eval()(inputs), rtol=1e-4, atol=1e-5)
    # As one vector: a bias whose gradient a later BatchNorm all but cancels is float noise on its own.
    ours, theirs = (
        torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        for net in (model, usual)
    )
    assert ours.shape == theirs.shape == (_num_params(model),)
    assert float((ours - theirs).norm() / theirs.norm()) < 2e-3

    card = ModelCard(model=get_build_args(model), input_spec=get_input_spec(model).to_dict())
    loaded, _ = load_model(save_checkpoint(tmp_path / "ckpt", model, card))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in loaded.parameters() if p.ndim == 4)
    torch.testing.assert_close(loaded(inputs), model(inputs))


def test_unet_handles_sizes_not_divisible_by_its_depth() -> None:
    with torch.no_grad():
        out = create_model("tiny_unet").eval()(torch.rand(1, 1, 50, 44))
    assert out.shape == (1, 1, 50, 44)


def test_kwargs_reach_the_architecture_and_rebuild_from_build_args() -> None:
    model = create_model("tiny_cnn_lstm", image_size=48, num_classes=3, hidden_size=16)
    assert model.num_classes == 3
    assert get_input_spec(model).image_size == 48
    args = get_build_args(model)
    assert args == {"name": "tiny_cnn_lstm", "image_size": 48, "num_classes": 3, "hidden_size": 16}

    rebuilt = create_model(**json.loads(json.dumps(args)))
    rebuilt.load_state_dict(model.state_dict())
    assert get_input_spec(rebuilt) == get_input_spec(model)
    with torch.no_grad():
        assert rebuilt.eval()(torch.rand(2, 1, 48, 48)).shape == (2, 3)


def test_spec_and_build_args_are_found_through_ddp_style_wrappers() -> None:
    model = create_model("tiny_dual_cnn")
    wrapped = torch.nn.DataParallel(model)
    assert get_input_spec(wrapped).channels == ("image", "mask")
    assert get_build_args(wrapped)["name"] == "tiny_dual_cnn"
    with pytest.raises(ValueError, match="create_model"):
        get_input_spec(torch.nn.Linear(2, 2))


def test_kwargs_must_be_json_serialisable() -> None:
    with pytest.raises(TypeError, match="JSON"):
        create_model("tiny_cnn_lstm", num_classes=object())


def test_input_spec_round_trips_and_validates() -> None:
    spec = get_input_spec("tiny_dual_cnn", image_size=128)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["channels"] == ["image", "mask"]
    assert InputSpec.from_dict(data) == spec
    with pytest.raises(ValueError, match="channels"):
        InputSpec(channels=("mask",), image_size=64, mean=0.5, std=0.25)
    with pytest.raises(ValueError, match="task"):
        InputSpec(channels=("image",), image_size=64, mean=0.5, std=0.25, task="detect")
    with pytest.raises(ValueError, match="unknown InputSpec keys"):
        InputSpec.from_dict({**data, "colour": "rgb"})


@pytest.mark.parametrize(("name", "suggestion"), [("resnet81", "resnet18"), ("Tiny_UNet", "tiny_unet")])
def test_unknown_model_suggests_the_close_name(name: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="did you mean") as info:
        create_model(name)
    assert repr(suggestion) in str(info.value)
    assert "cnn_lstm" in str(info.value)


def test_pretrained_is_refused_by_models_without_weights() -> None:
    with pytest.raises(ValueError, match="takes no pretrained weights"):
        create_model("tiny_cnn_lstm", pretrained="hub")


@pytest.fixture(scope="module")
def imagenet_resnet18() -> dict[str, torch.Tensor]:
    """A resnet18 state_dict shaped like ImageNet weights: RGB first conv, 1000-class head."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_file_adapts_first_conv_and_skips_head(
    suffix: str, imagenet_resnet18: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(imagenet_resnet18, str(path))
    else:
        torch.save(imagenet_resnet18, path)

    with caplog.at_level(logging.INFO, logger="cxrcore.models.pretrained"):
        model = create_model("resnet18", pretrained=str(path), num_classes=4)
    state = model.state_dict()

    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(state["conv1.weight"], imagenet_resnet18["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(state["layer3.1.conv2.weight"], imagenet_resnet18["layer3.1.conv2.weight"])
    torch.testing.assert_close(state["bn1.running_var"], imagenet_resnet18["bn1.running_var"])
    assert state["fc.weight"].shape == (4, 512)
    assert "fc.weight" in caplog.text and "fc.bias" in caplog.text
    assert "pretrained" not in get_build_args(model)


def test_pretrained_file_for_another_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("tiny_resnet").state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="do not fit"):
        create_model("resnet18", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="train from scratch"):
        create_model("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_hub_offline_raises_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        if pretrained:
            raise OSError("Network is unreachable")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="model hub") as info:
        create_model("resnet18", pretrained="hub")
    message = str(info.value)
    assert "--pretrained none (pretrained=None)" in message and "local" in message
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ValueError, match="no hub weights"):
        create_model("tiny_resnet", pretrained="hub")


def test_freeze_backbone_leaves_only_the_head_trainable() -> None:
    model = create_model("tiny_resnet", freeze_backbone=True)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


def test_dice_and_iou_on_known_masks() -> None:
    square = torch.zeros(1, 1, 8, 8)
    square[..., 2:6, 2:6] = 1
    other = torch.zeros(1, 1, 8, 8)
    other[..., 0:2, 0:2] = 1
    half = torch.zeros(1, 1, 8, 8)
    half[..., 2:6, 2:4] = 1
    empty = torch.zeros(1, 1, 8, 8)

    for score in (dice_score, iou_score):
        assert score(square, square, from_logits=False) == 1
        assert score(other, square, from_logits=False) == 0
        assert score(empty, empty, from_logits=False) == 1
        assert score(empty, square, from_logits=False) == 0
    assert dice_score(half, square, from_logits=False) == pytest.approx(2 * 8 / (8 + 16))
    assert iou_score(half, square, from_logits=False) == pytest.approx(8 / 16)

    logits = (square * 2 - 1) * 5  # positive inside the square
    batch = torch.cat([logits, torch.full_like(logits, -5.0)])
    target = torch.cat([square, empty]).squeeze(1).to(torch.uint8)  # (B, H, W) masks are accepted
    assert dice_score(batch, target) == 1
    assert iou_score(batch, target) == 1
    with pytest.raises(ValueError, match="do not match"):
        dice_score(batch, square)


def test_worker_imports_leave_out_what_only_some_need() -> None:
    """Every Ray worker that runs cxr's code imports it: timm (with torchvision and torch._dynamo) and
    scikit-learn took 2.7 of the training loop's 4.1 s import, and only a ResNet and ROC curves need them."""
    code = (
        "import sys, cxrcore.train.loop, cxrcore.tune, cxrcore.data.ingest, cxrcore.metrics, cxrcore.models; "
        "print(sorted(m for m in ('timm', 'torchvision', 'sklearn') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    assert create_model("tiny_resnet") is not None  # built on demand, timm imported then


def test_an_unreachable_hub_fails_at_once_saying_which_flags_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries an unreachable hub for about 45 s; the driver's check asks the hub once."""
    import socket
    import time

    from cxrcore.config import ConfigError
    from cxrcore.train.trainer import check_pretrained

    with socket.socket() as closed:  # a port nothing listens on: connection refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=rf"unreachable from here \(127.0.0.1:{port}: Connection refused\)"
    ) as info:
        check_pretrained("resnet18", "auto")
    assert time.monotonic() - started < 10
    assert "--pretrained PATH" in str(info.value) and "--pretrained none" in str(info.value)


def test_which_models_have_hub_weights_and_take_tunes_pretrained() -> None:
    """Declared on the registry entry, not read from the name: `--pretrained auto` fetches hub weights for
    those models alone, and Tune hands its --pretrained to them alone."""
    from cxrcore.models import registry
    from cxrcore.train.trainer import resolve_pretrained
    from cxrcore.tune import takes_pretrained

    hub = [name for name in list_models() if get_model_entry(name).hub_weights]
    assert {"resnet18", "resnet34", "resnet50"} <= set(hub) and not [n for n in hub if n.startswith("tiny_")]
    assert [name for name in list_models() if takes_pretrained(name)] == hub
    assert resolve_pretrained("resnet18", "auto") == "hub"
    assert resolve_pretrained("tiny_resnet", "auto") is None
    with pytest.raises(ValueError, match="takes no `pretrained`"):

        @registry.register_model(get_input_spec("tiny_cnn_lstm"), hub_weights=True)
        def weightless_test_net() -> torch.nn.Module:
            """Claims hub weights it cannot load."""
            return torch.nn.Identity()

    assert "weightless_test_net" not in list_models()


def test_a_cxr_checkpoint_is_a_starting_point_for_its_own_architecture(tmp_path: Path) -> None:
    """A second site fine-tuning the shipped model: `--pretrained` of a version folder was refused for the
    demo's models and, for a ResNet, asked for an ImageNet file written into the version's folder."""
    from cxrcore.checkpoint import ModelCard, save_checkpoint
    from cxrcore.config import ConfigError
    from cxrcore.train.trainer import pretrained_from, resolve_pretrained
    from cxrcore.tune import takes_pretrained

    torch.manual_seed(5)
    shipped = create_model("tiny_cnn_lstm")
    card = ModelCard(model=get_build_args(shipped), input_spec=get_input_spec(shipped).to_dict(),
                     data={"fingerprint": "site-1"}, version="tiny_cnn_lstm:3")  # fmt: skip
    save_checkpoint(tmp_path / "v3", shipped, card)
    weights = resolve_pretrained("tiny_cnn_lstm", str(tmp_path / "v3"))
    assert weights == str(tmp_path / "v3" / "model.safetensors")
    started = create_model("tiny_cnn_lstm", pretrained=weights)
    assert all(
        torch.equal(a, b)
        for a, b in zip(started.state_dict().values(), shipped.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match="is a checkpoint of tiny_cnn_lstm: fine-tune it with --model"):
        resolve_pretrained("tiny_resnet", str(tmp_path / "v3"))
    assert takes_pretrained("tiny_cnn_lstm", str(tmp_path / "v3"))
    assert not takes_pretrained("tiny_dual_cnn", str(tmp_path / "v3"))
    lineage = pretrained_from(weights)
    assert lineage is not None and (lineage["version"], lineage["dataset_fingerprint"]) == (
        "tiny_cnn_lstm:3",
        "site-1",
    )
