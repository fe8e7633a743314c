"""The Predictor shared by batch evaluation and Ray Serve: rebuilt from a checkpoint's card alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cxrcore.calibration import apply_temperature
from cxrcore.checkpoint import ModelCard, load_model
from cxrcore.data.batches import masks_to_unit, model_inputs, to_unit
from cxrcore.data.spec import InputSpec
from cxrcore.data.transforms import resize_image, resize_mask
from cxrcore.segmenter import predict_masks


class Predictor:
    """Class probabilities (or lung masks) for uint8 grayscale images of any size.

    Images go through exactly the training path: resized to the dataset's base size as at ingest,
    then to the model's size on the device, normalised as the card's input spec says.
    """

    def __init__(
        self, model: torch.nn.Module, card: ModelCard, device: str | torch.device = "cpu",
        segmenter: Predictor | None = None,
    ) -> None:  # fmt: skip
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)
        self.spec = InputSpec.from_dict(card.input_spec)
        self.base_size = int(card.data.get("size") or self.spec.image_size)
        self.segmenter = segmenter

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str | torch.device = "cpu", segmenter: str | Path | None = None
    ) -> Predictor:
        """Load a checkpoint; a dual-channel model also loads the segmenter named on its card (or given)."""
        model, card = load_model(directory, device)
        spec = InputSpec.from_dict(card.input_spec)
        segmenter_dir = segmenter or card.segmenter
        helper = None
        if "mask" in spec.channels and segmenter_dir:
            helper = cls.from_checkpoint(segmenter_dir, device)
        return cls(model, card, device, helper)

    @property
    def needs_mask(self) -> bool:
        return "mask" in self.spec.channels

    def base_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (B, base, base) on the device: each image resized as ingest does."""
        stacked = np.stack(
            [resize_image(np.asarray(image, dtype=np.uint8), self.base_size) for image in images]
        )
        return torch.from_numpy(stacked).to(self.device)

    @property
    def temperature(self) -> float:
        """The card's temperature: predict_proba serves softmax(logits / temperature)."""
        return self.card.temperature

    @torch.inference_mode()
    def predict_proba(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
        *,
        calibrated: bool = True,
    ) -> np.ndarray:
        """(B, num_classes) probabilities; missing masks come from the segmenter for dual-channel models.

        Calibrated by the card's temperature unless `calibrated` is False (plain softmax of the logits);
        the most probable class is the same either way.
        """
        logits = self._logits(images, masks)
        return apply_temperature(logits, self.temperature if calibrated else 1.0).cpu().numpy()

    @torch.inference_mode()
    def predict_logits(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None
    ) -> np.ndarray:
        """(B, num_classes) raw float32 logits, before temperature scaling."""
        return self._logits(images, masks).cpu().numpy()

    def _logits(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None
    ) -> torch.Tensor:
        if self.spec.task != "classify":
            raise ValueError(f"{self.card.name} is a {self.spec.task} model; use segment()")
        unit = to_unit(self.base_images(images), self.spec.image_size)
        mask = None
        if self.needs_mask:
            mask = self._masks(unit, images, masks)
        return self.model(model_inputs(self.spec, unit, mask)).float()

    @torch.inference_mode()
    def segment(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 0/255 lung masks (B, base, base) for a segmentation model."""
        unit = to_unit(self.base_images(images), self.base_size)
        masks = self.mask_source(unit)
        return (masks[:, 0] * 255).to(torch.uint8).cpu().numpy()

    def mask_source(self, unit_images: torch.Tensor) -> torch.Tensor:
        """0/1 masks (B, 1, S, S) for [0, 1] images (B, 1, S, S) of any size S."""
        return predict_masks(self.model, self.spec, unit_images)

    def _masks(
        self, unit: torch.Tensor, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None
    ) -> torch.Tensor:
        given = list(masks) if masks is not None else [None] * len(images)
        out = torch.zeros_like(unit)
        missing = [i for i, m in enumerate(given) if m is None]
        present = [i for i, m in enumerate(given) if m is not None]
        if present:
            stacked = np.stack([resize_mask(np.asarray(given[i]), self.base_size) for i in present])
            out[present] = masks_to_unit(torch.from_numpy(stacked).to(self.device), self.spec.image_size)
        if missing:
            if self.segmenter is None:
                raise ValueError(
                    f"{self.card.name} needs a lung mask: send one, or serve it with a segmenter checkpoint"
                )
            out[missing] = self.segmenter.mask_source(unit[missing])
        return out
