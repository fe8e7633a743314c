"""One writer per output: a second ingest, training run or Tune experiment writing the same place fails at
once, naming the first, and a killed writer's lock goes with its process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxrcore.config import IngestConfig, TrainConfig, TuneConfig
from cxrcore.data import storage

HOLD = """
import sys
import threading
import time
from cxrcore.data import storage
with storage.exclusive(sys.argv[1], "a test writer", "elsewhere"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the lock of tmp_path/out until the test ends it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "out")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait(timeout=30)


def test_a_second_writer_fails_naming_the_first_until_the_first_is_gone(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(storage.InUse) as refused, storage.exclusive(out, "a training run", "another --name"):
        pass
    message = str(refused.value)
    assert message.startswith(f"{out} is being written by a test writer (pid {holder.pid} on ")
    assert message.endswith("; wait for it to finish or stop it, or use another --name")
    holder.kill()  # killed, not finished: the kernel releases its lock
    holder.wait(timeout=30)
    with storage.exclusive(out, "a training run", "another --name"):
        # re-entrant: the command took it before Ray started, its library call takes it again
        with storage.exclusive(out, "the library call", "x"):
            pass
        assert (tmp_path / ".out.lock").read_text().startswith("a training run (pid ")  # still held
        other = subprocess.run([sys.executable, "-c", HOLD, out], capture_output=True, text=True, input="")
        assert other.returncode != 0 and "is being written by a training run" in other.stderr
    other = subprocess.run([sys.executable, "-c", HOLD, out], capture_output=True, text=True, input="")
    assert other.returncode == 0 and other.stdout.strip() == "held"  # released on leaving
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # the lock goes


def test_a_folder_made_for_the_lock_alone_goes_with_it(tmp_path: Path) -> None:
    """A run refused before it wrote anything leaves no `cxr-runs` behind; one that wrote keeps it."""
    with storage.exclusive(str(tmp_path / "a/b/run"), "a training run", "x"):
        assert (tmp_path / "a/b/.run.lock").is_file()
    assert not (tmp_path / "a").exists()
    with storage.exclusive(str(tmp_path / "a/b/run"), "a training run", "x"):
        (tmp_path / "a/b/run").mkdir()
    assert (tmp_path / "a/b/run").is_dir() and not (tmp_path / "a/b/.run.lock").exists()


def test_an_object_store_location_holds_no_lock() -> None:
    with (
        storage.exclusive("s3://bucket/ds", "an ingest", "another OUT"),
        storage.exclusive("s3://bucket/ds", "an ingest", "another OUT"),
    ):
        pass


def test_ingest_train_and_tune_refuse_an_output_being_written(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    """Each checks before any work (and before Ray: the lock comes first)."""
    from cxrcore.data.ingest import ingest_dataset
    from cxrcore.train.trainer import fit
    from cxrcore.tune import run_comparison

    out = tmp_path / "out"
    with pytest.raises(storage.InUse, match=r"or use another OUT$"):
        ingest_dataset(IngestConfig(raw=str(tmp_path / "raw"), out=str(out)))
    with pytest.raises(storage.InUse, match=r"or use another --name or --out$"):
        fit(TrainConfig(data=str(tmp_path / "ds"), model="tiny_cnn_lstm", out=str(tmp_path), name="out"))
    with pytest.raises(storage.InUse, match=r"or use another --name or --out$"):
        run_comparison(
            TuneConfig(data=str(tmp_path / "ds"), registry=str(tmp_path / "r"), out=str(tmp_path), name="out")
        )
    assert not (tmp_path / "out").exists()  # nothing was written meanwhile


def test_the_commands_refuse_before_ray_starts(
    holder: subprocess.Popen[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A second command waited for a whole local Ray cluster (13-39 s) before the library call refused."""
    import cxrcore.cli as cli
    from cxrcore.cli import main
    from tests.unit.test_external_eval import class_rows, write_dataset

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "_connect", no_ray)
    data = write_dataset(
        tmp_path / "ds",
        class_rows("COVID", train=4, val=1),
        "f",
    )
    train = ["train", "--data", data, "--model", "tiny_cnn_lstm", "--out", str(tmp_path), "--name", "out"]
    assert main(train) == 2
    refused = f"{tmp_path / 'out'} is being written by a test writer (pid {holder.pid}"
    assert refused in capsys.readouterr().err
    raw = tmp_path / "raw"
    (raw / "COVID").mkdir(parents=True)
    assert main(["data", "ingest", str(raw), str(tmp_path / "out")]) != 0  # refused by the folder or the lock
    assert "Ray was started" not in capsys.readouterr().err


def test_a_link_and_its_target_share_one_lock(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with pytest.raises(storage.InUse), storage.exclusive(str(tmp_path / "link"), "a second", "x"):
        pass


def test_a_dry_run_says_when_the_output_is_being_written(
    holder: subprocess.Popen[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run checks what the run checks before Ray starts, the output's lock included."""
    from cxrcore.cli import main
    from tests.conftest import write_png, xray
    from tests.unit.test_external_eval import class_rows, write_dataset

    data = write_dataset(
        tmp_path / "ds",
        class_rows("COVID", train=4, val=1),
        "f",
    )
    train = ["train", "--data", data, "--model", "tiny_cnn_lstm", "--out", str(tmp_path), "--name", "out"]
    assert main([*train, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "plan of cxr train" in captured.out and "is being written by a test writer" in captured.err
    for cls in ("COVID", "Normal"):
        write_png(tmp_path / "raw" / cls / f"{cls}-1.png", xray(1, 64))
    assert main(["data", "ingest", str(tmp_path / "raw"), str(tmp_path / "out"), "--dry-run"]) == 2
    assert "is being written by a test writer" in capsys.readouterr().err
    assert main([*train, "--name", "other", "--dry-run"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "other" in p.name]


def test_the_library_calls_start_cxrs_ray_themselves_once_they_hold_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ingest_dataset` from a notebook failed ("Ray has not been started yet") and `fit` started a plain
    Ray of its own; each now joins or starts Ray as the commands do (a no-op once Ray runs)."""
    import torch

    from cxrcore import runtime, tune
    from cxrcore.data.ingest import ingest_dataset
    from cxrcore.train import trainer
    from cxrcore.train.trainer import fit, torch_state_kept
    from cxrcore.tune import run_comparison
    from tests.conftest import write_png, xray

    class Started(Exception):
        pass

    def init_ray(address: str | None = None) -> None:
        assert any(p.name.endswith(".lock") for p in tmp_path.rglob(".*")), "Ray before the output's lock"
        raise Started(address)

    monkeypatch.setattr(runtime, "init_ray", init_ray)
    checked: list[str] = []  # the dataset is checked before Ray's start too: "d" is none, and passes here
    monkeypatch.setattr(trainer, "check_dataset", lambda data: checked.append(data))

    def preflight(config: TuneConfig) -> tuple[dict[str, str], list[dict[str, object]]]:
        checked.append(config.data)
        return {"fingerprint": "f"}, []  # the report and plan; the experiment's settings are recorded then

    monkeypatch.setattr(tune, "preflight", preflight)
    for cls in ("COVID", "Normal"):  # a folder ingest takes: one it refuses is refused before Ray starts
        write_png(tmp_path / "raw" / cls / f"{cls}-1.png", xray(1, 64))
    calls = [
        lambda: ingest_dataset(
            IngestConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "ds"), address="a")
        ),
        lambda: fit(TrainConfig(data="d", model="tiny_cnn_lstm", out=str(tmp_path), address="a")),
        lambda: run_comparison(TuneConfig(data="d", registry="r", out=str(tmp_path), address="a")),
    ]
    for call in calls:
        with pytest.raises(Started, match=r"^a$"):
            call()
    assert (
        checked == [os.path.abspath("d")] * 2
    )  # fit's and run_comparison's, each inside the lock and before Ray
    import random

    import numpy as np

    threads = torch.get_num_threads()
    torch.manual_seed(123)
    np.random.seed(1)
    random.seed(2)
    with torch_state_kept():
        torch.set_num_threads(1)
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
    assert torch.get_num_threads() == threads and torch.rand(1).item() == pytest.approx(0.2961, abs=1e-4)
    assert np.random.rand() == pytest.approx(0.417022) and random.random() == pytest.approx(0.956034)


READ = """
import sys
import threading
import time
from cxrcore.data.ingest import reading
with reading(sys.argv[1]):
    print("reading", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


def test_an_ingest_refuses_to_replace_a_dataset_that_a_run_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray Data reads the Parquet files again every epoch: a dataset swapped under a run failed it
    mid-epoch (FileNotFoundError), and a Tune experiment scored its winners on the new data."""
    import cxrcore.cli as cli
    from cxrcore.cli import main
    from cxrcore.data.ingest import REPORT_NAME, reading
    from tests.conftest import write_png, xray
    from tests.unit.test_external_eval import class_rows, write_dataset

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "_connect", no_ray)
    data = write_dataset(
        tmp_path / "ds",
        class_rows("COVID", train=4, val=1),
        "f",
    )
    for cls in ("COVID", "Normal"):
        write_png(tmp_path / "raw" / cls / f"{cls}-1.png", xray(1, 64))
    reader = subprocess.Popen(
        [sys.executable, "-c", READ, data], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        with reading(data):  # any number of runs read at once
            pass
        refused = r"is being read by a run on it .* or use x OUT$"
        with pytest.raises(storage.BeingRead, match=refused), storage.replacing(data, REPORT_NAME, "x OUT"):
            pass
        before = sorted(p.relative_to(data) for p in Path(data).rglob("*"))
        assert main(["data", "ingest", str(tmp_path / "raw"), data]) == 2  # before Ray, before decoding
        assert f"{data} is being read by a run on it" in capsys.readouterr().err
        assert sorted(p.relative_to(data) for p in Path(data).rglob("*")) == before  # the dataset is intact

        # A run that starts reading during an ingest: the ingest's swap, its dataset made, waits for it.
        swapped: list[bool] = []

        def swap() -> None:
            with storage.replacing(data, REPORT_NAME, "another OUT", wait=True):
                swapped.append(True)

        thread = threading.Thread(target=swap)
        thread.start()
        deadline = time.monotonic() + 30
        while f"waiting for the runs reading {data} to end" not in capsys.readouterr().err:
            assert time.monotonic() < deadline and not swapped, "the swap neither waited nor said so"
            time.sleep(0.05)
        assert not swapped
    finally:
        reader.kill()  # killed: the kernel releases its lock
        reader.wait(timeout=30)
    thread.join(30)
    assert swapped == [True]
    with storage.replacing(data, REPORT_NAME, "another OUT"):
        pass
    with reading(str(tmp_path / "raw")):  # not a dataset: nothing held, no lock file left there
        pass
    assert not (tmp_path / "raw" / storage.READ_LOCK_NAME).exists()


def test_evaluate_and_the_demo_refuse_a_folder_being_written(
    holder: subprocess.Popen[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two evaluations into one --out mixed one's report.html with the other's metrics.json; two demos in
    one --work-dir wrote their phantoms over each other."""
    from cxrcore.cli import main
    from cxrcore.config import EvaluateConfig
    from cxrcore.evaluate.evaluation import evaluate_checkpoint

    out = str(tmp_path / "out")
    with pytest.raises(storage.InUse, match=r"being written by a test writer .* or use another --out$"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=str(tmp_path / "ck"), data=str(tmp_path), out=out))
    assert main(["demo", "--work-dir", out, "--no-serve"]) == 2
    assert f"{out} is being written by a test writer (pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written meanwhile
