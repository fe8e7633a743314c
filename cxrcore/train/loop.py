"""The Ray Train worker loop: DDP model, streamed shards, per-epoch metrics and checkpoints, resume."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from cxrcore import telemetry
from cxrcore.calibration import apply_temperature, calibration_report, fit_temperature
from cxrcore.checkpoint import ModelCard, load_train_state, save_checkpoint
from cxrcore.config import TrainConfig, from_dict
from cxrcore.data.batches import AugmentConfig
from cxrcore.labels import CLASSES
from cxrcore.metrics import (
    KEEP_SCORE,
    LR_REPLANNED,
    RESUMED_AFTER,
    STOPPED_EARLY,
    best_by_validation,
    keep_score,
)
from cxrcore.models.registry import unwrap
from cxrcore.plan import epoch_steps
from cxrcore.train.engine import (
    Batch,
    EpochResult,
    adamw,
    average_batchnorm_across_ranks,
    combine,
    epoch_seed,
    recalibrate_batchnorm,
    run_epoch,
    warmup_cosine,
)

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["image", "mask", "has_mask", "label_index"]
PRECISE_BN_IMAGES = 1024
"""Training images per worker over which BatchNorm statistics are recomputed before each validation."""


class TrainingDiverged(ValueError):
    """An epoch's loss is not a number: the weights have blown up (most often a learning rate too high), and
    every later epoch, retry or score would be of a broken model."""


class TrainSession:
    """What the training loop asks of the process it runs in: its rank among the workers, its device, its
    data, the checkpoint to resume from, and where each epoch's metrics and checkpoint go.

    This one is a Ray Train worker's (`ray.train`): a TorchTrainer's DDP workers, each with its shard.
    `TrialSession` is a Ray Tune trial's that trains in the trial's own process.
    """

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.run_name = context.get_experiment_name()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def get_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, split: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(split)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Every rank reports every epoch (a barrier); rank 0 with the checkpoint it wrote, which Ray Train
        stores in the run's folder as `checkpoint_epoch_007` for the 7th epoch (counted from 1, as the epoch
        lines and the history are), rather than by the time of day."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = checkpoint_name(metrics["epoch"])
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class TrialSession(TrainSession):
    """A Ray Tune trial that trains one worker's loop in its own process, without a TorchTrainer.

    A TorchTrainer in a trial starts a controller, its workers and four helper actors, each a process
    importing Ray and torch: on a 2-core machine a one-epoch trial of a tiny model spent about a minute of
    CPU on them against seconds of training. With one worker there is nothing to distribute, so the trial
    runs the same loop (`run_training`) on the same datasets, reporting to Tune, which keeps the
    checkpoints (`tune.RunConfig`'s checkpoint policy) and resumes a restored trial from the latest.
    `print_epoch` prints each epoch's line, as the Train run's `epoch_printer` does.
    """

    def __init__(self, datasets: dict[str, Any], gpu: bool, print_epoch: Any = None) -> None:
        import ray.tune

        self.rank, self.world = 0, 1
        self.run_name = ray.tune.get_context().get_trial_id()
        # Ray shows the trial only its own GPU (CUDA_VISIBLE_DEVICES), as it does a Train worker.
        self.device = torch.device("cuda", 0) if gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._datasets = datasets
        self._print_epoch = print_epoch

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def get_checkpoint(self) -> Any:
        import ray.tune

        return ray.tune.get_checkpoint()

    def dataset(self, split: str) -> Any:
        return self._datasets[split]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.tune

        if self._print_epoch is not None:
            self._print_epoch(metrics)
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)


def checkpoint_name(epoch: int) -> str:
    """The folder of a Ray Train run's checkpoint of `epoch` (counted from 1).

    >>> checkpoint_name(7), checkpoint_name(1200)
    ('checkpoint_epoch_007', 'checkpoint_epoch_1200')
    """
    return f"checkpoint_epoch_{epoch:03d}"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's worker function: `run_training` on this worker's shard; rank 0 checkpoints."""
    run_training(loop_config, TrainSession())


def run_training(loop_config: dict[str, Any], session: TrainSession) -> None:
    """Train `loop_config["train"]` (a TrainConfig dict) on the session's data; rank 0 checkpoints."""
    from cxrcore import inputcheck
    from cxrcore.checkpoint import WEIGHTS_NAME, read_weights
    from cxrcore.console import quiet_train_worker
    from cxrcore.models import create_model, get_build_args, get_input_spec
    from cxrcore.segmenter import load_mask_source
    from cxrcore.train.exit import exit_without_finalizing_while_training

    exit_without_finalizing_while_training()  # a stopped trial's worker must not abort on its way out
    if loop_config.get("quiet_console"):
        quiet_train_worker()
    config = from_dict(TrainConfig, loop_config["train"])
    rank, world, device = session.rank, session.world, session.device
    # Ray Train's local mode (--workers 0) runs the loop in the driver and hands it a visible GPU whatever
    # use_gpu says: without --gpu it is a CPU run there too, as it is in CPU workers (where Ray hides the
    # GPUs), not an fp32 run on the GPU without the CPU threads it was given.
    on_cpu_anyway = device.type != "cpu" and not config.gpu
    if on_cpu_anyway:
        device = torch.device("cpu")
    if device.type == "cpu" and loop_config.get("cpus_per_worker"):
        torch.set_num_threads(int(loop_config["cpus_per_worker"]))  # as Ray's OMP_NUM_THREADS says
    if device.type == "cuda":  # training batches keep one shape: cuDNN times its kernels for it once
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed + rank)  # the initial weights (rank 0's, which DDP broadcasts)
    generator = torch.Generator()  # augmentation's; seeded each epoch

    # DDP broadcasts rank 0's weights at wrap time, so only rank 0 loads pretrained ones.
    pretrained = loop_config["pretrained"] if rank == 0 else None
    model = create_model(config.model, image_size=loop_config["image_size"], pretrained=pretrained)
    if config.freeze_backbone:  # on every rank: DDP reduces the same trainable parameters everywhere
        from cxrcore.models.pretrained import freeze_all_but_head

        trainable = freeze_all_but_head(model)
        if rank == 0:
            log.info("--freeze-backbone: training %s only", ", ".join(trainable))
    spec, build_args = get_input_spec(model), get_build_args(model)
    model = model.to(device) if on_cpu_anyway else session.prepare_model(model)  # local mode: one process
    segmenting = spec.task == "segment"

    optimizer = adamw(model, config.lr, config.weight_decay)  # the head alone where the backbone is frozen
    batch_size = int(loop_config["train"]["batch_size"])  # resolved by the driver (auto for small data)
    # The rows each worker trains on an epoch: data in memory is cut in shares that differ by one row at
    # most, each taken to this many (sharding.WholeValidation); Ray's streaming split makes them equal.
    rows_per_worker = loop_config.get("rows_per_worker") if world > 1 else None
    steps_per_epoch = epoch_steps(rows_per_worker or loop_config["train_rows"] // max(world, 1), batch_size)
    plan = {
        "warmup_steps": round(config.warmup_epochs * steps_per_epoch),
        "total_steps": config.epochs * steps_per_epoch,
    }
    scheduler = warmup_cosine(optimizer, plan["warmup_steps"], plan["total_steps"])
    loss_weights = torch.tensor(loop_config["class_weights"]) if loop_config.get("class_weights") else None
    mask_source = load_mask_source(config.segmenter, device) if config.segmenter else None
    # Train on the masks Serve will compute (the segmenter's) rather than the dataset's: on 400 new
    # phantoms, dual_cnn scored 0.958 / 0.940 as served (two seeds) against 0.865 / 0.933 when it had
    # trained on the dataset's masks, and as well with ground-truth masks either way (README).
    # The driver may have put them in the data already (trainer._segments_once): then read the data's.
    precomputed = bool(loop_config.get("masks_from_segmenter"))
    served_masks = config.train_masks == "segmenter" and not precomputed
    autocast_dtype = torch.bfloat16 if config.gpu else None
    reference = inputcheck.from_plain(loop_config.get("input_reference")) if rank == 0 else None
    augmentation = AugmentConfig() if config.augment else None

    start_epoch, history = 0, []
    resume_mark: dict[str, Any] = {}  # the first epoch trained after a resume: where and how it went on
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            unwrap(model).load_state_dict(read_weights(f"{directory}/{WEIGHTS_NAME}", device=str(device)))
            state = load_train_state(directory)
            if state is not None:
                if (resumed := resumed_optimizer(model, config, state["optimizer"])) is not None:
                    optimizer = resumed  # a recipe of an earlier cxr's
                    scheduler = warmup_cosine(optimizer, plan["warmup_steps"], plan["total_steps"])
                optimizer.load_state_dict(state["optimizer"])
                start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
                scheduler, replanned = _resumed_schedule(
                    optimizer, scheduler, state, plan, start_epoch * steps_per_epoch
                )
                resume_mark = {RESUMED_AFTER: start_epoch, LR_REPLANNED: replanned}
        log.info("rank %d resumed after epoch %d of %d", rank, start_epoch, config.epochs)

    train_shard, val_shard = session.dataset("train"), session.dataset("val")
    # On a GPU, batches pinned by the prefetch threads: their non-blocking copies then overlap the step
    # running on the stream, where copies from pageable memory wait for it (CUDA's rule).
    batch_options = {
        "batch_size": batch_size,
        "device": device,
        "drop_last": False,
        "pin_memory": device.type == "cuda",
    }
    for epoch in range(start_epoch, config.epochs):
        if (best := patience_ran_out(history, config.patience)) is not None:  # nothing more to train
            if STOPPED_EARLY not in history[-1]:  # a run re-run with a --patience that has run out: say so,
                session.report({**history[-1], STOPPED_EARLY: best}, None)  # or it reads as interrupted
            break
        # The same --seed and workers give the same run, resumed or not (on CPU; cuDNN's kernels vary).
        seed = epoch_seed(config.seed, rank, epoch)
        torch.manual_seed(seed)
        generator.manual_seed(seed)
        # data in memory: the worker's whole share where it fits (trainer.SHUFFLE_BYTES); else 8 batches
        buffer = max(batch_size * 8, int(loop_config.get("shuffle_rows") or 0))
        shuffle = {"local_shuffle_buffer_size": buffer, "local_shuffle_seed": seed}
        kept: list[Batch] = []  # the first training batches, reused to recompute BatchNorm statistics
        trained = run_epoch(
            model,
            _keep_first(
                _at_most(train_shard.iter_torch_batches(**batch_options, **shuffle), rows_per_worker),
                kept,
                PRECISE_BN_IMAGES,
            ),
            spec,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_weights=loss_weights,
            augmentation=augmentation,
            mask_source=mask_source,
            autocast_dtype=autocast_dtype,
            generator=generator,
            served_masks=served_masks,
        )
        # Validation, checkpoint ranking, ASHA and Serve all see the eval-mode model: give it statistics
        # that describe the current weights, identical on every rank. Both this and validation run in
        # float32, as the Predictor serves the model; only the training steps run under bf16 autocast.
        recalibrate_batchnorm(unwrap(model), kept, spec, mask_source=mask_source, served_masks=served_masks)
        average_batchnorm_across_ranks(unwrap(model))
        del kept
        # Validation feeds it what Serve does: a dual-channel model's masks all come from its segmenter
        # (already in the data where the driver made them), whatever it trained on.
        validated = run_epoch(
            # Unwrapped: DDP's forward after a training step broadcasts rank 0's buffers, a collective a rank
            # with no validation images never joins, and the run would hang until the backend's timeout.
            unwrap(model),
            val_shard.iter_torch_batches(**batch_options),
            spec,
            # Unweighted: the validation loss is the model's plain NLL (the card's calibration
            # nll_before), which breaks near-ties of macro-F1 between checkpoints. Weighted by the
            # training classes' inverse frequency, one rare-class image held half of it.
            loss_weights=None,
            mask_source=mask_source,
            keep_outputs=True,
            served_masks=not precomputed,
        )
        val = _gather(validated, world)
        gathered = _gather(trained, world)
        check_finite(epoch, gathered["loss"], val["loss"])
        temperature, calibration = 1.0, {}
        if not segmenting and val["count"]:  # temperature scaling on the validation split, so probabilities
            # mean what they say; the validation scores are then those of the calibrated model, as served.
            temperature = fit_temperature(val["outputs"], val["labels"])
            calibration = {  # the card's: fitted and measured on the validation split
                "split": "val",
                **calibration_report(val["outputs"], val["labels"], temperature),
            }
        metrics = epoch_metrics(epoch, gathered, val, segmenting, temperature)
        metrics["lr"] = scheduler.get_last_lr()[0]
        if epoch == start_epoch:
            metrics.update(resume_mark)  # where the run went on, in its report, history and curves
        if not segmenting:
            metrics.update(temperature=temperature, val_ece=calibration["ece_after"])
        # the figures, and the confusion matrix that best_by_validation reads to tell one image's difference
        # (without it the history's best could differ from the best checkpoint's, chosen on Ray's metrics)
        kept_in_history = {k: v for k, v in metrics.items() if not isinstance(v, dict | list)}
        history.append({**kept_in_history, **_confusion_of(metrics)})
        if (best := patience_ran_out(history, config.patience)) is not None and epoch + 1 < config.epochs:
            metrics[STOPPED_EARLY] = history[-1][STOPPED_EARLY] = best  # every rank: the same history
        if rank == 0:
            telemetry.record_epoch(session.run_name, config.model, epoch + 1, metrics["train_images_per_s"])

        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                card = ModelCard(
                    model=build_args,
                    input_spec=spec.to_dict(),
                    classes=list(CLASSES),
                    data=loop_config["data"],
                    metrics=metrics,
                    history=history,
                    training=loop_config["train"],
                    epoch=epoch,
                    segmenter=config.segmenter,
                    temperature=temperature,
                    calibration=calibration,
                    input_reference=reference.summary if reference else {},
                )
                train_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "plan": plan,
                    "epoch": epoch,
                    "history": history,
                }
                beside = reference.arrays() if reference else None
                save_checkpoint(directory, unwrap(model), card, train_state, beside)
            session.report(metrics, directory if rank == 0 else None)
        if STOPPED_EARLY in metrics:
            break


def _confusion_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """The epoch's validation confusion matrix, where it has one, for its entry in the run's history."""
    key = "val_confusion_matrix"
    return {key: metrics[key]} if key in metrics else {}


def patience_ran_out(history: list[dict[str, Any]], patience: int | None) -> int | None:
    """The epoch of the best of `history` by validation (best_by_validation, as the best checkpoint is
    chosen) where `patience` epochs or more have passed since it; None where training goes on.

    >>> history = [{"epoch": e, "val_score": s, "val_loss": l, "val_count": 40}
    ...            for e, s, l in [(1, 0.6, 0.9), (2, 0.8, 0.5), (3, 0.78, 0.6), (4, 0.7, 0.7)]]
    >>> patience_ran_out(history, 2), patience_ran_out(history, 3), patience_ran_out(history, None)
    (2, None, None)
    """
    if not patience or not history:
        return None
    best = best_by_validation(history, lambda entry: entry)
    if best is None or int(history[-1]["epoch"]) - int(best["epoch"]) < patience:
        return None
    return int(best["epoch"])


def check_finite(epoch: int, train_loss: float, val_loss: float) -> None:
    """Raise TrainingDiverged where an epoch's loss is not a number: its calibration and scores then failed
    on the model's NaN probabilities ("probs must be finite"), a traceback after every retry."""
    for split, loss in (("training", train_loss), ("validation", val_loss)):
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1}: its {split} loss is {loss}; train again with a "
                "lower --lr"
            )


def epoch_metrics(
    epoch: int, trained: dict[str, Any], validated: dict[str, Any], segmenting: bool, temperature: float = 1.0
) -> dict[str, Any]:
    """The per-epoch report: losses, accuracy, throughput, and the validation metrics that matter, a
    classifier's scored on its probabilities at `temperature` (its validation outputs: log-probabilities)."""
    from cxrcore.metrics import classification_metrics, segmentation_metrics

    if not validated["count"]:  # the driver refuses an empty val split; a segmenter reads masked rows only
        what = "with a ground-truth lung mask " if segmenting else ""
        raise ValueError(f"the val split holds no image {what}to score epoch {epoch + 1} on")
    metrics: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": trained["loss"],
        "train_images_per_s": trained["images_per_s"],
        "train_data_wait_share": trained["data_wait_share"],
        "val_loss": validated["loss"],
        "val_count": len(validated["outputs"]),
    }
    if segmenting:
        seg = segmentation_metrics(validated["outputs"][:, 0], validated["targets"][:, 0])
        metrics.update(val_dice=seg["dice"], val_iou=seg["iou"], val_score=seg["dice"])
        return {**metrics, KEEP_SCORE: keep_score(metrics)}
    metrics["train_accuracy"] = trained["accuracy"]
    probs = apply_temperature(torch.from_numpy(validated["outputs"]), temperature).numpy()
    val = classification_metrics(validated["labels"], probs)
    metrics.update(
        val_accuracy=val["accuracy"],
        val_macro_f1=val["macro_f1"],
        val_macro_auroc=val["macro_auroc"],
        val_score=val["macro_f1"],
        val_per_class=val["per_class"],
        val_confusion_matrix=val["confusion_matrix"],
    )
    return {**metrics, KEEP_SCORE: keep_score(metrics)}


def resumed_optimizer(
    model: torch.nn.Module, config: TrainConfig, saved: dict[str, Any]
) -> torch.optim.AdamW | None:
    """The optimizer a resumed run goes on with where its `saved` state is of another recipe than
    `adamw`'s (None where it is the same): a run saved by an earlier cxr, whose one parameter group
    decayed every parameter, keeps that group (loaded into two groups, its state would not fit)."""
    if len(saved["param_groups"]) == len(adamw(model, config.lr, config.weight_decay).param_groups):
        return None
    return adamw(model, config.lr, config.weight_decay, decay_all=True)


def _resumed_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: dict[str, Any],
    plan: dict[str, int],
    step: int,
) -> tuple[torch.optim.lr_scheduler.LambdaLR, bool]:
    """The learning-rate schedule of a resumed run, and whether it was planned anew: where it stood, under
    the same plan; under another (other --workers or --epochs: steps of another count), at `step` of the new
    plan, as if the run had been planned so. Its saved step count, read under the new plan, trained a run
    resumed from 1 worker onto 2 at a learning rate of 0 from half-way, and restarted a finished run given
    more --epochs warm."""
    saved = state["scheduler"]
    # A checkpoint of an earlier cxr records no plan: its own step count tells whether the plan is this one
    # (each epoch steps steps_per_epoch times, or once fewer where its last batch held one image).
    epochs = int(state["epoch"]) + 1
    same = state.get("plan") == plan if "plan" in state else 0 <= step - int(saved["last_epoch"]) <= epochs
    if same:
        scheduler.load_state_dict(saved)
        return scheduler, False
    log.warning(
        "the learning-rate schedule continues at step %d of %d: the run was planned with other --workers, "
        "--epochs or --batch-size, or by a cxr that counted an epoch's steps otherwise",
        step, plan["total_steps"],
    )  # fmt: skip
    return warmup_cosine(optimizer, plan["warmup_steps"], plan["total_steps"], start_step=step), True


def _gather(result: EpochResult, world: int) -> dict[str, Any]:
    """Combine every rank's epoch result (all ranks get the same summary)."""
    if world <= 1:
        return combine([result])
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, result)
    return combine(gathered)


def _at_most(batches: Iterable[Batch], rows: int | None) -> Iterator[Batch]:
    """The first `rows` rows of `batches` (all where None), the batch that passes it cut short; the rest is
    read and left out, so that the iterator ends as Ray Data expects."""
    if rows is None:
        yield from batches
        return
    left = rows
    for batch in batches:
        if left > 0:
            size = len(batch["label_index"])
            yield batch if size <= left else {name: values[:left] for name, values in batch.items()}
            left -= size


def _keep_first(batches: Iterable[Batch], kept: list[Batch], images: int) -> Iterator[Batch]:
    """Pass `batches` through, keeping the first ones (up to `images` rows) in `kept`."""
    count = 0
    for batch in batches:
        if count < images:
            kept.append(batch)
            count += len(batch["label_index"])
        yield batch
