"""The input check: how unlike the model's training images an image is, so that a photograph, a scanned
page, a rotated or inverted film or a blank image is not answered as if it were a chest X-ray.

A classifier gives four probabilities for any picture, and they sum to one whatever it was: a confident
"Normal" for a photo of a keyboard looks like any other answer. The check needs no second model. Each
image, as the model sees it at its base size, is shrunk to a 16×16 thumbnail (area averages) and
standardised (its own mean 0 and spread 1, so another hospital's brightness and contrast do not count).
The training images' thumbnails share a few patterns (their principal components: a chest's outline,
lungs, mediastinum). An image's **score** is the share of its thumbnail's variance those patterns leave
unexplained: about 0.1–0.5 for chest X-rays, about 1 for a photograph, noise or a page of text.

The **threshold** is the 99th percentile of the scores of the validation images, which the patterns were
not fitted on: about 1 in 100 images like them is flagged (with fewer than 100 validation images, the
highest of their scores). A flagged image is not refused: the answer carries `input_check.unusual`, and
`cxr evaluate` counts them, as a share of a dataset far above 1 % says the data is not what the model was
made for (another view, another modality, another hospital's processing).

Measured on the real sample at 256 px (8 patterns from 80 X-rays, the threshold 0.57 from 20 more): the
other 30 scored up to 0.51, none flagged; photographs and screenshots 1.03–1.56, noise 1.29, a
checkerboard 1.34, a grey ramp 0.63, an inverted film 1.61, a film turned 90° 0.67. A film upside down
(0.51) passes: the check is a guard against the wrong kind of picture, not a quality check of a film.

The fitted reference (the patterns' mean and components) is stored in the checkpoint's weights file, in
its metadata (`checkpoint.BESIDE_WEIGHTS_PREFIX`), so that it travels, is registered and is checked
(`weights_sha256`) with the weights it belongs to, while any loader of the weights reads the model alone;
the card's `input_reference` says how it was fitted and holds the threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

THUMBNAIL = 16
"""Side of the thumbnail an image is compared at: the shape of a chest, not its detail."""
MAX_COMPONENTS = 16
"""At most this many patterns; fewer with fewer training images (one per IMAGES_PER_COMPONENT)."""
IMAGES_PER_COMPONENT = 10
QUANTILE = 0.99
"""The validation scores' quantile taken as the threshold."""
MIN_TRAIN_IMAGES = 20
MIN_VAL_IMAGES = 5
MAX_TRAIN_IMAGES = 4000
"""Training images read to fit the patterns: the split's first (ingest shuffles the rows)."""
MAX_VAL_IMAGES = 2000
ARRAY_PREFIX = "cxr.input_reference."
"""Names of the reference's arrays in the checkpoint's weights file (`checkpoint.BESIDE_WEIGHTS_PREFIX`)."""


def thumbnails(images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """(N, THUMBNAIL²) float64: each uint8 (S, S) image's area-averaged thumbnail, standardised to mean 0
    and spread 1 (a blank image stays all zeros)."""
    import torch

    stacked = np.ascontiguousarray(np.stack(list(images)) if not isinstance(images, np.ndarray) else images)
    if stacked.ndim != 3:
        raise ValueError(f"expected (N, S, S) images, got shape {stacked.shape}")
    with torch.inference_mode():
        pooled = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(stacked).to(torch.float32)[:, None], THUMBNAIL
        )
    flat = pooled.reshape(len(stacked), -1).numpy().astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    spread = flat.std(axis=1, keepdims=True)
    return np.divide(flat, spread, out=np.zeros_like(flat), where=spread > 1e-6)


@dataclass(frozen=True)
class InputReference:
    """The training images' patterns, and the score above which an image counts as unusual."""

    mean: np.ndarray
    """(THUMBNAIL²,) the training thumbnails' mean."""
    components: np.ndarray
    """(k, THUMBNAIL²) their first k principal components, orthonormal rows."""
    threshold: float
    summary: dict[str, Any]
    """How it was fitted (the card's `input_reference`): images, patterns, explained share, threshold."""

    def scores(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """(N,) the share of each uint8 image's thumbnail the patterns leave unexplained; 1.0 for a blank
        image, which has nothing to explain."""
        return self.thumbnail_scores(thumbnails(images))

    def thumbnail_scores(self, flat: np.ndarray) -> np.ndarray:
        """`scores` of images already made `thumbnails`."""
        centred = flat - self.mean
        residual = centred - (centred @ self.components.T) @ self.components
        out = (residual**2).mean(axis=1)
        out[~flat.any(axis=1)] = 1.0
        return out

    def checks(self, images: np.ndarray | Iterable[np.ndarray]) -> list[dict[str, Any]]:
        """Each image's `input_check` as Serve answers it: its score, the threshold, whether it is above."""
        return [
            {
                "score": round(float(s), 4),
                "threshold": round(self.threshold, 4),
                "unusual": bool(s > self.threshold),
            }
            for s in self.scores(images)
        ]

    def arrays(self) -> dict[str, np.ndarray]:
        """The reference as float32 arrays named for the weights file (`save_checkpoint`'s beside_weights)."""
        return {
            f"{ARRAY_PREFIX}mean": self.mean.astype(np.float32),
            f"{ARRAY_PREFIX}components": self.components.astype(np.float32),
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], summary: Mapping[str, Any]
    ) -> InputReference | None:
        """The reference stored by `arrays()` with its card summary; None where either is missing or they
        do not fit together."""
        mean, components = (arrays.get(f"{ARRAY_PREFIX}{n}") for n in ("mean", "components"))
        size = THUMBNAIL * THUMBNAIL
        if mean is None or components is None or "threshold" not in summary:
            return None
        if mean.shape != (size,) or components.ndim != 2 or components.shape[1] != size:
            log.warning("the input check's reference is damaged (shapes %s, %s): images are not checked",
                        mean.shape, components.shape)  # fmt: skip
            return None
        return cls(
            mean=mean.astype(np.float64),
            components=components.astype(np.float64),
            threshold=float(summary["threshold"]),
            summary=dict(summary),
        )


def fit(train: np.ndarray, val: np.ndarray) -> InputReference:
    """The reference of (N, S, S) uint8 training images, its threshold from validation images'."""
    return fit_thumbnails(thumbnails(train), thumbnails(val))


def fit_thumbnails(flat: np.ndarray, val: np.ndarray) -> InputReference:
    """`fit` of the training and validation images' `thumbnails`."""
    count = min(MAX_COMPONENTS, max(1, len(flat) // IMAGES_PER_COMPONENT), len(flat) - 1)
    mean = flat.mean(axis=0)
    _, singular, rows = np.linalg.svd(flat - mean, full_matrices=False)
    explained = float((singular[:count] ** 2).sum() / max((singular**2).sum(), 1e-12))
    # rounded as stored, so that the threshold is the one the stored reference gives
    mean, components = (
        mean.astype(np.float32).astype(np.float64),
        rows[:count].astype(np.float32).astype(np.float64),
    )
    unfitted = InputReference(mean, components, 0.0, {})
    scores = unfitted.thumbnail_scores(val)
    threshold = float(np.quantile(scores, QUANTILE, method="higher"))
    summary = {
        "thumbnail": THUMBNAIL,
        "components": count,
        "explained": round(explained, 4),
        "train_images": len(flat),
        "val_images": len(scores),
        "quantile": QUANTILE,
        "threshold": round(threshold, 6),
        "val_median": round(float(np.median(scores)), 4),
    }
    return InputReference(mean, components, round(threshold, 6), summary)


def split_thumbnails(dataset: str, split: str, limit: int) -> np.ndarray:
    """The `thumbnails` of up to `limit` images of a finished dataset's split (its first: ingest shuffles
    the rows), read in chunks of 512: at most one chunk of pixels is held at a time."""
    from cxrcore.data.ingest import read_chunks, tensor_column

    parts: list[np.ndarray] = []
    taken = 0
    for table in read_chunks(dataset, ["image"], split, rows=512):
        part = thumbnails(tensor_column(table.column("image").to_pylist()[: limit - taken]))
        parts.append(part)
        taken += len(part)
        if taken >= limit:
            break
    return np.concatenate(parts) if parts else np.zeros((0, THUMBNAIL * THUMBNAIL))


def fit_dataset(dataset: str) -> InputReference | None:
    """The reference of a finished dataset (its train split's patterns, its val split's threshold), or
    None, with a log line, where the splits are too small to say what is usual."""
    started = time.perf_counter()
    train = split_thumbnails(dataset, "train", MAX_TRAIN_IMAGES)
    val = split_thumbnails(dataset, "val", MAX_VAL_IMAGES)
    if len(train) < MIN_TRAIN_IMAGES or len(val) < MIN_VAL_IMAGES:
        log.info(
            "no input check: %d training and %d validation images are too few to say what a usual input is "
            "(%d and %d at least)", len(train), len(val), MIN_TRAIN_IMAGES, MIN_VAL_IMAGES,
        )  # fmt: skip
        return None
    reference = fit_thumbnails(train, val)
    log.debug("input check fitted in %.2f s: %s", time.perf_counter() - started, reference.summary)
    return reference


def plain(reference: InputReference | None) -> dict[str, Any] | None:
    """The reference as plain lists (a worker's loop config), or None."""
    if reference is None:
        return None
    return {
        "mean": reference.mean.tolist(),
        "components": reference.components.tolist(),
        "summary": reference.summary,
    }


def from_plain(value: Mapping[str, Any] | None) -> InputReference | None:
    if not value:
        return None
    summary = dict(value["summary"])
    return InputReference(
        np.asarray(value["mean"], dtype=np.float64),
        np.asarray(value["components"], dtype=np.float64),
        float(summary["threshold"]),
        summary,
    )
