"""Temperature scaling: one scalar T, fitted on the validation split, so softmax(logits / T) is calibrated."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cxrcore.metrics import ECE_BINS, NLL_EPSILON, reliability_bins

MIN_TEMPERATURE = 0.25
MAX_TEMPERATURE = 10.0
"""The search range of fit_temperature; a perfectly separated validation set ends at MIN_TEMPERATURE."""
_SEARCH_STEPS = 80
"""Golden-section steps over log T: the bracket shrinks to 0.618**80 of its width, far below any use."""
_MIN_IMPROVEMENT = 1e-9
"""A fitted T must beat T = 1 by this much NLL, else 1.0 is kept (flat or uninformative logits)."""


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) against int class labels.

    `logits` is (N, C) and may equally be log-probabilities (e.g. np.log(probs + 1e-12)): log-softmax
    differs from the logits by a per-row constant, and softmax((z - c) / T) = softmax(z / T), so the fit
    is the same. The NLL is convex in 1/T, hence unimodal in log T, which a deterministic golden-section
    search over log T in [log MIN_TEMPERATURE, log MAX_TEMPERATURE] minimises. Rows with non-finite
    values are left out. Returns 1.0 (no change) with fewer than 2 usable samples, a single class among
    the labels, or when no temperature beats 1.0; never NaN. Argmax, hence accuracy, does not depend on T.
    """
    z, y = _check(logits, labels)
    usable = np.isfinite(z).all(axis=1)
    z, y = z[usable], y[usable]
    if len(y) < 2 or len(np.unique(y)) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        value = _nll(z / math.exp(log_t), y)
        return value if math.isfinite(value) else math.inf

    lower, upper = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    lo, hi = lower, upper
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    # The bounds are candidates too: the minimum may sit on one (golden section never evaluates them).
    candidates = [(fa, a), (fb, b), (nll(lower), lower), (nll(upper), upper)]
    best_nll, best_log_t = min(candidates)
    baseline = nll(0.0)
    if not math.isfinite(best_nll) or best_nll > baseline - _MIN_IMPROVEMENT:
        return 1.0
    return float(min(max(math.exp(best_log_t), MIN_TEMPERATURE), MAX_TEMPERATURE))  # exp(log) rounds


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """ECE and NLL of softmax(logits) (before) and softmax(logits / temperature) (after), as plain floats.

    ECE and NLL are computed as classification_metrics computes `ece` and `nll` (same ECE_BINS binning,
    same clipping), so `ece_after` equals metrics.json's `ece` of the calibrated probabilities. `logits`
    may be log-probabilities, as for fit_temperature. An empty set gives None for every measurement.
    """
    temperature = _check_temperature(temperature)
    z, y = _check(logits, labels)
    report: dict[str, Any] = {
        "temperature": temperature,
        "ece_before": None,
        "ece_after": None,
        "nll_before": None,
        "nll_after": None,
    }
    if len(y) == 0:
        return report
    for suffix, scaled in (("before", z), ("after", z / temperature)):
        probs = _softmax(scaled)
        report[f"ece_{suffix}"] = float(reliability_bins(y, probs, ECE_BINS)["ece"])
        report[f"nll_{suffix}"] = float(
            -np.log(np.clip(probs[np.arange(len(y)), y], NLL_EPSILON, 1.0)).mean()
        )
    return report


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
