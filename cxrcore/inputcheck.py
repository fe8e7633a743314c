"""The input check: how unlike the model's training images an image is, so that a photograph, a scanned
page, a rotated or inverted film or a blank image is not answered as if it were a chest X-ray.

A classifier gives four probabilities for any picture, and they sum to one whatever it was: a confident
"Normal" for a photo of a keyboard looks like any other answer. The check needs no second model. Each
image, as the model sees it at its base size, is shrunk to a 16×16 thumbnail (area averages) and
standardised (its own mean 0 and spread 1, so another hospital's brightness and contrast do not count).
The training images' thumbnails share a few patterns (their principal components: a chest's outline,
lungs, mediastinum). An image's **score** is the share of its thumbnail's variance those patterns leave
unexplained: about 0.1–0.5 for chest X-rays, about 1 for a photograph, noise or a page of text. Its
**pattern distance** (Hotelling's T²) is how far it lies from the training images within those patterns: a
ramp or a blob they explain, but in amounts no chest X-ray has.

The **thresholds** are set on images the patterns were not fitted on (`fit_thumbnails`): the validation
split's, and each training image's under the patterns of the other folds. Each statistic is cut at its
99.5th percentile: about 1 in 100 usual images is flagged, at most 2 in n + 1 where n (under 200) were
pooled (`expected_share`). A flagged image is not refused: the answer carries `input_check.unusual`, and
`cxr evaluate` counts them, warning where so many are unlikely among usual images (another view, crop or
modality, or not chest X-rays).

Measured on the real sample (40 shuffles at 128 px: 104 to fit, 13 to validate, 13 scored): 1.2 % of
unseen X-rays flagged (1.7 % expected); photographs, screen captures, noise, a checkerboard, an inverted
film, a film turned 90° and a horizontal ramp unusual; a vertical ramp (the first pattern's own shape), a
film upside down, cropped to its centre or turned 15° pass: the check is a guard against the wrong kind of
picture, not a quality check of a film. Another site's films may be flagged where their shape differs (one
source of the real sample against the others, a population too: 19 of 50).

The fitted reference (the patterns, their variances and the thresholds) is stored in the checkpoint's
weights file, in its metadata (`checkpoint.BESIDE_WEIGHTS_PREFIX`), so that it travels, is registered and is
checked (`weights_sha256`) with the weights it belongs to, while any loader of the weights reads the model
alone; the card's `input_reference` says how it was fitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

THUMBNAIL = 16
"""Side of the thumbnail an image is compared at: the shape of a chest, not its detail."""
MAX_COMPONENTS = 16
"""At most this many patterns; fewer with fewer training images (one per IMAGES_PER_COMPONENT)."""
IMAGES_PER_COMPONENT = 10
QUANTILE = 0.99
"""About this share of usual images passes: each of the two statistics is cut at 1 - (1 - QUANTILE) / 2."""
FOLDS = 5
"""Folds of the training images whose out-of-sample statistics set the thresholds, with the validation
images' (`fit_thumbnails`)."""
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
    """The training images' patterns, and the two scores above which an image counts as unusual: the share
    of its thumbnail the patterns leave unexplained (`score`), and how far from the training images it lies
    within them (`pattern_distance`, Hotelling's T²: a ramp or a blob the patterns explain, but in amounts no
    chest X-ray has)."""

    mean: np.ndarray
    """(THUMBNAIL²,) the training thumbnails' mean."""
    components: np.ndarray
    """(k, THUMBNAIL²) their first k principal components, orthonormal rows."""
    variances: np.ndarray
    """(k,) the training thumbnails' variance along each component."""
    threshold: float
    """of the score (the unexplained share)"""
    distance_threshold: float
    """of the pattern distance"""
    summary: dict[str, Any]
    """How it was fitted (the card's `input_reference`): images, patterns, thresholds, expected share."""

    def statistics(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, pattern distance) of each of `thumbnails`; a blank image's score is 1.0 (nothing of it
        is explained: it has nothing to explain)."""
        centred = flat - self.mean
        coefficients = centred @ self.components.T
        residual = centred - coefficients @ self.components
        score = (residual**2).mean(axis=1)
        score[~flat.any(axis=1)] = 1.0
        return score, (coefficients**2 / self.variances).sum(axis=1)

    def scores(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """(N,) each uint8 image's score: the share of its thumbnail the patterns leave unexplained."""
        return self.statistics(thumbnails(images))[0]

    def unusual(self, images: np.ndarray | Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, pattern distance, unusual) of each uint8 image: unusual where either is above its
        threshold."""
        score, distance = self.statistics(thumbnails(images))
        return score, distance, (score > self.threshold) | (distance > self.distance_threshold)

    def checks(self, images: np.ndarray | Iterable[np.ndarray]) -> list[dict[str, Any]]:
        """Each image's `input_check` as Serve answers it: its two scores, their thresholds, and whether
        either is above."""
        return [
            {
                "score": round(float(s), 4),
                "threshold": round(self.threshold, 4),
                "pattern_distance": round(float(d), 2),
                "pattern_threshold": round(self.distance_threshold, 2),
                "unusual": bool(u),
            }
            for s, d, u in zip(*self.unusual(images), strict=True)
        ]

    def arrays(self) -> dict[str, np.ndarray]:
        """The reference as float32 arrays named for the weights file (`save_checkpoint`'s beside_weights):
        the thresholds too, so that the weights' hash covers all that decides a check."""
        return {
            f"{ARRAY_PREFIX}mean": self.mean.astype(np.float32),
            f"{ARRAY_PREFIX}components": self.components.astype(np.float32),
            f"{ARRAY_PREFIX}variances": self.variances.astype(np.float32),
            f"{ARRAY_PREFIX}thresholds": np.array([self.threshold, self.distance_threshold], np.float32),
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], summary: Mapping[str, Any]
    ) -> InputReference | None:
        """The reference stored by `arrays()`, with its card summary; None where the card records none, or,
        with a warning (every answer's input_check is then null), where the arrays are missing, damaged
        (not finite, components not orthonormal, variances not positive) or disagree with the card."""
        if not summary:
            return None
        names = ("mean", "components", "variances", "thresholds")
        mean, components, variances, thresholds = (arrays.get(f"{ARRAY_PREFIX}{n}") for n in names)
        problem = None
        size = THUMBNAIL * THUMBNAIL
        if mean is None or components is None or variances is None or thresholds is None:
            problem = "its arrays are missing from the weights file"
        elif mean.shape != (size,) or components.ndim != 2 or components.shape[1] != size:
            problem = f"its arrays have the shapes {mean.shape} and {components.shape}"
        elif variances.shape != (len(components),) or thresholds.shape != (2,):
            problem = f"its variances {variances.shape} and thresholds {thresholds.shape} do not fit"
        elif not all(np.isfinite(a).all() for a in (mean, components, variances, thresholds)):
            problem = "its arrays hold values that are not finite"
        elif not np.allclose(components @ components.T, np.eye(len(components)), atol=1e-3):
            problem = "its components are not orthonormal"
        elif (variances <= 0).any() or (thresholds <= 0).any():
            problem = "its variances or thresholds are not positive"
        elif not np.isclose(float(thresholds[0]), float(summary.get("threshold", -1)), rtol=1e-4):
            problem = f"its threshold {float(thresholds[0]):.6g} is not the card's {summary.get('threshold')}"
        if problem:
            log.warning("the input check's reference is damaged (%s): images are not checked", problem)
            return None
        assert (
            mean is not None and components is not None and variances is not None and thresholds is not None
        )
        return cls(
            mean=mean.astype(np.float64),
            components=components.astype(np.float64),
            variances=variances.astype(np.float64),
            threshold=float(thresholds[0]),
            distance_threshold=float(thresholds[1]),
            summary=dict(summary),
        )


def fit(train: np.ndarray, val: np.ndarray) -> InputReference:
    """The reference of (N, S, S) uint8 training images, its thresholds from images it was not fitted on."""
    return fit_thumbnails(thumbnails(train), thumbnails(val))


def _patterns(flat: np.ndarray, count: int) -> InputReference:
    """The patterns of `thumbnails` (mean, first `count` components and their variances), as stored
    (float32), without thresholds."""
    mean = flat.mean(axis=0)
    _, singular, rows = np.linalg.svd(flat - mean, full_matrices=False)
    variances = np.maximum(singular[:count] ** 2 / max(len(flat) - 1, 1), 1e-8)
    # rounded as stored, so that the thresholds are the ones the stored reference gives
    mean, components, variances = (
        a.astype(np.float32).astype(np.float64) for a in (mean, rows[:count], variances)
    )
    explained = float((singular[:count] ** 2).sum() / max((singular**2).sum(), 1e-12))
    return InputReference(mean, components, variances, 0.0, 0.0, {"explained": round(explained, 4)})


def fit_thumbnails(flat: np.ndarray, val: np.ndarray) -> InputReference:
    """`fit` of the training and validation images' `thumbnails`.

    The thresholds are quantiles of out-of-sample statistics: the validation images' under the patterns of
    every training image, and each training image's under the patterns of the other FOLDS - 1 folds. A
    threshold from the validation split alone (13 images of the real sample) is its highest score, which 1 in
    14 images like them exceeds, not 1 in 100; pooled, the real sample gives 117. The folds' patterns come
    from fewer images, so their scores run a little high: the thresholds err towards flagging less. Each of
    the two statistics is cut at its 99.5th percentile, so about 1 in 100 usual images is flagged where
    hundreds are pooled, and at most 2 in n + 1 where n (fewer than 200) are: `expected_share` records it.
    """
    count = min(MAX_COMPONENTS, max(1, len(flat) // IMAGES_PER_COMPONENT), len(flat) - 1)
    reference = _patterns(flat, count)
    held = [reference.statistics(val)]
    order = np.arange(len(flat))
    for fold in np.array_split(order, FOLDS):  # ingest shuffled the rows: contiguous folds are random ones
        held.append(_patterns(flat[np.setdiff1d(order, fold)], count).statistics(flat[fold]))
    scores, distances = (np.concatenate(parts) for parts in zip(*held, strict=True))
    quantile = 1 - (1 - QUANTILE) / 2  # each statistic's: the two flag about 1 - QUANTILE together
    threshold = float(np.quantile(scores, quantile, method="higher"))
    distance_threshold = float(np.quantile(distances, quantile, method="higher"))
    # the share of new usual images above each threshold: above the rank-j value of n, (n + 1 - j) / (n + 1)
    above = sum(((values > cut).sum() + 1) / (len(values) + 1) for values, cut in
                ((scores, threshold), (distances, distance_threshold)))  # fmt: skip
    summary = {
        "thumbnail": THUMBNAIL,
        "components": count,
        "explained": reference.summary["explained"],
        "train_images": len(flat),
        "val_images": len(val),
        "out_of_sample_images": len(scores),
        "quantile": quantile,
        "threshold": round(threshold, 6),
        "pattern_threshold": round(distance_threshold, 4),
        "expected_share": round(min(float(above), 1.0), 4),
        "median_score": round(float(np.median(scores)), 4),
    }
    return replace(reference, threshold=threshold, distance_threshold=distance_threshold, summary=summary)


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
        log.warning(
            "no input check: %d training and %d validation images are too few to say what a usual input is "
            "(%d and %d at least); the model's answers will carry input_check null",
            len(train), len(val), MIN_TRAIN_IMAGES, MIN_VAL_IMAGES,
        )  # fmt: skip
        return None
    reference = fit_thumbnails(train, val)
    log.debug("input check fitted in %.2f s: %s", time.perf_counter() - started, reference.summary)
    return reference


def plain(reference: InputReference | None) -> dict[str, Any] | None:
    """The reference as plain lists (a worker's loop config), or None."""
    if reference is None:
        return None
    return {"arrays": {k: v.tolist() for k, v in reference.arrays().items()}, "summary": reference.summary}


def from_plain(value: Mapping[str, Any] | None) -> InputReference | None:
    if not value:
        return None
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in value["arrays"].items()}
    return InputReference.from_arrays(arrays, value["summary"])
