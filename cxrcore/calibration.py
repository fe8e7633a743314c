"""Temperature scaling: one scalar T, fitted on the validation split, so softmax(logits / T) is calibrated."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cxrcore.metrics import ECE_BINS, NLL_EPSILON, reliability_bins

MIN_TEMPERATURE = 0.25
MAX_TEMPERATURE = 10.0
"""The search range of fit_temperature."""
PRIOR_LOG_SD = 0.5
"""Standard deviation of the prior on log T, centred on T = 1: what cross-entropy training aims for.

A validation split of a few dozen images is often classified without a mistake, and then the NLL alone
keeps falling as T → 0: the fit would make the served probabilities overconfident on everything else.
Measured on synthetic phantoms, a dual_cnn whose 24 validation images were all right got T = 0.25 from
the NLL alone, and its NLL on 600 other images rose from 0.26 to 0.42. The prior adds
(log T / PRIOR_LOG_SD)² / 2 to the NLL summed over the images: it decides on 24 images and is
negligible on thousands. Where the split holds no mistake at all, fit_temperature does not sharpen
(T < 1) at all: the prior still held T at 0.6-0.7 there, on no evidence.
"""
MIN_IMAGES_TO_SHARPEN = 50
"""Fewer validation images than this never sharpen (T < 1): on the real sample's 13, every fitted T was
0.55-0.61, and the test NLL rose in each of four evaluations (1.176 -> 1.358, 1.006 -> 1.133, 0.945 ->
1.063, 0.957 -> 0.980; a real-sample study, session 52), while the served answers of wrong or
meaningless images came out near-certain (COVID 0.982, 1.0). A few mistakes among a dozen images fix T
no better than none did (see above). Softening (T > 1) is still fitted: it makes answers less confident,
and the images that call for it are the evidence."""
_GRID_POINTS = 97
"""Coarse grid over log T that brackets the minimum before the golden-section refinement."""
_SEARCH_STEPS = 60
"""Golden-section steps inside the bracket: it shrinks to 0.618**60 of a grid cell, far below any use."""
_MIN_IMPROVEMENT = 1e-9
"""A fitted T must beat T = 1 by this much, else 1.0 is kept (flat or uninformative logits)."""


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, prior_log_sd: float | None = PRIOR_LOG_SD
) -> float:
    """The temperature T > 0 that best calibrates softmax(logits / T) for int class labels.

    It minimises the mean NLL plus a Gaussian prior on log T centred on 0 (T = 1) with standard deviation
    `prior_log_sd` (None: the NLL alone), i.e. the MAP estimate; see PRIOR_LOG_SD for why.
    `logits` is (N, C) and may equally be log-probabilities (e.g. np.log(probs + 1e-12)): log-softmax
    differs from the logits by a per-row constant, and softmax((z - c) / T) = softmax(z / T), so the fit
    is the same. The search is deterministic: a grid over log T in [log MIN_TEMPERATURE, log
    MAX_TEMPERATURE], then golden-section inside the best grid cell's neighbours. Rows with non-finite
    values are left out. Returns 1.0 (no change) with fewer than 2 usable samples, a single class among
    the labels, when no temperature beats 1.0, or when it would sharpen (T < 1) a split classified without
    a mistake or one of fewer than MIN_IMAGES_TO_SHARPEN images; never NaN. Argmax, hence accuracy, does
    not depend on T.
    """
    z, y = _check(logits, labels)
    usable = np.isfinite(z).all(axis=1)
    z, y = z[usable], y[usable]
    if len(y) < 2 or len(np.unique(y)) < 2:
        return 1.0
    prior_weight = 0.0 if prior_log_sd is None else 1.0 / (2.0 * prior_log_sd**2 * len(y))

    def objective(log_t: float) -> float:
        value = _nll(z / math.exp(log_t), y) + prior_weight * log_t**2
        return value if math.isfinite(value) else math.inf

    grid = np.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), _GRID_POINTS)
    values = [objective(float(log_t)) for log_t in grid]
    best = int(np.argmin(values))
    lo, hi = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = objective(a), objective(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = objective(b)
    best_value, best_log_t = min([(fa, a), (fb, b), (values[best], float(grid[best]))])
    if not math.isfinite(best_value) or best_value > objective(0.0) - _MIN_IMPROVEMENT:
        return 1.0
    if best_log_t < 0 and (z.argmax(axis=1) == y).all():
        # Without a single mistake the NLL falls for ever as T shrinks: sharpening then rests on the prior
        # alone, not on the data. A clinician's review saw T = 0.647 from 41 faultless validation images
        # make every served probability more confident, and the NLL on other hospitals' images worse
        # (1.98 -> 2.75). Softening (T > 1) the data can show; sharpening it cannot, here.
        return 1.0
    if best_log_t < 0 and len(y) < MIN_IMAGES_TO_SHARPEN:
        return 1.0
    return float(min(max(math.exp(best_log_t), MIN_TEMPERATURE), MAX_TEMPERATURE))  # exp(log) rounds


def calibration_report(
    logits: np.ndarray, labels: np.ndarray, temperature: float, calibrated: np.ndarray | None = None
) -> dict[str, Any]:
    """ECE and NLL of softmax(logits) (before) and softmax(logits / temperature) (after), as plain floats.

    ECE and NLL are computed as classification_metrics computes `ece` and `nll` (same ECE_BINS binning,
    same clipping). `calibrated` is softmax(logits / temperature) as the caller scored it (the served
    float32 probabilities): given, the `_after` figures are computed from it, so `ece_after` and
    `nll_after` are the very `ece` and `nll` of metrics.json, not a float64 recomputation that differs in
    the 8th decimal.
    `ece_floor_before` / `ece_floor_after` (with their `_sd`) are the ECE those probabilities would show
    on this many images if they were perfectly calibrated (metrics.ece_floor): on a few dozen images
    most of an ECE is sampling noise, and no calibration can take it below that. `logits` may be
    log-probabilities, as for fit_temperature. An empty set gives None for every measurement.
    """
    temperature = _check_temperature(temperature)
    z, y = _check(logits, labels)
    report: dict[str, Any] = {
        "n": len(y),  # the images the figures rest on: on a few dozen an ECE is mostly sampling noise
        "temperature": temperature,
        "ece_before": None,
        "ece_after": None,
        "nll_before": None,
        "nll_after": None,
        "ece_floor_before": None,
        "ece_floor_sd_before": None,
        "ece_floor_after": None,
        "ece_floor_sd_after": None,
        "note": None,
    }
    if len(y) == 0:
        return report
    after = _softmax(z / temperature) if calibrated is None else np.asarray(calibrated, dtype=np.float64)
    if after.shape != z.shape:
        raise ValueError(f"calibrated must have the logits' shape {z.shape}, got {after.shape}")
    for suffix, probs in (("before", _softmax(z)), ("after", after)):
        bins = reliability_bins(y, probs, ECE_BINS)
        for key in ("ece", "ece_floor", "ece_floor_sd"):
            report[f"{key}_{suffix}"] = float(bins[key])
        report[f"nll_{suffix}"] = float(
            -np.log(np.clip(probs[np.arange(len(y)), y], NLL_EPSILON, 1.0)).mean()
        )
    report["note"] = _worse_note(report, len(y))
    return report


WORSE_NLL = 0.001
"""The least rise in NLL after temperature scaling that the calibration note reports: what 3 decimals show."""


def _worse_note(report: dict[str, Any], n: int) -> str | None:
    """Why the scaled probabilities may be the worse ones here, or None where T helped or was 1.

    On the split T was fitted on, the NLL cannot rise (fit_temperature keeps T = 1 unless it lowers the
    NLL plus the prior). Elsewhere it can: the validation split was too small to fit T, or this split's
    images differ from it. Served probabilities are the scaled ones either way, so the report says so.
    """
    # a rise that rounds away (1.3749 -> 1.3754) is no news; one the three decimals show is
    if report["temperature"] == 1.0 or report["nll_after"] - report["nll_before"] < WORSE_NLL:
        return None
    return (
        f"the temperature {report['temperature']:.2f}, fitted on the validation split, made the NLL on these "
        f"{n} images worse ({report['nll_before']:.3f} -> {report['nll_after']:.3f}); the served "
        "probabilities are the scaled ones. On a few dozen images this can be chance; on more, the "
        "validation split was too small to fit T, or unlike these images"
    )


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated class probabilities softmax(logits / temperature) over dim 1, in float32 or wider."""
    temperature = _check_temperature(temperature)
    scores = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.softmax(scores / temperature, dim=1)


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise ValueError(f"logits must be (N, C) and labels (N,), got shapes {z.shape} and {y.shape}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got {y.min()}..{y.max()}")
    return z, y


def _check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    return value


def _softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probs


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean -log softmax(z)[y], computed stably in log space (no clipping: the fit needs a smooth loss)."""
    top = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float((log_norm - z[np.arange(len(y)), y]).mean())
