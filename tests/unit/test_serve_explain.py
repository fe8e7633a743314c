"""Grad-CAM and `explain`: heatmaps at the model's input size, and the same probabilities as predict_proba."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxrcore.explain import explain, grad_cam
from cxrcore.inference import Predictor
from cxrcore.models import create_model, list_models
from tests.e2e.uploads import chest, write_checkpoints


@pytest.mark.parametrize("name", list_models("tiny_*", task="classify"))
def test_grad_cam_maps_are_normalised_and_input_sized(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    inputs = torch.randn(3, model.input_spec.num_channels, 64, 64)
    heatmaps, logits = grad_cam(model, inputs)
    assert heatmaps.shape == (3, 64, 64) and logits.shape == (3, 4)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1 + 1e-6
    with torch.no_grad():
        torch.testing.assert_close(logits, model(inputs))
    assert not any(p.grad is not None for p in model.parameters())  # nothing accumulates between requests
    assert not any(module._forward_hooks for module in model.modules())  # the hooks are gone


def test_a_feature_map_of_one_cell_places_nothing_and_is_said_to_be_empty() -> None:
    """A ResNet's last feature map at 32 px is 1×1: its map, stretched and scaled to its maximum, was 255
    everywhere with heatmap_empty false, read as evidence everywhere. At 64 px (2×2) it places something."""
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    heatmaps, _ = grad_cam(model, torch.randn(2, 1, 32, 32))
    assert heatmaps.abs().max() == 0  # blank: `explain` says empty
    heatmaps, _ = grad_cam(model, torch.randn(2, 1, 64, 64))
    assert heatmaps.amax(dim=(1, 2)).tolist() == [1.0, 1.0] and heatmaps.amin() < 1


def test_grad_cam_weighs_the_block_output_after_batchnorm_not_the_raw_convolution() -> None:
    # The convolution's output is negative everywhere; BatchNorm shifts it positive and the class reads it.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2, 4),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[0].bias.fill_(-5.0)
        model[1].running_mean.fill_(-5.0)
        model[1].bias.fill_(1.0)
        model[5].weight.zero_()
        model[5].weight[0] = 1.0
        model[5].bias.zero_()
    inputs = torch.rand(2, 1, 16, 16)
    maps, logits = grad_cam(model, inputs)
    assert (logits.argmax(dim=1) == 0).all()
    assert torch.allclose(maps.flatten(1).amax(dim=1), torch.ones(2))  # evidence where the class reads it
    raw, _ = grad_cam(model, inputs, layer=model[0])
    assert raw.max() == 0  # the raw convolution's map: blank, what the served heatmaps were


def test_explain_matches_predict_proba_and_returns_the_mask_used(tmp_path: Path) -> None:
    checkpoints = write_checkpoints(tmp_path)
    image = np.round(chest(3, 180, 150) * 255).astype(np.uint8)
    dual = Predictor.from_checkpoint(checkpoints.dual)
    result = explain(dual, image)
    np.testing.assert_allclose(result.probabilities, dual.predict_proba([image])[0], atol=1e-6)
    assert result.target == int(result.probabilities.argmax())
    assert (
        result.heatmap.shape == (64, 64)
        and result.heatmap.dtype == np.uint8
        and result.heatmap.max() == 255
        and not result.empty
    )
    assert result.mask is not None and set(np.unique(result.mask)) <= {0, 255}

    image_only = explain(Predictor.from_checkpoint(checkpoints.cnn_lstm), image)
    assert image_only.mask is None and image_only.heatmap.shape == (64, 64)


def test_grad_cam_reads_the_layer_a_model_declares() -> None:
    """A pre-activation architecture's blocks end before their normalisation, so the last block's output
    is not the feature map to weigh: its registry entry names the module instead (`cam_layer`)."""
    from cxrcore.data.spec import InputSpec
    from cxrcore.models import registry

    spec = InputSpec(channels=("image",), image_size=64, mean=0.5, std=0.25)

    @registry.register_model(spec, cam_layer="0.1")
    def preactivation_test_net() -> nn.Module:
        """A test network whose Grad-CAM layer is declared."""
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4),
        )  # fmt: skip

    try:
        model = create_model("preactivation_test_net").eval()
        inputs = torch.randn(2, 1, 64, 64)
        declared, _ = grad_cam(model, inputs)
        named, _ = grad_cam(model, inputs, layer=model[0][1])  # the BatchNorm the entry names
        last_block, _ = grad_cam(model, inputs, layer=model[0][3])  # what _feature_map would pick
        torch.testing.assert_close(declared, named)
        assert not torch.allclose(declared, last_block)
    finally:
        registry._entries.pop("preactivation_test_net", None)
