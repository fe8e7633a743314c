"""Convolution building blocks shared by the custom model families."""

from __future__ import annotations

from torch import nn


class ConvBnReLU(nn.Sequential):
    """3×3 convolution (size-preserving, no bias since BN follows), batch norm, ReLU."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
        )


def conv_block(in_chans: int, out_chans: int, depth: int = 2) -> nn.Sequential:
    """`depth` ConvBnReLU layers, the first changing the width from in_chans to out_chans."""
    if depth < 1:
        raise ValueError(f"conv block depth must be at least 1, got {depth}")
    return nn.Sequential(*(ConvBnReLU(in_chans if i == 0 else out_chans, out_chans) for i in range(depth)))
