"""Ray Train: 2-worker DDP on CPU, checkpoints with cards, resume, evaluation.

The segmenter is trained, registered and used in tests/integration/test_tune.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxrcore.checkpoint import CARD_NAME, TRAIN_STATE_NAME, WEIGHTS_NAME, load_card
from cxrcore.config import EvaluateConfig, TrainConfig
from cxrcore.data.ingest import read_report, read_table, tensor_column
from cxrcore.evaluate.evaluation import evaluate_checkpoint
from cxrcore.inference import Predictor
from cxrcore.train.loop import TrainSession
from cxrcore.train.trainer import TrainResult, fit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def train(data: str, runs: Path, name: str, model: str, **settings: object) -> TrainResult:
    """A small training run (1 epoch, 1 worker unless told otherwise) named `name` under `runs`."""
    defaults: dict[str, object] = {"epochs": 1, "workers": 1, "batch_size": 16, "lr": 3e-3}
    return fit(TrainConfig(data=data, model=model, out=str(runs), name=name, **{**defaults, **settings}))


def test_two_worker_ddp_beats_chance_and_writes_checkpoint_and_card(
    ddp_run: TrainResult, ddp_work: Path, synthetic_dataset: str
) -> None:
    assert ddp_run.metrics["epoch"] == 2
    assert ddp_run.best_metrics["val_accuracy"] > 0.5, ddp_run.best_metrics  # chance is 0.25
    best = Path(ddp_run.best_checkpoint)
    assert best.parent == ddp_work / "cxr-runs/ddp"  # relative --data and --out, where they were typed
    assert {CARD_NAME, WEIGHTS_NAME} <= {p.name for p in best.iterdir()}
    # The optimizer's state, to resume from, is kept in the latest checkpoint only.
    assert [p.parent.name for p in best.parent.glob(f"*/{TRAIN_STATE_NAME}")] == ["checkpoint_epoch_002"]
    card = load_card(best)
    assert card.model["name"] == "dual_cnn" and card.input_spec["channels"] == ["image", "mask"]
    assert card.classes == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert card.data["fingerprint"] == read_report(synthetic_dataset)["fingerprint"]
    assert card.training["workers"] == 2
    from cxrcore.summaries import format_train_result

    said = format_train_result(ddp_run)  # what the checkpoint's figures rest on, and one image's weight
    assert f"validation: {card.metrics['val_count']} images, on which the best checkpoint" in said
    # recorded for the dashboard's Train view (RAY_TRAIN_ENABLE_STATE_TRACKING, off in Ray by default)
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    tracker = get_state_actor()
    assert tracker is not None, "no Train run was recorded for the dashboard"
    assert "ddp" in {run.name for run in ray.get(tracker.get_train_runs.remote()).values()}
    assert card.metrics["val_count"] == read_report(synthetic_dataset)["by_split"]["val"]  # every image
    assert [h["epoch"] for h in card.history] == list(range(1, card.epoch + 2))
    assert card.metrics["val_score"] == pytest.approx(ddp_run.best_metrics["val_score"])
    assert card.metrics["val_score"] == card.metrics["val_macro_f1"]  # checkpoints rank on macro-F1 (README)
    # the input check's reference, fitted on the training split and thresholded on the validation one
    splits = read_report(synthetic_dataset)["by_split"]
    fitted = card.input_reference
    assert (fitted["train_images"], fitted["val_images"]) == (splits["train"], splits["val"])
    from cxrcore.inference import Predictor

    reference = Predictor.from_checkpoint(best).input_reference
    assert reference is not None and reference.threshold == pytest.approx(fitted["threshold"], rel=1e-5)


def test_evaluation_numbers_agree_with_each_other(
    ddp_run: TrainResult, synthetic_dataset: str, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    paths = evaluate_checkpoint(
        EvaluateConfig(checkpoint=ddp_run.best_checkpoint, data=synthetic_dataset, out=str(out))
    )
    expected = {
        "metrics",
        "confusion_matrix",
        "confusion_matrix_normalized",
        "roc_curves",
        "reliability",
        "training_curves",
        "report",
        "predictions",
    }
    assert set(paths) == expected and all(p.is_file() for p in paths.values())
    metrics = json.loads(paths["metrics"].read_text())
    matrix = np.array(metrics["confusion_matrix"])
    test_rows = read_report(synthetic_dataset)["by_split"]["test"]
    assert matrix.sum() == metrics["n"] == test_rows
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    for i, name in enumerate(metrics["classes"]):
        assert metrics["per_class"][name]["support"] == matrix[i].sum()
    # predictions.csv gives back the matrix, and the served probabilities of every image.
    import pandas as pd

    rows = pd.read_csv(paths["predictions"])
    classes = metrics["classes"]
    recounted = pd.crosstab(rows["label"], rows["predicted"]).reindex(index=classes, columns=classes)
    assert (recounted.fillna(0).to_numpy() == matrix).all() and rows["correct"].mean() == metrics["accuracy"]
    probs = rows[[f"p_{name}" for name in classes]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4) and rows["file"].is_unique
    assert set(rows["split"]) == {"test"} and rows["sha256"].str.fullmatch("[0-9a-f]{64}").all()
    # the calibration block and the top-level figures are one computation on the served probabilities
    calibration = metrics["calibration"]
    assert (calibration["ece_after"], calibration["nll_after"]) == (metrics["ece"], metrics["nll"])
    assert "dual_cnn" in paths["report"].read_text()

    # The card's validation figures describe the saved model: two workers each validated half the split,
    # with BatchNorm statistics pooled across them, which is what one evaluation of the weights gives.
    on_val = out / "val"
    evaluate_checkpoint(
        EvaluateConfig(
            checkpoint=ddp_run.best_checkpoint, data=synthetic_dataset, out=str(on_val), split="val"
        )
    )
    scored, card = json.loads((on_val / "metrics.json").read_text()), load_card(ddp_run.best_checkpoint)
    assert scored["n"] == card.metrics["val_count"]
    assert abs(scored["accuracy"] - card.metrics["val_accuracy"]) <= 1.01 / scored["n"], scored
    nll_served, nll_card = scored["calibration"]["nll_after"], card.calibration["nll_after"]
    assert nll_served == pytest.approx(nll_card, rel=1e-3), (nll_served, nll_card)


def test_predictor_matches_training_preprocessing(ddp_run: TrainResult, synthetic_dataset: str) -> None:
    """The Predictor rebuilt from the card alone scores the test split as the evaluation did."""
    predictor = Predictor.from_checkpoint(ddp_run.best_checkpoint)
    frame = read_table(synthetic_dataset, ["image", "mask", "label_index"], split="test").to_pandas()
    probs = predictor.predict_proba(tensor_column(frame["image"]), list(tensor_column(frame["mask"])))
    assert probs.shape == (len(frame), 4)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="needs a lung mask"):
        predictor.predict_proba(tensor_column(frame["image"])[:2])


def test_rerun_with_the_same_name_resumes_after_the_last_epoch(
    ddp_run: TrainResult, ddp_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More --epochs and fewer workers under the same name: one more epoch, the first two kept as is.

    The third epoch streams its data from Parquet through Ray Data, as a dataset too large for the driver
    and the object store does (Kaggle's at 256 px is 2.7 GB of pixels): how data reaches Ray Train is
    not part of a run's identity, and that path is trained on here."""
    from cxrcore.data import ingest
    from cxrcore.train import trainer

    monkeypatch.setattr(trainer, "DRIVER_READ_BYTES", 0)
    monkeypatch.setattr(trainer, "_fits_in_object_store", lambda rows, size: False)
    streamed: list[str] = []

    def read_split(
        dataset: str, split: str, columns: list[str] | None = None, shuffle_files: int | None = None
    ) -> object:
        streamed.append(f"{split} {shuffle_files}")
        return real_read_split(dataset, split, columns, shuffle_files)

    real_read_split = ingest.read_split
    monkeypatch.setattr(ingest, "read_split", read_split)
    config = TrainConfig(
        data=str(ddp_work / "ds"), model="dual_cnn", out=str(ddp_work / "cxr-runs"), name="ddp", epochs=3,
        workers=1, batch_size=8,  # the batch size is the run's: the automatic one would grow with 1 worker
    )  # fmt: skip
    # What Ctrl-C can leave: a checkpoint the workers wrote that the controller never recorded.
    run = ddp_work / "cxr-runs" / "ddp"
    recorded = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert [folder.name for folder in recorded] == ["checkpoint_epoch_001", "checkpoint_epoch_002"]
    unrecorded = run / "checkpoint_epoch_003"  # the epoch being trained, written, never recorded
    shutil.copytree(recorded[-1], unrecorded)
    (unrecorded / "leftover").touch()
    second = fit(config)
    assert not (unrecorded / "leftover").exists() and all(folder.exists() for folder in recorded[-2:])
    assert second.latest_checkpoint is not None and second.latest_checkpoint.endswith("/checkpoint_epoch_003")
    assert streamed == [f"train {config.seed}", "val None"]  # the training files in a new order each epoch
    assert second.metrics["epoch"] == 3
    assert [p.parent.name for p in run.glob(f"*/{TRAIN_STATE_NAME}")] == ["checkpoint_epoch_003"]
    history = load_card(second.latest_checkpoint).history
    assert [h["epoch"] for h in history] == list(range(1, 4))
    # Marked where it went on: 3 epochs on 1 worker is another plan, so its learning rate jumped there.
    assert [h.get("resumed_after") for h in history] == [None, None, 2] and history[2]["lr_replanned"] is True
    # Epoch 2 was not trained again: its record is the first run's, to the last digit.
    assert history[1]["val_loss"] == ddp_run.metrics["val_loss"]


def test_data_kept_in_the_object_store_gets_the_segmenters_masks_once(
    synthetic_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data too large for the driver that fits the object store is read by Ray Data and materialized;
    on CPU the segmenter's masks are made then, once (not by the workers every epoch), as for small data."""
    from ray.data.dataset import MaterializedDataset

    from cxrcore.train import trainer
    from tests.e2e.uploads import write_checkpoint

    monkeypatch.setattr(trainer, "DRIVER_READ_BYTES", 0)
    unet = str(write_checkpoint(tmp_path / "unet", "tiny_unet", 0))
    config = TrainConfig(
        data=synthetic_dataset, model="tiny_dual_cnn", segmenter=unet, image_size=48, out=str(tmp_path)
    )
    built = trainer.build_trainer(config)
    assert built.train_loop_config["masks_from_segmenter"]
    kept = built.run_config.checkpoint_config  # the three best by validation score, ties by loss
    assert (kept.num_to_keep, kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (
        3,
        "val_keep",
        "max",
    )
    assert built.run_config.failure_config.max_failures == config.max_failures >= 1
    for split in ("train", "val"):
        dataset = built.datasets[split]
        assert isinstance(dataset, MaterializedDataset)
        batch = dataset.take_batch(batch_size=10_000, batch_format="numpy")
        assert len(batch["label_index"]) == read_report(synthetic_dataset)["by_split"][split]
        assert batch["mask"].shape[1:] == (48, 48) and batch["has_mask"].all()  # the segmenter's, at 48 px


def test_a_small_dataset_read_by_the_driver_has_the_rows_ray_data_reads(synthetic_dataset: str) -> None:
    """Training data under DRIVER_READ_BYTES (as every test run's is) reaches Ray Train as in-memory blocks
    read by the driver: the same rows and arrays as the Ray Data read it replaces."""
    import hashlib

    from cxrcore.data.ingest import read_split
    from cxrcore.train.loop import TRAIN_COLUMNS
    from cxrcore.train.trainer import DRIVER_READ_BYTES, _in_memory_split, _pixel_bytes, _with_mask

    assert 0 < _pixel_bytes(synthetic_dataset, ("train", "val")) <= DRIVER_READ_BYTES

    def rows(dataset: object) -> dict[str, np.ndarray]:
        batch = dataset.take_batch(batch_size=10_000, batch_format="numpy")  # type: ignore[attr-defined]
        order = np.argsort([hashlib.sha256(image.tobytes()).hexdigest() for image in batch["image"]])
        return {name: batch[name][order] for name in TRAIN_COLUMNS}

    for split, segmenting in [("train", False), ("val", True)]:
        memory = _in_memory_split(synthetic_dataset, split, segmenting, blocks=4)
        streamed = read_split(synthetic_dataset, split, TRAIN_COLUMNS)
        if segmenting:
            streamed = streamed.map_batches(_with_mask, batch_format="numpy")
        assert memory.num_blocks() == 4
        expected, got = rows(streamed), rows(memory)
        assert len(got["label_index"]) == read_report(synthetic_dataset)["by_split"][split]
        for name in TRAIN_COLUMNS:
            assert got[name].dtype == expected[name].dtype and np.array_equal(got[name], expected[name]), name
        assert got["image"].shape[1:] == (64, 64)


def test_streamed_training_files_come_in_a_new_order_each_epoch_drawn_from_the_seed(
    synthetic_dataset: str,
) -> None:
    """Data larger than the object store is read from Parquet every epoch: its files in another order each
    time (which file's rows come first), the same orders for the same seed, and in their own order without
    one (validation, evaluation)."""
    from cxrcore.data.ingest import parquet_files, read_split

    assert len([f for f in parquet_files(synthetic_dataset).files if "split=train" in f]) >= 2

    def first_rows(seed: int | None, epochs: int = 4) -> list[int]:
        dataset = read_split(synthetic_dataset, "train", ["row_id"], shuffle_files=seed)
        dataset.context.execution_options.preserve_order = True  # the files' order, not the tasks' finish
        return [
            int(next(iter(dataset.iter_batches(batch_size=1, batch_format="numpy")))["row_id"][0])
            for _ in range(epochs)
        ]

    orders = first_rows(7)
    assert len(set(orders)) > 1 and first_rows(7) == orders
    assert len(set(first_rows(None))) == 1


@pytest.mark.gpu
def test_gpu_training_runs_on_cuda(synthetic_dataset: str, runs: Path) -> None:
    import torch

    result = train(
        synthetic_dataset, runs, "gpu", "tiny_cnn_lstm", workers=torch.cuda.device_count(), gpu=True
    )
    assert result.metrics["epoch"] == 1 and load_card(result.best_checkpoint).training["gpu"]


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_validation_is_shared_among_workers_without_dropping_a_row(
    ray_session: None, in_memory: bool
) -> None:
    """Training shards stay equal (DDP steps in lockstep); validation scores every row of its split. Data
    in memory is divided without a SplitCoordinator actor, and one worker gets every dataset whole,
    without one either (streamed data then runs in the worker)."""
    import ray
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    from cxrcore.train.sharding import WholeValidation
    from cxrcore.train.trainer import _shard_options

    datasets = {name: ray.data.range(41, override_num_blocks=6) for name in ("train", "val")}
    if in_memory:
        datasets = {name: dataset.materialize() for name, dataset in datasets.items()}
    shards = WholeValidation(execution_options=_shard_options()).configure(datasets, 2, None, None)
    streamed = [isinstance(shard[name], StreamSplitDataIterator) for shard in shards for name in shard]
    assert streamed == [not in_memory] * 4

    @ray.remote(num_cpus=0)
    def ids(iterator: object) -> list[int]:
        return [int(i) for batch in iterator.iter_batches() for i in batch["id"]]  # type: ignore[attr-defined]

    train = ray.get([ids.remote(shard["train"]) for shard in shards])
    val = ray.get([ids.remote(shard["val"]) for shard in shards])
    if in_memory:  # every row in a share; the loop takes 20 of each (rows_per_worker), a row left out
        assert sorted(map(len, train)) == [20, 21] and sorted(train[0] + train[1]) == list(range(41))
    else:  # Ray's equal split: one row dropped so that both take as many steps
        assert len(train[0]) == len(train[1]) == 20
    assert sorted(val[0] + val[1]) == list(range(41))
    (alone,) = WholeValidation(execution_options=_shard_options()).configure(datasets, 1, None, None)
    assert not [name for name in alone if isinstance(alone[name], StreamSplitDataIterator)]
    if not in_memory:  # one worker reads streamed training data in order: the same --seed, the same run
        options = {name: alone[name]._base_dataset.context.execution_options for name in alone}
        assert options["train"].preserve_order and not options["val"].preserve_order
    assert (
        sorted(ray.get(ids.remote(alone["train"])))
        == sorted(ray.get(ids.remote(alone["val"])))
        == list(range(41))
    )


class _InThisProcess(TrainSession):
    """The worker loop's session as one CPU worker in the test's process; keeps the reported checkpoint."""

    def __init__(self, datasets: dict[str, object], keep: Path, resume: Path | None = None) -> None:
        self.rank, self.world, self.run_name, self.device = 0, 1, "bf16", torch.device("cpu")
        self._datasets, self._keep, self._resume, self.metrics = datasets, keep, resume, {}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def get_checkpoint(self) -> object:
        from ray.train import Checkpoint

        return None if self._resume is None else Checkpoint.from_directory(str(self._resume))

    def dataset(self, split: str) -> object:
        return self._datasets[split]

    def report(self, metrics: dict[str, object], checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        shutil.copytree(checkpoint_dir, self._keep, dirs_exist_ok=True)
        shutil.copytree(checkpoint_dir, f"{self._keep}-epoch{metrics['epoch']}")  # each epoch's, kept
        self.metrics = metrics


def test_local_mode_without_gpu_trains_on_the_cpu_where_ray_hands_it_a_gpu(
    synthetic_dataset: str, tmp_path: Path
) -> None:
    """Ray Train's local mode (--workers 0) gives the loop a visible GPU whatever use_gpu says; without
    --gpu the run stays on the CPU. The session here claims CUDA, which this machine does not have: a loop
    that followed it would fail at its first `.to("cuda")`."""
    from cxrcore.train.loop import run_training
    from cxrcore.train.trainer import training_inputs

    config = TrainConfig(
        data=synthetic_dataset, model="tiny_cnn_lstm", epochs=1, workers=1, batch_size=16,
        class_weights=False, out=str(tmp_path), name="local",
    )  # fmt: skip
    settings, datasets = training_inputs(config)
    settings["class_weights"] = [0.2, 0.2, 0.2, 3.4]  # as for a rare class; the default's are near 1 here
    session = _InThisProcess(datasets, tmp_path / "checkpoint")
    session.device = torch.device("cuda", 0)
    session.prepare_model = lambda model: pytest.fail("Ray's prepare_model would move it to the GPU")  # type: ignore[method-assign]
    run_training(settings, session)
    assert session.metrics["epoch"] == 1 and session.metrics["val_count"] > 0
    assert not load_card(tmp_path / "checkpoint").training["gpu"]


class _Reports(_InThisProcess):
    """_InThisProcess that keeps every report, checkpoint or not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, object], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            super().report(metrics, checkpoint_dir)


def test_patience_stops_the_loop_after_the_best_and_a_rerun_goes_on_only_with_more(
    synthetic_dataset: str, tmp_path: Path
) -> None:
    """`--patience 1` in the worker loop itself: the run stops at the first epoch that is not the best so
    far by cxr's rule (the one that picks the best checkpoint), and its last report names that best. The
    same patience again trains nothing; a larger one trains on from the stopped epoch."""
    from cxrcore.metrics import STOPPED_EARLY, best_by_validation
    from cxrcore.train.loop import run_training
    from cxrcore.train.trainer import training_inputs

    config = TrainConfig(
        data=synthetic_dataset, model="tiny_cnn_lstm", epochs=8, workers=1, batch_size=32, lr=0.02,
        patience=1, out=str(tmp_path), name="patience",
    )  # fmt: skip
    settings, datasets = training_inputs(config)
    session = _Reports(datasets, tmp_path / "checkpoint")
    run_training(settings, session)
    epochs = [int(r["epoch"]) for r in session.reports]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 8, epochs  # stopped before the end
    *trained, last = session.reports
    best = best_by_validation(session.reports, lambda report: report)
    assert best is not None and last[STOPPED_EARLY] == best["epoch"] == last["epoch"] - 1
    for end in range(2, len(trained) + 1):  # each earlier epoch was the best so far: no earlier stop
        assert best_by_validation(trained[:end], lambda report: report) is trained[end - 1]
    assert all(STOPPED_EARLY not in report for report in trained)

    again = _Reports(datasets, tmp_path / "again", resume=tmp_path / "checkpoint")
    run_training(settings, again)  # the same --patience: it has run out, nothing to train, nothing said
    assert again.reports == []
    settings["train"] = {**settings["train"], "patience": 3}
    more = _Reports(datasets, tmp_path / "more", resume=tmp_path / "checkpoint")
    run_training(settings, more)
    assert more.reports and int(more.reports[0]["epoch"]) == last["epoch"] + 1


def test_a_bf16_run_validates_the_float32_model_that_is_served(
    synthetic_dataset: str, tmp_path: Path
) -> None:
    """A `--gpu` run trains under bf16 autocast (here on the CPU, which has it too), but validation, which
    ranks checkpoints and drives ASHA, scores the model as the Predictor serves it: in float32. The
    validation loss is the served model's on the validation split, to float32 rounding; validated under
    bf16 it was 4e-5 off (relative) for this tiny model, whose few convolutions are most of what autocast
    changes. Training weighs the classes unevenly here, validation does not: its loss is the plain NLL
    (the card's calibration nll_before), which breaks near-ties between checkpoints."""
    import torch.nn.functional as F

    from cxrcore.train.loop import run_training
    from cxrcore.train.trainer import training_inputs

    config = TrainConfig(
        data=synthetic_dataset, model="tiny_cnn_lstm", epochs=1, workers=1, batch_size=16, gpu=True,
        class_weights=False, out=str(tmp_path), name="bf16",
    )  # fmt: skip
    settings, datasets = training_inputs(config)
    settings["class_weights"] = [0.2, 0.2, 0.2, 3.4]  # as for a rare class; the default's are near 1 here
    session = _InThisProcess(datasets, tmp_path / "checkpoint")
    run_training(settings, session)

    predictor = Predictor.from_checkpoint(tmp_path / "checkpoint")
    frame = read_table(synthetic_dataset, ["image", "label_index"], split="val").to_pandas()
    logits = torch.from_numpy(predictor.predict_logits(tensor_column(frame["image"])))
    served_loss = float(F.cross_entropy(logits, torch.from_numpy(frame["label_index"].to_numpy())))
    assert session.metrics["val_count"] == len(frame)
    assert session.metrics["val_loss"] == pytest.approx(served_loss, rel=3e-6)
    nll = load_card(tmp_path / "checkpoint").calibration["nll_before"]
    assert session.metrics["val_loss"] == pytest.approx(nll, rel=1e-5)


def test_the_same_seed_trains_the_same_model_and_another_seed_another(
    synthetic_dataset: str, tmp_path: Path
) -> None:
    """Two runs with one --seed give the same weights, bit for bit: the local shuffle of each epoch is
    seeded (it was not, and two runs differed from the first epoch), as are augmentation and dropout."""
    from safetensors.torch import load_file

    from cxrcore.train.loop import run_training
    from cxrcore.train.trainer import training_inputs

    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        config = TrainConfig(
            data=synthetic_dataset, model="tiny_cnn_lstm", epochs=2, workers=1, batch_size=8, seed=seed,
            out=str(tmp_path), name=name,
        )  # fmt: skip
        settings, datasets = training_inputs(config)
        session = _InThisProcess(datasets, tmp_path / name)
        run_training(settings, session)
        return load_file(str(tmp_path / name / WEIGHTS_NAME))

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)

    # Resumed after epoch 1, the run trains epoch 2 as the uninterrupted one did: the optimizer's state
    # comes back, and epoch 2's shuffle, augmentation and dropout are drawn afresh from the seed.
    config = TrainConfig(
        data=synthetic_dataset, model="tiny_cnn_lstm", epochs=2, workers=1, batch_size=8, seed=0,
        out=str(tmp_path), name="resumed",
    )  # fmt: skip
    settings, datasets = training_inputs(config)
    run_training(settings, _InThisProcess(datasets, tmp_path / "resumed", resume=tmp_path / "a-epoch1"))
    resumed = load_file(str(tmp_path / "resumed" / WEIGHTS_NAME))
    assert all(torch.equal(first[key], resumed[key]) for key in first)
