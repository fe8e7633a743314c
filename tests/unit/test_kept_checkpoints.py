"""`cxr train` chooses its best checkpoint among every checkpoint Ray Train kept, the latest included, and
a resumed run drops the checkpoints an interrupted one wrote but never recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ray.train import Checkpoint, Result

from cxrcore.metrics import best_by_validation
from cxrcore.train.trainer import CHECKPOINT_SNAPSHOT, drop_unrecorded_checkpoints, kept_checkpoints


def _epoch(epoch: int, score: float, loss: float) -> dict[str, Any]:
    return {"epoch": epoch, "val_score": score, "val_loss": loss, "val_count": 12}


def test_the_latest_checkpoint_outside_the_top_scores_is_kept_and_can_be_the_best(tmp_path: Path) -> None:
    # As a 20-epoch run with num_to_keep=3 ended (12 validation images): Train's best_checkpoints are the
    # top 3 by val_score; the latest is kept to resume from, ranks 4th, and is within one image of the top
    # with the lowest loss, so best_by_validation picks it, as it does from Result.from_path(run).
    top = [(7, 0.368, 1.399), (9, 0.378, 1.431), (15, 0.375, 1.407)]
    best = [(Checkpoint(str(tmp_path / f"checkpoint_{e}")), _epoch(e, s, loss)) for e, s, loss in top]
    latest = Checkpoint(str(tmp_path / "checkpoint_20"))
    result = Result(
        metrics=_epoch(20, 0.296, 1.388),
        checkpoint=latest,
        error=None,
        path=str(tmp_path),
        best_checkpoints=best,
    )
    kept = kept_checkpoints(result)
    assert [metrics["epoch"] for _, metrics in kept] == [7, 9, 15, 20]
    checkpoint, metrics = best_by_validation(kept, lambda item: item[1])  # type: ignore[misc]
    assert checkpoint.path == latest.path and metrics["epoch"] == 20
    # Without it, the best of the top 3 (epoch 7, the lowest loss among them).
    assert best_by_validation(result.best_checkpoints or [], lambda item: item[1])[1]["epoch"] == 7  # type: ignore[index]


def test_a_latest_checkpoint_among_the_best_is_listed_once(tmp_path: Path) -> None:
    best = [(Checkpoint(str(tmp_path / f"checkpoint_{e}")), _epoch(e, 0.5, 1.0)) for e in (3, 4)]
    result = Result(
        metrics=_epoch(4, 0.5, 1.0),
        checkpoint=best[-1][0],
        error=None,
        path=str(tmp_path),
        best_checkpoints=best,
    )
    assert [metrics["epoch"] for _, metrics in kept_checkpoints(result)] == [3, 4]
    empty = Result(metrics={}, checkpoint=None, error=None, path=str(tmp_path), best_checkpoints=None)
    assert kept_checkpoints(empty) == []


def test_a_run_that_ctrl_c_ended_is_reported_interrupted_not_finished(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Ray Train's SIGINT handler aborts the run; its trainer then either returns the last checkpoint's
    result, with no error, or exits the driver. `cxr train` says which epoch it reached either way."""
    import pytest

    from cxrcore.config import TrainConfig
    from cxrcore.runtime import Interrupted
    from cxrcore.train import trainer as trainer_module

    class Aborted:
        def __init__(self, outcome: Any) -> None:
            self.outcome = outcome

        def fit(self) -> Any:
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

    monkeypatch.setattr("cxrcore.runtime.init_ray", lambda address=None: None)  # no Ray to start here
    monkeypatch.setattr(trainer_module, "check_dataset", lambda data: None)  # nor a dataset
    config = TrainConfig(data=str(tmp_path), model="tiny_cnn_lstm", epochs=30)
    after_3 = Result(metrics=_epoch(3, 0.3, 1.3), checkpoint=None, error=None, path=str(tmp_path))
    for outcome, said in [
        (after_3, "training stopped after epoch 3 of 30"),
        (SystemExit(0), "training stopped;"),
    ]:
        monkeypatch.setattr(trainer_module, "build_trainer", lambda config, callbacks, o=outcome: Aborted(o))
        with pytest.raises(Interrupted, match=said):
            trainer_module.fit(config)


def test_a_resumed_run_drops_the_checkpoints_its_interrupted_run_never_recorded(tmp_path: Path) -> None:
    run = tmp_path / "cxr-runs" / "ddp"
    names = [f"checkpoint_2026-12-04_05-38-4{i}.000000" for i in range(6)]
    for name in names:
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"weights")
    (run / "checkpoint_notes.txt").write_text("a file, not a checkpoint")
    (run / "cxr_settings.json").write_text("{}")
    record = {
        "ray_version": "2.60.0",
        "checkpoint_results": [
            {"checkpoint_dir_name": names[0], "metrics": {}},
            {"checkpoint_dir_name": names[2]},
        ],
        "latest_checkpoint_result": {"checkpoint_dir_name": names[3]},
        "pending_training_results": [{"checkpoint_dir_name": names[1]}],  # a validation in flight
    }
    snapshot = run / CHECKPOINT_SNAPSHOT
    snapshot.write_text(json.dumps(record))

    # A record this code cannot read, or of another format, removes nothing.
    for text in ("{not json", json.dumps({"checkpoints": []}), json.dumps([names[0]])):
        snapshot.write_text(text)
        assert drop_unrecorded_checkpoints(str(run)) == []
    assert all((run / name).is_dir() for name in names)
    assert drop_unrecorded_checkpoints(str(tmp_path / "no-such-run")) == []

    snapshot.write_text(json.dumps(record))
    assert drop_unrecorded_checkpoints(str(run)) == names[4:]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [*names[:4], "checkpoint_notes.txt", "cxr_settings.json", CHECKPOINT_SNAPSHOT]
    )
    assert drop_unrecorded_checkpoints(str(run)) == []  # and again: nothing more


def _recorded_run(run: Path, epochs: list[tuple[int, float, float]], size: int, keep: bool) -> None:
    """A run folder as Ray Train leaves it: a checkpoint folder with a card per epoch, and its record."""
    from cxrcore.checkpoint import CARD_NAME, TRAIN_STATE_NAME

    results = []
    for epoch, score, loss in epochs:
        folder = run / f"checkpoint_epoch_{epoch:03d}"
        folder.mkdir(parents=True)
        card = {
            "model": {"name": "cnn_lstm"},
            "input_spec": {"image_size": size},
            "classes": [],
            "epoch": epoch,
        }
        (folder / CARD_NAME).write_text(json.dumps(card))
        (folder / TRAIN_STATE_NAME).write_bytes(b"state")
        metrics = {**_epoch(epoch, score, loss), **({"val_keep": score} if keep else {})}
        results.append({"version": 0, "checkpoint_dir_name": folder.name, "metrics": metrics})
    record = {"checkpoint_results": results, "latest_checkpoint_result": results[-1]}
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps(record))


def test_tied_epochs_are_kept_by_the_lower_loss_as_the_best_is_chosen() -> None:
    """A review (session 53): with 13 validation images, 15 of 30 epochs scored 1.000; Ray kept the last
    three of them by val_score, and the one best_by_validation chooses (the lowest loss) was gone. The
    score Ray keeps them by breaks exact ties by the loss, and nothing else."""
    from cxrcore.metrics import keep_score

    epochs = [
        _epoch(e, 1.0, loss) for e, loss in ((20, 0.051), (26, 0.048), (28, 0.055), (29, 0.06), (30, 0.07))
    ]
    kept = sorted(epochs, key=keep_score)[-3:]  # as Ray keeps num_to_keep=3 by it
    assert best_by_validation(epochs, dict) in kept and [m["epoch"] for m in kept] == [28, 20, 26]
    assert keep_score(_epoch(1, 0.98, 0.01)) < keep_score(_epoch(2, 0.99, 50.0))  # the score first


def test_an_earlier_cxrs_run_gets_keep_scores_and_is_checked_at_its_trained_size(tmp_path: Path) -> None:
    """A run recorded before the keep score gets its checkpoints' val_score as theirs (else Ray ranks them
    below every new one and deletes its best first); a run recorded with image_size None (every run
    before session 53: the recorded --image-size, unset) is checked against its card's size, and a run is
    not resumed at another size or cut to fewer epochs."""
    import pytest

    from cxrcore.config import ConfigError, TrainConfig
    from cxrcore.experiment import SETTINGS_NAME
    from cxrcore.train import trainer

    run = tmp_path / "runs" / "old"
    _recorded_run(run, [(1, 0.5, 1.2), (2, 0.7, 0.9)], size=64, keep=False)
    trainer._keep_scores_added(str(run))
    record = json.loads((run / CHECKPOINT_SNAPSHOT).read_text())
    # their score with their loss, as a new epoch's: a bare 0.7 had outranked every new epoch of 0.7
    assert [r["metrics"]["val_keep"] for r in record["checkpoint_results"]] == [0.5 - 1.2e-9, 0.7 - 0.9e-9]
    assert record["latest_checkpoint_result"]["metrics"]["val_keep"] == 0.7 - 0.9e-9

    config = TrainConfig(data="ds", model="cnn_lstm", out=str(tmp_path / "runs"), name="old", epochs=4)
    settings = {
        "train": {"image_size": None, "lr": 2e-3},
        "image_size": 64,
        "data": {"fingerprint": "f00d"},
    }
    assert trainer.run_settings(config, settings)["image_size"] == 64  # resolved, not the flag's None
    recorded = {**trainer.run_settings(config, settings), "image_size": None}  # as an earlier cxr wrote it
    (run / SETTINGS_NAME).write_text(json.dumps(recorded))
    trainer.check_resume(config, settings, str(run), write=False)  # at its card's size: goes on
    with pytest.raises(ConfigError, match=r"image_size 64 → 128"):
        trainer.check_resume(config, {**settings, "image_size": 128}, str(run), write=False)
    shorter = TrainConfig(data="ds", model="cnn_lstm", out=str(tmp_path / "runs"), name="old", epochs=1)
    with pytest.raises(ConfigError, match=r"--epochs 1: .* already holds a run of 2 epochs"):
        trainer.check_resume(shorter, settings, str(run), write=False)


def test_a_dry_run_refuses_the_resume_the_run_would_refuse(tmp_path: Path, capsys: Any) -> None:
    """A review (session 53): `--dry-run` exited 0 for a re-run with another --lr that the run itself
    refused once Ray had started; it checks the recorded settings and epochs as the run does."""
    from cxrcore.cli import main
    from cxrcore.config import TrainConfig
    from cxrcore.train import trainer
    from tests.unit.test_external_eval import class_rows, write_dataset

    data = write_dataset(
        tmp_path / "ds",
        [*class_rows("COVID", train=2, val=1), *class_rows("Normal", train=2, seed=10)],
        "f",
    )
    command = ["train", "--data", data, "--model", "cnn_lstm", "--out", str(tmp_path / "runs"), "--name", "r"]
    config = TrainConfig(data=data, model="cnn_lstm", out=str(tmp_path / "runs"), name="r", epochs=4)
    run = tmp_path / "runs" / "r"
    _recorded_run(run, [(1, 0.5, 1.2), (2, 0.7, 0.9)], size=32, keep=True)
    trainer.check_resume(config, trainer.loop_config(config, settings_only=True), str(run))  # records
    assert main([*command, "--epochs", "4", "--dry-run"]) == 0
    assert main([*command, "--epochs", "4", "--lr", "0.01", "--dry-run"]) == 2
    assert (
        "already holds a training run started with other settings (lr 0.002 → 0.01)"
        in capsys.readouterr().err
    )
    assert main([*command, "--epochs", "1", "--dry-run"]) == 2
    assert "already holds a run of 2 epochs" in capsys.readouterr().err
    import ray

    assert main([*command, "--epochs", "1"]) == 2 and not ray.is_initialized()  # refused before Ray's start
    assert "already holds a run of 2 epochs" in capsys.readouterr().err


def test_a_run_whose_checkpoints_were_deleted_by_hand_is_refused_in_one_line(
    tmp_path: Path, capsys: Any
) -> None:
    """A review (session 57), freeing disk space as a user over quota would: a recorded checkpoint folder
    deleted ended in Ray's 88-line traceback, whose advice deleted the best checkpoint too; the latest
    checkpoint's train_state.pt deleted trained the run again from epoch 1 with a fresh optimizer, over
    folders of the same names, and printed a best checkpoint that was gone. Both are refused, by the dry
    run too, before Ray starts."""
    import shutil

    from cxrcore.checkpoint import TRAIN_STATE_NAME, WEIGHTS_NAME
    from cxrcore.cli import main
    from cxrcore.config import ConfigError, TrainConfig
    from cxrcore.train import trainer
    from tests.unit.test_external_eval import class_rows, write_dataset

    data = write_dataset(
        tmp_path / "ds",
        [*class_rows("COVID", train=2, val=1), *class_rows("Normal", train=2, seed=10)],
        "f",
    )
    config = TrainConfig(data=data, model="cnn_lstm", out=str(tmp_path / "runs"), name="r", epochs=4)
    run = tmp_path / "runs" / "r"
    _recorded_run(run, [(1, 0.5, 1.2), (2, 0.7, 0.9), (3, 0.6, 1.0)], size=32, keep=True)
    trainer.check_resume(config, trainer.loop_config(config, settings_only=True), str(run))  # as it was left
    command = ["train", "--data", data, "--model", "cnn_lstm", "--out", str(tmp_path / "runs"), "--name", "r"]

    assert main([*command, "--epochs", "4", "--dry-run"]) == 0  # intact, it would resume
    err = capsys.readouterr().err  # the dataset holds COVID and Normal only: said before Ray starts
    assert "WARNING: the training split holds no image of Lung_Opacity or Viral Pneumonia: a model" in err

    (run / "checkpoint_epoch_003" / TRAIN_STATE_NAME).unlink()
    for args in (["--dry-run"], []):
        assert main([*command, "--epochs", "4", *args]) == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cxr: error")]
        assert f"{run}/checkpoint_epoch_003, this run's latest checkpoint, has no {TRAIN_STATE_NAME}" in error
        assert error.endswith(f"--pretrained {run}/checkpoint_epoch_003/{WEIGHTS_NAME}")
    import ray

    assert not ray.is_initialized()

    shutil.rmtree(run / "checkpoint_epoch_001")
    with pytest.raises(
        ConfigError, match=r"checkpoint folder\(s\) this run recorded are gone \(checkpoint_epoch_001\)"
    ):
        trainer.check_recorded_checkpoints(str(run))
    trainer.check_recorded_checkpoints(str(tmp_path / "no-such-run"))  # a new run: nothing to check


def test_a_tune_rerun_with_other_settings_is_refused_before_ray_and_by_its_dry_run(
    tmp_path: Path, capsys: Any
) -> None:
    """A Tune experiment re-run with other settings (here --patience) was refused only once Ray had started
    (about 20 s), and its `--dry-run` exited 0; both refuse it now, and the same settings pass."""
    from cxrcore.cli import main
    from cxrcore.config import TuneConfig
    from cxrcore.data.ingest import read_report
    from cxrcore.tune import check_experiment_settings
    from tests.unit.test_external_eval import write_dataset

    rows = [("COVID", "train", 1), ("Normal", "train", 2), ("COVID", "val", 3), ("Normal", "test", 4)]
    data = write_dataset(tmp_path / "ds", rows, "f")
    out, registry = str(tmp_path / "exps"), str(tmp_path / "reg")
    command = ["tune", "--data", data, "--registry", registry, "--models", "cnn_lstm", "--out", out]
    config = TuneConfig(data=data, registry=registry, models="cnn_lstm", out=out, patience=1)
    check_experiment_settings(config, read_report(data))  # what the first run recorded
    assert main([*command, "--patience", "1", "--dry-run"]) == 0
    assert main([*command, "--patience", "3", "--dry-run"]) == 2
    assert "started with other settings (patience 1 → 3)" in capsys.readouterr().err
    import ray

    assert main([*command, "--patience", "3"]) == 2 and not ray.is_initialized()  # refused before Ray's start
    assert "started with other settings (patience 1 → 3)" in capsys.readouterr().err


def test_a_run_patience_stopped_is_finished_not_interrupted(tmp_path: Path, monkeypatch: Any) -> None:
    """`--patience`: the loop's last report names the best epoch (stopped_early); `cxr train` then ends as
    a finished run, where a run that reached fewer epochs otherwise is one Ctrl-C stopped."""
    import dataclasses

    import pytest

    from cxrcore.config import ConfigError, TrainConfig
    from cxrcore.train import trainer as trainer_module
    from cxrcore.train.loop import patience_ran_out

    class Finished:
        def fit(self) -> Any:
            return Result(
                metrics=stopped, checkpoint=None, error=None, path=str(tmp_path), best_checkpoints=[]
            )

    history = [_epoch(1, 0.5, 1.0), _epoch(2, 0.7, 0.8), _epoch(3, 0.6, 0.9), _epoch(4, 0.55, 0.95)]
    assert patience_ran_out(history, 2) == 2 and patience_ran_out(history, 3) is None
    stopped = {**history[-1], "stopped_early": 2}
    monkeypatch.setattr("cxrcore.runtime.init_ray", lambda address=None: None)
    monkeypatch.setattr(trainer_module, "check_dataset", lambda data: None)
    monkeypatch.setattr(trainer_module, "build_trainer", lambda config, callbacks: Finished())
    config = TrainConfig(data=str(tmp_path), model="tiny_cnn_lstm", epochs=30, patience=2, out=str(tmp_path))
    assert trainer_module.fit(config).metrics["epoch"] == 4  # not Interrupted("stopped after epoch 4 of 30")
    # Re-run with a --patience that had run out before: nothing trains, and Ray's result is the latest
    # checkpoint's, without the flag; its card's history says the patience ran out.
    from cxrcore.checkpoint import CARD_NAME

    latest = tmp_path / "checkpoint_epoch_004"
    latest.mkdir()
    card = {"model": {"name": "tiny_cnn_lstm"}, "input_spec": {}, "classes": [], "history": history}
    (latest / CARD_NAME).write_text(json.dumps(card))
    stopped = history[-1]
    Finished.fit = lambda self: Result(  # type: ignore[method-assign]
        metrics=stopped,
        checkpoint=Checkpoint(str(latest)),
        error=None,
        path=str(tmp_path),
        best_checkpoints=[],
    )
    assert trainer_module.fit(config).metrics["epoch"] == 4
    with pytest.raises(trainer_module.Interrupted):  # without --patience it is a run cut short
        trainer_module.fit(dataclasses.replace(config, patience=None))
    with pytest.raises(ConfigError, match="--patience: must be 1 or more"):
        TrainConfig(data="ds", model="tiny_cnn_lstm", patience=0)


def test_a_finished_trial_keeps_the_resume_state_of_its_latest_checkpoint_only(tmp_path: Path) -> None:
    """The optimizer's state (twice a model's weights) is needed to resume, from the latest checkpoint;
    the other kept checkpoints lose it when the experiment ends, their weights and cards untouched."""
    from types import SimpleNamespace

    import torch

    from cxrcore.checkpoint import TRAIN_STATE_NAME, WEIGHTS_NAME, ModelCard, save_checkpoint
    from cxrcore.config import TuneConfig
    from cxrcore.tune import _trial_record

    def checkpoint(epoch: int) -> Checkpoint:
        card = ModelCard(
            model={"name": "tiny_cnn_lstm"}, input_spec={}, epoch=epoch, metrics=_epoch(epoch + 1, 0.5, 1.0)
        )
        folder = save_checkpoint(
            tmp_path / f"checkpoint_{epoch:06d}", torch.nn.Linear(2, 1), card, {"epoch": epoch}
        )
        return Checkpoint(str(folder))

    kept = [checkpoint(epoch) for epoch in (2, 0, 1)]  # Tune's order is by score, not by epoch
    result = SimpleNamespace(
        config={"trial": {"model": "tiny_cnn_lstm", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 16}},
        metrics={"trial_id": "t", **_epoch(3, 0.5, 1.0)}, error=None, path=str(tmp_path), checkpoint=kept[0],
        best_checkpoints=[(c, {}) for c in kept],
    )  # fmt: skip
    record = _trial_record(TuneConfig(data="ds", registry="reg", models="tiny_cnn_lstm", epochs=3), result)
    assert record["best_epoch"] is not None
    with_state = sorted(p.parent.name for p in tmp_path.glob(f"*/{TRAIN_STATE_NAME}"))
    assert with_state == ["checkpoint_000002"]
    assert len(list(tmp_path.glob(f"*/{WEIGHTS_NAME}"))) == 3
    _trial_record(TuneConfig(data="ds", registry="reg", models="tiny_cnn_lstm", epochs=3), result)  # again


def test_resume_state_that_cannot_be_deleted_is_left_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run whose older resume state cannot be deleted (a read-only share, an object store's
    refusal) still finishes: the file is named in a warning and left."""
    from cxrcore.checkpoint import TRAIN_STATE_NAME, drop_resume_state
    from cxrcore.data import storage

    folders = [tmp_path / "checkpoint_epoch_001", tmp_path / "checkpoint_epoch_002"]
    for folder in folders:
        folder.mkdir()
        (folder / TRAIN_STATE_NAME).write_bytes(b"state")
    real_remove = storage.remove

    def remove(filesystem: object, path: str) -> None:
        if "epoch_001" in path:
            raise PermissionError(13, "Permission denied", path)
        real_remove(filesystem, path)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "remove", remove)
    drop_resume_state([str(folder) for folder in folders] + [str(tmp_path / "gone")])  # gone: nothing to do
    assert (folders[0] / TRAIN_STATE_NAME).exists() and not (folders[1] / TRAIN_STATE_NAME).exists()
    assert f"could not delete {folders[0]}/{TRAIN_STATE_NAME}, which resuming does not need" in caplog.text


def test_a_run_that_kept_no_checkpoint_starts_again_with_other_settings(tmp_path: Path, capsys: Any) -> None:
    """A review (session 57): a run diverged in its first epoch said "train again with a lower --lr", and
    the same command with one was refused as another experiment, though the run had kept nothing."""
    from cxrcore.cli import main
    from cxrcore.config import ConfigError, TrainConfig
    from cxrcore.experiment import recorded_settings
    from cxrcore.train import trainer
    from tests.unit.test_external_eval import write_dataset

    rows = [("COVID", "train", 1), ("Normal", "train", 2), ("COVID", "val", 3), ("Normal", "test", 4)]
    data = write_dataset(tmp_path / "ds", [*rows, ("COVID", "train", 5), ("Normal", "train", 6)], "f")
    run = tmp_path / "runs" / "r"

    def check(lr: float, write: bool = True) -> None:
        config = TrainConfig(data=data, model="cnn_lstm", out=str(tmp_path / "runs"), name="r", lr=lr)
        trainer.check_resume(config, trainer.loop_config(config, settings_only=True), str(run), write=write)

    check(1e30)  # recorded as the run starts; it diverges before its first checkpoint
    command = ["train", "--data", data, "--model", "cnn_lstm", "--out", str(tmp_path / "runs"), "--name", "r"]
    assert main([*command, "--lr", "0.001", "--dry-run"]) == 0
    check(1e-3)
    assert (recorded_settings(str(run), "a training run") or {})["lr"] == 1e-3
    (run / "checkpoint_epoch_001").mkdir()  # once a checkpoint is kept, the run is that experiment
    with pytest.raises(ConfigError, match=r"other settings \(lr 0.001 → 0.01\)"):
        check(1e-2, write=False)
