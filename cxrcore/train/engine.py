"""One epoch of training or evaluation over a stream of uint8 batches: plain torch, no Ray."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrcore.data.batches import (
    AugmentConfig,
    augment,
    masks_to_unit,
    model_inputs,
    normalize_image,
    to_unit,
)
from cxrcore.data.spec import InputSpec
from cxrcore.segmenter import MaskSource

Batch = dict[str, torch.Tensor]


@dataclass
class EpochResult:
    """What one pass over the data produced (per rank; the loop combines ranks)."""

    loss_sum: float = 0.0
    """each batch's mean loss times its weight (`loss_weight`'s share of that batch)."""
    loss_weight: float = 0.0
    """images counted by their class's loss weight (every image 1 without class weights): the epoch's loss is
    loss_sum / loss_weight, the weighted mean over every image, as one batch of all of them would give."""
    count: int = 0
    correct: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    """of `seconds`, the time spent waiting for the next batch: the input pipeline not keeping up."""
    labels: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    """class probabilities (classifiers) or mask probabilities (segmenters)."""
    targets: list[np.ndarray] = field(default_factory=list)
    """true masks (segmenters)."""


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse-frequency loss weights, images / (classes present × the class's images) (scikit-learn's
    "balanced"): their mean over the training images is 1, so a batch's weighted loss summed and divided by
    its image count (`classification_loss`) has the scale of the plain cross-entropy. Absent classes get 0.

    >>> [round(w, 3) for w in class_weights([108, 180, 305, 40]).tolist()]  # the database's mix
    [1.465, 0.879, 0.519, 3.956]
    >>> [round(w, 3) for w in class_weights([3, 0, 1]).tolist()]
    [0.667, 0.0, 2.0]
    """
    counts_t = torch.tensor(counts, dtype=torch.float32)
    present = int((counts_t > 0).sum())
    return torch.where(counts_t > 0, counts_t.sum() / (present * counts_t.clamp(min=1)), 0.0)


def classification_loss(
    output: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss a training step minimises, and the batch's weighted mean cross-entropy as reported.

    The step's loss is the weighted cross-entropy summed over the batch and divided by its image count, so
    each image weighs its class's weight in every batch: the expectation of the whole split's weighted
    loss. cross_entropy's own weighted mean divides by the batch's summed weights, which cancels the
    weights of a batch of one class and weakens them in small batches. On the database's mix (108 / 180 /
    305 / 40), Viral Pneumonia carried 0.06 of the loss at 1 image per batch, 0.15 at 4 (the automatic
    batch on small data), 0.19 at 8 and 0.23 at 32, where a balanced mix gives it 0.25 (a review,
    session 54); it now carries 0.25 at any batch size. Without weights both are the plain mean.
    """
    if weights is None:
        loss = F.cross_entropy(output, labels)
        return loss, loss
    weighted = (F.cross_entropy(output, labels, reduction="none") * weights[labels]).sum()
    # 0/0 where every class of the batch weighs 0 (absent from training): reported 0 at weight 0, unread
    return weighted / len(labels), weighted / weights[labels].sum().clamp(
        min=torch.finfo(weighted.dtype).tiny
    )


def adamw(
    model: torch.nn.Module, lr: float, weight_decay: float, decay_all: bool = False
) -> torch.optim.AdamW:
    """AdamW over the parameters that train (a frozen backbone's are left out), with weight decay on the
    weights of convolutions, linear and recurrent layers only: a norm layer's scale and shift and the
    biases get none, as in timm's and torchvision's recipes. Decay pulls them to 0, and a norm layer's
    scale is what sets its output's size (its input's is normalised away), so decay there shrinks the
    features rather than the model's complexity. `decay_all` is the one group of runs saved before
    (a resumed run keeps its recipe).

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    >>> [(len(group["params"]), group["weight_decay"]) for group in adamw(net, 1e-3, 0.05).param_groups]
    [(2, 0.05), (4, 0.0)]
    >>> [(len(group["params"]), group["weight_decay"]) for group in adamw(net, 1e-3, 0.05, True).param_groups]
    [(6, 0.05)]
    """
    learning = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if decay_all:
        return torch.optim.AdamW([param for _, param in learning], lr=lr, weight_decay=weight_decay)
    decayed = [param for _, param in learning if param.ndim > 1]
    kept = [param for _, param in learning if param.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=lr)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak learning rate, then cosine decay to zero at total_steps; from `start_step`
    (a resumed run whose plan changed: the optimizer's param groups hold `initial_lr`)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's epoch: its shuffle, augmentation and dropout. Drawn afresh each epoch, so that
    a run resumed after epoch k trains epoch k + 1 as the uninterrupted run did; each epoch, rank and seed
    draws its own.

    >>> epoch_seed(0, 0, 1) == epoch_seed(0, 0, 1)
    True
    >>> len({epoch_seed(0, 0, 1), epoch_seed(0, 0, 2), epoch_seed(0, 1, 1), epoch_seed(1, 0, 1)})
    4
    """
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def prepare_batch(
    batch: Batch,
    spec: InputSpec,
    augmentation: AugmentConfig | None,
    mask_source: MaskSource | None = None,
    generator: torch.Generator | None = None,
    *,
    served_masks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model input and the [0, 1] mask used (resized, masks filled in, augmented when training).

    A classifier's missing masks come from `mask_source`; with `served_masks` every mask does, the
    dataset's own ignored, as Serve makes them (it never receives one).
    """
    image = to_unit(batch["image"], spec.image_size)
    needs_mask = "mask" in spec.channels or spec.task == "segment"
    mask = masks_to_unit(batch["mask"], spec.image_size) if needs_mask else None
    if mask is not None and mask_source is not None and spec.task == "classify":
        if served_masks:
            mask = mask_source(image)
        elif (missing := ~batch["has_mask"].bool()).any():
            mask = mask.clone()
            mask[missing] = mask_source(image[missing])
    if augmentation is not None:
        image, mask = augment(image, mask, augmentation, generator)
    if spec.task == "segment":
        return normalize_image(spec, image), mask
    return model_inputs(spec, image, mask), mask


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice: BCE for per-pixel calibration, Dice against the lung/background imbalance."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum(dim=(1, 2, 3))
    dice = (2 * intersection + 1.0) / (probs.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return bce + (1.0 - dice.mean())


def run_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    spec: InputSpec,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss_weights: torch.Tensor | None = None,
    augmentation: AugmentConfig | None = None,
    mask_source: MaskSource | None = None,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    keep_outputs: bool = False,
    served_masks: bool = False,
) -> EpochResult:
    """Train (when an optimizer is given) or evaluate over `batches`; returns sums for combining ranks.

    `served_masks`: a dual-channel classifier reads `mask_source`'s mask for every image (prepare_batch).
    """
    training = optimizer is not None
    model.train(training)
    for norm in frozen_norms(model) if training else ():
        norm.eval()  # a frozen backbone's statistics stay as loaded
    result = EpochResult()
    # Each step's loss, weight and correct count stay on the device until the epoch ends: reading one
    # (`float(loss)`) makes the CPU wait for the GPU's step, which then idles while the next batch is
    # fetched and prepared.
    losses: list[torch.Tensor] = []
    step_weights: list[torch.Tensor | float] = []
    corrects: list[torch.Tensor] = []
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # a classifier's log-probabilities and labels
    weights: torch.Tensor | None = None
    started = time.perf_counter()
    for batch in _timed(batches, result):
        if training and result.count and len(batch["image"]) == 1:
            # A last batch of one image: BatchNorm cannot train on it where a feature map has shrunk to
            # 1×1 (a ResNet at 32 px raises), and elsewhere it would normalise by one image's statistics.
            # Training shards hold as many rows on every rank, so each rank leaves its own out alike.
            continue
        inputs, mask = prepare_batch(
            batch, spec, augmentation if training else None, mask_source, generator, served_masks=served_masks
        )
        device_type = inputs.device.type
        with (
            torch.set_grad_enabled(training),
            torch.autocast(
                device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            ),
        ):
            output = model(inputs).float()
            if spec.task == "segment":
                assert mask is not None
                loss = reported = segmentation_loss(output, mask)
            else:
                labels = batch["label_index"].long()
                if loss_weights is not None and weights is None:
                    weights = loss_weights.to(output.device)
                loss, reported = classification_loss(output, labels, weights)
        if training:
            assert optimizer is not None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        n = inputs.shape[0]
        # The epoch's loss is the weighted mean over every image: each batch's weighted mean, weighed by
        # its summed weights, or a batch of a rare class would count for less than its images.
        losses.append(reported.detach())
        step_weights.append(
            weights[labels].sum() if spec.task != "segment" and weights is not None else float(n)
        )
        result.count += n
        if spec.task == "segment":
            if keep_outputs:
                assert mask is not None
                result.outputs.append(torch.sigmoid(output).detach().cpu().numpy())
                result.targets.append(mask.cpu().numpy())
        else:
            corrects.append((output.argmax(dim=1) == labels).sum())
            if keep_outputs:
                # Log-probabilities, which keep what softmax rounds to 0 or 1 in float32: the temperature is
                # fitted on them, and log(p + 1e-12) capped a confident error's loss at 27.6 (T came out low).
                kept.append((torch.log_softmax(output.detach(), dim=1), labels))
    _tally(result, losses, step_weights, corrects)
    if kept:  # read from the device once, as the losses are
        result.outputs.append(torch.cat([o for o, _ in kept]).cpu().numpy())
        result.labels.append(torch.cat([label for _, label in kept]).cpu().numpy())
    result.seconds = time.perf_counter() - started
    return result


def _tally(
    result: EpochResult,
    losses: list[torch.Tensor],
    weights: list[torch.Tensor | float],
    corrects: list[torch.Tensor],
) -> None:
    """Add the steps' losses (each weighted), weights and correct counts to `result`, read from the device
    at once. A batch whose classes all weigh 0 (absent from training) has a loss of 0/0: it counts for
    nothing."""
    if not losses:
        return
    step_losses = torch.stack(losses).float().cpu().tolist()
    if isinstance(weights[0], torch.Tensor):
        weights = torch.stack([torch.as_tensor(w) for w in weights]).float().cpu().tolist()
    for loss, weight in zip(step_losses, weights, strict=True):
        if weight > 0:
            result.loss_sum += loss * float(weight)
            result.loss_weight += float(weight)
    if corrects:
        result.correct += int(torch.stack(corrects).sum())


def _timed(batches: Iterable[Batch], result: EpochResult) -> Iterator[Batch]:
    """`batches`, adding the time spent waiting for each one to `result.data_seconds`."""
    iterator = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(iterator, None)
        result.data_seconds += time.perf_counter() - started
        if batch is None:
            return
        yield batch


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Sequence[Batch],
    spec: InputSpec,
    *,
    mask_source: MaskSource | None = None,
    served_masks: bool = False,
) -> int:
    """Recompute every BatchNorm's running statistics for the current weights; returns images used.

    Running statistics are an exponential average over past batches, so after few steps with fast-moving
    weights they describe an earlier model, and the eval-mode model (the one validated, ranked and
    served) is not the one that was trained. This replaces them with the exact average over
    `batches` (un-augmented training images, as evaluation sees them, with the masks training used:
    `served_masks` as in prepare_batch), taken with the weights as they are now ("precise BN"), in float32
    as the model is served (a bf16 run's training steps do not). Only BatchNorm layers run in training
    mode; dropout stays off.
    """
    frozen = set(frozen_norms(model))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats and m not in frozen]
    # Each batch weighs alike in the average, and one image raises where a map has shrunk to 1×1.
    batches = [batch for batch in batches if len(batch["image"]) > 1] or batches
    if not norms or not batches:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    calls = dict.fromkeys(norms, 0)

    def cumulative(norm: nn.modules.batchnorm._BatchNorm, _: Any) -> None:
        # A cumulative average over all the batches below: the n-th call weighs 1/n. What momentum=None
        # does, but that reads the layer's call count from the device (one wait for the GPU per layer
        # and batch: about 1,700 an epoch for a ResNet50); counted here, the numbers are the same.
        calls[norm] += 1
        norm.momentum = 1.0 / calls[norm]

    hooks = [norm.register_forward_pre_hook(cumulative) for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, _ = prepare_batch(batch, spec, None, mask_source, served_masks=served_masks)
                model(inputs)
                seen += inputs.shape[0]
    finally:
        for hook in hooks:
            hook.remove()
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    model.train(was_training)
    return seen


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers whose weights do not train (`--freeze-backbone`): kept in eval mode while the
    rest trains, and left out of precise BN, so that their statistics stay the pretrained ones."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (params := list(module.parameters(recurse=False)))
        and not any(param.requires_grad for param in params)
    ]


def average_batchnorm_across_ranks(model: nn.Module) -> None:
    """Make every rank's BatchNorm statistics the pooled statistics of all ranks (equal batch counts)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
            assert norm.running_mean is not None and norm.running_var is not None
            # Pool the moments: mean of means, and E[x²] = var + mean² averaged, minus the pooled mean².
            moments = torch.stack([norm.running_mean, norm.running_var + norm.running_mean**2])
            dist.all_reduce(moments)
            moments /= world
            norm.running_mean.copy_(moments[0])
            norm.running_var.copy_(moments[1] - moments[0] ** 2)


def combine(results: list[EpochResult]) -> dict[str, Any]:
    """Loss, accuracy, throughput, the share of time spent waiting for data, and concatenated outputs over
    all ranks' results."""
    count = sum(r.count for r in results)
    summary: dict[str, Any] = {
        "loss": sum(r.loss_sum for r in results) / max(sum(r.loss_weight for r in results), 1e-12),
        "accuracy": sum(r.correct for r in results) / max(count, 1),
        "count": count,
        "images_per_s": count / max(max(r.seconds for r in results), 1e-9),
        "data_wait_share": sum(r.data_seconds for r in results) / max(sum(r.seconds for r in results), 1e-9),
    }
    outputs = [o for r in results for o in r.outputs]
    if outputs:
        summary["outputs"] = np.concatenate(outputs)
        labels = [x for r in results for x in r.labels]
        targets = [x for r in results for x in r.targets]
        summary["labels"] = np.concatenate(labels) if labels else None
        summary["targets"] = np.concatenate(targets) if targets else None
    return summary
