"""The input a model expects: which channels, at what size, normalised how, for which task."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

CHANNELS: tuple[str, ...] = ("image", "mask")
TASKS: tuple[str, ...] = ("classify", "segment")
NORMALIZATIONS: tuple[str, ...] = ("fixed", "per_image")


@dataclass(frozen=True)
class InputSpec:
    """What the data pipeline and Serve must feed a model; carried by the model and its card.

    >>> spec = InputSpec(channels=("image", "mask"), image_size=224, mean=0.5, std=0.25)
    >>> spec.num_channels
    2
    >>> InputSpec.from_dict(spec.to_dict()) == spec
    True
    """

    channels: tuple[str, ...]
    """Input channels in order: the grayscale image, optionally followed by its 0/1 lung mask."""
    image_size: int
    """Side of the square input in pixels."""
    mean: float
    """Under 'fixed' normalisation, the mean subtracted from the image scaled to [0, 1] (under 'per_image'
    unused: each image's own is); the mask channel stays 0/1."""
    std: float
    """Under 'fixed' normalisation, the divisor applied to the image after subtracting the mean."""
    task: str = "classify"
    """'classify' (logits of shape (B, num_classes)) or 'segment' (mask logits of shape (B, 1, H, W))."""
    normalization: str = "fixed"
    """'fixed': (x - mean) / std for every image. 'per_image': each image standardised by its own mean
    and standard deviation, which removes exposure and contrast differences between films and sites."""

    def __post_init__(self) -> None:
        if not isinstance(self.channels, tuple) or not self.channels or self.channels[0] != "image":
            raise ValueError(f"channels must be a tuple starting with 'image', got {self.channels!r}")
        unknown = [name for name in self.channels if name not in CHANNELS]
        if unknown or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels must be distinct names from {CHANNELS}, got {self.channels!r}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (channels as a list)."""
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Inverse of to_dict; rejects unknown keys so a malformed card fails loudly."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown InputSpec keys {unknown}; expected {sorted(known)}")
        return cls(**{**data, "channels": tuple(data["channels"])})
