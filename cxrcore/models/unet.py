"""UNet for lung segmentation: grayscale image in, one mask-logit map of the same size out."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrcore.data.spec import InputSpec
from cxrcore.models.layers import conv_block
from cxrcore.models.registry import register_model

__all__ = ["UNet"]


class UNet(nn.Module):
    """Encoder of `depth` 2× downsamplings doubling from `base_width`, mirrored decoder with skips.

    Returns logits (B, 1, H, W); sigmoid > 0.5 is lung. Sizes that are not a multiple of 2**depth
    work too: upsampled maps are resized to their skip connection.
    """

    def __init__(self, base_width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.num_classes = 1
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            conv_block(1 if level == 0 else widths[level - 1], widths[level]) for level in range(depth + 1)
        )
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], kernel_size=2, stride=2)
            for level in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(
            conv_block(2 * widths[level], widths[level]) for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for upsample, decoder in zip(self.upsamplers, self.decoders, strict=True):
            skip = skips.pop()
            x = upsample(x)
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = decoder(torch.cat((skip, x), dim=1))
        return self.head(x)


_SPEC = InputSpec(channels=("image",), image_size=256, mean=0.5, std=0.25, task="segment")
_TINY_SPEC = InputSpec(channels=("image",), image_size=64, mean=0.5, std=0.25, task="segment")


def _create_unet(model_args: dict[str, Any], **kwargs: Any) -> UNet:
    return UNet(**{**model_args, **kwargs})


@register_model(_SPEC)
def unet(**kwargs: Any) -> UNet:
    """Lung-segmentation UNet for 256 px inputs: four downsamplings, 32–512 channels."""
    return _create_unet(dict(base_width=32, depth=4), **kwargs)


@register_model(_TINY_SPEC)
def tiny_unet(**kwargs: Any) -> UNet:
    """Tiny lung-segmentation UNet for tests and smoke runs: three downsamplings, 8–64 channels."""
    return _create_unet(dict(base_width=8, depth=3), **kwargs)
