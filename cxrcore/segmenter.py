"""A lung segmenter as the mask source of dual-channel models, for training, evaluation and Serve alike.

Where an image comes without its lung mask (a dataset without masks, a request that sends none), a U-Net
checkpoint predicts one: the Train workers through `load_mask_source`, the Predictor (batch evaluation,
Ray Serve) through `predict_masks`, so both segment the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cxrcore.checkpoint import load_model
from cxrcore.data.batches import normalize_image
from cxrcore.data.spec import InputSpec

MaskSource = Callable[[torch.Tensor], torch.Tensor]
"""Predicts 0/1 masks (B, 1, S, S) from [0, 1] images (B, 1, S, S): the segmenter fallback."""


def predict_masks(
    model: Callable[[torch.Tensor], torch.Tensor], spec: InputSpec, unit_images: torch.Tensor
) -> torch.Tensor:
    """0/1 masks (B, 1, S, S) for [0, 1] images (B, 1, S, S) of any size S, from a segmentation model in
    eval mode (or its graph): the images resized to its input size, its masks back to S."""
    size = unit_images.shape[-1]
    x = unit_images
    if size != spec.image_size:
        x = F.interpolate(x, size=spec.image_size, mode="bilinear", antialias=True, align_corners=False)
    probs = torch.sigmoid(model(normalize_image(spec, x)).float())
    if size != spec.image_size:
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return (probs > 0.5).float()


def load_mask_source(directory: str | Path, device: str | torch.device = "cpu") -> MaskSource:
    """A U-Net checkpoint as a MaskSource; any other kind of model is refused, saying what it is."""
    model, card = load_model(directory, device)
    spec = InputSpec.from_dict(card.input_spec)
    if spec.task != "segment":
        raise ValueError(f"{directory} holds a {spec.task} model, not a lung segmenter")

    @torch.no_grad()
    def source(unit_images: torch.Tensor) -> torch.Tensor:
        return predict_masks(model, spec, unit_images)

    return source
