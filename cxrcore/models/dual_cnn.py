"""Dual-channel CNN: the image and its lung mask stacked as two input channels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cxrcore.data.spec import InputSpec
from cxrcore.labels import NUM_CLASSES
from cxrcore.models.layers import conv_block
from cxrcore.models.registry import register_model

__all__ = ["DualCnn"]


class DualCnn(nn.Module):
    """Conv stages (2× max pool between them), global average pool, dropout, linear head.

    Input is (B, 2, H, W): the normalised image, then the 0/1 lung mask: the U-Net segmenter's in
    training, validation and serving alike (`--train-masks dataset` trains on the ground truth).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        widths: Sequence[int] = (32, 64, 128, 256, 256),
        convs_per_stage: int = 2,
        drop_rate: float = 0.3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        stages: list[nn.Module] = []
        in_chans = 2
        for i, width in enumerate(widths):
            if i > 0:
                stages.append(nn.MaxPool2d(2))
            stages.append(conv_block(in_chans, width, convs_per_stage))
            in_chans = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(in_chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(pooled))


_SPEC = InputSpec(channels=("image", "mask"), image_size=224, mean=0.5, std=0.25, normalization="per_image")
_TINY_SPEC = InputSpec(channels=("image", "mask"), image_size=64, mean=0.5, std=0.25)


def _create_dual_cnn(model_args: dict[str, Any], **kwargs: Any) -> DualCnn:
    return DualCnn(**{**model_args, **kwargs})


@register_model(_SPEC)
def dual_cnn(**kwargs: Any) -> DualCnn:
    """Image + lung mask CNN for 128–256 px inputs: five stages of two convs, 32–256 wide."""
    return _create_dual_cnn(dict(widths=(32, 64, 128, 256, 256), convs_per_stage=2), **kwargs)


@register_model(_TINY_SPEC)
def tiny_dual_cnn(**kwargs: Any) -> DualCnn:
    """Tiny image + lung mask CNN for tests and smoke runs: four stages of one conv, 8–64 wide."""
    return _create_dual_cnn(dict(widths=(8, 16, 32, 64), convs_per_stage=1), **kwargs)
