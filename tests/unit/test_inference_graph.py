"""The served forward as a frozen TorchScript graph: the eager model's outputs at every batch size, or
the eager model itself where a trace would change them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxrcore.data.spec import InputSpec
from cxrcore.inference import Predictor, as_graph
from cxrcore.models import create_model, list_models
from tests.e2e.uploads import chest, write_checkpoints

CPU = torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list_models("tiny_*"))
def test_the_graph_gives_the_models_outputs_at_any_batch_size(name: str, device: str) -> None:
    """On a GPU too, whose TF32 convolutions would tell a graph with BatchNorm folded into them apart from
    the model (as_graph keeps the model's own arithmetic there)."""
    torch.manual_seed(0)
    model = create_model(name).eval().to(device)
    spec = model.input_spec
    graph = as_graph(model, spec, torch.device(device), name)
    assert isinstance(graph, torch.jit.ScriptModule)
    for batch in (1, 7):
        inputs = torch.rand(batch, spec.num_channels, spec.image_size, spec.image_size, device=device)
        with torch.inference_mode():
            torch.testing.assert_close(graph(inputs), model(inputs), rtol=1e-4, atol=1e-5)


class _BranchesOnData(nn.Module):
    """A trace records the branch its example took, whatever later inputs hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if bool(x.mean() > 0.5) else -1.0  # the probe's mean is below the example's
        return x.flatten(1)[:, :4] * scale


class _FixedBatch(nn.Module):
    """A Python int taken from a shape becomes a constant of the trace: batch 2 forever."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4] + torch.arange(int(x.shape[0])).unsqueeze(1)


class _Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)  # leaves torch: nothing for a trace to record


@pytest.mark.parametrize("module", [_BranchesOnData, _FixedBatch, _Untraceable])
def test_a_model_a_trace_would_change_is_served_eager(
    module: type[nn.Module], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if module is _BranchesOnData:  # make the example's mean high and the probe's low
        draws = iter([torch.full((2, 1, 8, 8), 0.9), torch.full((3, 1, 8, 8), 0.1)])
        monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: next(draws))
    model = module().eval()
    spec = InputSpec(channels=("image",), image_size=8, mean=0.5, std=0.25)
    with caplog.at_level(logging.WARNING, logger="cxrcore.inference"):
        assert as_graph(model, spec, CPU, "odd") is model
    assert "serving odd eager" in caplog.text


def test_a_predictor_with_graphs_predicts_what_the_eager_one_does(tmp_path: Path) -> None:
    """The dual-channel model and its U-Net both as graphs; images of other sizes than the model's."""
    checkpoints = write_checkpoints(tmp_path)
    images = [np.round(chest(seed, 180 + seed, 150) * 255).astype(np.uint8) for seed in range(5)]
    for checkpoint in (checkpoints.dual, checkpoints.cnn_lstm):
        eager = Predictor.from_checkpoint(checkpoint)
        graph = Predictor.from_checkpoint(checkpoint, graph=True)
        assert isinstance(graph.forward, torch.jit.ScriptModule) and eager.forward is eager.model
        if graph.segmenter is not None:
            assert isinstance(graph.segmenter, Predictor)
            assert isinstance(graph.segmenter.forward, torch.jit.ScriptModule)
        for batch in (images[:1], images):
            np.testing.assert_allclose(graph.predict_proba(batch), eager.predict_proba(batch), atol=1e-5)
