"""The training engine's batch preparation (which lung masks a dual-channel model reads) and the data a
run refuses before it starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrcore.models import create_model, get_input_spec
from cxrcore.train.engine import prepare_batch


def _batch(size: int) -> dict[str, torch.Tensor]:
    """Four images, the first two with a full-image lung mask, the last two without one."""
    return {
        "image": torch.full((4, size, size), 128, dtype=torch.uint8),
        "mask": torch.cat([torch.full((2, size, size), 255), torch.zeros(2, size, size)]).to(torch.uint8),
        "has_mask": torch.tensor([True, True, False, False]),
        "label_index": torch.arange(4),
    }


def _empty_masks(unit_images: torch.Tensor) -> torch.Tensor:
    """A segmenter that finds no lung anywhere."""
    return torch.zeros_like(unit_images)


def test_masks_come_from_the_data_in_training_and_from_the_segmenter_as_served() -> None:
    spec = get_input_spec(create_model("tiny_dual_cnn", image_size=32))
    # Training: the dataset's masks where it has them, the segmenter's for the rest.
    _, mask = prepare_batch(_batch(32), spec, None, _empty_masks)
    assert mask is not None
    assert mask[:2].min() == 1.0 and mask[2:].max() == 0.0
    # Validation, like Serve, never uses the dataset's masks: every one is the segmenter's.
    _, mask = prepare_batch(_batch(32), spec, None, _empty_masks, served_masks=True)
    assert mask is not None and mask.max() == 0.0
    # Without a segmenter there is nothing else to read: the dataset's masks stay.
    _, mask = prepare_batch(_batch(32), spec, None, None, served_masks=True)
    assert mask is not None and mask[:2].min() == 1.0


@pytest.mark.parametrize(
    ("by_split", "message"),
    [
        ({"train": 0, "val": 4, "test": 4}, "no image in its train split"),
        ({"train": 32, "val": 0, "test": 4}, "no image in its val split, on which every epoch is scored"),
    ],
)
def test_a_dataset_without_training_or_validation_images_is_refused_before_training(
    tmp_path: Path, by_split: dict[str, int], message: str
) -> None:
    """Found before Ray Train starts, rather than as a KeyError in a worker after the first epoch."""
    from cxrcore.config import ConfigError
    from cxrcore.data.ingest import REPORT_NAME
    from cxrcore.train.trainer import check_dataset

    (tmp_path / REPORT_NAME).write_text(json.dumps({"by_split": by_split}))
    with pytest.raises(ConfigError, match=message) as error:
        check_dataset(str(tmp_path))
    assert "cxr data ingest" in str(error.value)


def _maskless_dataset(root: Path) -> str:
    """A dataset as far as the checks before training read one: its report and its Parquet schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrcore.data.ingest import REPORT_NAME

    report = {
        "by_split": {"train": 32, "val": 4, "test": 4}, "by_class_split": {}, "ingested": 40,
        "without_mask": 40, "config": {"size": 32},
    }  # fmt: skip
    (root / REPORT_NAME).write_text(json.dumps(report))
    for split, rows in report["by_split"].items():
        (root / f"split={split}").mkdir()
        columns = {
            "image": [b""] * rows,
            "mask": [b""] * rows,
            "has_mask": [False] * rows,
            "label_index": [0] * rows,
        }
        pq.write_table(pa.table(columns), root / f"split={split}/part-0.parquet")
    return str(root)


def test_models_that_need_masks_are_refused_on_a_dataset_without_any(tmp_path: Path) -> None:
    """The segmenter that dual-channel models are served with learns from the dataset's masks: without
    masks, Tune and the segmenter's own run stop before training (they failed after its first epoch)."""
    from cxrcore.config import ConfigError, TrainConfig, TuneConfig
    from cxrcore.train.trainer import loop_config
    from cxrcore.tune import preflight

    data = _maskless_dataset(tmp_path)
    tune = TuneConfig(data=data, registry=str(tmp_path / "reg"), models="tiny_dual_cnn,tiny_cnn_lstm")
    with pytest.raises(ConfigError, match=r"tiny_dual_cnn reads a lung mask.*has none"):
        preflight(tune)
    preflight(TuneConfig(data=data, registry=str(tmp_path / "reg"), models="tiny_cnn_lstm"))  # image alone
    with pytest.raises(ConfigError, match="no lung mask to learn segmenting from"):
        loop_config(TrainConfig(data=data, model="tiny_unet"))


def test_masks_made_once_by_the_driver_are_the_masks_the_workers_would_make(tmp_path: Path) -> None:
    """On CPU a small dataset's segmenter masks are computed once before training (trainer._segments_once);
    read as the dataset's, they must be the masks prepare_batch makes each epoch with served_masks."""
    import numpy as np

    from cxrcore.config import TrainConfig
    from cxrcore.data.batches import to_unit
    from cxrcore.segmenter import load_mask_source
    from cxrcore.train.trainer import _segments_once
    from tests.e2e.uploads import write_checkpoint

    unet = str(write_checkpoint(tmp_path / "unet", "tiny_unet", 0))
    config = TrainConfig(data="d", model="tiny_dual_cnn", segmenter=unet, image_size=48)
    segment = _segments_once(config, 48)
    assert segment is not None
    for other in ({"train_masks": "dataset"}, {"gpu": True}, {"model": "tiny_cnn_lstm"}, {"segmenter": None}):
        assert _segments_once(TrainConfig(**{**vars(config), **other}), 48) is None, other  # type: ignore[arg-type]

    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (5, 64, 64), dtype=np.uint8),
        "mask": np.zeros((5, 64, 64), dtype=np.uint8),
        "has_mask": np.array([True, False, True, False, True]),
        "label_index": np.arange(5) % 4,
    }
    made = segment(batch)
    assert made["mask"].shape == (5, 48, 48) and made["mask"].dtype == np.uint8 and made["has_mask"].all()
    spec = get_input_spec(create_model("tiny_dual_cnn", image_size=48))
    torch_batch = {name: torch.from_numpy(column) for name, column in batch.items()}
    _, each_epoch = prepare_batch(torch_batch, spec, None, load_mask_source(unet), served_masks=True)
    made_batch = {name: torch.from_numpy(column) for name, column in made.items()}
    _, read = prepare_batch(made_batch, spec, None, None)
    assert read is not None and each_epoch is not None and torch.equal(read, each_epoch)

    # A block of more than 64 images: the first full 64 go as passes of 64, 32 ... 2 on trial, the rest
    # as passes of the fastest; every mask is the one a single pass over the block makes.
    many = {"image": rng.integers(0, 256, (64 * 3 + 5, 64, 64), dtype=np.uint8)}
    masks = segment(many)["mask"]
    whole = load_mask_source(unet)(to_unit(torch.from_numpy(many["image"]), 48))
    assert masks.shape == (197, 48, 48) and np.array_equal(masks, (whole[:, 0] * 255).to(torch.uint8).numpy())


class _Replay(torch.nn.Module):
    """A classifier that answers each batch with the next rows of fixed `logits`."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.served = logits, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        start, self.served = self.served, self.served + len(inputs)
        return self.logits[start : self.served]


def test_validation_keeps_the_log_probabilities_the_temperature_is_fitted_on() -> None:
    """A confident model's wrong answers sit 40 nats below its choice: kept as float32 probabilities they
    rounded to 0, their log was clipped at -27.6, and the temperature fitted on them came out too low, so
    the served probabilities were overconfident while the card's calibration figures said otherwise."""
    from cxrcore.calibration import fit_temperature
    from cxrcore.train.engine import combine, run_epoch

    labels = np.arange(40) % 4
    wrong = np.random.default_rng(0).random(40) < 0.1
    logits = 40.0 * np.eye(4)[np.where(wrong, (labels + 1) % 4, labels)]

    spec = get_input_spec(create_model("tiny_cnn_lstm", image_size=32))
    batches = [
        {
            "image": torch.zeros((4, 32, 32), dtype=torch.uint8),
            "mask": torch.zeros((4, 32, 32), dtype=torch.uint8),
            "has_mask": torch.zeros(4, dtype=torch.bool),
            "label_index": torch.from_numpy(labels[i : i + 4]),
        }
        for i in range(0, 40, 4)
    ]
    outputs = combine(
        [run_epoch(_Replay(torch.tensor(logits, dtype=torch.float32)), batches, spec, keep_outputs=True)]
    )["outputs"]
    expected = torch.log_softmax(torch.tensor(logits), dim=1).numpy()
    np.testing.assert_allclose(outputs, expected, atol=1e-4)
    assert fit_temperature(outputs, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    clipped = np.log(np.exp(expected.astype(np.float32)) + 1e-12)  # as validation kept them before
    assert fit_temperature(clipped, labels) < 0.8 * fit_temperature(outputs, labels)


def test_a_last_training_batch_of_one_image_is_left_out() -> None:
    """A ResNet at 32 px has 1×1 feature maps in its last stage, where BatchNorm cannot train on one image,
    nor recompute its statistics from one; evaluation scores every image."""
    from cxrcore.train.engine import recalibrate_batchnorm, run_epoch

    model = create_model("tiny_resnet", image_size=32)
    spec = get_input_spec(model)
    batches = [{key: value[:n] for key, value in _batch(32).items()} for n in (4, 1)]
    optimizer = torch.optim.AdamW(model.parameters())
    assert run_epoch(model, batches, spec, optimizer=optimizer).count == 4
    assert run_epoch(model, batches, spec).count == 5
    assert recalibrate_batchnorm(model, batches, spec) == 4


def test_a_class_weighted_loss_over_an_epoch_is_the_weighted_mean_over_every_image() -> None:
    """cross_entropy's weighted mean divides by each batch's own summed weights: averaged by image count,
    a batch of rare-class images (weight 3) counted as much as a batch of common ones, and the epoch's
    val_loss (the tie-break between checkpoints and trials) depended on how the split fell into batches."""
    from cxrcore.train.engine import class_weights, combine, run_epoch

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 9 + [1] * 3 + [2] * 3 + [3] * 3)  # one batch of the common class first
    logits = torch.randn(len(labels), 4, generator=generator) * 3
    weights = class_weights([9, 3, 3, 3])

    spec = get_input_spec(create_model("tiny_cnn_lstm", image_size=32))
    batches = [
        {
            "image": torch.zeros((len(part), 32, 32), dtype=torch.uint8),
            "mask": torch.zeros((len(part), 32, 32), dtype=torch.uint8),
            "has_mask": torch.zeros(len(part), dtype=torch.bool),
            "label_index": part,
        }
        for part in labels.split([9, 9])
    ]
    whole = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
    assert combine([run_epoch(_Replay(logits), batches, spec, loss_weights=weights)])[
        "loss"
    ] == pytest.approx(float(whole), rel=1e-5)
    unweighted = torch.nn.functional.cross_entropy(logits, labels)
    assert combine([run_epoch(_Replay(logits), batches, spec)])["loss"] == pytest.approx(
        float(unweighted), rel=1e-5
    )


def test_a_step_weighs_each_image_by_its_class_whatever_else_its_batch_holds() -> None:
    """A review (session 54): cross_entropy's weighted mean divides by the batch's own summed weights, so a
    batch of one class trained as if unweighted, and small batches (4 images per worker, the automatic size
    on small data) gave the rarest class 0.15 of the loss where a balanced mix gives it 0.25. The step's
    loss is now each image's weighted cross-entropy over the batch's image count."""
    from cxrcore.train.engine import class_weights, classification_loss

    weights = class_weights([108, 180, 305, 40])
    expected_mean = sum(n * float(w) for n, w in zip([108, 180, 305, 40], weights, strict=True)) / 633
    assert expected_mean == pytest.approx(1.0)  # the plain cross-entropy's scale, on the training mix
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    rare = torch.full((4,), 3)
    loss, reported = classification_loss(logits, rare, weights)
    plain = torch.nn.functional.cross_entropy(logits, rare)
    assert float(loss) == pytest.approx(float(weights[3] * plain), rel=1e-6)  # weighed, alone in its batch
    assert float(reported) == pytest.approx(float(plain), rel=1e-6)  # the weighted mean, as reported
    mixed = torch.tensor([0, 1, 2, 3])
    loss, reported = classification_loss(logits, mixed, weights)
    each = torch.nn.functional.cross_entropy(logits, mixed, reduction="none") * weights[mixed]
    assert float(loss) == pytest.approx(float(each.sum() / 4), rel=1e-6)
    assert float(reported) == pytest.approx(float(each.sum() / weights[mixed].sum()), rel=1e-6)
    assert classification_loss(logits, mixed, None)[0] == torch.nn.functional.cross_entropy(logits, mixed)


def test_a_batch_whose_classes_all_weigh_nothing_counts_for_nothing() -> None:
    """A class absent from training weighs 0: a batch of only that class has a loss of 0/0, which must not
    turn the epoch's loss into NaN now that the steps' losses are read at the epoch's end."""
    from cxrcore.train.engine import class_weights, combine, run_epoch

    labels = torch.tensor([0, 1, 3, 0, 2, 2])
    logits = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(1))
    weights = class_weights([2, 1, 0, 1])
    assert float(weights[2]) == 0.0

    spec = get_input_spec(create_model("tiny_cnn_lstm", image_size=32))
    batches = [
        {"image": torch.zeros((len(part), 32, 32), dtype=torch.uint8), "label_index": part}
        for part in labels.split([4, 2])  # the second batch: class 2 alone
    ]
    result = run_epoch(_Replay(logits), batches, spec, loss_weights=weights)
    expected = torch.nn.functional.cross_entropy(logits[:4], labels[:4], weight=weights)
    assert combine([result])["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result.count == 6 and result.correct == int((logits.argmax(1) == labels).sum())


def _augmented(device: str, seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    from cxrcore.data.batches import AugmentConfig, augment

    images = torch.linspace(0, 1, 64).expand(8, 1, 64, 64).contiguous().to(device)
    masks = (images > 0.5).float()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return augment(images, masks, AugmentConfig(), generator)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_augmentation_repeats_with_its_seed_on_every_device(device: str) -> None:
    """Parameters are drawn on the CPU and the noise on the device, from a generator seeded by the CPU one:
    a seeded run augments alike again, another seed differently, and masks stay 0/1."""
    image, mask = _augmented(device, 7)
    again, _ = _augmented(device, 7)
    other, _ = _augmented(device, 8)
    assert image.device.type == device and torch.equal(image, again) and not torch.equal(image, other)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert mask is not None and set(mask.unique().tolist()) <= {0.0, 1.0}
    unseeded, _ = _augmented(device, None)  # the device's own generator
    assert unseeded.shape == image.shape and not torch.equal(unseeded, image)


def test_a_resumed_run_keeps_its_schedule_or_takes_the_new_plans_place_in_it() -> None:
    """Resumed under the same plan, the schedule goes on where it stood; under another (1 worker's 10 steps
    an epoch, resumed on 2 workers' 5), at the new plan's step for that epoch. Read under the new plan, the
    saved count (20 of 30 steps) put it at 2/3 of the way at 1/3, and half the rest trained at 0."""
    from cxrcore.train.engine import warmup_cosine
    from cxrcore.train.loop import _resumed_schedule

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    first = optimizer()
    old = warmup_cosine(first, 10, 60)  # 6 epochs of 10 steps, one of warmup
    for _ in range(20):  # two epochs
        first.step()
        old.step()
    state = {
        "optimizer": first.state_dict(),
        "scheduler": old.state_dict(),
        "plan": {"warmup_steps": 10, "total_steps": 60},
        "epoch": 1,  # two epochs done
    }

    same = optimizer()
    fresh = warmup_cosine(same, 10, 60)  # as the loop does: the schedule, then the optimizer's saved state
    same.load_state_dict(state["optimizer"])
    resumed, replanned = _resumed_schedule(same, fresh, state, state["plan"], 20)
    assert not replanned  # where it stood: the card's history marks the resume, not a new plan
    assert resumed.last_epoch == 20 and same.param_groups[0]["lr"] == pytest.approx(old.get_last_lr()[0])

    other = optimizer()
    fresh = warmup_cosine(other, 5, 30)  # 6 epochs of 5 steps
    other.load_state_dict(state["optimizer"])
    plan = {"warmup_steps": 5, "total_steps": 30}
    resumed, replanned = _resumed_schedule(other, fresh, state, plan, 10)
    assert replanned
    expected = 0.5 * (1 + np.cos(np.pi * (10 - 5) / (30 - 5)))  # the new plan's, after two epochs
    assert resumed.last_epoch == 10 and other.param_groups[0]["lr"] == pytest.approx(expected)
    lrs = []
    for _ in range(20):  # the four epochs left: the rate falls to 0 at the last step, not half-way
        other.step()
        resumed.step()
        lrs.append(other.param_groups[0]["lr"])
    assert all(lr > 0 for lr in lrs[:-1]) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert other.param_groups[0]["initial_lr"] == 1.0
    # A checkpoint of an earlier cxr has no plan: its step count tells whether the plan is the same.
    # Its last batch of one image skipped once: 19 steps where the plan counts 20, the same plan (loaded).
    earlier = {key: value for key, value in state.items() if key != "plan"}
    earlier["scheduler"] = {**earlier["scheduler"], "last_epoch": 19}
    cases = (
        ({"warmup_steps": 10, "total_steps": 60}, 20, 19),
        ({"warmup_steps": 5, "total_steps": 30}, 10, 10),
    )
    for new_plan, step, expected in cases:
        again = optimizer()
        fresh = warmup_cosine(again, new_plan["warmup_steps"], new_plan["total_steps"])
        again.load_state_dict(state["optimizer"])
        assert _resumed_schedule(again, fresh, earlier, new_plan, step)[0].last_epoch == expected
    two_to_one = {**earlier, "scheduler": {**earlier["scheduler"], "last_epoch": 10}}  # 5 steps an epoch
    again = optimizer()
    fresh = warmup_cosine(again, 10, 60)
    again.load_state_dict(state["optimizer"])
    resumed, replanned = _resumed_schedule(
        again, fresh, two_to_one, {"warmup_steps": 10, "total_steps": 60}, 20
    )
    assert (
        replanned and resumed.last_epoch == 20
    )  # repositioned: 10 steps behind is not one short batch an epoch


def test_a_diverged_epoch_is_named_as_one_not_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cxr train --lr 1e12` ended, after its retries, in a traceback from scoring NaN probabilities
    ("probs must be finite"); the epoch's loss is checked first, and the command says what to change."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from cxrcore.config import ConfigError, TrainConfig
    from cxrcore.train import trainer
    from cxrcore.train.loop import TrainingDiverged, check_finite

    check_finite(0, 1.2, 1.4)
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 3: its validation loss is inf"):
        check_finite(2, 1.2, float("inf"))
    wrapped = RayTaskError("train_fn", "traceback text", TrainingDiverged("training diverged in epoch 1: x"))
    failed = WorkerGroupError("worker group failed", {0: wrapped})

    class Fails:
        def fit(self) -> None:
            raise failed

    monkeypatch.setattr(trainer, "build_trainer", lambda config, callbacks: Fails())
    config = TrainConfig(data="ds", model="tiny_cnn_lstm", lr=1e12)
    with pytest.raises(ConfigError, match=r"^training diverged in epoch 1: x \(this run's: 1e\+12\)$"):
        trainer._fit(config)


def test_the_card_carries_the_warning_that_the_datasets_sources_separate_classes(tmp_path: Path) -> None:
    """GET /v1/model shows the card: its scores, on a dataset whose sources separate classes, may measure
    the sources; the warning ingest gave goes with them."""
    from cxrcore.config import TrainConfig
    from cxrcore.data.ingest import REPORT_NAME
    from cxrcore.train.trainer import loop_config
    from tests.unit.test_external_eval import write_dataset

    rows = [(name, split, 10 * k + i) for k, name in enumerate(("COVID", "Normal")) for i, split in
            enumerate(("train", "train", "val", "test"))]  # fmt: skip
    data = write_dataset(tmp_path / "ds", rows, "separated", sources=["a"] * 4 + ["b"] * 4)
    config = TrainConfig(data=data, model="tiny_cnn_lstm")
    assert "sources_separate_classes" not in loop_config(config)["data"]
    report_file = tmp_path / "ds" / REPORT_NAME
    report = json.loads(report_file.read_text())
    report["source_separates"] = [["COVID", "Normal"]]
    report["by_source_class"] = {"a": {"COVID": 4}, "b": {"Normal": 4}}
    report_file.write_text(json.dumps(report))
    data_block = loop_config(config)["data"]
    assert data_block["sources_separate_classes"].startswith("every source holds one class only: a model can")
    # and the training split's class mix, which the probabilities are made for without class weights
    assert data_block["train_class_counts"] == {
        "COVID": 2,
        "Lung_Opacity": 0,
        "Normal": 2,
        "Viral Pneumonia": 0,
    }


def test_a_frozen_backbone_trains_its_head_alone_and_keeps_its_batchnorm_statistics(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A review (session 52): freezing existed in the Python API only, and left BatchNorm's running
    statistics to every batch (all 40 buffers of a ResNet moved, then precise BN replaced them), so the
    "frozen" features moved. `--freeze-backbone` trains the head; the backbone's weights and statistics
    stay."""
    from cxrcore.cli import main
    from cxrcore.models.pretrained import freeze_all_but_head
    from cxrcore.train.engine import frozen_norms, recalibrate_batchnorm, run_epoch

    torch.manual_seed(0)
    model = create_model("tiny_resnet", image_size=32)
    assert freeze_all_but_head(model) == ["fc.weight", "fc.bias"]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    spec = get_input_spec(model)
    batches = [_batch(32) for _ in range(3)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run_epoch(model, batches, spec, optimizer=optimizer)
    recalibrate_batchnorm(model, batches, spec)
    after = model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed == {"fc.weight", "fc.bias"}  # not a running mean, variance or batch count
    assert len(frozen_norms(model)) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    assert frozen_norms(create_model("tiny_resnet", image_size=32)) == []  # nothing frozen unasked

    train = ["train", "--data", "ds", "--dry-run", "--freeze-backbone"]
    assert main([*train, "--model", "tiny_cnn_lstm", "--pretrained", "none"]) == 2
    assert "--freeze-backbone: needs pretrained weights" in capsys.readouterr().err
    assert main([*train, "--model", "tiny_cnn_lstm"]) == 2
    assert "--freeze-backbone: tiny_cnn_lstm has no pretrained backbone to freeze" in capsys.readouterr().err
    assert main([*train, "--model", "tiny_resnet"]) == 2  # `auto`: tiny_resnet has no hub weights, so none
    assert "--freeze-backbone: --pretrained auto gives tiny_resnet no weights" in capsys.readouterr().err


def test_weight_decay_spares_norms_and_biases_and_a_run_saved_with_one_group_resumes_in_it() -> None:
    """AdamW decays the convolutions' and linear layers' weights, not BatchNorm's scale and shift or the
    biases; a run whose state an earlier cxr saved (one group, every parameter decayed) resumes as it was."""
    from cxrcore.config import TrainConfig
    from cxrcore.models import create_model
    from cxrcore.train.engine import adamw
    from cxrcore.train.loop import resumed_optimizer

    model = create_model("tiny_dual_cnn", image_size=32)
    config = TrainConfig(data="ds", model="tiny_dual_cnn", weight_decay=0.05)
    optimizer = adamw(model, config.lr, config.weight_decay)
    decayed, spared = optimizer.param_groups
    names = {id(param): name for name, param in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    assert all(param.ndim > 1 for param in decayed["params"])
    assert {names[id(param)].rsplit(".", 1)[1] for param in spared["params"]} == {"weight", "bias"}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(names)
    assert resumed_optimizer(model, config, optimizer.state_dict()) is None  # today's recipe: as it is

    earlier = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model(torch.rand(2, 2, 32, 32)).sum().backward()
    earlier.step()
    resumed = resumed_optimizer(model, config, earlier.state_dict())
    assert resumed is not None and [group["weight_decay"] for group in resumed.param_groups] == [0.05]
    resumed.load_state_dict(earlier.state_dict())  # fits, moments and all
    assert len(resumed.state) == len(names)


def test_a_worker_with_a_row_more_trains_on_as_many_rows_as_the_others() -> None:
    """Data in memory is shared among workers in parts that differ by one row at most; each worker's epoch
    takes rows // workers of its part (`_at_most`), so DDP's workers step in lockstep, and the row left out
    is the one its shuffle draws last, not the same rows in every epoch (a review, session 54)."""
    from cxrcore.train.loop import _at_most, epoch_steps

    def batches(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
        start, out = 0, []
        for size in sizes:
            rows = torch.arange(start, start + size)
            out.append({"label_index": rows, "image": rows.view(-1, 1, 1).expand(-1, 2, 2)})
            start += size
        return out

    taken = list(_at_most(batches([4, 4, 4, 4, 4, 1]), 20))  # 21 rows, 20 taken: the last batch left out
    assert [len(b["label_index"]) for b in taken] == [4, 4, 4, 4, 4]
    taken = list(_at_most(batches([4, 4, 3]), 10))  # a batch cut short, every column alike
    assert [len(b["label_index"]) for b in taken] == [4, 4, 2] and taken[-1]["image"].shape == (2, 2, 2)
    assert taken[-1]["label_index"].tolist() == [8, 9]
    assert sum(len(b["label_index"]) for b in _at_most(batches([4, 4, 3]), None)) == 11
    # the schedule plans the steps a worker runs: 36 rows at batch 4 are 9 steps, 37 too (a last batch of
    # one image is not trained on), 38 are 10
    assert [epoch_steps(rows, 4) for rows in (36, 37, 38)] == [9, 9, 10]


def test_augmentation_moves_the_mask_with_the_image_up_to_the_edge() -> None:
    """The mask is warped with the image's own parameters and padded as the image is (a review, session 54:
    zero-padded, a lung that met the edge lost mask where the image, edge-padded, kept it: 261 pixels in 4
    images); `translate` is the largest shift as a share of the side."""
    from cxrcore.data.batches import AugmentConfig, augment

    image = torch.zeros(16, 1, 64, 64)
    image[:, :, 8:56, :24] = 1.0  # a "lung" that meets the left edge
    still = AugmentConfig(contrast=0.0, brightness=0.0, gamma=0.0, noise_std=0.0)
    warped, mask = augment(image, image.clone(), still, torch.Generator().manual_seed(0))
    assert mask is not None and torch.equal(mask, (warped > 0.5).float())
    dot = torch.zeros(64, 1, 64, 64)
    dot[:, :, 31:33, 31:33] = 1.0
    shifted, _ = augment(
        dot, None, AugmentConfig(rotate_degrees=0.0, scale=(1.0, 1.0), contrast=0.0, brightness=0.0,
                                 gamma=0.0, noise_std=0.0, translate=0.1), torch.Generator().manual_seed(1),
    )  # fmt: skip
    centres = [torch.nonzero(d[0] > 0.25).float().mean(0)[1] - 31.5 for d in shifted]
    assert max(abs(float(c)) for c in centres) == pytest.approx(6.4, abs=0.8)  # up to 10% of 64 px
