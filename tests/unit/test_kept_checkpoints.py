"""`cxr train` chooses its best checkpoint among every checkpoint Ray Train kept, the latest included, and
a resumed run drops the checkpoints an interrupted one wrote but never recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
