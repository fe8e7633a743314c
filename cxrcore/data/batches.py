"""Model inputs from uint8 image/mask batches, on the training or serving device, plus augmentation.

Training, evaluation and Serve all call `model_inputs`, so what a model sees never depends on where
it runs. Augmentation works on whole batches on the device (affine warps via `grid_sample`), because
per-image CPU augmentation cannot keep a GPU fed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrcore.data.spec import InputSpec


@dataclass(frozen=True)
class AugmentConfig:
    """Anatomy-respecting augmentation: small affine, contrast/brightness, noise; no flips by default.

    Horizontal flips are off because they move the heart to the right, which real films never show.
    """

    rotate_degrees: float = 7.0
    scale: tuple[float, float] = (0.92, 1.08)
    translate: float = 0.05
    contrast: float = 0.2
    brightness: float = 0.1
    gamma: float = 0.2
    noise_std: float = 0.02
    hflip: bool = False


def to_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W) → float (B, 1, size, size) in [0, 1], resized with antialiasing."""
    x = images.unsqueeze(1).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def masks_to_unit(masks: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 0/255 masks (B, H, W) → float (B, 1, size, size) with values 0/1."""
    x = (masks.unsqueeze(1) > 127).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) > 0.5).float()
    return x


def augment(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly augment a batch of [0, 1] images (B, 1, S, S) and, with the same warp, their masks."""
    b, device = image.shape[0], image.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device="cpu").mul_(high - low).add_(low).to(device)

    angle = uniform(-config.rotate_degrees, config.rotate_degrees) * (math.pi / 180.0)
    scale = uniform(*config.scale)
    tx, ty = uniform(-config.translate, config.translate), uniform(-config.translate, config.translate)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    flip = torch.ones(b, device=device)
    if config.hflip:
        flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], dim=1), torch.stack([sin * flip, cos, ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask is not None:
        mask = (
            F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5
        ).float()

    view = (b, 1, 1, 1)
    gamma = torch.exp(uniform(-config.gamma, config.gamma)).view(view)
    image = image.clamp(1e-6, 1.0).pow(gamma)
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(1 - config.contrast, 1 + config.contrast).view(view)
    brightness = uniform(-config.brightness, config.brightness).view(view)
    image = (image - mean) * contrast + mean + brightness
    if config.noise_std > 0:
        noise = torch.randn(image.shape, generator=generator, device="cpu").to(device)
        image = image + noise * config.noise_std
    return image.clamp_(0.0, 1.0), mask


def normalize_image(spec: InputSpec, image: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B, 1, S, S) normalised as the model's input spec says."""
    if spec.normalization == "per_image":
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        std = image.std(dim=(1, 2, 3), keepdim=True)
        return (image - mean) / (std + 1e-3)  # a blank image stays finite
    return (image - spec.mean) / spec.std


def model_inputs(spec: InputSpec, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised model input (B, C, S, S) from [0, 1] images and 0/1 masks, channels as the spec says."""
    channels = [normalize_image(spec, image)]
    if "mask" in spec.channels:
        if mask is None:
            raise ValueError("this model needs a lung mask channel; pass masks or a segmenter")
        channels.append(mask)
    return torch.cat(channels, dim=1)
