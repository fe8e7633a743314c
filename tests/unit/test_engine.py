"""The training engine's batch preparation (which lung masks a dual-channel model reads) and the data a
run refuses before it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cxrcore.models import create_model, get_input_spec
from cxrcore.train.engine import prepare_batch


def _batch(size: int) -> dict[str, torch.Tensor]:
    """Four images, the first two with a full-image lung mask, the last two without one."""
    return {
        "image": torch.full((4, size, size), 128, dtype=torch.uint8),
        "mask": torch.cat([torch.full((2, size, size), 255), torch.zeros(2, size, size)]).to(torch.uint8),
        "has_mask": torch.tensor([True, True, False, False]),
        "label_index": torch.arange(4),
    }


def _empty_masks(unit_images: torch.Tensor) -> torch.Tensor:
    """A segmenter that finds no lung anywhere."""
    return torch.zeros_like(unit_images)


def test_masks_come_from_the_data_in_training_and_from_the_segmenter_as_served() -> None:
    spec = get_input_spec(create_model("tiny_dual_cnn", image_size=32))
    # Training: the dataset's masks where it has them, the segmenter's for the rest.
    _, mask = prepare_batch(_batch(32), spec, None, _empty_masks)
    assert mask is not None
    assert mask[:2].min() == 1.0 and mask[2:].max() == 0.0
    # Validation, like Serve, never uses the dataset's masks: every one is the segmenter's.
    _, mask = prepare_batch(_batch(32), spec, None, _empty_masks, served_masks=True)
    assert mask is not None and mask.max() == 0.0
    # Without a segmenter there is nothing else to read: the dataset's masks stay.
    _, mask = prepare_batch(_batch(32), spec, None, None, served_masks=True)
    assert mask is not None and mask[:2].min() == 1.0


@pytest.mark.parametrize(
    ("by_split", "message"),
    [
        ({"train": 0, "val": 4, "test": 4}, "no image in its train split"),
        ({"train": 32, "val": 0, "test": 4}, "no image in its val split, on which every epoch is scored"),
    ],
)
def test_a_dataset_without_training_or_validation_images_is_refused_before_training(
    tmp_path: Path, by_split: dict[str, int], message: str
) -> None:
    """Found before Ray Train starts, rather than as a KeyError in a worker after the first epoch."""
    from cxrcore.config import ConfigError
    from cxrcore.data.ingest import REPORT_NAME
    from cxrcore.train.trainer import check_dataset

    (tmp_path / REPORT_NAME).write_text(json.dumps({"by_split": by_split}))
    with pytest.raises(ConfigError, match=message) as error:
        check_dataset(str(tmp_path))
    assert "cxr data ingest" in str(error.value)


def _maskless_dataset(root: Path) -> str:
    """A dataset as far as the checks before training read one: its report and its Parquet schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrcore.data.ingest import REPORT_NAME

    report = {
        "by_split": {"train": 32, "val": 4, "test": 4}, "by_class_split": {}, "ingested": 40,
        "without_mask": 40, "config": {"size": 32},
    }  # fmt: skip
    (root / REPORT_NAME).write_text(json.dumps(report))
    (root / "split=train").mkdir()
    columns = {"image": pa.binary(), "mask": pa.binary(), "has_mask": pa.bool_(), "label_index": pa.int64()}
    pq.write_table(pa.schema(columns).empty_table(), root / "split=train/part-0.parquet")
    return str(root)


def test_models_that_need_masks_are_refused_on_a_dataset_without_any(tmp_path: Path) -> None:
    """The segmenter that dual-channel models are served with learns from the dataset's masks: without
    masks, Tune and the segmenter's own run stop before training (they failed after its first epoch)."""
    from cxrcore.config import ConfigError, TrainConfig, TuneConfig
    from cxrcore.train.trainer import loop_config
    from cxrcore.tune import preflight

    data = _maskless_dataset(tmp_path)
    tune = TuneConfig(data=data, registry=str(tmp_path / "reg"), models="tiny_dual_cnn,tiny_cnn_lstm")
    with pytest.raises(ConfigError, match=r"tiny_dual_cnn reads a lung mask.*has none"):
        preflight(tune)
    preflight(TuneConfig(data=data, registry=str(tmp_path / "reg"), models="tiny_cnn_lstm"))  # image alone
    with pytest.raises(ConfigError, match="no lung mask to learn segmenting from"):
        loop_config(TrainConfig(data=data, model="tiny_unet"))
