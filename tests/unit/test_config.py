"""Typed configs: validation naming the flag, YAML files, CLI flags derived from the fields."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from cxrcore.config import (
    ConfigError,
    IngestConfig,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    from_dict,
    load_config,
    to_dict,
)


def test_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--size: must be between 32 and 2048, got 8"):
        IngestConfig(raw="r", out="o", size=8)
    with pytest.raises(ConfigError, match="--val-fraction"):
        IngestConfig(raw="r", out="o", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match="--train-masks: must be one of segmenter, dataset, got 'truth'"):
        TrainConfig(data="d", model="dual_cnn", train_masks="truth")


def test_training_masks_shape_a_run_only_where_there_is_a_segmenter() -> None:
    """Re-running a run with the other --train-masks is another experiment; without a segmenter the
    setting changes nothing, and runs recorded before it existed resume."""
    from cxrcore.train.trainer import run_settings

    def settings(**train: object) -> dict[str, object]:
        config = TrainConfig(data="d", model="dual_cnn", **train)  # type: ignore[arg-type]
        loop = {"train": to_dict(config), "data": {"fingerprint": "f"}, "image_size": 64}
        return run_settings(config, loop)

    assert settings(segmenter="u", train_masks="dataset") != settings(segmenter="u")
    assert settings(train_masks="dataset") == settings() and "train_masks" not in settings()


def test_unknown_and_missing_settings() -> None:
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        from_dict(IngestConfig, {"raw": "r", "out": "o", "sed": 1})
    with pytest.raises(ConfigError, match="missing setting 'out'"):
        from_dict(IngestConfig, {"raw": "r"})


def test_round_trip_and_yaml_with_flag_overrides(tmp_path: Path) -> None:
    config = IngestConfig(raw="r", out="o", size=64)
    assert from_dict(IngestConfig, to_dict(config)) == config
    path = tmp_path / "ingest.yaml"
    path.write_text("raw: data/raw\nout: data/out\nsize: 128\nseed: 3\n")
    assert load_config(IngestConfig, path).size == 128

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, IngestConfig)
    args = parser.parse_args(["--config", str(path), "--size", "96"])
    config = config_from_args(IngestConfig, args)
    # Relative locations are resolved once, against the directory the command is run from.
    assert (config.raw, config.size, config.seed) == (os.path.abspath("data/raw"), 96, 3)
    args = parser.parse_args(["a", "b", "--near-duplicate-bits", "0"])
    assert config_from_args(IngestConfig, args) == IngestConfig(raw="a", out="b", near_duplicate_bits=0)


def test_an_unknown_model_is_a_one_line_error_naming_the_flag(tmp_path: Path) -> None:
    from cxrcore.config import TrainConfig
    from cxrcore.train.trainer import loop_config
    from tests.unit.test_external_eval import write_dataset

    data = write_dataset(tmp_path / "ds", [("COVID", "train", 1), ("COVID", "val", 2)], "f")
    with pytest.raises(ConfigError, match=r"^--model: unknown model 'bogus'.* Available models: "):
        loop_config(TrainConfig(data=data, model="bogus"))


def test_gpu_workers_the_local_cluster_lacks_are_refused_before_ray_waits_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    from cxrcore import runtime
    from cxrcore.train.trainer import check_local_gpus

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    monkeypatch.setattr(runtime, "_local_cores", 2)  # the local cluster init_ray started
    check_local_gpus(1)
    with pytest.raises(ConfigError, match=r"^--gpu: the local Ray cluster has 1 GPU\(s\) for 2 GPU worker"):
        check_local_gpus(2)
    monkeypatch.setattr(runtime, "_local_cores", None)  # a cluster joined by address may autoscale
    check_local_gpus(8)


def test_a_config_files_values_are_read_as_their_settings_types(tmp_path: Path) -> None:
    """PyYAML reads `lr: 1e-3` as text (a traceback deep in training followed) and `gpu: "false"` as text
    that Python takes for true (the plan said GPUs); both are settings of a known type."""
    from cxrcore.config import ConfigError, TrainConfig, load_config

    good = tmp_path / "good.yaml"
    good.write_text('data: ds\nmodel: cnn_lstm\nlr: 1e-3\ngpu: "false"\naugment: "no"\nepochs: 8.0\n')
    good.write_text(good.read_text() + "name: 2024\n")
    config = load_config(TrainConfig, good)
    read = (config.lr, config.gpu, config.augment, config.epochs, config.name)
    assert read == (0.001, False, False, 8, "2024")
    bad = tmp_path / "bad.yaml"
    for line, message in [
        ("epochs: 2.5", "epochs: expected a whole number, got 2.5"),
        ("epochs: three", "epochs: expected a number, got 'three'"),
        ("gpu: maybe", "gpu: expected true or false, got 'maybe'"),
        ("lr: [1]", "lr: expected a number, got [1]"),
        ("epoch: 3", "unknown setting 'epoch' for TrainConfig; did you mean 'epochs'?"),
    ]:
        bad.write_text(f"data: ds\nmodel: cnn_lstm\n{line}\n")
        with pytest.raises(ConfigError) as error:
            load_config(TrainConfig, bad)
        assert str(error.value) == f"--config {bad}: {message}"
    bad.write_text("data: ds\nmodel: cnn_lstm\nepochs: .inf\n")  # YAML's infinity: no whole number
    with pytest.raises(ConfigError, match=r"epochs: expected a whole number, got inf$"):
        load_config(TrainConfig, bad)
    assert load_config(TrainConfig, good, out=tmp_path / "runs").out == str(tmp_path / "runs")  # a Path
    # a flag that overrides the file is named as the flag's value, not the file's
    with pytest.raises(ConfigError, match=r"^epochs: expected a whole number"):
        load_config(TrainConfig, good, epochs=2.5)
    bad.write_text("data: [ds\n")
    with pytest.raises(ConfigError, match=r"^--config .*bad.yaml: not valid YAML \(line 2\)"):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match=r"^--config .*: Is a directory$"):
        load_config(TrainConfig, tmp_path)


def test_a_config_built_in_python_reads_its_values_as_a_files_are(tmp_path: Path) -> None:
    """A notebook's `IngestConfig(size="32")` raised a bare TypeError from a comparison, and a Path stayed
    a Path; built in Python, a config reads each value as a YAML file's is, and refuses one by name."""
    config = IngestConfig(raw=tmp_path / "raw", out="ds", size="32", val_fraction="0.2")
    assert (config.size, config.val_fraction, config.raw) == (32, 0.2, str(tmp_path / "raw"))
    with pytest.raises(ConfigError, match=r"^epochs: expected a number, got 'two'$"):
        TrainConfig(data="ds", model="tiny_cnn_lstm", epochs="two")
    with pytest.raises(ConfigError, match=r"^gpu: expected true or false, got 'maybe'$"):
        TrainConfig(data="ds", model="tiny_cnn_lstm", gpu="maybe")
    assert TrainConfig(data="ds", model="tiny_cnn_lstm", gpu="false").gpu is False
    import numpy as np  # a notebook's sweep: np.arange's numbers are its settings too

    swept = TrainConfig(data="ds", model="tiny_cnn_lstm", lr=np.float32(1e-3), augment=np.bool_(False))
    assert (swept.lr, swept.augment, IngestConfig(raw="r", out="o", size=np.int64(32)).size) == (
        pytest.approx(1e-3), False, 32
    )  # fmt: skip
    assert type(swept.lr) is float and type(swept.augment) is bool


def test_an_ingest_into_a_symlink_writes_through_it(tmp_path: Path) -> None:
    """OUT is published by swapping a finished folder in beside it: a symlinked OUT was swapped out itself,
    the dataset written beside the link (on the link's disk) and the target's dataset left without its
    report. Through the link the swap happens at the target, and the link stays."""
    from cxrcore.config import IngestConfig

    target = tmp_path / "big disk" / "ds"
    target.mkdir(parents=True)
    (tmp_path / "ds-link").symlink_to(target)
    (tmp_path / "new-link").symlink_to(tmp_path / "big disk" / "not yet")  # a link to a folder to be made
    assert IngestConfig(raw=str(tmp_path), out=str(tmp_path / "ds-link") + "/").out == str(target)
    assert IngestConfig(raw=str(tmp_path), out=str(tmp_path / "new-link")).out == str(
        tmp_path / "big disk" / "not yet"
    )
    assert IngestConfig(raw=str(tmp_path), out=str(tmp_path / "plain")).out == str(tmp_path / "plain")


def test_a_run_name_ray_train_cannot_run_is_refused_before_anything_starts() -> None:
    """`cxr train --name "essai é"` failed in Ray Train's controller ("'ascii' codec can't encode character")
    after its run folder was made, and its dry run passed; a non-ASCII --out works and stays allowed."""
    from cxrcore.config import ConfigError, TrainConfig, TuneConfig

    with pytest.raises(ConfigError, match=r"^--name: 'essai é': Ray Train cannot run a name with 'é' in it"):
        TrainConfig(data="ds", model="tiny_cnn_lstm", name="essai é")
    for path in ("runs/a", "..", "."):  # `..` wrote the run's checkpoints beside --out, into its parent
        with pytest.raises(ConfigError, match="one folder's name, not a path"):
            TrainConfig(data="ds", model="tiny_cnn_lstm", name=path)
    with pytest.raises(ConfigError, match=r"^--name: one folder's name, not a path"):
        TuneConfig(data="ds", registry="reg", name="..")
    assert TrainConfig(data="ds", model="tiny_cnn_lstm", name="essai-1", out="runs é").run_name() == "essai-1"


def test_tune_promotes_its_winner_or_only_names_it_a_candidate() -> None:
    from cxrcore.config import ConfigError, TuneConfig
    from cxrcore.plan import tune_plan

    assert TuneConfig(data="ds", registry="reg").promote == "auto"
    never = TuneConfig(data="ds", registry="reg", promote=" Never ")
    assert never.promote == "never"
    assert re.search(
        r"\nwinner: +the alias candidate \(--promote never\); production stays\n", tune_plan(never)
    )
    with pytest.raises(ConfigError, match=r"^--promote: auto or never, got 'sometimes'"):
        TuneConfig(data="ds", registry="reg", promote="sometimes")
