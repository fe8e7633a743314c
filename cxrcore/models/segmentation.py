"""Overlap metrics for binary lung masks: Dice and IoU, batch means robust to empty masks."""

from __future__ import annotations

import torch

__all__ = ["dice_score", "iou_score"]


def dice_score(
    pred: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True, threshold: float = 0.5
) -> torch.Tensor:
    """Mean Dice over the batch; a sample whose prediction and target are both empty scores 1.

    `pred` holds logits (or probabilities with from_logits=False) of shape (B, 1, H, W) or (B, H, W);
    `target` holds 0/1 (or 0..1) values with as many elements per sample.
    """
    intersection, pred_area, target_area = _overlap(pred, target, from_logits, threshold)
    total = pred_area + target_area
    dice = torch.where(total > 0, 2 * intersection / total.clamp(min=1), 1.0)
    return dice.mean()


def iou_score(
    pred: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True, threshold: float = 0.5
) -> torch.Tensor:
    """Mean intersection over union over the batch; both empty scores 1. Arguments as dice_score."""
    intersection, pred_area, target_area = _overlap(pred, target, from_logits, threshold)
    union = pred_area + target_area - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), 1.0)
    return iou.mean()


def _overlap(
    pred: torch.Tensor, target: torch.Tensor, from_logits: bool, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample intersection and areas, in pixels, of the thresholded masks."""
    batch = pred.shape[0]
    pred_flat = pred.detach().reshape(batch, -1)
    target_flat = target.detach().reshape(target.shape[0], -1)
    if pred_flat.shape != target_flat.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} do not match")
    pred_mask = (pred_flat.float().sigmoid() if from_logits else pred_flat.float()) > threshold
    target_mask = target_flat.float() > threshold
    intersection = (pred_mask & target_mask).sum(dim=1).float()
    return intersection, pred_mask.sum(dim=1).float(), target_mask.sum(dim=1).float()
