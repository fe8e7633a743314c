"""The Predictor shared by batch evaluation and Ray Serve: rebuilt from a checkpoint's card alone."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cxrcore.calibration import apply_temperature
from cxrcore.checkpoint import ModelCard, load_model
from cxrcore.data.batches import masks_to_unit, model_inputs, to_unit
from cxrcore.data.spec import InputSpec
from cxrcore.data.transforms import resize_image, resize_mask
from cxrcore.segmenter import predict_masks

log = logging.getLogger(__name__)


class Predictor:
    """Class probabilities (or lung masks) for uint8 grayscale images of any size.

    Images go through exactly the training path: resized to the dataset's base size as at ingest,
    then to the model's size on the device, normalised as the card's input spec says.

    With `graph`, the forward passes run as a frozen TorchScript graph of the model (`as_graph`), checked
    at load to give its outputs; `model` stays the eager module (Grad-CAM hooks into it).
    """

    def __init__(
        self, model: torch.nn.Module, card: ModelCard, device: str | torch.device = "cpu",
        segmenter: Predictor | None = None, *, graph: bool = False,
    ) -> None:  # fmt: skip
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)
        self.spec = InputSpec.from_dict(card.input_spec)
        self.base_size = int(card.data.get("size") or self.spec.image_size)
        self.segmenter = segmenter
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            as_graph(self.model, self.spec, self.device, card.name) if graph else self.model
        )

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str | torch.device = "cpu", segmenter: str | Path | None = None,
        *, graph: bool = False,
    ) -> Predictor:  # fmt: skip
        """Load a checkpoint; a dual-channel model also loads the segmenter named on its card (or given)."""
        model, card = load_model(directory, device)
        spec = InputSpec.from_dict(card.input_spec)
        segmenter_dir = segmenter or card.segmenter
        helper = None
        if "mask" in spec.channels and segmenter_dir:
            helper = cls.from_checkpoint(segmenter_dir, device, graph=graph)
        return cls(model, card, device, helper, graph=graph)

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
        return self.forward(model_inputs(self.spec, unit, mask)).float()

    @torch.inference_mode()
    def segment(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 0/255 lung masks (B, base, base) for a segmentation model."""
        unit = to_unit(self.base_images(images), self.base_size)
        masks = self.mask_source(unit)
        return (masks[:, 0] * 255).to(torch.uint8).cpu().numpy()

    def mask_source(self, unit_images: torch.Tensor) -> torch.Tensor:
        """0/1 masks (B, 1, S, S) for [0, 1] images (B, 1, S, S) of any size S."""
        return predict_masks(self.forward, self.spec, unit_images)

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


def as_graph(
    model: torch.nn.Module, spec: InputSpec, device: torch.device, name: str = "model"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model`'s eval-mode forward as a frozen TorchScript graph, or `model` itself where none gives its
    outputs.

    A graph runs all its ops in C++ without taking Python's lock between them. In a Serve replica the
    model thread shares that lock with the event loop that takes requests; the eager forward then waits
    for it between ops (cnn_lstm at 128 px, batch 16, one thread: 58 images/s alone, 28 beside a busy
    Python thread; the graph 63 and 66). The graph is traced at batch 2 and must reproduce the model's
    outputs at batch 3 on other inputs, which catches a trace that fixed a batch size or took a branch on
    the data; a model that cannot be traced, or differs by more than float rounding, is served eager.
    """
    channels, size = len(spec.channels), spec.image_size
    generator = torch.Generator().manual_seed(0)
    example, probe = (torch.rand(n, channels, size, size, generator=generator).to(device) for n in (2, 3))
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.compile and torch.export, neither of which
            # gives a GIL-free forward for any batch size without a C++ toolchain at load; the
            # TracerWarnings come from shape checks inside torch's own modules (nn.LSTM, interpolate).
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            graph = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
            expected, got = model(probe).float(), graph(probe).float()
    except Exception as exc:  # an untraceable model still serves, eager
        log.warning("serving %s eager: it cannot be traced (%s: %s)", name, type(exc).__name__, exc)
        return model
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        log.warning("serving %s eager: its traced graph does not give its outputs", name)
        return model
    return graph
