"""A full disk, a quota, `ulimit -f` or a read-only filesystem, wherever Ray hits it: one line naming the
place, nothing half-written left to block the next run (a review with small tmpfs mounts; the end-to-end
runs are in tests/integration/test_faults_ingest.py)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import sys
from pathlib import Path

import pytest

from cxrcore.cli import main
from cxrcore.config import ConfigError
from cxrcore.runtime import storage_error, storage_reason
from tests.conftest import write_png, xray

FULL = "Error writing bytes to file. Detail: [errno 28] No space left on device"
"""pyarrow's words for a write that found the disk full."""


class RayTaskLike(Exception):
    """As Ray's RayTaskError keeps a task's exception: as `cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray::task()")
        self.cause = cause


class WorkerGroupLike(Exception):
    """As Ray Train's WorkerGroupError keeps each worker's exception."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_a_full_disk_is_found_however_deep_ray_wraps_it() -> None:
    full = OSError(errno.ENOSPC, FULL)
    assert storage_error(full) is full
    assert storage_error(RayTaskLike(full)) is full
    assert storage_error(WorkerGroupLike({0: ValueError("other"), 1: RayTaskLike(full)})) is full
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("Ray Data's SystemException") from exc
    except RuntimeError as wrapped:
        assert storage_error(wrapped) is full
    try:
        try:
            raise full
        except OSError:
            raise ValueError("a bug in the handler")  # noqa: B904
    except ValueError as later:
        assert storage_error(later) is None  # raised while handling it, not caused by it
    big = OSError(errno.EFBIG, "File too large")
    assert storage_error(RayTaskLike(big)) is big  # `ulimit -f`
    assert storage_error(OSError(errno.EIO, "I/O error")) is None  # a failing disk is a bug to see whole
    assert storage_error(RayTaskLike(ValueError())) is None
    assert storage_reason(full) == "No space left on device"


def test_a_full_disk_in_a_ray_task_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrcore.data.storage

    def full(path: str, *_: object) -> None:
        raise RayTaskLike(OSError(errno.ENOSPC, FULL, f"{path}/part-0.parquet"))

    monkeypatch.setattr(cxrcore.data.storage, "exclusive", full)
    write_png(tmp_path / "raw" / "COVID" / "images" / "COVID-1.png", xray(1))
    assert main(["data", "ingest", str(tmp_path / "raw"), str(tmp_path / "out")]) == 1
    assert (
        capsys.readouterr().err == f"cxr: error: {tmp_path / 'out'}/part-0.parquet: No space left on device\n"
    )


def test_ray_datas_console_drops_the_records_of_a_full_disk_only() -> None:
    from cxrcore.console import HideStorageErrors

    hide = HideStorageErrors()

    def record(exc_info: object = None) -> logging.LogRecord:
        return logging.LogRecord("ray.data", logging.ERROR, __file__, 1, "failed", None, exc_info)  # type: ignore[arg-type]

    full = OSError(errno.ENOSPC, FULL)
    assert not hide.filter(record((OSError, full, None)))
    assert hide.filter(record((ValueError, ValueError("a bug"), None)))
    assert hide.filter(record())
    try:
        raise RayTaskLike(full)
    except RayTaskLike:  # "Exception occurred in Ray Data or Ray Core internal code": logged while handling
        assert sys.exc_info()[1] is not None and not hide.filter(record())


def test_an_ingest_that_fills_the_disk_removes_its_staging_and_names_the_output(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from cxrcore.data.ingest import _staging_removed_if_full

    out = tmp_path / "ds"
    out.mkdir()
    (out / "ingest_report.json").write_text("{}")  # the dataset there before
    staging = tmp_path / "ds.partial"
    with (
        pytest.raises(OSError) as raised,
        _staging_removed_if_full(pafs.LocalFileSystem(), str(out), str(out)),
    ):
        (staging / "split=train").mkdir(parents=True)
        (staging / "split=train" / "part-0.parquet").write_bytes(b"PAR1")
        raise RayTaskLike(OSError(errno.ENOSPC, FULL))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)
    assert str(raised.value.strerror).startswith("No space left on device while the dataset was written")
    assert not staging.exists() and (out / "ingest_report.json").read_text() == "{}"
    with pytest.raises(ValueError), _staging_removed_if_full(pafs.LocalFileSystem(), str(out), str(out)):
        raise ValueError("a bug, not the disk")


def _run_folder(tmp_path: Path, epochs: list[int]) -> tuple[Path, str]:
    """A run folder as Ray Train leaves it: a checkpoint per epoch and its record naming them."""
    run = tmp_path / "run"
    for epoch in epochs:
        (run / f"checkpoint_epoch_{epoch:03d}").mkdir(parents=True)
    record = {
        "checkpoint_results": [
            {"checkpoint_dir_name": f"checkpoint_epoch_{epoch:03d}", "metrics": {"epoch": epoch}}
            for epoch in epochs
        ],
        "latest_checkpoint_result": {"checkpoint_dir_name": f"checkpoint_epoch_{epochs[-1]:03d}"},
    }
    text = json.dumps(record, indent=2)
    (run / "checkpoint_manager_snapshot.json").write_text(text)
    return run, text


def test_a_checkpoint_record_cut_short_is_put_back_from_its_last_whole_copy(tmp_path: Path) -> None:
    """A disk that filled as Ray wrote the record left 4,096 bytes of JSON, and every re-run of the run
    failed in Ray's CheckpointManager ("Unterminated string")."""
    from cxrcore.train.trainer import (
        CHECKPOINT_SNAPSHOT,
        RECORD_COPY,
        copy_checkpoint_record,
        drop_unrecorded_checkpoints,
        restore_checkpoint_record,
    )

    run, whole = _run_folder(tmp_path, [1, 2])
    assert restore_checkpoint_record(str(run)) is None  # whole: nothing to do
    copy_checkpoint_record(str(run))
    assert (run / RECORD_COPY).read_text() == whole
    # Epoch 3's checkpoint was written, then the disk filled as Ray wrote its record.
    (run / "checkpoint_epoch_003").mkdir()
    (run / CHECKPOINT_SNAPSHOT).write_text(whole.replace("[1, 2]", "")[: len(whole) // 2])
    copy_checkpoint_record(str(run))  # a record that does not parse is never copied
    assert (run / RECORD_COPY).read_text() == whole
    assert restore_checkpoint_record(str(run)) == 2
    assert (run / CHECKPOINT_SNAPSHOT).read_text() == whole
    assert drop_unrecorded_checkpoints(str(run)) == ["checkpoint_epoch_003"]  # epoch 3 trains again


def test_a_damaged_checkpoint_record_without_a_usable_copy_is_one_line_saying_what_to_do(
    tmp_path: Path,
) -> None:
    from cxrcore.train.trainer import CHECKPOINT_SNAPSHOT, RECORD_COPY, restore_checkpoint_record

    run, whole = _run_folder(tmp_path, [1, 2])
    (run / CHECKPOINT_SNAPSHOT).write_text(whole[:100])
    with pytest.raises(
        ConfigError, match=r"is damaged .* and no whole copy of it is kept: train again with "
    ):
        restore_checkpoint_record(str(run))
    (run / RECORD_COPY).write_text(whole)
    os.rmdir(run / "checkpoint_epoch_001")  # a copy naming a checkpoint that is gone would fail in Ray
    with pytest.raises(ConfigError, match=r"checkpoints that are gone \(checkpoint_epoch_001\).* delete"):
        restore_checkpoint_record(str(run))


def test_a_tune_experiment_whose_record_is_damaged_is_refused_in_one_line(tmp_path: Path) -> None:
    """Tune wrote its state empty on a full disk; the re-run logged "Failed to restore the run state",
    trained every trial again beside the old ones' checkpoints and exited 0."""
    from cxrcore.tune import check_experiment_state

    experiment = tmp_path / "exp"
    check_experiment_state(str(experiment))  # none yet: a new experiment
    experiment.mkdir()
    (experiment / "experiment_state-2026-12-05_10-00-00.json").write_text('{"trial_data": []}')
    search = experiment / "basic-variant-state-2026-12-05_10-00-00.json"  # a pickle, despite its name
    search.write_bytes(pickle.dumps({"_iterators": [], "_finished": False}))
    check_experiment_state(str(experiment))
    search.write_bytes(b"")  # as a verifier's full disk left it: the re-run had started over, exit 0
    with pytest.raises(ConfigError, match=r"basic-variant-state-2026-12-05_10-00-00.json, Ray Tune's record"):
        check_experiment_state(str(experiment))
    search.write_bytes(pickle.dumps({"_iterators": [], "_finished": False}))
    (experiment / "experiment_state-2026-12-05_11-00-00.json").write_text('{"trial_da')  # the newest, cut
    with pytest.raises(ConfigError, match=r"experiment_state-2026-12-05_11-00-00.json, Ray Tune's record"):
        check_experiment_state(str(experiment))


def test_a_local_cluster_is_not_started_where_it_could_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAY_TMPDIR on a nearly full disk: Ray's dashboard failed after 60 s in 64 lines, or a training run
    hung; a hard limit of 64 open files: a C++ line 22 s in."""
    import resource
    import shutil

    from cxrcore import runtime

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(runtime, "check_socket_paths", lambda folder: None)  # pytest's folders are long
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=2 * 1024**2))
    with pytest.raises(OSError) as raised:
        runtime.check_local_resources()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path)
    assert "2.0 MiB free" in str(raised.value.strerror) and "RAY_TMPDIR" in str(raised.value.strerror)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10 * 1024**3))
    runtime.check_local_resources()
    real = resource.getrlimit
    monkeypatch.setattr(resource, "getrlimit", lambda r: (64, 64) if r == resource.RLIMIT_NOFILE else real(r))
    with pytest.raises(ConfigError, match=r"allows 64 open files .*needs at least 128: .*`ulimit -n 4096`"):
        runtime.check_local_resources()
    small = 300 * 1024  # `ulimit -f 300`: Ray's dashboard failed after 60 s
    fsize = resource.RLIMIT_FSIZE
    monkeypatch.setattr(resource, "getrlimit", lambda r: (small, small) if r == fsize else real(r))
    with pytest.raises(ConfigError, match=r"limits files to 0.3 MiB \(`ulimit -f`\)"):
        runtime.check_local_resources()


def test_a_write_that_fills_the_disk_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write() or fsync() names no file: `cxr models promote` said `cxr: error: No space left on
    device`, not where."""
    import pyarrow.fs as pafs

    from cxrcore.data import storage

    def full(_: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "aliases.json"
    with pytest.raises(OSError) as raised:
        storage.write_text(pafs.LocalFileSystem(), str(target), "{}")
    assert raised.value.filename == str(target) and not target.exists()
    assert os.listdir(tmp_path) == []  # its temporary file removed
    named = OSError(errno.ENOSPC, "No space left on device")
    storage.name_the_place(named, "REG/cnn_lstm/v2")
    assert named.filename == "REG/cnn_lstm/v2"
    other = OSError(errno.EIO, "I/O error")
    storage.name_the_place(other, "REG")
    assert other.filename is None


def test_a_checkpoint_saved_into_a_full_temporary_folder_is_said_to_be_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stages each checkpoint in TMPDIR: a full one ended the run in safetensors' SafetensorError
    or torch's "unexpected pos" RuntimeError, 53-73 lines, some naming no disk (a verifier, session 47)."""
    from safetensors import SafetensorError

    from cxrcore import checkpoint
    from tests.unit.test_registry import make_checkpoint

    def full(*_: object, **__: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as raised:
        make_checkpoint(tmp_path / "ckpt")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "ckpt")
    assert storage_error(RayTaskLike(raised.value)) is raised.value

    def broken(*_: object, **__: object) -> None:
        raise SafetensorError("a bug, not the disk")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(SafetensorError):
        make_checkpoint(tmp_path / "other")


def test_a_failed_trials_empty_error_file_is_dropped_before_tune_reads_it(tmp_path: Path) -> None:
    """Tune wrote a failed trial's error.pkl empty on a full disk, and every re-run died unpickling it
    (`EOFError: Ran out of input`) although its record was whole (a verifier, session 47)."""
    from cxrcore.tune import drop_empty_error_files

    trial = tmp_path / "exp" / "segmenter_per_trial_c1aa8_00000"
    trial.mkdir(parents=True)
    (trial / "error.pkl").write_bytes(b"")
    (trial / "error.txt").write_text("")
    kept = tmp_path / "exp" / "other_trial" / "error.pkl"
    kept.parent.mkdir()
    kept.write_bytes(pickle.dumps(ValueError("a trial's own failure")))
    assert drop_empty_error_files(str(tmp_path / "exp")) == [str(trial / "error.pkl")]
    assert not (trial / "error.pkl").exists() and kept.exists() and (trial / "error.txt").exists()
    assert drop_empty_error_files(str(tmp_path / "none")) == []
