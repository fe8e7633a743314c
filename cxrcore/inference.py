"""The Predictor shared by batch evaluation and Ray Serve: rebuilt from a checkpoint's card alone."""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from cxrcore.calibration import apply_temperature
from cxrcore.checkpoint import ModelCard, load_checkpoint
from cxrcore.data.batches import masks_to_unit, model_inputs, to_unit
from cxrcore.data.spec import InputSpec
from cxrcore.data.transforms import resize_image, resize_mask, scale_to_uint8, to_gray_uint8
from cxrcore.inputcheck import InputReference
from cxrcore.segmenter import predict_masks

log = logging.getLogger(__name__)
T = TypeVar("T")

ImageLike = Any
"""What a Predictor takes as one image (`gray_image`): a uint8 (H, W) array as `cxr serve` decodes an
upload, or a file path, a PIL image, another array or a tensor, read as ingest reads such a file."""


FORWARD_SWEEP_BUDGET_S = 3.0
"""How long `Predictor.fit_forward_batch` may measure: about 1.5 s for cnn_lstm at 128 px on one thread,
a fraction of that for the tiny test models; a model too slow to sweep in time keeps whole batches."""
FORWARD_SWEEP_TOLERANCE = 0.03
"""Batch sizes within this share of the fastest count as fast: the largest of them is taken (fewer calls)."""


@dataclass(frozen=True)
class ForwardSweep:
    """`sweep_forward`'s images/s per batch size (median of the rounds) and the size chosen, if any."""

    images_per_s: dict[int, float]
    best: int | None
    rounds: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "images_per_s": {str(size): rate for size, rate in self.images_per_s.items()},
            "best": self.best,
            "rounds": self.rounds,
            "seconds": self.seconds,
        }


def batch_sizes(max_batch_size: int) -> list[int]:
    """The sizes a sweep measures: the powers of two below `max_batch_size`, then itself.

    >>> batch_sizes(8), batch_sizes(12), batch_sizes(1)
    ([1, 2, 4, 8], [1, 2, 4, 8, 12], [1])
    """
    sizes = [
        1 << power for power in range(max(1, max_batch_size).bit_length()) if 1 << power < max_batch_size
    ]
    return [*sizes, max(1, max_batch_size)]


def fastest_batch(images_per_s: Mapping[int, float], tolerance: float = FORWARD_SWEEP_TOLERANCE) -> int:
    """The largest batch size whose images/s is within `tolerance` of the best.

    >>> fastest_batch({1: 89.0, 2: 93.0, 4: 95.0, 8: 77.0})
    4
    >>> fastest_batch({1: 89.0, 2: 93.0, 4: 95.0, 8: 94.0})
    8
    """
    best = max(images_per_s.values())
    return max(size for size, rate in images_per_s.items() if rate >= (1 - tolerance) * best)


def sweep_forward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    example: Callable[[int], torch.Tensor],
    sizes: Sequence[int],
    *,
    rounds: int = 3,
    budget_s: float = FORWARD_SWEEP_BUDGET_S,
    min_s: float = 0.03,
    clock: Callable[[], float] = time.perf_counter,
) -> ForwardSweep:
    """Images/s of `forward` at each of `sizes` (inputs from `example(size)`), measured in turns.

    Each size is warmed up once, then timed over at least two calls and `min_s`, `rounds` times in
    turns; each keeps its median, as a shared machine's speed drifts within seconds. Rounds after the
    first stop once `budget_s` is spent; a first round that cannot finish in it chooses nothing.
    """
    start = clock()
    inputs = {size: example(size) for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    with torch.inference_mode():
        for size in sizes:
            if clock() - start > budget_s:
                return ForwardSweep({}, None, 0, round(clock() - start, 3))
            _sync(forward(inputs[size]))
        done = 0
        while done < rounds and (done == 0 or clock() - start <= budget_s):
            for size in sizes:
                if done == 0 and clock() - start > budget_s:
                    return ForwardSweep({}, None, 0, round(clock() - start, 3))
                calls, began = 0, clock()
                while calls < 2 or clock() - began < min_s:
                    _sync(forward(inputs[size]))
                    calls += 1
                times[size].append((clock() - began) / (calls * size))
            done += 1
    rates = {size: round(1 / statistics.median(per_image), 1) for size, per_image in times.items()}
    return ForwardSweep(rates, fastest_batch(rates), done, round(clock() - start, 3))


def in_passes(
    forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, size: int | None
) -> torch.Tensor:
    """`forward(inputs)` as passes of at most `size` inputs, concatenated (None: one pass)."""
    if size is None or len(inputs) <= size:
        return forward(inputs)
    return torch.cat([forward(part) for part in inputs.split(size)])


class PassSizes:
    """Images per forward pass chosen from timed passes over real batches, as cudnn.benchmark chooses
    kernels: the first full batches run as passes of each candidate size in turns, `rounds` times (their
    outputs are kept, no work is wasted), then every batch as passes of the fastest (`fastest_batch` of
    each size's best time).

    On a CPU a forward slows per image once a batch's activations outgrow the caches, at a size that
    depends on the model, the image size, the threads and the machine (128 px, images/s as one pass of 64
    against passes of 8: on 2 threads cnn_lstm 108 / 156, the U-Net 18.5 / 23.4, dual_cnn 53 / 58,
    resnet18 104 / 102, its best 107 at 16; the U-Net on one thread 8.4 / 10.9, 11.5 at 2).
    """

    def __init__(
        self, batch_size: int, rounds: int = 2, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.batch_size = batch_size
        self._clock = clock
        # One image a pass is never the fastest for these models and costs most to try.
        candidates = [size for size in batch_sizes(batch_size) if size > 1 or batch_size == 1][::-1]
        self._trials = candidates * rounds
        self._tried = 0
        self.seconds_per_image: dict[int, float] = {}
        self.chosen: int | None = None

    def run(self, passes: Callable[[int], T], images: int) -> T:
        """`passes(size)`: a batch of `images` as passes of `size` images: a size on trial and timed for a
        full batch while trials are left; else the chosen size (None before any: the batch whole)."""
        if images < self.batch_size or self._tried == len(self._trials):
            return passes(self.chosen or self.batch_size)
        size = self._trials[self._tried]
        began = self._clock()
        result = passes(size)
        per_image = (self._clock() - began) / images
        self.seconds_per_image[size] = min(per_image, self.seconds_per_image.get(size, per_image))
        self._tried += 1
        if self._tried == len(self._trials):
            rates = {size: 1 / max(seconds, 1e-9) for size, seconds in self.seconds_per_image.items()}
            self.chosen = fastest_batch(rates)
            log.info(
                "forward passes of %d images (images/s by size %s)",
                self.chosen, {size: round(rate, 1) for size, rate in sorted(rates.items())},
            )  # fmt: skip
        return result


class BatchedPredictions:
    """A Predictor's outputs over many images in batches of `batch_size`, each run as forward passes of
    the size `PassSizes` finds fastest (the Predictor's and its segmenter's `forward_batch_size`)."""

    def __init__(
        self,
        predictor: Predictor,
        batch_size: int,
        rounds: int = 2,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.predictor = predictor
        self.batch_size = batch_size
        self.sizes = PassSizes(batch_size, rounds, clock)

    @property
    def chosen(self) -> int | None:
        return self.sizes.chosen

    @property
    def seconds_per_image(self) -> dict[int, float]:
        return self.sizes.seconds_per_image

    def run(
        self, predict: Callable[..., np.ndarray], *inputs: Sequence[Any] | np.ndarray | None
    ) -> np.ndarray:
        """`predict(*slices)` (a Predictor method) over `inputs` in batches of `batch_size`, concatenated;
        an input of None stays None."""
        count = len(next(item for item in inputs if item is not None))
        outputs = []
        for start in range(0, count, self.batch_size):
            batch = [None if item is None else item[start : start + self.batch_size] for item in inputs]

            def passes(size: int, batch: list[Any] = batch) -> np.ndarray:
                self._set(size)
                return predict(*batch)

            outputs.append(self.sizes.run(passes, min(self.batch_size, count - start)))
        return np.concatenate(outputs)

    def _set(self, size: int) -> None:
        self.predictor.forward_batch_size = size
        if isinstance(self.predictor.segmenter, Predictor):
            self.predictor.segmenter.forward_batch_size = size


def _sync(output: torch.Tensor) -> None:
    """Wait for the device to finish `output` (a no-op on a CPU)."""
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)


def gray_image(image: ImageLike) -> np.ndarray:
    """One image as the uint8 (H, W) grayscale a model reads, as ingest and `cxr serve` make it.

    A file path (PNG, JPEG, TIFF, BMP, DICOM) is decoded as ingest decodes it, a PIL image of any mode as
    ingest converts it. An array or tensor of (H, W), (H, W, 1) or (1, H, W): uint8 as it is; values
    0–255 of another integer type as those levels; uint16 (a 16-bit file read with numpy) and other
    integers mapped from their range onto 0–255, as ingest does a 16-bit file; floats within [0, 1] scaled
    by 255, other floats mapped from their range. An (H, W, 3 or 4) uint8 array is taken for RGB(A).
    Anything else raises ValueError saying what it got: a cast to uint8 had wrapped 16-bit values modulo
    256 and read a [0, 1] float image as black, both scored without a word.

    >>> gray_image(np.array([[0.0, 0.5], [1.0, 0.25]])).tolist()
    [[0, 128], [255, 64]]
    >>> gray_image(np.array([[1000, 3000], [2000, 1000]], dtype=np.uint16)).tolist()
    [[0, 255], [128, 0]]
    >>> gray_image(np.zeros((8, 8, 2)))
    Traceback (most recent call last):
    ...
    ValueError: an image of shape (8, 8, 2): give one grayscale image of (H, W), or RGB(A) of (H, W, 3 or 4)
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2:
        return image  # what serving decodes: no copy, no check beyond these
    if isinstance(image, str | os.PathLike):
        from cxrcore.data.layout import decode_image

        return decode_image(Path(image).read_bytes(), str(image))
    if hasattr(image, "mode") and hasattr(image, "getbands"):  # a PIL image
        return to_gray_uint8(image)
    pixels = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if pixels.ndim == 3 and 1 in (pixels.shape[0], pixels.shape[-1]):
        pixels = pixels.reshape(pixels.shape[1:] if pixels.shape[0] == 1 else pixels.shape[:2])
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) and pixels.dtype == np.uint8:
        from PIL import Image as PILImage

        return to_gray_uint8(PILImage.fromarray(pixels, "RGB" if pixels.shape[-1] == 3 else "RGBA"))
    if pixels.ndim != 2 or pixels.dtype.kind not in "biuf":
        raise ValueError(
            f"an image of shape {pixels.shape}"
            + ("" if pixels.dtype.kind in "biuf" else f" and dtype {pixels.dtype}")
            + ": give one grayscale image of (H, W), or RGB(A) of (H, W, 3 or 4)"
            + (" as uint8" if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) else "")
        )
    if pixels.size == 0:
        raise ValueError(f"an empty image (shape {pixels.shape})")
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise ValueError("an image with NaN or infinite values")
        if pixels.min() >= 0 and pixels.max() <= 1:
            return np.round(pixels * 255.0).astype(np.uint8)
        return scale_to_uint8(pixels)
    if pixels.dtype.kind == "b":
        return pixels.astype(np.uint8) * np.uint8(255)
    if pixels.dtype != np.uint16 and pixels.min() >= 0 and pixels.max() <= 255:
        return pixels.astype(np.uint8)
    return scale_to_uint8(pixels)


def _batch(images: Sequence[ImageLike]) -> list[np.ndarray]:
    """A batch's images as `gray_image` makes them; one image alone is refused, as it would be read as a
    batch of its rows (a (299, 299) array scored as 299 images, a (299, 299, 3) one as 299 of 299 × 3). A
    (B, H, W) array is a batch; so is a (B, H, C) one only where C is not 1, 3 or 4, which no X-ray is."""
    alone = isinstance(images, str | os.PathLike) or hasattr(images, "getbands")
    if isinstance(images, np.ndarray | torch.Tensor):  # (H, W), or (H, W, C) of a gray or RGB(A) image
        alone = images.ndim < 3 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4))
    if alone:
        raise ValueError("a Predictor takes a batch of images: pass one image as [image]")
    if len(images) == 0:
        raise ValueError("no images to predict")
    return [gray_image(image) for image in images]


class MaskDrawer(Protocol):
    """What a Predictor's segmenter is to it: another Predictor, or Serve's SegmenterClient, whose masks
    come from the Segmenter deployment."""

    def mask_source(self, unit_images: torch.Tensor) -> torch.Tensor: ...


class Predictor:
    """Class probabilities (or lung masks) for uint8 grayscale images of any size.

    Images go through exactly the training path: resized to the dataset's base size as at ingest,
    then to the model's size on the device, normalised as the card's input spec says.

    With `graph`, the forward passes run as a frozen TorchScript graph of the model (`as_graph`), checked
    at load to give its outputs; `model` stays the eager module (Grad-CAM hooks into it).

    `forward_batch_size`, when set, splits a larger batch into forward passes of at most that many
    images (`fit_forward_batch` measures the size at which this process's forward runs fastest).

    `input_reference` (`cxrcore.inputcheck`, stored in the checkpoint) checks how unlike the training
    images each image is (`input_checks`); None: images are not checked.
    """

    def __init__(
        self, model: torch.nn.Module, card: ModelCard, device: str | torch.device = "cpu",
        segmenter: MaskDrawer | None = None, *, graph: bool = False,
        input_reference: InputReference | None = None,
    ) -> None:  # fmt: skip
        self.input_reference = input_reference
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)
        self.spec = InputSpec.from_dict(card.input_spec)
        self.base_size = int(card.data.get("size") or self.spec.image_size)
        self.segmenter: MaskDrawer | None = segmenter
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            as_graph(self.model, self.spec, self.device, card.name) if graph else self.model
        )
        self.forward_batch_size: int | None = None

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str | torch.device = "cpu", segmenter: str | Path | None = None,
        *, graph: bool = False,
    ) -> Predictor:  # fmt: skip
        """Load a checkpoint; a dual-channel model also loads the segmenter named on its card (or given)."""
        loaded = load_checkpoint(directory, device)
        spec = InputSpec.from_dict(loaded.card.input_spec)
        segmenter_dir = segmenter or loaded.card.segmenter
        helper = None
        if "mask" in spec.channels and segmenter_dir:
            helper = cls.from_checkpoint(segmenter_dir, device, graph=graph)
        return cls(
            loaded.model, loaded.card, device, helper, graph=graph, input_reference=loaded.input_reference
        )

    @classmethod
    def from_registry(
        cls, registry: str | Path | Any, ref: str = "production", device: str | torch.device = "cpu",
        *, graph: bool = False,
    ) -> Predictor:  # fmt: skip
        """A registered version (an alias, NAME:N, or NAME for its latest) of a registry (its location or a
        ModelRegistry), with its lung segmenter found as `cxr serve` finds it: in that registry, also after
        the registry was moved or copied, where the card's own folder for it no longer exists."""
        from cxrcore.registry import ModelRegistry

        models = registry if isinstance(registry, ModelRegistry) else ModelRegistry(str(registry))
        version = models.get(ref)
        segmenter = version.card.segmenter
        helper = models.segmenter_checkpoint(segmenter, of=version.ref) if segmenter else None
        return cls.from_checkpoint(models.local_checkpoint(version.ref), device, helper, graph=graph)

    @property
    def needs_mask(self) -> bool:
        return "mask" in self.spec.channels

    def base_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """uint8 (B, base, base) on the device: each image (`gray_image`) resized as ingest does."""
        return torch.from_numpy(self.base_arrays(images)).to(self.device)

    def base_arrays(self, images: Sequence[ImageLike]) -> np.ndarray:
        """uint8 (B, base, base) numpy: each image (`gray_image`) resized as ingest does."""
        return np.stack([resize_image(image, self.base_size) for image in _batch(images)])

    def input_checks(self, images: Sequence[ImageLike]) -> list[dict[str, Any]] | None:
        """Each image's input check (`InputReference.checks`: score, threshold, unusual) at the base size
        the model sees it at; None where the checkpoint has no reference."""
        if self.input_reference is None:
            return None
        return self.input_reference.checks(self.base_arrays(images))

    @torch.inference_mode()
    def predict_checked(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[dict[str, Any]] | None]:
        """`predict_proba` and `input_checks` of the same images, each resized once (what Serve answers)."""
        base = self.base_arrays(images)
        checks = self.input_reference.checks(base) if self.input_reference is not None else None
        return self.predict_proba(list(base)), checks

    @property
    def temperature(self) -> float:
        """The card's temperature: predict_proba serves softmax(logits / temperature)."""
        return self.card.temperature

    @torch.inference_mode()
    def predict_proba(
        self,
        images: Sequence[ImageLike],
        masks: Sequence[np.ndarray | None] | None = None,
        *,
        calibrated: bool = True,
    ) -> np.ndarray:
        """(B, num_classes) probabilities of a batch of images (each as `gray_image` reads it: a uint8 (H, W)
        array, a file path, a PIL image, ...); missing masks come from the segmenter for dual-channel models.

        Calibrated by the card's temperature unless `calibrated` is False (plain softmax of the logits);
        the most probable class is the same either way.
        """
        logits = self._logits(images, masks)
        return apply_temperature(logits, self.temperature if calibrated else 1.0).cpu().numpy()

    @torch.inference_mode()
    def predict_logits(
        self, images: Sequence[ImageLike], masks: Sequence[np.ndarray | None] | None = None
    ) -> np.ndarray:
        """(B, num_classes) raw float32 logits, before temperature scaling."""
        return self._logits(images, masks).cpu().numpy()

    def _logits(self, images: Sequence[ImageLike], masks: Sequence[np.ndarray | None] | None) -> torch.Tensor:
        if self.spec.task != "classify":
            raise ValueError(f"{self.card.name} is a {self.spec.task} model; use segment()")
        unit = to_unit(self.base_images(images), self.spec.image_size)
        mask = None
        if self.needs_mask:
            mask = self._masks(unit, images, masks)
        return self._forward(model_inputs(self.spec, unit, mask)).float()

    @torch.inference_mode()
    def segment(self, images: Sequence[ImageLike]) -> np.ndarray:
        """uint8 0/255 lung masks (B, base, base) for a segmentation model."""
        unit = to_unit(self.base_images(images), self.base_size)
        masks = self.mask_source(unit)
        return (masks[:, 0] * 255).to(torch.uint8).cpu().numpy()

    def mask_source(self, unit_images: torch.Tensor) -> torch.Tensor:
        """0/1 masks (B, 1, S, S) for [0, 1] images (B, 1, S, S) of any size S."""
        return predict_masks(self._forward, self.spec, unit_images)

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return in_passes(self.forward, inputs, self.forward_batch_size)

    def fit_forward_batch(
        self, max_batch_size: int, budget_s: float = FORWARD_SWEEP_BUDGET_S
    ) -> ForwardSweep:
        """Measure the forward at batch sizes up to `max_batch_size` and split larger batches into forward
        passes of the fastest (`forward_batch_size`); a sweep cut short by `budget_s` leaves batches whole.

        On a CPU a convolution's activations outgrow the core's caches as the batch grows, and where that
        happens depends on the model, the image size, the threads and the machine: one thread, 128 px,
        images/s at batch 2 / 8 / 16 (interleaved, median of 3): cnn_lstm 94 / 96 / 79, dual_cnn 37 / 30 /
        28, unet 12.3 / 11.0 / 9.4; batch 16 as four passes of 4 ran at the batch-4 speed (96, 31, 11.4).
        So a server can batch as many requests as its callers send, which spreads its per-call work,
        while each forward pass runs at the size this process runs fastest. The measurement also warms
        the forward up at every size, which a frozen graph's first calls need.
        """
        sweep = sweep_forward(self.forward, self._example, batch_sizes(max_batch_size), budget_s=budget_s)
        self.forward_batch_size = sweep.best
        return sweep

    def _example(self, batch_size: int) -> torch.Tensor:
        channels, size = len(self.spec.channels), self.spec.image_size
        generator = torch.Generator().manual_seed(batch_size)
        return torch.rand(batch_size, channels, size, size, generator=generator).to(self.device)

    def _masks(
        self, unit: torch.Tensor, images: Sequence[ImageLike], masks: Sequence[np.ndarray | None] | None
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
            # Freezing folds each BatchNorm into its convolution, which changes the weights' float
            # rounding; on a GPU, whose float32 convolutions run in TF32 by default, the folded graph's
            # outputs then differ from the model's by ~1e-3 (emulated: resnet18 1.75e-3, cnn_lstm 9.6e-4),
            # the check below would serve every model eager, and were it looser the served scores would
            # not be the validated ones. There the graph keeps the model's own arithmetic.
            numerics = device.type != "cuda"
            graph = torch.jit.freeze(
                torch.jit.trace(model, example, check_trace=False), optimize_numerics=numerics
            )
            expected, got = model(probe).float(), graph(probe).float()
    except Exception as exc:  # an untraceable model still serves, eager
        log.warning("serving %s eager: it cannot be traced (%s: %s)", name, type(exc).__name__, exc)
        return model
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        log.warning("serving %s eager: its traced graph does not give its outputs", name)
        return model
    return graph
