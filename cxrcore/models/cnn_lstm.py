"""CNN-LSTM: a small CNN over the grayscale image whose feature-map rows are read by a biLSTM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cxrcore.data.spec import InputSpec
from cxrcore.labels import NUM_CLASSES
from cxrcore.models.layers import conv_block
from cxrcore.models.registry import register_model

__all__ = ["CnnLstm"]


class CnnLstm(nn.Module):
    """Rows of the CNN feature map, top to bottom (apex to base), form the sequence that a biLSTM reads;
    its outputs, averaged over the rows, classify.

    Each stage is `convs_per_stage` conv-BN-ReLU layers and a 2× max pool. Every row of the last
    feature map is pooled to `row_width` columns, so a row is a vector of widths[-1] × row_width
    features and any input size works.

    Why a row average and the mean of the outputs rather than 4 columns per row and the final states: a
    finding may sit anywhere across a row, and every row's output gets a gradient. In 4 epochs on 192
    phantoms at 64 px, accuracy on 600 independent phantoms rose from 0.54-0.59 to 0.72-0.82 (seeds 0-2).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        widths: Sequence[int] = (32, 64, 128, 256),
        convs_per_stage: int = 1,
        row_width: int = 1,
        hidden_size: int = 128,
        num_layers: int = 1,
        drop_rate: float = 0.3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        stages: list[nn.Module] = []
        in_chans = 1
        for width in widths:
            stages += [conv_block(in_chans, width, convs_per_stage), nn.MaxPool2d(2)]
            in_chans = width
        self.features = nn.Sequential(*stages)
        self.row_pool = nn.AdaptiveAvgPool2d((None, row_width))
        # Post-ReLU features are unbounded; normalised rows keep the LSTM's gates out of saturation,
        # which is what lets it train at the learning rates the convolutions want.
        self.row_norm = nn.LayerNorm(in_chans * row_width)
        self.lstm = nn.LSTM(
            input_size=in_chans * row_width,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=drop_rate if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(2 * hidden_size, num_classes)

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) image → (B, rows, features) sequence for the LSTM."""
        rows = self.row_pool(self.features(x))  # (B, C, H', row_width)
        return self.row_norm(rows.permute(0, 2, 1, 3).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(self.forward_sequence(x))  # (B, rows, 2 * hidden): both directions
        return self.head(self.dropout(outputs.mean(dim=1)))


_SPEC = InputSpec(channels=("image",), image_size=224, mean=0.5, std=0.25, normalization="per_image")
_TINY_SPEC = InputSpec(channels=("image",), image_size=64, mean=0.5, std=0.25)


def _create_cnn_lstm(model_args: dict[str, Any], **kwargs: Any) -> CnnLstm:
    return CnnLstm(**{**model_args, **kwargs})


@register_model(_SPEC)
def cnn_lstm(**kwargs: Any) -> CnnLstm:
    """CNN-LSTM for 128–256 px inputs: four conv stages (32–256 wide) and a 128-unit biLSTM."""
    return _create_cnn_lstm(dict(widths=(32, 64, 128, 256), hidden_size=128), **kwargs)


@register_model(_TINY_SPEC)
def tiny_cnn_lstm(**kwargs: Any) -> CnnLstm:
    """Tiny CNN-LSTM for tests and smoke runs: three conv stages (8–32 wide), 32-unit biLSTM."""
    return _create_cnn_lstm(dict(widths=(8, 16, 32), hidden_size=32), **kwargs)
