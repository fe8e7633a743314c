"""Grad-CAM: which regions of an X-ray drove the classifier's prediction, plus the lung mask it saw."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrcore.calibration import apply_temperature
from cxrcore.data.batches import model_inputs, to_unit
from cxrcore.inference import Predictor


@dataclass(frozen=True)
class Explanation:
    """A prediction with its Grad-CAM heatmap and the lung mask used, both at the model's input size."""

    probabilities: np.ndarray
    """(num_classes,) class probabilities of the explained forward pass."""
    target: int
    """Index of the class the heatmap explains (the predicted one)."""
    heatmap: np.ndarray
    """uint8 (S, S), 255 where the target class's evidence is strongest; all 0 where `empty`."""
    mask: np.ndarray | None
    """uint8 (S, S) 0/255 lung mask fed to a dual-channel model; None for image-only models."""
    empty: bool = False
    """No region adds to the target's score (every weighted activation is negative): the blank heatmap
    says Grad-CAM found nothing to show, not that the image has no evidence."""


def _feature_map(fired: list[tuple[nn.Module, Any]]) -> torch.Tensor:
    """The last convolutional block's output, from the modules' outputs in the order they ran.

    Grad-CAM weighs the deepest feature map as the layers after it read it: after the last convolution's
    normalisation and activation (and the residual sum of a ResNet block), not the convolution's raw
    output, whose sign means little before BatchNorm shifts each channel. Measured on a tiny_dual_cnn
    trained on real X-rays, the raw convolution output was negative everywhere for 4 of 5 confident COVID
    calls, and their heatmaps came out blank. The block's output is the last one after the last
    convolution with the convolution's shape; a pooling that follows (the CNN+LSTM's rows) changes it.
    """
    convs = [i for i, (module, _) in enumerate(fired) if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError("the model ran no Conv2d layer for Grad-CAM")
    shape = fired[convs[-1]][1].shape
    return next(
        output
        for _, output in reversed(fired[convs[-1] :])
        if isinstance(output, torch.Tensor) and output.shape == shape
    )


def grad_cam(
    model: nn.Module, inputs: torch.Tensor, target: int | None = None, layer: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (B, H, W) in [0, 1] at the input size, and the (B, num_classes) logits.

    The map is ReLU(Σ_c mean(∂score/∂A_c) · A_c) over `layer`'s output A; by default the module the
    model's registry entry names (`cam_layer`), else the last convolutional block's output (see
    _feature_map); upsampled and scaled to its maximum, or all 0 where no region adds to the score more
    than another (none does, or the feature map is one cell). `target` defaults to each image's predicted
    class. Not thread-safe with other calls on the same model (the hooks see every forward while they are
    registered).
    """
    fired: list[tuple[nn.Module, Any]] = []
    layer = layer if layer is not None else declared_cam_layer(model)
    watched = [layer] if layer is not None else list(model.modules())
    hooks = [
        module.register_forward_hook(lambda module, _args, output: fired.append((module, output)))
        for module in watched
    ]
    try:
        # cuDNN's RNN kernels refuse backward in eval mode (the CNN-LSTM); the native ones do not. Other
        # models keep cuDNN's convolutions, many times faster on a GPU than the native ones.
        recurrent = any(isinstance(module, torch.nn.RNNBase) for module in model.modules())
        without_cudnn = torch.backends.cudnn.flags(enabled=False) if recurrent else contextlib.nullcontext()
        with torch.enable_grad(), without_cudnn:
            logits = model(inputs.detach().requires_grad_(True))
            features = fired[-1][1] if layer is not None else _feature_map(fired)
            targets = logits.argmax(dim=1) if target is None else torch.full_like(logits[:, 0], target).long()
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, features)
    finally:
        for hook in hooks:
            hook.remove()
        fired.clear()
    activations = features.detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    # A map without any spatial variation places nothing: a 1×1 feature map (a small input through a deep
    # network) came out as 255 everywhere, read as "evidence everywhere" with heatmap_empty false.
    flat = cam.flatten(1)
    cam = cam * (flat.amax(dim=1) > flat.amin(dim=1))[:, None, None, None]
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return cam / peak, logits.detach()


def declared_cam_layer(model: nn.Module) -> nn.Module | None:
    """The module the registry entry of a model built by create_model names for Grad-CAM, if it names one
    (`register_model(..., cam_layer=)`); None for any other model."""
    from cxrcore.models import get_build_args, get_model_entry

    try:
        name = get_model_entry(get_build_args(model)["name"]).cam_layer
    except ValueError:  # not built by create_model
        return None
    return model.get_submodule(name) if name else None


def explain(predictor: Predictor, image: np.ndarray) -> Explanation:
    """Probabilities, Grad-CAM heatmap and lung mask for one uint8 image, through the Predictor's path.

    The input is built as `Predictor.predict_proba` builds it (base size, model size, mask from the
    predictor's segmenter), so the probabilities match a plain prediction.
    """
    if predictor.spec.task != "classify":
        raise ValueError(f"{predictor.card.name} is a {predictor.spec.task} model; nothing to explain")
    unit = to_unit(predictor.base_images([image]), predictor.spec.image_size)
    mask = None
    if predictor.needs_mask:
        if predictor.segmenter is None:
            raise ValueError(f"{predictor.card.name} needs a lung mask: serve it with a segmenter checkpoint")
        with torch.no_grad():
            mask = predictor.segmenter.mask_source(unit)
    heatmap, logits = grad_cam(predictor.model, model_inputs(predictor.spec, unit, mask))
    probabilities = apply_temperature(logits.float(), predictor.temperature)[0].cpu().numpy()  # as /predict
    return Explanation(
        probabilities=probabilities,
        target=int(probabilities.argmax()),
        heatmap=(heatmap[0] * 255).round().to(torch.uint8).cpu().numpy(),
        mask=None if mask is None else (mask[0, 0] * 255).to(torch.uint8).cpu().numpy(),
        empty=bool(heatmap[0].max() == 0),
    )
