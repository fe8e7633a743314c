"""Grad-CAM and `explain`: heatmaps at the model's input size, and the same probabilities as predict_proba."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrcore.explain import explain, grad_cam, last_conv_layer
from cxrcore.inference import Predictor
from cxrcore.models import create_model
from tests.e2e.uploads import chest, write_checkpoints


@pytest.mark.parametrize("name", ["tiny_cnn_lstm", "tiny_dual_cnn", "tiny_resnet"])
def test_grad_cam_maps_are_normalised_and_input_sized(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    channels = 2 if "dual" in name else 1
    inputs = torch.randn(3, channels, 64, 64)
    heatmaps, logits = grad_cam(model, inputs)
    assert heatmaps.shape == (3, 64, 64) and logits.shape == (3, 4)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1 + 1e-6
    with torch.no_grad():
        torch.testing.assert_close(logits, model(inputs))
    assert not any(p.grad is not None for p in model.parameters())  # nothing accumulates between requests
    assert not last_conv_layer(model)._forward_hooks  # the hook is gone


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
        and result.heatmap.max() in (0, 255)
    )
    assert result.mask is not None and set(np.unique(result.mask)) <= {0, 255}

    image_only = explain(Predictor.from_checkpoint(checkpoints.cnn_lstm), image)
    assert image_only.mask is None and image_only.heatmap.shape == (64, 64)
