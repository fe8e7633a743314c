"""The `cxr` console script: help for every command, exit codes and messages of `cxr data check`."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrcore.cli import build_parser, main
from tests.conftest import write_png, xray


def _subcommands(parser: object) -> dict:
    actions = getattr(parser, "_subparsers", None)
    return actions._group_actions[0].choices if actions else {}  # type: ignore[union-attr]


def test_help_lists_commands_and_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    for name in ("data", "train", "tune", "evaluate", "models", "serve", "predict", "demo", "benchmark"):
        assert name in top
    commands = _subcommands(build_parser())
    paths = [[name] for name in commands]
    paths += [[group, name] for group in ("data", "models") for name in _subcommands(commands[group])]
    assert ["data", "ingest"] in paths and ["data", "check"] in paths and ["data", "synth"] in paths
    for name in ("architectures", "list", "show", "promote"):
        assert ["models", name] in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        assert "usage: cxr" in capsys.readouterr().out


def test_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "expected class folders" in capsys.readouterr().err

    (tmp_path / "COVID/images").mkdir(parents=True)
    (tmp_path / "COVID/images/COVID-1.png").write_bytes(b"")
    assert main(["data", "check", str(tmp_path)]) == 1
    assert "no usable image" in capsys.readouterr().err

    write_png(tmp_path / "COVID/images/COVID-2.png", xray(0))
    assert main(["data", "check", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"]["COVID"]["images"] == 2 and report["classes"]["COVID"]["unreadable"] == 1
    assert report["unreadable"][0]["reason"].startswith("empty file")


def test_bad_settings_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "ingest", str(tmp_path), str(tmp_path / "out"), "--size", "4"]) == 2
    assert "--size: must be between 32 and 2048" in capsys.readouterr().err
    assert main(["data", "ingest"]) == 2
    assert "missing setting 'raw'" in capsys.readouterr().err


def test_synth_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", str(tmp_path / "raw"), "--per-class", "2", "--seed", "3"]) == 0
    assert "wrote 8 synthetic images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "raw/Viral Pneumonia/images").iterdir()) == [
        "Viral Pneumonia-1.png",
        "Viral Pneumonia-2.png",
    ]
    # A second run into the same folder would mix two sets of phantoms under one run's metadata.
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "raw").rglob("*"))
    assert main(["data", "synth", str(tmp_path / "raw"), "--per-class", "1", "--seed", "0"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "raw").rglob("*")) == before


def test_an_interrupted_run_exits_130_saying_what_it_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cxrcore.cli as cli
    from cxrcore.runtime import Interrupted

    def interrupted(args: object) -> int:
        raise Interrupted("nothing was registered; run the same command again to resume")

    class Ray:
        """Ray as the run left it connected; its workers' lines print until it is shut down."""

        connected = True

        def is_initialized(self) -> bool:
            return self.connected

        def shutdown(self) -> None:
            print("a trial's last epoch line")
            self.connected = False

    monkeypatch.setattr(cli, "_run_check", interrupted)
    monkeypatch.setitem(sys.modules, "ray", Ray())
    assert main(["data", "check", "anywhere"]) == 130
    out = capsys.readouterr()
    assert out.out == "a trial's last epoch line\n"  # before the message, which is the last line
    assert out.err == "cxr: interrupted: nothing was registered; run the same command again to resume\n"


def test_ctrl_c_or_sigterm_elsewhere_exits_130_or_143_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command with no interruption path of its own (an ingest, which stages its output) ends in one line,
    not a KeyboardInterrupt traceback; after a SIGTERM (raised as a SIGINT once Ray is up) with 143."""
    import cxrcore.cli as cli
    import cxrcore.runtime as runtime

    def stopped(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_check", stopped)
    assert main(["data", "check", "anywhere"]) == 130
    assert capsys.readouterr().err == "cxr: interrupted by Ctrl-C\n"

    def terminated(args: object) -> int:
        runtime._sigterm_received = True  # as the SIGTERM handler records it, then raises a Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_check", terminated)
    assert main(["data", "check", "anywhere"]) == 143
    assert capsys.readouterr().err == "cxr: interrupted by SIGTERM\n"
    monkeypatch.setattr(cli, "_run_check", stopped)  # the next command in this process: Ctrl-C again
    assert main(["data", "check", "anywhere"]) == 130
    assert capsys.readouterr().err == "cxr: interrupted by Ctrl-C\n"


def test_the_sigint_handler_a_run_installs_goes_when_it_ends() -> None:
    """Ray Train's and Tune's `fit` leave their SIGINT handlers installed; a SIGTERM after the sweep (while
    `cxr tune` registers the winners) went to a finished run and was lost."""
    import signal

    from cxrcore.runtime import sigint_handler_kept

    before = signal.getsignal(signal.SIGINT)
    with sigint_handler_kept():
        signal.signal(signal.SIGINT, lambda *_: None)  # as Tune's fit does
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ingest_whose_dicom_decoder_could_not_start_is_one_line_not_a_ray_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray Data hands the driver RayTaskError(UserCodeException) with the task's error only as traceback
    text (its cause chain is not pickled): the text as Ray 2.60 writes it, measured from a map_batches
    that raised DecoderUnavailableError."""
    import ray.exceptions

    import cxrcore.cli as cli

    traceback = (
        "\x1b[36mray::ReadParquet->MapBatches(decode_pair_batch)()\x1b[39m (pid=22304, ip=192.0.2.2)\n"
        '  File "cxrcore/decoder_process.py", line 146, in _running_child\n'
        "cxrcore.data.transforms.DecoderUnavailableError: the DICOM decoder's process could not be "
        "started: Resource temporarily unavailable\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    cause = ray.exceptions.UserCodeException("UDF failed to process a data block.")
    failed = ray.exceptions.RayTaskError("decode_pair_batch", traceback, cause).as_instanceof_cause()

    def unavailable(args: object) -> int:
        raise failed

    monkeypatch.setattr(cli, "_run_check", unavailable)
    assert main(["data", "check", "anywhere"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "cxr: error: this machine cannot decode compressed DICOM right now (the DICOM decoder's process "
        "could not be started: Resource temporarily unavailable); no file is at fault and nothing was "
        "written: run the same command again once processes are free\n"
    )

    other = ray.exceptions.RayTaskError("f", "ValueError: boom", ValueError("boom")).as_instanceof_cause()

    def fails(args: object) -> int:
        raise other

    monkeypatch.setattr(cli, "_run_check", fails)
    with pytest.raises(ValueError, match="boom"):  # any other failure keeps its traceback
        main(["data", "check", "anywhere"])


@pytest.mark.parametrize(
    ("best", "status", "said"),
    [
        ({"tiny_cnn_lstm": {}, "tiny_resnet": {}}, 0, None),
        ({"tiny_cnn_lstm": {}}, 1, "tiny_resnet produced no checkpoint"),
        ({}, 1, "no architecture produced a checkpoint"),
        ({"tiny_cnn_lstm": {}, "tiny_resnet": {"failed": "boom"}}, 1, "every trial of tiny_resnet failed"),
    ],
)
def test_tune_exits_non_zero_when_an_architecture_it_was_asked_to_compare_produced_nothing(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    best: dict[str, object],
    status: int,
    said: str | None,
) -> None:
    """A `ray job submit` of a comparison whose resnet trials all failed must not read SUCCEEDED."""
    import cxrcore.cli as cli

    trials = [{"model": "tiny_cnn_lstm"}, {"model": "tiny_resnet"}, {"model": "tiny_resnet"}]
    monkeypatch.setattr(cli, "_run_on_ray", lambda args, run, show, writing: {"trials": trials, "best": best})
    assert main(["tune", "--data", "ds", "--models", "tiny_cnn_lstm,tiny_resnet"]) == status
    err = capsys.readouterr().err
    assert (said in err) if said else err == ""


@pytest.mark.parametrize("joined", [True, False])
def test_a_cluster_joined_by_address_is_told_which_locations_are_paths_of_this_machine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, joined: bool
) -> None:
    """`ray job submit` of `cxr train --out runs`: on a cluster of several nodes the workers would write
    their checkpoints to their own disks. The local cluster cxr starts is one machine: nothing to say."""
    import cxrcore.cli as cli
    import cxrcore.runtime
    import cxrcore.train.trainer

    monkeypatch.setattr(cli, "_connect", lambda address: None)
    monkeypatch.setattr(cxrcore.runtime, "_local_cores", None if joined else 2)
    monkeypatch.setattr(cxrcore.train.trainer, "fit", lambda config: None)
    monkeypatch.setattr(cli, "format_train_result", lambda result: "trained")
    monkeypatch.setattr(
        cli,
        "_run_train",
        lambda args: cli._run_on_ray(args, cxrcore.train.trainer.fit, str, cxrcore.train.trainer.writing),
    )
    monkeypatch.chdir(tmp_path)
    main(["train", "--data", "s3://bucket/ds", "--model", "tiny_cnn_lstm", "--out", "runs"])
    err = capsys.readouterr().err
    if joined:  # the path as the workers would get it: this machine's absolute one
        assert err.startswith(
            f"note: --out {tmp_path / 'runs'}: on a cluster of several nodes, every node must"
        )
        assert "s3://bucket/ds" not in err  # object storage is every node's
    else:
        assert "note:" not in err


def test_outputs_inside_a_jobs_working_dir_copy_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ray job submit --working-dir . -- cxr tune ...` runs in Ray's unpacked copy of the working dir: the
    default relative --out wrote comparison.html there, deleted with the cluster's session."""
    import cxrcore.cli as cli
    import cxrcore.runtime
    import cxrcore.train.trainer

    package = tmp_path / "runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    ran: list[object] = []
    monkeypatch.setattr(cli, "_connect", lambda address: None)
    monkeypatch.setattr(cxrcore.runtime, "_local_cores", None)  # joined by address, as a job's driver is
    monkeypatch.setattr(cxrcore.train.trainer, "fit", ran.append)
    monkeypatch.setattr(
        cli,
        "_run_train",
        lambda args: cli._run_on_ray(args, cxrcore.train.trainer.fit, str, cxrcore.train.trainer.writing),
    )
    monkeypatch.chdir(package)
    assert main(["train", "--data", "s3://bucket/ds", "--model", "tiny_cnn_lstm", "--out", "runs"]) == 2
    assert f"--out {package / 'runs'}: inside this job's copy of its working_dir" in capsys.readouterr().err
    assert not ran
    main(["train", "--data", "s3://b/ds", "--model", "tiny_cnn_lstm", "--out", str(tmp_path / "r")])
    assert len(ran) == 1  # an absolute path outside the copy runs
    # Ingest's OUT and evaluate's --out were written there too, and the job SUCCEEDED.
    assert main(["data", "ingest", str(tmp_path / "raw"), "ds_rel", "--size", "64"]) == 2
    assert f"OUT {package / 'ds_rel'}: inside this job's copy" in capsys.readouterr().err
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "ds")]
    assert main([*evaluate, "--out", "eval-rel"]) == 2
    assert f"--out {package / 'eval-rel'}: inside this job's copy" in capsys.readouterr().err
    assert not (package / "ds_rel").exists() and not (package / "eval-rel").exists()


def test_every_subcommand_says_what_it_does_in_its_own_help() -> None:
    """`cxr serve --help` began with the usage alone: its one-line help was only in `cxr --help`."""
    import argparse

    from cxrcore.cli import build_parser

    def undescribed(parser: argparse.ArgumentParser, path: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += [] if sub.description else [f"{path} {name}"]
                    found += undescribed(sub, f"{path} {name}")
        return found

    assert undescribed(build_parser(), "cxr") == []


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["train", "--data", "ds", "--model", "tiny_cnn_lstmm"], "--model: unknown model 'tiny_cnn_lstmm'"),
        (
            ["tune", "--data", "ds", "--models", "dual_cn", "--registry", "reg"],
            "--models: unknown model 'dual_cn'",
        ),
    ],
)
def test_a_mistyped_architecture_is_refused_before_ray_starts(
    command: list[str], said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cxrcore.cli as cli

    def started(address: str | None) -> None:
        raise AssertionError("Ray started for a command that cannot run")

    monkeypatch.setattr(cli, "_connect", started)
    assert main(command) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_sigterm_is_raised_as_ctrl_c_also_where_sigint_is_ignored(sigint: str) -> None:
    """Once Ray is up, SIGTERM stops the process as Ctrl-C does: through the SIGINT handler (Ray Train's and
    Tune's stop the run at its checkpoint), or where SIGINT is ignored, as in a shell's background job (a
    `ray job` entrypoint), as a KeyboardInterrupt; raising an ignored SIGINT would have done nothing."""
    script = f"""
import os, signal, threading
from cxrcore.runtime import _sigterm_as_ctrl_c, sigterm_received
signal.signal(signal.SIGINT, signal.SIG_IGN if {sigint == "ignored"} else signal.default_int_handler)
_sigterm_as_ctrl_c()
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    threading.Event().wait(30)
except KeyboardInterrupt:
    print("stopped", sigterm_received())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout == "stopped True\n", done.stderr


def test_a_rerun_on_other_settings_or_other_data_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    """Other settings can be put back; another dataset (or the same folder ingested again, whose splits
    moved) cannot, and the advice says so rather than "re-run with the recorded settings"."""
    from cxrcore.config import ConfigError
    from cxrcore.experiment import check_same_experiment

    run = str(tmp_path / "run")
    check_same_experiment(run, {"data_fingerprint": "aaa", "lr": 0.001}, "a training run")
    check_same_experiment(run, {"data_fingerprint": "aaa", "lr": 0.001}, "a training run")  # resumes
    with pytest.raises(ConfigError, match="Re-run with the recorded settings") as settings:
        check_same_experiment(run, {"data_fingerprint": "aaa", "lr": 0.01}, "a training run")
    assert "lr 0.001 → 0.01" in str(settings.value)
    with pytest.raises(ConfigError, match="ingested again") as data:
        check_same_experiment(run, {"data_fingerprint": "bbb", "lr": 0.001}, "a training run")
    assert "Re-run with the recorded" not in str(data.value) and "another --name" in str(data.value)


def test_a_missing_pretrained_file_fails_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """It failed after Ray's start (25 s in a review); a file that is there is loaded once, by the run."""
    import cxrcore.cli as cli

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "_connect", no_ray)
    missing = tmp_path / "w.safetensors"
    train = ["train", "--data", "s3://bucket/ds", "--model", "tiny_resnet", "--out", str(tmp_path)]
    assert main([*train, "--pretrained", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"cxr: error: --pretrained: no weights file at {missing}"
    tune = [
        "tune",
        "--data",
        "s3://bucket/ds",
        "--registry",
        str(tmp_path / "reg"),
        "--models",
        "resnet",
    ]
    assert main([*tune, "--pretrained", str(missing)]) == 2
    assert "--pretrained: no weights file at" in capsys.readouterr().err


def test_a_class_without_a_val_image_is_named_before_training(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Five Viral Pneumonia images split 4/0/1: no epoch score, checkpoint or winner saw the class, and
    only ingest had said so. Train and tune say it too, and the comparison's summary (in its JSON)."""
    import cxrcore.cli as cli
    from tests.unit.test_external_eval import write_dataset

    class Stop(Exception):
        pass

    def no_ray(address: str | None) -> None:
        raise Stop

    monkeypatch.setattr(cli, "_connect", no_ray)
    rows = [("COVID", "train", 4), ("COVID", "val", 2), ("Normal", "train", 4), ("Normal", "val", 2),
            ("Viral Pneumonia", "train", 4), ("Viral Pneumonia", "test", 1)]  # fmt: skip
    rows.append(("COVID", "train", 5))  # two training images a worker
    data = write_dataset(tmp_path / "ds", rows, "f")
    with pytest.raises(Stop):
        main(["train", "--data", data, "--model", "tiny_cnn_lstm", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert "WARNING: the val split holds no Viral Pneumonia image" in err
    assert "is over the other 2 classes" in err and "--val-fraction" in err
    whole = write_dataset(tmp_path / "whole", [*rows, ("Viral Pneumonia", "val", 1)], "g")
    with pytest.raises(Stop):
        main(["train", "--data", whole, "--model", "tiny_cnn_lstm", "--out", str(tmp_path / "runs")])
    assert "val split holds no" not in capsys.readouterr().err


@pytest.mark.parametrize("grace", ["-1", "inf", "nan", "1e300"])
def test_a_grace_that_cannot_be_waited_is_refused_before_anything_starts(
    grace: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`--grace-s inf` or 1e300 ended in an OverflowError traceback at SIGTERM, after no grace at all."""
    assert main(["serve", "--registry", str(tmp_path), "--grace-s", grace]) == 2
    assert capsys.readouterr().err.startswith("cxr: error: --grace-s: expected 0 to 3600 seconds, got ")


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [(errno.EROFS, 2, "Read-only file system"), (errno.ENOSPC, 1, "No space left on device")],
)
def test_a_read_only_or_full_disk_is_one_line_naming_the_path(
    code: int, status: int, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A read-only mount (NFS, a container's volume) ended `cxr data ingest`, `cxr train` and `cxr models
    promote` in a traceback (`OSError: [Errno 30] Read-only file system: '.../.out.lock'`)."""
    import cxrcore.data.storage

    def refused(path: str, *_: object) -> None:
        raise OSError(code, os.strerror(code), f"{path}.lock")

    monkeypatch.setattr(cxrcore.data.storage, "exclusive", refused)
    raw = tmp_path / "raw"
    write_png(raw / "COVID" / "images" / "COVID-1.png", xray(1))
    assert main(["data", "ingest", str(raw), str(tmp_path / "out")]) == status
    err = capsys.readouterr().err
    assert err == f"cxr: error: {tmp_path / 'out'}.lock: {words}\n"
    monkeypatch.setattr(
        cxrcore.data.storage, "exclusive", lambda *_: (_ for _ in ()).throw(OSError(errno.EIO, "io"))
    )
    with pytest.raises(OSError):  # any other OSError is a bug to see whole
        main(["data", "ingest", str(raw), str(tmp_path / "out")])


def test_a_quoted_home_path_reads_in_every_command_as_register_writes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cxr models register ... --registry '~/reg'` wrote to $HOME/reg, then `cxr models list --registry
    '~/reg'` said "no registry at ~/reg"; `cxr data check '~/raw'` said it was no folder. A registry path
    that is a file said "no such folder" too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_png(tmp_path / "raw" / "COVID" / "images" / "COVID-1.png", xray(1))
    assert main(["data", "check", "~/raw"]) == 0
    (tmp_path / "reg").mkdir()
    assert main(["models", "list", "--registry", "~/reg"]) == 0
    assert "no registry at" not in capsys.readouterr().err
    (tmp_path / "afile.txt").write_text("x")
    assert main(["models", "list", "--registry", str(tmp_path / "afile.txt")]) == 2
    assert (
        capsys.readouterr().err
        == f"cxr: error: --registry: {tmp_path / 'afile.txt'} is a file, not a registry folder\n"
    )


def test_an_output_that_is_a_file_is_named_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cxr train --out afile.txt` said "afile.txt: File exists" (os.makedirs' words)."""
    import cxrcore.cli

    def makes(args: object) -> int:
        os.makedirs(tmp_path / "afile.txt")
        return 0

    (tmp_path / "afile.txt").write_text("x")
    monkeypatch.setattr(cxrcore.cli, "_run_synth", makes)
    assert main(["data", "synth", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == f"cxr: error: {tmp_path / 'afile.txt'}: a file is there, where a folder is needed\n"


def test_a_setting_added_since_an_experiment_started_reads_as_its_default(tmp_path: Path) -> None:
    """An experiment from before --repeats records none: the same command resumes it, and --repeats 2 is
    refused as "repeats 1 → 2", not "None → 2"."""
    from cxrcore.config import ConfigError
    from cxrcore.experiment import check_same_experiment

    old = {"data_fingerprint": "f", "trials": 1}
    check_same_experiment(str(tmp_path), old, "a Tune experiment", {"repeats": 1})
    check_same_experiment(str(tmp_path), old, "a Tune experiment", {"repeats": 1})
    with pytest.raises(ConfigError, match=r"started with other settings \(repeats 1 → 2\)"):
        check_same_experiment(str(tmp_path), {**old, "repeats": 2}, "a Tune experiment", {"repeats": 1})


def test_check_json_spells_a_name_that_is_not_utf8_as_the_dataset_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr data check --json` and ingest_report.json wrote a non-UTF-8 name as an unpaired surrogate escape
    ("\\udce9"), which duckdb and polars refuse; the Parquet's `file` column spells it `caf\\xe9.png`."""
    write_png(tmp_path / "raw" / "COVID" / "images" / "COVID-1.png", xray(1))
    bad = os.path.join(os.fsencode(tmp_path / "raw" / "COVID" / "images"), b"caf\xe9.png")
    with open(bad, "wb") as file:
        file.write(b"not a png")
    main(["data", "check", str(tmp_path / "raw"), "--json"])
    out = capsys.readouterr().out
    assert "\\udce9" not in out and "caf\\\\xe9.png" in out
    json.loads(out)


def test_a_ctrl_c_while_the_finished_commands_ray_stops_is_held_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pressed as the local cluster stopped, after the last line, it ended a finished ingest in Ray's
    traceback with exit status 1."""
    import os
    import signal

    import cxrcore.cli as cli

    stopped: list[bool] = []

    def stop_ray_while_interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in this thread: ignored, not a KeyboardInterrupt
        stopped.append(True)

    monkeypatch.setattr(cli, "_ray_running", lambda: True)
    monkeypatch.setattr(cli, "_disconnect_ray", stop_ray_while_interrupted)
    before = signal.getsignal(signal.SIGINT)
    cli._stop_ray_undisturbed()
    assert stopped == [True] and signal.getsignal(signal.SIGINT) is before


def test_version_names_the_code_by_commit_and_source_hash(capsys: pytest.CaptureFixture[str]) -> None:
    """An audit (session 51): cards of a wheel or container install recorded only "0.2.0", which many commits
    share; the source hash names the code wherever it runs."""
    from cxrcore.provenance import source_sha256, versions

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    line = capsys.readouterr().out
    assert line.startswith("cxr ") and f"source sha256 {source_sha256()[:12]}" in line
    assert versions()["cxr_source_sha256"] == source_sha256() and len(source_sha256()) == 64
