"""The configs a user runs on the full database (jobs/configs/) and `--dry-run`: parse, resolve, plan."""

from __future__ import annotations

import dataclasses
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from cxrcore.cli import main
from cxrcore.config import ConfigError, IngestConfig, TuneConfig, load_config
from cxrcore.models import get_model_entry
from cxrcore.plan import expected_epochs_per_trial
from cxrcore.runtime import usable_cores
from cxrcore.tune import (
    max_concurrent_trials,
    planned_space,
    search_plan,
    trains_in_trial,
    trial_request,
    trial_resources,
    trial_worker_cpus,
    tune_settings,
)

CONFIGS = Path(__file__).parents[2] / "jobs" / "configs"
CONFIG_CLASSES: dict[str, type] = {"ingest.yaml": IngestConfig, "tune.yaml": TuneConfig}
"""Each file in jobs/configs/ and the config class of the job that reads it."""


def test_every_config_parses_into_its_class() -> None:
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(CONFIG_CLASSES)
    for name, cls in CONFIG_CLASSES.items():
        assert isinstance(load_config(cls, CONFIGS / name), cls), name


def test_tune_runs_each_planned_trial_once() -> None:
    """The shipped sweep (4 trials of each of 3 architectures) is 12 trials, as planned and documented:
    Tune runs a grid search num_samples times over, and had run each planned trial 4 times (48)."""
    from ray.tune.search.variant_generator import _count_variants

    config = load_config(TuneConfig, CONFIGS / "tune.yaml")
    plan = search_plan(config, 16_933)
    settings = tune_settings(config, {"CPU": 32.0, "GPU": 4.0})
    assert len(plan) == config.trials * len(config.model_names()) == 12
    assert _count_variants({"config": planned_space(plan), "num_samples": settings.num_samples}, []) == 12
    assert settings.max_concurrent_trials == 4  # one trial per GPU


def test_tune_config_names_registered_models_on_one_gpu_each() -> None:
    config = load_config(TuneConfig, CONFIGS / "tune.yaml")
    assert config.model_names() == ["cnn_lstm", "dual_cnn", "resnet50"]
    for name in config.model_names():
        get_model_entry(name)  # raises for a name the registry does not know
    assert config.gpu and config.workers_per_trial == 1 and config.image_size == 224
    assert config.pretrained.endswith(".safetensors")  # written by `cxr models import-weights`
    batch_sizes = {trial["batch_size"] for trial in search_plan(config, 16_933)}
    assert batch_sizes <= {16, 32, 64}  # what the config's comments promise a 16 GB GPU holds


def test_tune_dry_run_prints_trials_gpus_and_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--config", str(CONFIGS / "tune.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "16,933 (assumed: no ingest_report.json here" in out
    assert "trials:              12 (cnn_lstm 4, dual_cnn 4, resnet50 4)" in out
    assert "1 worker in the trial's own process, no TorchTrainer (1 GPU), 0.1 CPU reserved" in out
    assert "4 trials at once (set by max_concurrent) → 3 waves" in out
    assert "up to 30 per trial; ASHA may stop a trial after 15" in out
    assert "≈270 expected" in out and "180 if it stopped every trial at grace, 360 if none" in out
    assert (
        "unet, 8 epochs on 1 worker in a Tune trial's own process, no TorchTrainer (1 GPU), batch 16" in out
    )
    assert "output:              /data/cxr/runs/radiography-full (comparison.html" in out
    assert "weights file /data/cxr/weights/resnet50-1ch.safetensors (not on this machine" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 12 and {int(row[4]) for row in rows} <= {16, 32, 64}


def test_tune_dry_run_refuses_a_setting_its_trials_would_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    """`--image-size 8` passed the dry run (exit 0, a full plan); submitted, the trials raised it after Ray
    and Tune had started."""
    tune = ["tune", "--data", "d", "--registry", "r", "--models", "tiny_cnn_lstm,tiny_dual_cnn"]
    assert main([*tune, "--image-size", "8", "--dry-run"]) == 2
    assert "--image-size: must be between 32 and 2048, got 8" in capsys.readouterr().err
    assert main([*tune, "--image-size", "8"]) == 2  # before Ray starts, too
    assert "--image-size: must be between 32 and 2048, got 8" in capsys.readouterr().err


def test_ingest_dry_run_through_the_job_entrypoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["jobs.ingest", "--config", str(CONFIGS / "ingest.yaml"), "--dry-run"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("jobs.ingest", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "source:   /data/COVID-19_Radiography_Dataset (not on this machine)" in out
    assert "256×256 px" in out and "train 80% / val 10% / test 10%" in out
    assert "about 16,933 train / 2,116 val / 2,116 test" in out


def test_train_dry_run_reads_the_dataset_report_when_present(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.test_external_eval import write_dataset

    splits = {"train": 100, "val": 12, "test": 12}
    rows = [("COVID", split, i) for split, n in splits.items() for i in range(n)]
    data = write_dataset(tmp_path / "ds", rows, "f", size=64)
    argv = ["train", "--data", data, "--model", "dual_cnn", "--workers", "2", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train images: 100 (from its ingest_report.json)" in out
    assert "2 Train workers on CPUs (gloo): on a local cluster they share the machine's cores" in out
    assert main([*argv, "--cpus-per-worker", "3"]) == 0
    captured = capsys.readouterr()
    assert "2 Train workers, 3 CPUs each (gloo)" in captured.out
    if usable_cores() < 4:  # what this machine's local cluster could not place: a note, as --gpu's
        note = "note: on this machine the run would stop: --workers 2 × --cpus-per-worker 3 needs 6"
        assert note in captured.out + captured.err
    assert "4 per worker (automatic" in out and "≈13 steps per epoch" in out
    assert "image size:   64 px, the dataset's base size" in out


def test_gpu_tune_plan_without_max_concurrent_states_its_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tune", "--data", "/nowhere", "--registry", "/nowhere/reg", "--models", "resnet", "--trials", "3"]
    assert main([*argv, "--gpu", "--workers-per-trial", "2", "--pretrained", "none", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trials at once (assumed cluster: one node with 4 GPUs" in out
    assert "trials:              9 (resnet18 3, resnet34 3, resnet50 3)" in out  # each depth, each draw
    assert "segmenter" not in out


def test_wrong_names_fail_with_exit_2_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = yaml.safe_load((CONFIGS / "tune.yaml").read_text())
    bad = tmp_path / "tune.yaml"
    bad.write_text(yaml.safe_dump({**settings, "models": "cnn_lstm,dual_cnn,resnet05"}))
    assert main(["tune", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxr: error: --models: unknown model 'resnet05'") and "did you mean" in err
    tune = ["tune", "--data", "ds", "--registry", "reg", "--dry-run", "--models"]
    assert main([*tune, "tiny_cnn_lstm,tiny_unet"]) == 2  # ASHA would have ranked Dice beside macro-F1
    assert capsys.readouterr().err.startswith("cxr: error: --models: tiny_unet is a lung segmenter, not a")
    assert main([*tune, "tiny_cnn_lstm,tiny_resnet,tiny_cnn_lstm"]) == 2
    assert "--models: tiny_cnn_lstm named twice" in capsys.readouterr().err
    assert main([*tune, "resnet,resnet18", "--pretrained", "none"]) == 2
    assert (
        "--models: 'resnet' already searches resnet18, resnet34, resnet50; resnet18 beside"
        in capsys.readouterr().err
    )

    assert (
        main(["train", "--data", "ds", "--model", "cnn_lstm", "--pretrained", "w.safetensors", "--dry-run"])
        == 2
    )
    assert "--pretrained: model 'cnn_lstm' takes no pretrained weights" in capsys.readouterr().err
    assert main(["data", "ingest", "raw", "out", "--map", "COVID-19=Covid19", "--dry-run"]) == 2
    assert "cxr: error: --map: 'Covid19' (for 'COVID-19') is not a class" in capsys.readouterr().err


def test_expected_epochs_and_concurrency_arithmetic() -> None:
    assert expected_epochs_per_trial(30, 15, 2) == 22.5  # rungs at 15 (half go on to 30)
    assert expected_epochs_per_trial(30, 10, 2) == 17.5  # rungs at 10 and 20
    assert expected_epochs_per_trial(8, 8, 2) == 8
    one_gpu = TuneConfig(data="d", registry="r", gpu=True)
    assert max_concurrent_trials(one_gpu, {"GPU": 4, "CPU": 32}) == 4
    two_cpus = TuneConfig(data="d", registry="r", workers_per_trial=2)
    assert max_concurrent_trials(two_cpus, {"CPU": 8}) == 3  # 2 workers + 0.1 for the trial's driver


@pytest.mark.parametrize(
    ("cores", "logical", "workers", "asked", "expected"),
    [
        (2, 4, 1, None, 2),  # the 2-core machine: the worker takes both cores, 2 logical CPUs stay free
        (16, 18, 1, None, 16),  # a bigger one: the cluster counts DATA_CPUS more for Ray Data's reads
        (16, 16, 1, None, 14),  # one started with no more logical CPUs than cores: Ray Data keeps 2
        (16, 4, 1, None, 2),  # a cluster started with fewer logical CPUs than cores
        (2, 4, 2, None, 1),  # DDP workers on 2 cores: one CPU each
        (16, 18, 2, None, 8),  # on 16: the 16 a single worker would get, shared
        (16, 18, 5, None, 3),
        (2, 4, 3, None, 1),  # never under 1
        (None, 8, 1, None, 1),  # a cluster joined by address: its CPUs are its cores
        (2, 4, 1, 3, 3),  # --cpus-per-worker wins
    ],
)
def test_cpu_workers_share_the_cores_but_leave_ray_data_some(
    monkeypatch: pytest.MonkeyPatch,
    cores: int | None,
    logical: int,
    workers: int,
    asked: int | None,
    expected: int,
) -> None:
    import ray

    import cxrcore.runtime
    from cxrcore.config import TrainConfig
    from cxrcore.train.trainer import worker_cpus

    monkeypatch.setattr(cxrcore.runtime, "_local_cores", cores)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(logical)})
    config = TrainConfig(data="ds", model="tiny_cnn_lstm", workers=workers, cpus_per_worker=asked)
    assert worker_cpus(config) == expected


def test_cpu_tune_plan_assumes_the_local_cluster_cxr_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("cxrcore.runtime.usable_cores", lambda *_: 2)
    argv = [
        "tune",
        "--data",
        "/nowhere",
        "--registry",
        "/nowhere/reg",
        "--models",
        "cnn_lstm",
        "--trials",
        "6",
    ]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 2 cores count 4 logical CPUs: 3 trials of 1.1 CPUs at once, as a real local run places them
    assert "3 trials at once (assumed cluster: the local one cxr starts on this machine's 2 cores" in out
    assert "→ 2 waves" in out
    assert main([*argv[:-1], "2", "--dry-run"]) == 0  # fewer trials than room: what runs, and the room
    assert (
        "2 trials at once (assumed cluster: the local one cxr starts on this machine's 2 cores"
        in (out := capsys.readouterr().out)
        and ": room for 3) → 1 wave" in out
    )
    assert "1 worker in the trial's own process, no TorchTrainer (1 CPU), 1.1 CPU reserved" in out
    monkeypatch.setattr("cxrcore.runtime.usable_cores", lambda *_: 16)
    assert main([*argv[:-1], "2", "--dry-run"]) == 0  # 2 trials on 16 cores: 8 threads each
    out = capsys.readouterr().out
    assert "(8 CPUs: fewer trials than this machine's 16 cores share them), 8.1 CPU reserved" in out
    assert main([*argv[:-1], "2", "--workers-per-trial", "2", "--dry-run"]) == 0  # a TorchTrainer per trial
    out = capsys.readouterr().out
    assert "2 Train workers (4 CPUs each: fewer trials than this machine's 16 cores share them)" in out
    assert "share them), 8.1 CPU reserved (workers and driver)" in out


def test_trials_fewer_than_the_cores_share_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import cxrcore.runtime

    demo = TuneConfig(data="d", registry="r")  # 1 worker per trial
    monkeypatch.setattr(cxrcore.runtime, "_local_cores", 16)
    assert trial_worker_cpus(demo, {"CPU": 18.0}, trials=3) == 5  # 3 at once, 15 of 16 cores
    assert trial_worker_cpus(demo, {"CPU": 18.0}, trials=12) == 1  # 12 at once: one core each
    assert trial_worker_cpus(demo, {"CPU": 18.0}, trials=40) == 1  # more than fit: queued, one each
    pairs = TuneConfig(data="d", registry="r", workers_per_trial=2)
    assert trial_worker_cpus(pairs, {"CPU": 18.0}, trials=3) == 2  # 3 trials × 2 workers × 2 = 12
    capped = TuneConfig(data="d", registry="r", max_concurrent=2)
    assert trial_worker_cpus(capped, {"CPU": 18.0}, trials=12) == 8  # 2 at once (--max-concurrent)
    assert trial_worker_cpus(TuneConfig(data="d", registry="r", gpu=True), {"CPU": 18.0, "GPU": 1}, 3) == 1
    monkeypatch.setattr(cxrcore.runtime, "_local_cores", 2)
    assert trial_worker_cpus(demo, {"CPU": 4.0}, trials=3) == 1  # this 2-core machine: as before
    monkeypatch.setattr(cxrcore.runtime, "_local_cores", None)  # a cluster joined by address
    assert trial_worker_cpus(demo, {"CPU": 64.0}, trials=3) == 1


def test_a_local_cluster_counts_cpus_for_ray_data_beyond_the_cores() -> None:
    from cxrcore.runtime import DATA_CPUS, local_logical_cpus

    assert [local_logical_cpus(cores) for cores in (1, 2, 4, 16)] == [4, 4, 6, 18]
    assert local_logical_cpus(16) - DATA_CPUS == 16  # a single worker can take every core


def test_workers_the_local_cluster_can_never_place_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    import cxrcore.runtime
    from cxrcore.config import ConfigError, TrainConfig
    from cxrcore.train.trainer import _check_worker_cpus

    monkeypatch.setattr(cxrcore.runtime, "_local_cores", 2)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    config = TrainConfig(data="ds", model="tiny_cnn_lstm", workers=2, cpus_per_worker=3)
    with pytest.raises(ConfigError, match="needs 6 CPUs and the local Ray cluster has 4"):
        _check_worker_cpus(config, 3)
    # 4 of 4 CPUs: placeable, but the Ray Data tasks that feed the workers get none, and the run waited
    every = "needs 4 CPUs, all the local Ray cluster's 4, which leaves the Ray Data tasks feeding them none"
    with pytest.raises(ConfigError, match=every):
        _check_worker_cpus(TrainConfig(data="ds", model="tiny_cnn_lstm", workers=2), 2)
    _check_worker_cpus(TrainConfig(data="ds", model="tiny_cnn_lstm", workers=2), 1)  # 3 of 4
    # Before Ray starts (and in a dry run): the local cluster's CPUs are known; it had taken 26 s to refuse
    from cxrcore.train.trainer import check_local_worker_cpus

    monkeypatch.setattr("cxrcore.runtime.usable_cores", lambda *_: 2)
    every_cpu = TrainConfig(data="ds", model="tiny_cnn_lstm", workers=2, cpus_per_worker=2)
    with pytest.raises(ConfigError, match=every):
        check_local_worker_cpus(every_cpu)
    check_local_worker_cpus(dataclasses.replace(every_cpu, cpus_per_worker=1))
    check_local_worker_cpus(dataclasses.replace(every_cpu, address="head:6379"))  # a cluster may autoscale
    monkeypatch.setattr(cxrcore.runtime, "_local_cores", None)  # a joined cluster may autoscale
    _check_worker_cpus(config, 3)


def test_on_a_joined_cluster_workers_it_cannot_feed_or_place_now_are_noted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ray job submit ... jobs.train --workers 2` on a 2-CPU cluster stayed RUNNING for good, saying nothing:
    a cluster joined by address may autoscale, so the run goes on, with a note of what it waits for."""
    import cxrcore.runtime
    from cxrcore.config import TrainConfig
    from cxrcore.train.trainer import worker_fit_note

    monkeypatch.setattr(cxrcore.runtime, "_local_cores", None)
    two = TrainConfig(data="ds", model="tiny_cnn_lstm", workers=2)
    note = worker_fit_note(two, {"CPU": 2.0}, {"CPU": 2.0})
    assert note is not None and note.startswith("2 Train worker(s) need 2 CPUs, and the Ray Data tasks that")
    assert "the cluster has 2: training waits until the autoscaler adds a node" in note
    busy = worker_fit_note(two, {"CPU": 8.0}, {"CPU": 2.0})
    assert busy is not None and "2 of the cluster's 8 are free now" in busy
    assert worker_fit_note(two, {"CPU": 8.0}, {"CPU": 8.0}) is None
    gpus = TrainConfig(data="ds", model="tiny_cnn_lstm", workers=2, gpu=True)
    assert "need 2 GPUs; the cluster has 1" in (worker_fit_note(gpus, {"CPU": 8.0, "GPU": 1.0}, {}) or "")
    monkeypatch.setattr(cxrcore.runtime, "_local_cores", 2)  # the local cluster: _check_worker_cpus refuses
    assert worker_fit_note(two, {"CPU": 2.0}, {"CPU": 2.0}) is None


@pytest.mark.parametrize(("cores", "workers", "expected"), [(2, 1, 2), (16, 2, 8)])
def test_cpu_tune_plan_gives_the_segmenter_the_cores_it_trains_on(
    cores: int,
    workers: int,
    expected: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The segmenter trains alone before the trials, its workers sharing the local cluster's cores, as
    `trainer.worker_cpus` gives them in the run."""
    monkeypatch.setattr("cxrcore.runtime.usable_cores", lambda *_: cores)
    argv = ["tune", "--data", "/nowhere", "--registry", "/nowhere/reg", "--models", "dual_cnn"]
    assert main([*argv, "--workers-per-trial", str(workers), "--dry-run"]) == 0
    if workers > 1:
        where = f"{workers} Train workers ({expected} CPUs each: this machine's {cores} cores)"
    else:  # as one-worker trials train
        where = "1 worker in a Tune trial's own process, no TorchTrainer"
        where += f" ({expected} CPUs: this machine's {cores} cores)"
    assert f"epochs on {where}, batch 16" in capsys.readouterr().out


def test_a_one_worker_trial_reserves_in_its_own_process_what_a_torchtrainer_trial_reserved_in_all() -> None:
    """A one-worker trial trains in Tune's trial actor, which then reserves the worker's CPUs (or its GPU)
    beside the driver's share; a trial of several workers reserves only the driver's share, its
    TorchTrainer's workers their own. Either way a trial holds what `trial_resources` counts, so as many
    trials run at once as before."""
    one = TuneConfig(data="d", registry="r")
    assert trains_in_trial(one) and trial_request(one, cpus_per_worker=1) == {"cpu": 1.1}
    assert trial_request(one, cpus_per_worker=5) == {"cpu": 5.1}  # fewer trials than cores share them
    assert trial_resources(one) == {"CPU": 1.1, "GPU": 0}
    gpu = TuneConfig(data="d", registry="r", gpu=True)
    assert trial_request(gpu, cpus_per_worker=1) == {"cpu": 0.1, "gpu": 1}
    assert trial_resources(gpu) == {"CPU": 0.1, "GPU": 1}
    pairs = TuneConfig(data="d", registry="r", workers_per_trial=2)
    assert not trains_in_trial(pairs) and trial_request(pairs, cpus_per_worker=1) == {"cpu": 0.1}
    assert trial_resources(pairs) == {"CPU": 2.1, "GPU": 0}


def test_a_trial_the_cluster_cannot_place_is_said_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tune job whose trial needed 2.1 CPUs of a 2-CPU cluster stayed RUNNING for good, and one beside a
    Serve app holding a CPU waited minutes, both without a word on the console."""
    from cxrcore import runtime
    from cxrcore.tune import trial_fit_note

    two = TuneConfig(data="ds", registry="reg", workers_per_trial=2)
    one = TuneConfig(data="ds", registry="reg")
    cluster, idle = {"CPU": 2.0}, {"CPU": 2.0}
    monkeypatch.setattr(runtime, "local_core_limit", lambda: None)  # a cluster joined by address
    note = trial_fit_note(two, 1, cluster, idle)
    assert note is not None and note.startswith("each trial needs 2.1 CPUs (2 worker(s) per trial and its")
    assert "the cluster has 2: the trials wait until the autoscaler adds a node" in note
    assert trial_fit_note(one, 1, cluster, idle) is None
    busy = trial_fit_note(one, 1, cluster, {"CPU": 0.9})  # Serve holds a CPU
    assert busy is not None and "0.9 of the cluster's 2 are free now" in busy
    monkeypatch.setattr(runtime, "local_core_limit", lambda: 2)  # the local cluster cxr started: never
    local = {"CPU": 4.0}  # 2 cores and DATA_CPUS
    assert trial_fit_note(two, 1, local, local) is None  # 2.1 CPUs, and one left for the data reads
    three = TuneConfig(data="ds", registry="reg", workers_per_trial=3)  # 3.1: started, then hung for good
    with pytest.raises(ConfigError, match="has 4, which leaves its data reads no CPU; use fewer --workers"):
        trial_fit_note(three, 1, local, local)
    gpu = TuneConfig(data="ds", registry="reg", gpu=True, workers_per_trial=2)
    with pytest.raises(ConfigError, match="each trial needs 2 GPUs"):
        trial_fit_note(gpu, 1, {"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0})


def test_cxr_registry_stands_for_registry_in_tune_and_serve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The README says CXR_REGISTRY may replace --registry: `cxr tune` said "missing setting 'registry'"
    and `cxr serve` "no registry to look it up in" with it set."""
    from cxrcore.cli import build_parser

    monkeypatch.delenv("CXR_REGISTRY", raising=False)
    with pytest.raises(ConfigError, match="no model registry given"):
        TuneConfig(data="ds")
    monkeypatch.setenv("CXR_REGISTRY", str(tmp_path / "reg"))
    assert TuneConfig(data="ds").registry == str(tmp_path / "reg")
    assert TuneConfig(data="ds", registry="other").registry.endswith("/other")  # the flag wins
    assert build_parser().parse_args(["serve"]).registry == str(tmp_path / "reg")


def test_the_demo_checks_its_settings_before_ray_and_the_synthesis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`cxr demo --models foo` failed after Ray's start, the synthesis and the ingest (70 s here)."""
    from cxrcore import runtime
    from cxrcore.cli import main

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    demo = ["demo", "--work-dir", str(tmp_path / "w"), "--no-serve"]
    for flags, message in [
        (["--models", "cnn_lstm,foo"], "--models: unknown model 'foo'"),
        (["--pretrained", str(tmp_path / "w.safetensors")], "--pretrained: no weights file at"),
        (["--real", str(tmp_path / "nowhere")], "--real: no folder at"),
        (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    ]:
        assert main([*demo, *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_dry_run_notes_what_this_machine_lacks_and_refuses_what_it_has_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run plans anywhere (the shipped configs name the cluster's /data), so a dataset, a weights file
    or GPUs missing here are notes, exit 0; a dataset here that the run would refuse exits 2 as it does."""
    import torch

    from tests.unit.test_external_eval import class_rows, write_dataset

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.chdir(tmp_path)
    train = ["train", "--model", "tiny_resnet", "--dry-run"]
    assert main([*train, "--data", "typo", "--gpu", "--pretrained", "w.safetensors"]) == 0
    captured = capsys.readouterr()
    assert "plan of cxr train" in captured.out
    notes = [line for line in captured.err.splitlines() if line.startswith("note: on this machine the run")]
    assert len(notes) == 3, captured.err
    assert notes[0].endswith(f"--pretrained: no weights file at {tmp_path / 'w.safetensors'}")
    assert "--gpu: this machine, where cxr starts a local Ray cluster, has 0 GPU(s)" in notes[1]
    assert notes[2].endswith(f"--data {tmp_path / 'typo'}: no such folder")
    data = write_dataset(
        tmp_path / "ds",
        class_rows("COVID", train=4, val=1),
        "f",
    )
    assert main([*train, "--data", data]) == 0 and "note:" not in capsys.readouterr().err
    next((tmp_path / "ds").rglob("*.parquet")).unlink()  # damaged here: the run would refuse it
    assert main([*train, "--data", data]) == 2
    captured = capsys.readouterr()
    assert "plan of cxr train" in captured.out and captured.err.startswith("cxr: error:")


def test_gpu_workers_this_machine_lacks_are_refused_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--gpu` on a machine without a GPU waited for a local Ray cluster's start (12 s) to be refused."""
    import torch

    import cxrcore.cli as cli
    from tests.unit.test_external_eval import class_rows, write_dataset

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "_connect", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    data = write_dataset(
        tmp_path / "ds",
        class_rows("COVID", train=4, val=1),
        "f",
    )
    train = ["train", "--data", data, "--model", "tiny_cnn_lstm", "--out", str(tmp_path), "--gpu"]
    assert main([*train, "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--gpu: this machine, where cxr starts a local Ray cluster, has 1 GPU(s) for 2 GPU worker" in err
    tune = ["tune", "--data", data, "--registry", str(tmp_path / "r"), "--models", "tiny_cnn_lstm", "--gpu"]
    assert main([*tune, "--workers-per-trial", "2"]) == 2
    assert "has 1 GPU(s) for 2 GPU worker(s)" in capsys.readouterr().err


def test_a_dry_run_refuses_here_what_the_run_refused_only_after_ray_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mask-reading comparison on a dataset without masks, and a weights file that is no weights file,
    passed the dry run (exit 0); the runs refused them once Ray had started. A damaged report was a
    traceback."""
    import json

    from tests.unit.test_external_eval import write_dataset

    rows = [("COVID", "train", 1), ("Normal", "train", 2), ("COVID", "val", 3), ("Normal", "val", 4)]
    rows += [("COVID", "train", 6), ("Normal", "train", 7)]  # two training images a worker
    data = write_dataset(tmp_path / "ds", [*rows, ("Normal", "test", 5)], "f")
    report = json.loads((tmp_path / "ds/ingest_report.json").read_text())
    (tmp_path / "ds/ingest_report.json").write_text(json.dumps({**report, "ingested": 5, "without_mask": 5}))
    tune = ["tune", "--data", data, "--registry", str(tmp_path / "r"), "--dry-run"]
    assert main([*tune, "--models", "tiny_dual_cnn"]) == 2
    assert "tiny_dual_cnn reads a lung mask" in capsys.readouterr().err
    assert main([*tune, "--models", "tiny_cnn_lstm"]) == 0
    junk = tmp_path / "w.safetensors"
    junk.write_bytes(b"not weights")
    train = ["train", "--data", data, "--model", "tiny_resnet", "--pretrained", str(junk), "--dry-run"]
    assert main(train) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("cxr: error: --pretrained")
    (tmp_path / "ds/ingest_report.json").write_text("{cut sho")
    assert main([*train[:-3], "--dry-run"]) == 2
    assert "ingest_report.json is not valid JSON" in capsys.readouterr().err


def test_a_dry_run_refuses_what_an_earlier_run_left_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut `cxr_settings.json`, Ray Train's checkpoint record or Tune's experiment state: the dry run
    passed (exit 0) and the run refused it in one line once Ray had started."""
    from tests.unit.test_external_eval import write_dataset

    rows = [("COVID", "train", 1), ("Normal", "train", 2), ("COVID", "val", 3), ("Normal", "val", 4)]
    rows += [("COVID", "train", 6), ("Normal", "train", 7)]  # two training images a worker
    data = write_dataset(tmp_path / "ds", [*rows, ("Normal", "test", 5)], "f")
    monkeypatch.chdir(tmp_path)
    train = ["train", "--data", data, "--model", "tiny_cnn_lstm", "--name", "r", "--dry-run"]
    assert main(train) == 0
    run = tmp_path / "cxr-runs" / "r"
    run.mkdir(parents=True)
    (run / "cxr_settings.json").write_text("")
    assert main(train) == 2
    assert (
        "cxr_settings.json, where a training run recorded its settings, is damaged" in capsys.readouterr().err
    )
    (run / "cxr_settings.json").write_text("{}")
    (run / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_res')
    assert main(train) == 2
    assert "Ray Train's record of this run's checkpoints, is damaged" in capsys.readouterr().err
    assert (
        run / "checkpoint_manager_snapshot.json"
    ).read_text() == '{"checkpoint_res'  # a dry run writes nothing
    tune = [
        "tune",
        "--data",
        data,
        "--registry",
        "reg",
        "--models",
        "tiny_cnn_lstm",
        "--name",
        "c",
        "--dry-run",
    ]
    assert main(tune) == 0
    (tmp_path / "cxr-runs" / "c").mkdir()
    (tmp_path / "cxr-runs" / "c" / "experiment_state-2026-12-05_10-00-00.json").write_text("")
    assert main(tune) == 2
    assert "Ray Tune's record of this experiment, is damaged" in capsys.readouterr().err


def test_each_demo_of_other_data_or_settings_has_its_own_experiment_and_the_same_one_resumes(
    tmp_path: Path,
) -> None:
    """`cxr demo --seed 2` after `--seed 1` in one folder failed after synthesis and ingest: the single
    experiment name "demo" held one "started with other settings"."""
    from cxrcore.config import PipelineConfig
    from cxrcore.pipeline import comparison_config

    report = {"fingerprint": "5920404495ea8990", "by_split": {"train": 320}}
    seed_1 = PipelineConfig(work_dir=str(tmp_path), seed=1)
    name = comparison_config(seed_1, report).name
    assert name.startswith("demo-") and name == comparison_config(seed_1, report).name
    assert comparison_config(PipelineConfig(work_dir=str(tmp_path), seed=2), report).name != name
    assert comparison_config(seed_1, {**report, "fingerprint": "75fb80985de1457c"}).name != name
    assert comparison_config(PipelineConfig(work_dir=str(tmp_path), seed=1, epochs=4), report).name != name


def test_repeats_train_each_configuration_once_per_seed(capsys: pytest.CaptureFixture[str]) -> None:
    """`--repeats 3` trains each planned configuration with seeds --seed .. --seed+2: the same hyperparameters
    each time, the first wave every architecture at --seed; an experiment without it keeps its settings."""
    from cxrcore.tune import experiment_settings, trial_train_config

    once = TuneConfig(data="ds", registry="reg", models="cnn_lstm,dual_cnn", trials=2, seed=5)
    thrice = dataclasses.replace(once, repeats=3)
    plan, repeated = search_plan(once, 1000), search_plan(thrice, 1000)
    # One seed plans as before --repeats (no seed key, no repeats in the trials' config): Tune restores an
    # experiment started then only with a space of the same keys.
    assert all(set(t) == {"model", "lr", "weight_decay", "batch_size"} for t in plan)
    assert [t["seed"] for t in repeated] == [5, 5, 6, 6, 7, 7] * 2  # round by round, each seed in turn
    drawn = [{k: v for k, v in t.items() if k != "seed"} for t in plan]
    assert [{k: v for k, v in t.items() if k != "seed"} for t in repeated] == [  # one draw, trained per seed
        drawn[(i // 6) * 2 + i % 2] for i in range(12)
    ]
    params = {"trial": repeated[3]}
    assert trial_train_config(thrice, params, "t", None).seed == repeated[3]["seed"]
    assert (
        trial_train_config(once, {"trial": drawn[0]}, "t", None).seed == 5
    )  # a trial planned before --repeats
    report = {"fingerprint": "f"}
    assert "repeats" not in experiment_settings(once, report)  # experiments from before --repeats resume
    assert experiment_settings(thrice, report)["repeats"] == 3
    assert main(["tune", "--data", "ds", "--registry", "reg", "--models", "cnn_lstm", "--trials", "1",
                 "--repeats", "3", "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "3 (cnn_lstm 3); each configuration trained 3 times, seeds 0 to 2\n" in out
    assert "ranks the trials of one architecture and seed among themselves, stops none" in out


def test_every_architecture_is_searched_on_the_same_draws_whatever_the_order_of_models() -> None:
    """Drawn in turn from one stream, `--models a,b` and `b,a` gave a and b each other's configurations,
    and adding an architecture changed the others'."""
    from cxrcore.tune import SEARCH

    def configurations(models: str) -> dict[str, list[tuple[float, float, int]]]:
        plan = search_plan(TuneConfig(data="ds", registry="reg", models=models, trials=3, seed=4), 1000)
        by_model: dict[str, list[tuple[float, float, int]]] = {}
        for trial in plan:
            by_model.setdefault(trial["model"], []).append(
                (trial["lr"], trial["weight_decay"], trial["batch_size"])
            )
        return by_model

    ab, ba = configurations("cnn_lstm,dual_cnn"), configurations("dual_cnn,cnn_lstm")
    assert ab == ba and ab["cnn_lstm"] == ab["dual_cnn"]
    assert configurations("cnn_lstm,dual_cnn,resnet18")["cnn_lstm"] == ab["cnn_lstm"]
    drawn = ab["cnn_lstm"][1:]  # the first is the training defaults
    assert len(set(drawn)) == 2
    assert all(
        SEARCH["lr"][0] <= lr <= SEARCH["lr"][1]
        and SEARCH["weight_decay"][0] <= wd <= SEARCH["weight_decay"][1]
        for lr, wd, _ in drawn
    )


def test_a_training_batch_of_one_image_is_refused_with_why(capsys: pytest.CaptureFixture[str]) -> None:
    """A review (session 52): `--batch-size 1` planned 52 steps an epoch and trained on one image (training
    skips a batch of one, as BatchNorm cannot train on it), with exit 0."""
    from cxrcore.cli import main

    assert main(["train", "--data", "ds", "--model", "tiny_resnet", "--batch-size", "1", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "--batch-size: must be at least 2, got 1: training skips a batch of one image" in error
    assert main(["benchmark", "train", "--batch-size", "1"]) == 2
    assert "must be at least 2" in capsys.readouterr().err


def test_resnet_searches_every_depth_on_every_configuration() -> None:
    """A review (session 52): 'resnet' stepped through its depths one a round, so each depth met other
    hyperparameters (ASHA's best depth compared depth and learning rate together) and, with --trials 2,
    resnet50 never ran."""
    config = TuneConfig(data="ds", registry="reg", models="resnet,cnn_lstm", trials=2, seed=4)
    plan = search_plan(config, 1000)
    assert [trial["model"] for trial in plan] == ["resnet18", "resnet34", "resnet50", "cnn_lstm"] * 2
    for round_ in (plan[:4], plan[4:]):
        assert len({(t["lr"], t["weight_decay"], t["batch_size"]) for t in round_}) == 1


def test_a_mask_reading_model_on_images_without_masks_needs_a_segmenter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real-sample study (session 52): tiny_dual_cnn trained with exit 0 on 100 images without masks (all of
    two classes: an empty mask told the class), then `cxr evaluate` and `cxr serve` refused it."""
    import json

    from tests.unit.test_external_eval import write_dataset

    rows = [("COVID", split, i) for split, n in {"train": 20, "val": 4, "test": 4}.items() for i in range(n)]
    data = write_dataset(tmp_path / "ds", rows, "f", size=64)
    report = Path(data) / "ingest_report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "without_mask": 10}))
    train = ["train", "--data", data, "--dry-run", "--model"]
    assert main([*train, "tiny_dual_cnn"]) == 2
    assert "--model tiny_dual_cnn reads a lung mask, and 10 of the" in capsys.readouterr().err
    assert main([*train, "tiny_cnn_lstm"]) == 0


def test_tune_refuses_a_dataset_without_a_test_image_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review (session 57): every trial trained, then `cxr tune` failed naming `--split`, an option it
    does not have; each architecture's best is scored on the test split before it is registered."""
    from cxrcore.tune import check_test_split
    from tests.unit.test_external_eval import write_dataset

    data = write_dataset(
        tmp_path / "ds", [("COVID", "train", 1), ("Normal", "train", 2), ("COVID", "val", 3)], "f"
    )
    tune = ["tune", "--data", data, "--registry", str(tmp_path / "r"), "--models", "tiny_cnn_lstm"]
    for args in (["--dry-run"], []):
        assert main([*tune, *args]) == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith(
            f"cxr: error: --data: {data} has no image in its test split, on which `cxr tune`"
        )
        assert error.endswith("`cxr data ingest --test-fraction` above 0")
    assert not (tmp_path / "r").exists()
    check_test_split(TuneConfig(data=data, registry="r"), {"by_split": {"test": 1}})  # one is enough


def test_a_worker_with_fewer_than_two_training_images_is_refused_in_one_line(tmp_path: Path) -> None:
    """A review (session 57): 2 training images on 2 workers gave each a batch of one, which BatchNorm
    refused in a traceback, three times (Ray Train's retries)."""
    from cxrcore.config import TrainConfig
    from cxrcore.train.trainer import loop_config
    from tests.unit.test_external_eval import write_dataset

    rows = [("COVID", "train", 1), ("Normal", "train", 2), ("COVID", "train", 3), ("COVID", "val", 4)]
    data = write_dataset(tmp_path / "ds", rows, "f")
    with pytest.raises(
        ConfigError, match=r"--workers 2: .*'s 3 training image\(s\) give a worker fewer than 2"
    ):
        loop_config(TrainConfig(data=data, model="tiny_cnn_lstm", workers=2))
    assert loop_config(TrainConfig(data=data, model="tiny_cnn_lstm", workers=1))["train_rows"] == 3
