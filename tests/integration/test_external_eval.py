"""External validation end to end: the real sample ingested as a hospital the model never saw, scored by
`cxr evaluate` through a registry reference, with the lung masks Serve would make."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cxrcore.checkpoint import ModelCard, save_checkpoint
from cxrcore.cli import main
from cxrcore.config import IngestConfig
from cxrcore.data.ingest import ingest_dataset, read_report
from cxrcore.models import create_model, get_build_args, get_input_spec
from cxrcore.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
SIZE = 64


def _save(
    directory: Path, name: str, own: str, segmenter: str | None = None, metrics: dict[str, Any] | None = None
) -> Path:
    """An untrained tiny model whose card says it was trained on the dataset `own`."""
    torch.manual_seed(0)
    model = create_model(name)
    card = ModelCard(
        model=get_build_args(model),
        input_spec=get_input_spec(model).to_dict(),
        data={"dataset": own, "fingerprint": read_report(own)["fingerprint"], "size": SIZE},
        metrics=metrics or {},
        segmenter=segmenter,
    )
    return save_checkpoint(directory, model, card)


def test_real_sample_as_external_data_for_a_registered_dual_channel_model(
    real_sample: Path, synthetic_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    external = tmp_path / "hospital"
    ingest_dataset(IngestConfig(raw=str(real_sample), out=str(external), size=SIZE))
    registry = ModelRegistry(tmp_path / "registry")
    unet = registry.register(_save(tmp_path / "unet", "tiny_unet", synthetic_dataset))
    # The card names its segmenter by registry reference, as Serve resolves it.
    dual = _save(
        tmp_path / "dual", "tiny_dual_cnn", synthetic_dataset, segmenter=unet.ref,
        metrics={"val_accuracy": 0.95, "val_macro_f1": 0.94},
    )  # fmt: skip
    registry.register(dual, alias="production")

    monkeypatch.chdir(tmp_path)
    flags = ["--model", "production", "--registry", "registry", "--data", "hospital", "--out", "eval"]
    assert main(["evaluate", *flags]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["evaluated"]["split"] == "all" and metrics["n"] == 130
    block = metrics["external"]
    assert block["classes_present"] == ["COVID", "Normal", "Viral Pneumonia"]
    assert block["classes_absent"] == ["Lung_Opacity"]
    assert set(block["one_vs_rest"]) == set(block["classes_present"])
    assert (
        block["one_vs_rest"]["COVID"]["positives"] == 50 and block["one_vs_rest"]["COVID"]["negatives"] == 80
    )
    overlap = block["overlap_with_training_data"]
    assert overlap["checked"] and overlap["dataset"] == synthetic_dataset and overlap["total"] == 0
    # Serve never receives a mask: the headline uses the segmenter's; the 30 real masks are scored apart.
    assert block["masks"].startswith("from the model's segmenter for every image")
    assert metrics["with ground-truth masks"]["n"] == 130
    assert metrics["with ground-truth masks"]["note"] == (
        "30 of the 130 images with the dataset's lung mask; the rest with the segmenter's, as served"
    )
    comparison = metrics["internal_comparison"]
    assert comparison["reference"] == "validation" and comparison["restricted_to"] is None  # no matrix
    assert comparison["figures"]["accuracy"]["internal"] == 0.95
    assert comparison["large_drop"] is (0.95 - metrics["accuracy"] >= 0.10)
