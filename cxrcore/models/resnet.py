"""ResNets from timm on one input channel, for transfer learning (`pretrained.py` builds and loads them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cxrcore.data.spec import InputSpec
from cxrcore.models.pretrained import HUB, create_timm, hub_unreachable, import_weights, load_pretrained
from cxrcore.models.registry import register_model

# The builders, and the weights' helpers that lived here until `pretrained.py` took them (imports kept).
__all__ = [
    "hub_unreachable",
    "import_weights",
    "load_pretrained",
    "resnet18",
    "resnet34",
    "resnet50",
    "tiny_resnet",
]


def _create_resnet(variant: str, *, pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """timm's ResNet `variant`, with every residual block's last BatchNorm at weight 1 where timm zeroes it
    by default (so each block starts as the identity). Zeroed, the blocks barely switch on in a short run
    from scratch: 4 epochs on 192 phantoms at 64 px reached 0.45-0.47 accuracy on 600 independent
    phantoms, against 0.62-0.68 with the weight at 1 (seeds 0-2). Pretrained weights overwrite it anyway."""
    kwargs.setdefault("zero_init_last", False)
    return create_timm(variant, pretrained=pretrained, **kwargs)


# Each image standardised by its own mean and std (per_image), which the first conv summed over ImageNet's
# RGB weights takes as well as ImageNet's normalised inputs. The mean and std, the grayscale equivalent of
# ImageNet's (the mean of its RGB means and stds), play no part there; the tiny model's fixed
# normalisation uses them.
_SPEC = InputSpec(channels=("image",), image_size=224, mean=0.449, std=0.226, normalization="per_image")
_TINY_SPEC = InputSpec(channels=("image",), image_size=64, mean=0.449, std=0.226)


@register_model(_SPEC, hub_weights=True)
def resnet18(pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """ResNet-18 (11M parameters); `pretrained` is None, a local weights file or "hub"."""
    return _create_resnet("resnet18", pretrained=pretrained, **kwargs)


@register_model(_SPEC, hub_weights=True)
def resnet34(pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """ResNet-34 (21M parameters); `pretrained` is None, a local weights file or "hub"."""
    return _create_resnet("resnet34", pretrained=pretrained, **kwargs)


@register_model(_SPEC, hub_weights=True)
def resnet50(pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """ResNet-50 (24M parameters, bottleneck blocks); `pretrained` is None, a local file or "hub"."""
    return _create_resnet("resnet50", pretrained=pretrained, **kwargs)


@register_model(_TINY_SPEC)
def tiny_resnet(pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Tiny ResNet for tests and smoke runs: one basic block per stage, 8–64 channels.

    Its shortcuts downsample by average pooling before their 1×1 convolution (ResNet-D's `avg_down`), not by
    a 1×1 convolution of stride 2: on AVX-512 CPUs (an AMD EPYC here) torch 2.14's oneDNN crashes the
    process (SIGSEGV or SIGABRT) computing the weight gradient of an 8→16 1×1 stride-2 channels-last
    convolution for an odd batch size, as a training set's last batch often is. Wider ones
    (64→128 in ResNet-18) do not."""
    if pretrained == HUB:
        raise ValueError("tiny_resnet has no hub weights; pass a local weights file or None")
    model_args = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, avg_down=True)
    return _create_resnet("resnet18", pretrained=pretrained, **{**model_args, **kwargs})
