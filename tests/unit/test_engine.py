"""The training engine's batch preparation: which lung masks a dual-channel model reads."""

from __future__ import annotations

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
