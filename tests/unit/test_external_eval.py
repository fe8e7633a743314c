"""External validation in `cxr evaluate`: the drop flag, the internal reference, registry references,
the split, and one evaluation end to end on Parquet datasets written here (no Ray)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from cxrcore.checkpoint import ModelCard, save_checkpoint
from cxrcore.cli import main
from cxrcore.config import ConfigError, EvaluateConfig
from cxrcore.data.ingest import _digest, read_report
from cxrcore.data.transforms import perceptual_hash
from cxrcore.evaluate.evaluation import classes_note, evaluate_checkpoint, resolve_model
from cxrcore.evaluate.external import (
    LARGE_DROP,
    DatasetRelation,
    compare_with_internal,
    internal_reference,
    training_overlap,
)
from cxrcore.evaluate.report import ALERT_OPEN
from cxrcore.inference import Predictor
from cxrcore.labels import CLASSES
from cxrcore.metrics import classification_metrics, wilson_interval
from cxrcore.models import create_model, get_build_args, get_input_spec
from cxrcore.registry import ModelRegistry, RegistryError
from tests.conftest import xray

SIZE = 64
PERFECT = np.diag([10, 10, 10, 10]).tolist()
"""An internal test confusion matrix: every image right."""


FINGERPRINTS: dict[str, str] = {}
"""A test's name for a dataset write_dataset wrote → its fingerprint (the last written under that name)."""


def class_rows(
    label: str, train: int = 0, val: int = 0, test: int = 0, seed: int = 1
) -> list[tuple[str, str, int]]:
    """`write_dataset` rows: so many images of `label` in each split, each of its own seed from `seed` on."""
    splits = ["train"] * train + ["val"] * val + ["test"] * test
    return [(label, split, seed + i) for i, split in enumerate(splits)]


def write_dataset(
    root: Path,
    rows: list[tuple[str, str, int]],
    fingerprint: str,
    sources: list[str] | None = None,
    test_sources: list[str] | None = None,
    size: int = SIZE,
    images: list[np.ndarray] | None = None,
) -> str:
    """A finished dataset as ingest writes it: hive split folders of Parquet and ingest_report.json.

    rows are (class, split, image seed); the same seed gives the same pixels, hence the same sha256.
    sources names each row's source ("site" for all by default); test_sources goes into the report, as
    `--test-sources` puts it there. `images` replaces the seeds' pixels, and adds ingest's perceptual hashes.
    """
    hashed = images is not None
    images = images if images is not None else [xray(seed, size=size) for _, _, seed in rows]
    phash = {"phash": [perceptual_hash(image) for image in images]} if hashed else {}
    table = pa.table(
        {
            "image": [image.ravel() for image in images],
            "mask": [np.zeros(size * size, dtype=np.uint8)] * len(rows),
            "has_mask": [False] * len(rows),
            "label": [label for label, _, _ in rows],
            "label_index": np.array([CLASSES.index(label) for label, _, _ in rows], dtype=np.int64),
            "source": sources or ["site"] * len(rows),
            "file": [f"{i}.png" for i in range(len(rows))],
            "sha256": [hashlib.sha256(image.tobytes()).hexdigest() for image in images],
            **phash,
            "split": [split for _, split, _ in rows],
        }
    )
    pads.write_dataset(table, root, format="parquet", partitioning=["split"], partitioning_flavor="hive")
    # The fingerprint of these rows, as ingest computes it and every reader checks it: `fingerprint` names the
    # dataset for the test (the digest it stands for: `FINGERPRINTS[fingerprint]`).
    digest = _digest(table["sha256"], table["label"], table["split"])
    FINGERPRINTS[fingerprint] = digest
    report: dict[str, Any] = {"fingerprint": digest, "config": {"size": size}}
    report["by_split"] = dict(Counter(split for _, split, _ in rows))
    report["by_class_split"] = {
        name: dict(Counter(split for label, split, _ in rows if label == name))
        for name in dict.fromkeys(label for label, _, _ in rows)
    }
    if test_sources:
        report["test_sources"] = test_sources
    (root / "ingest_report.json").write_text(json.dumps(report))
    return str(root)


def write_biased_checkpoint(directory: Path, own_dataset: str, favourite: str = "Lung_Opacity") -> Path:
    """A tiny classifier that answers `favourite` for every image: its external figures are known."""
    torch.manual_seed(0)
    model = create_model("tiny_cnn_lstm")
    head = model.head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([6.0 if name == favourite else 0.0 for name in CLASSES]))
    card = ModelCard(
        model=get_build_args(model),
        input_spec=get_input_spec(model).to_dict(),
        data={"dataset": own_dataset, "fingerprint": read_report(own_dataset)["fingerprint"], "size": SIZE},
        metrics={"val_accuracy": 0.9, "val_macro_f1": 0.88, "val_confusion_matrix": PERFECT},
        temperature=2.0,
        calibration={"temperature": 2.0, "ece_after": 0.04},
    )
    return save_checkpoint(directory, model, card)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model's own dataset, an external one with two classes (one image copied from the model's
    training split), the biased checkpoint, and a registry holding it with a test-split report."""
    root = tmp_path_factory.mktemp("world")
    own_rows = [(name, split, 100 + 10 * k + i) for k, name in enumerate(CLASSES) for i, split in
                enumerate(["train", "train", "val", "test"])]  # fmt: skip
    own = write_dataset(root / "own", own_rows, "own")
    external_rows = [("COVID", "train", 1), ("COVID", "test", 2), ("COVID", "val", 3)]
    external_rows += [("Normal", "train", 4), ("Normal", "test", 5), ("Normal", "train", 100)]  # 100: a copy
    external = write_dataset(root / "external", external_rows, "elsewhere")
    checkpoint = write_biased_checkpoint(root / "checkpoint", own)
    report = root / "report"
    report.mkdir()
    test_figures = {
        "n": 40, "accuracy": 0.95, "macro_f1": 0.95, "ece": 0.03, "confusion_matrix": PERFECT,
        "calibration": {"split": "test"}, "evaluated": {"relation": "internal", "split": "test"},
    }  # fmt: skip
    (report / "metrics.json").write_text(json.dumps(test_figures))
    registry = root / "registry"
    ModelRegistry(registry).register(checkpoint, report=report, alias="production")
    return {"root": root, "own": own, "external": external, "checkpoint": checkpoint, "registry": registry}


def test_external_evaluation_of_a_registry_version_from_another_folder(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(world["root"])
    monkeypatch.setenv("CXR_REGISTRY", "registry")  # relative, as a user types it
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "production", "--data", "external", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())

    evaluated = metrics["evaluated"]
    assert evaluated["model"] == "tiny_cnn_lstm:1" and evaluated["relation"] == "external"
    assert evaluated["split"] == "all" and metrics["n"] == 6  # auto: every image of data from elsewhere
    external = metrics["external"]
    assert external["classes_present"] == ["COVID", "Normal"]
    assert external["classes_absent"] == ["Lung_Opacity", "Viral Pneumonia"]
    # The model answers Lung_Opacity, a class the data does not hold: the column and the count show it.
    assert [row[1] for row in metrics["confusion_matrix"]] == [3, 0, 3, 0]
    assert external["predicted_absent"] == {"Lung_Opacity": 6}
    assert metrics["accuracy"] == 0.0 and metrics["macro_f1"] == 0.0  # over COVID and Normal only
    covid = external["one_vs_rest"]["COVID"]
    assert (covid["sensitivity"], covid["specificity"]) == (0.0, 1.0)
    assert (covid["positives"], covid["negatives"]) == (3, 3)
    assert set(external["one_vs_rest"]) == {"COVID", "Normal"}
    assert external["operating_point"]["temperature"] == 2.0 == metrics["calibration"]["temperature"]
    assert external["overlap_with_training_data"]["in_split"] == {"train": 1, "val": 0, "test": 0}
    # Scored as served: the same probabilities as the Predictor rebuilt from the registered card.
    predictor = Predictor.from_checkpoint(ModelRegistry(world["registry"]).local_checkpoint("production"))
    images = [xray(seed, size=SIZE) for seed in (1, 2, 3, 4, 5, 100)]
    labels = np.array([0, 0, 0, 2, 2, 2])
    served = classification_metrics(labels, predictor.predict_proba(images))
    assert metrics["nll"] == pytest.approx(served["nll"], rel=1e-5)

    comparison = metrics["internal_comparison"]
    assert comparison["reference"] == "test" and comparison["restricted_to"] == ["COVID", "Normal"]
    assert comparison["figures"]["accuracy"] == {"internal": 1.0, "external": 0.0, "drop": 1.0}
    assert comparison["figures"]["ece"]["internal"] is None  # 0.03 is of all four classes' test images
    assert comparison["large_drop"] is True and comparison["drop_threshold"] == LARGE_DROP
    # One image copies a training image: the verdict says so first, with the figures on the five others.
    assert external["unseen"] == {
        "n": 5,
        "accuracy": 0.0,
        "accuracy_ci95": wilson_interval(0, 5),
        "macro_f1": 0.0,
    }
    assert comparison["clean"] is False and comparison["verdict"].startswith(
        "Not a clean external validation: the model was trained or validated on pixel-exact copies of 1 of "
        "these 6 images, so the figures that follow flatter it; on the 5 others: accuracy 0.00 (95% CI "
    )
    assert "Large drop on external data: accuracy 1.00 internal (test)" in comparison["verdict"]
    html = (out / "report.html").read_text()
    assert ALERT_OPEN + "Not a clean" in html and "<h2>External validation</h2>" in html
    assert "Sensitivity and specificity" in html and "the 5 images that copy none of" in html
    assert "internal (test)" in printed and "WARNING: Not a clean" in printed
    # Macro averages over COVID and Normal only: said on the console, in the report and in metrics.json.
    note = "Macro averages (precision, recall, F1, AUROC) are over the 2 of 4 classes this split holds"
    assert evaluated["classes_note"].startswith(note) and "Lung_Opacity, Viral Pneumonia" in printed
    assert f"note: {note}" in printed and f'<p class="lead">{note}' in html


def test_a_split_read_in_chunks_scores_as_one_read_whole(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cxr evaluate streams a split's pixels chunk by chunk (a split read whole took three times its pixels
    in memory: 9.5 GB for 21,200 images at 256 px); the rows keep read_table's order, so the figures, the
    rows that copy training images and each image's prediction are those of one chunk."""
    import cxrcore.evaluate.evaluation as evaluation
    from cxrcore.data.ingest import read_chunks, read_table

    columns = ["file", "label_index"]
    chunks = list(read_chunks(world["external"], columns, None, rows=4))
    assert [chunk.num_rows for chunk in chunks] == [4, 2]  # across the split's folders
    assert pa.concat_tables(chunks).equals(read_table(world["external"], columns))
    config = EvaluateConfig(
        checkpoint=str(world["checkpoint"]), data=world["external"], out=str(tmp_path / "whole")
    )
    whole = evaluate_checkpoint(config)
    monkeypatch.setattr(evaluation, "EVAL_CHUNK_BYTES", 2 * SIZE * SIZE)  # two images a chunk
    chunked = evaluate_checkpoint(replace(config, out=str(tmp_path / "chunked")))
    assert chunked["predictions"].read_text() == whole["predictions"].read_text()
    figures = [json.loads(paths["metrics"].read_text()) for paths in (chunked, whole)]
    for metrics in figures:
        del metrics["evaluated"]["evaluated_at"]  # the second's, not the figures'
    assert figures[0] == figures[1]


def test_an_evaluation_replaces_an_earlier_one_and_refuses_a_folder_of_other_files(
    world: dict[str, Any], tmp_path: Path
) -> None:
    config = EvaluateConfig(
        checkpoint=str(world["checkpoint"]), data=world["external"], out=str(tmp_path / "e")
    )
    evaluate_checkpoint(config)
    stale = tmp_path / "e" / "roc_curves_of_an_older_model.png"
    stale.write_bytes(b"png")
    paths = evaluate_checkpoint(config)
    assert not stale.exists() and all(path.is_file() for path in paths.values())
    before = {path.name: path.read_bytes() for path in (tmp_path / "e").iterdir()}
    with pytest.raises(FileNotFoundError):  # a failed evaluation leaves the earlier one as it was
        evaluate_checkpoint(replace(config, checkpoint=str(tmp_path / "no-such-checkpoint")))
    assert {path.name: path.read_bytes() for path in (tmp_path / "e").iterdir()} == before  # no staging left
    (tmp_path / "e" / ".partial").mkdir()  # what a killed evaluation leaves: cleared, not refused
    (tmp_path / "e" / ".partial" / "metrics.json").write_text("{}")
    assert set(evaluate_checkpoint(config)) == set(paths)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == sorted(before)
    with pytest.raises(FileNotFoundError):  # a failed first evaluation leaves no folder behind
        evaluate_checkpoint(replace(config, checkpoint=str(tmp_path / "none"), out=str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()
    own = tmp_path / "mine"
    own.mkdir()
    (own / "metrics.json").write_text("{}")  # a user's file, not an evaluation's (no report.html)
    with pytest.raises(ConfigError, match="not an evaluation's"):
        evaluate_checkpoint(replace(config, out=str(own)))
    assert (own / "metrics.json").read_text() == "{}" and len(list(own.iterdir())) == 1


def test_the_models_own_dataset_ingested_again_is_not_a_clean_external_set(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """Re-ingested in place (another cxr's splits, or a changed folder), the model's own dataset has another
    fingerprint, so it is scored as data from elsewhere; but the model trained on its images, and its
    new splits no longer say which: the verdict opens with that, in red, not with a clean figure."""
    checkpoint = write_biased_checkpoint(tmp_path / "checkpoint", world["own"])
    card = json.loads((checkpoint / "card.json").read_text())
    card["data"]["fingerprint"] = "before-the-upgrade"
    (checkpoint / "card.json").write_text(json.dumps(card))
    paths = evaluate_checkpoint(
        EvaluateConfig(checkpoint=str(checkpoint), data=world["own"], out=str(tmp_path / "e"))
    )
    metrics = json.loads(paths["metrics"].read_text())
    overlap = metrics["external"]["overlap_with_training_data"]
    assert (
        overlap["checked"] is False
        and overlap["reingested"] is True
        and "ingested again" in overlap["reason"]
    )
    comparison = metrics["internal_comparison"]
    assert comparison["clean"] is False
    assert comparison["verdict"].startswith("Not a clean external validation: this is the dataset the model")
    assert ALERT_OPEN + "Not a clean" in paths["report"].read_text()


def test_a_version_is_registered_only_with_its_own_evaluation(world: dict[str, Any], tmp_path: Path) -> None:
    """An evaluation report's figures become the version's test figures, which external evaluations are
    compared with: one of other weights is refused (it was taken, and a cnn_lstm carried a dual model's)."""
    config = EvaluateConfig(
        checkpoint=str(world["checkpoint"]), data=world["own"], out=str(tmp_path / "eval")
    )
    evaluate_checkpoint(config)
    registry = ModelRegistry(tmp_path / "registry")
    other = write_biased_checkpoint(tmp_path / "other", world["own"], favourite="Normal")
    with pytest.raises(RegistryError, match="evaluates other weights"):
        registry.register(other, report=tmp_path / "eval")
    assert registry.register(world["checkpoint"], report=tmp_path / "eval").ref == "tiny_cnn_lstm:1"
    # An earlier cxr's report names the model only: a version of another one is refused too.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text(json.dumps({"evaluated": {"model": "tiny_dual_cnn:1"}}))
    with pytest.raises(RegistryError, match="evaluates tiny_dual_cnn:1, not this tiny_cnn_lstm"):
        registry.register(other, report=earlier)
    (earlier / "metrics.json").write_text(json.dumps({"evaluated": {"model": "s3://bucket/runs/r/ckpt"}}))
    assert registry.register(other, report=earlier).ref == "tiny_cnn_lstm:2"  # a folder names no model


def test_a_split_missing_classes_says_what_its_macro_averages_cover() -> None:
    row, empty = {"support": 4, "recall": 0.75}, {"support": 0, "recall": 0.0}
    assert classes_note({name: row for name in CLASSES}) is None
    assert classes_note({name: empty for name in CLASSES}) is None
    one = classes_note({**{name: empty for name in CLASSES}, "Normal": row})
    assert one is not None and one.startswith("Only Normal images here: its precision is 1 by construction")
    assert one.endswith("read the recall (sensitivity), 0.75.")
    never = classes_note({**{name: empty for name in CLASSES}, "Normal": {"support": 5, "recall": 0.0}})
    assert never is not None and "precision is 1" not in never  # 0/0: not 1, shown as 0
    assert never.startswith("Only Normal images here, and the model called none of them Normal")


def test_own_dataset_is_scored_on_its_test_split_without_an_external_block(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "own"
    args = ["evaluate", "--checkpoint", str(world["checkpoint"]), "--data", world["own"], "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the console shows each class's recall beside the accuracy, and names a class the model never finds
    printed = capsys.readouterr().out
    assert re.search(r"\nbalanced accuracy +\d\.\d{3}\n", printed)
    lines = {line.split()[0]: line for line in printed.splitlines() if line.split()}
    assert all(name.split()[0] in lines for name in CLASSES)
    missed = [name for name, row in metrics["per_class"].items() if row["support"] and not row["recall"]]
    assert all(f"{name} (0 of" in printed for name in missed)
    assert ("WARNING: the model finds no" in printed) == bool(missed)
    # and in metrics.json and the report's lead, not on the console alone
    assert (metrics["evaluated"]["missed"] is not None) == bool(missed)
    report = (out / "report.html").read_text()
    assert (ALERT_OPEN + "The model finds no image of" in report) == bool(missed)
    # so is an accuracy not shown to beat always answering the commonest class (4 images: it is not)
    from html import escape

    from cxrcore.evaluate.comparison import commonest_class_warning

    chance = commonest_class_warning(metrics)
    assert (
        chance is not None and metrics["evaluated"]["chance"] == chance and f"WARNING: {chance}\n" in printed
    )
    assert ALERT_OPEN + escape(chance[0].upper() + chance[1:]) in report
    assert metrics["evaluated"]["split"] == "test" and metrics["evaluated"]["relation"] == "internal"
    assert metrics["n"] == 4 and "external" not in metrics and "internal_comparison" not in metrics
    assert "source_holdout" not in metrics  # ingest held no source out
    assert metrics["evaluated"]["note"] is None


def test_a_class_weighted_models_lifted_probabilities_are_named(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The biased model puts most of every image's probability on Lung_Opacity, a quarter of the images:
    trained with class weights, that is what the weights do to a rare class, and evaluate says so."""
    import shutil

    from cxrcore.evaluate.evaluation import prior_note

    weighted = tmp_path / "weighted"
    shutil.copytree(world["checkpoint"], weighted)
    card = json.loads((weighted / "card.json").read_text())
    (weighted / "card.json").write_text(json.dumps({**card, "training": {"class_weights": True}}))
    args = ["evaluate", "--checkpoint", str(weighted), "--data", world["own"], "--out", str(tmp_path / "o")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    note = next(line for line in printed.splitlines() if line.startswith("note: ") and "weights" in line)
    assert "Lung_Opacity: served probability " in note and "against a share of 0.250" in note
    assert "--no-class-weights" in printed
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert note == f"note: {metrics['calibration']['prior_note']}"
    assert prior_note(metrics, class_weights=False) is None  # without weights the cause is another
    even = {"n": 4, "per_class": {name: {"support": 1, "mean_probability": 0.25} for name in CLASSES}}
    assert prior_note(even, class_weights=True) is None


def test_data_ingested_at_another_size_is_refused_naming_the_size_to_ingest_it_at(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Serve resizes an upload once, from its original: images stored at another size would be scored
    resized twice, an input the served model never sees."""
    other = write_dataset(tmp_path / "wide", [("COVID", "test", 1), ("Normal", "test", 2)], "other", size=96)
    args = [
        "evaluate",
        "--checkpoint",
        str(world["checkpoint"]),
        "--data",
        other,
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds images ingested at 96 px" in err and f"--size {SIZE}" in err and err.count("\n") == 1
    assert f"was trained on data ingested at {SIZE} px (then resized to its 64 px input)" in err
    assert not (tmp_path / "o").exists()


def test_split_all_on_the_own_dataset_warns_that_it_includes_training_images() -> None:
    relation = DatasetRelation("internal", "own", {"fingerprint": "own"})
    assert relation.split("auto") == "test" and relation.split("all") == "all"
    assert "trained on" in str(relation.note("all")) and relation.note("test") is None
    assert DatasetRelation("external", "x", {}).split("auto") == "all"
    assert DatasetRelation("unknown", None, {}).split("auto") == "test"


def test_references_resolve_like_cxr_models_show(world: dict[str, Any]) -> None:
    registry = str(world["registry"])
    for ref in ("production", "tiny_cnn_lstm", "tiny_cnn_lstm:1"):
        model = resolve_model(EvaluateConfig(model=ref, registry=registry, data="d", out="o"))
        assert model.ref == "tiny_cnn_lstm:1" and (model.checkpoint / "card.json").is_file()
        assert model.report is not None and model.report.endswith("report")


@pytest.mark.parametrize("ref", ["tiny_cnn_lstm:7", "staging", "resnet18"])
def test_an_unknown_reference_names_the_registry_and_its_versions(world: dict[str, Any], ref: str) -> None:
    registry = str(world["registry"])
    with pytest.raises(RegistryError) as error:
        resolve_model(EvaluateConfig(model=ref, registry=registry, data="d", out="o"))
    message = str(error.value)
    assert message.startswith(f"--model {ref}: ")
    assert f"The registry {registry} holds tiny_cnn_lstm:1 (production)" in message


def test_cli_errors_are_one_line_and_say_what_to_do(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_REGISTRY", raising=False)
    out = str(tmp_path)
    cases = [
        (["--model", "nope", "--registry", str(world["registry"])], "holds tiny_cnn_lstm:1 (production)"),
        (["--checkpoint", "production"], "name a registry version with --model REF --registry REG"),
        (["--model", "production"], "--registry: --model production names a registry version"),
        ([], "--checkpoint: name the model"),
        (["--checkpoint", "c", "--model", "m", "--registry", "r"], "--model: --checkpoint and --model are"),
        (["--checkpoint", "c", "--registry", "r"], "--registry: a registry goes with --model REF"),
        (["--checkpoint", "c", "--split", "every"], "--split: must be one of auto, all, train, val, test"),
        (
            ["--checkpoint", str(world["checkpoint"]), "--device", "gpu"],
            "--device: 'gpu' is not a torch device",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (["--checkpoint", str(world["checkpoint"]), "--device", "cuda"], "no CUDA device is visible")
        )
    for flags, expected in cases:
        assert main(["evaluate", "--data", world["external"], "--out", out, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (flags, err)


def test_a_wrong_data_path_is_told_for_what_it_is(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo was told to `cxr data ingest RAW` into it, and a split folder to be ingested into as well."""
    base = ["evaluate", "--checkpoint", str(world["checkpoint"]), "--out", str(tmp_path / "out")]
    missing = str(tmp_path / "nope")
    assert main([*base, "--data", missing]) == 2
    assert f"{missing}: no such folder, so not a finished cxr dataset" in capsys.readouterr().err
    split = str(Path(world["own"]) / "split=test")
    assert main([*base, "--data", split]) == 2
    assert (
        f"{split} is one split of the dataset {world['own']}: pass {world['own']}" in capsys.readouterr().err
    )
    staging = tmp_path / "ds.partial"  # what a killed ingest into ds left
    (staging / "split=train").mkdir(parents=True)
    assert main([*base, "--data", str(staging)]) == 2
    assert f"left (its staging folder, never a dataset): pass {tmp_path / 'ds'}" in capsys.readouterr().err


def test_drop_flag_threshold_and_verdict() -> None:
    external = {
        "classes_present": list(CLASSES), "accuracy": 0.80, "accuracy_ci95": [0.7, 0.88], "macro_f1": 0.79,
        "predicted_absent": {}, "overlap_with_training_data": {"checked": False},
    }  # fmt: skip
    just_under = {"kind": "test", "source": "report", "accuracy": 0.8999, "macro_f1": 0.85, "ece": 0.02}
    block = compare_with_internal(external, just_under, CLASSES, ece=0.1)
    assert block["large_drop"] is False
    assert block["figures"]["accuracy"]["drop"] == pytest.approx(0.0999)
    assert block["verdict"].startswith("Accuracy 0.90 internal (test) → 0.80 external (95% CI 0.70–0.88)")
    assert "within 0.10 of the internal figures" in block["verdict"]
    at_threshold = {**just_under, "accuracy": 0.90}
    assert compare_with_internal(external, at_threshold, CLASSES, ece=0.1)["large_drop"] is True
    f1_only = {**just_under, "macro_f1": 0.90}
    assert compare_with_internal(external, f1_only, CLASSES, ece=0.1)["large_drop"] is True
    validation = {**just_under, "kind": "validation"}
    assert "optimistic" in compare_with_internal(external, validation, CLASSES, ece=0.1)["verdict"]
    rise = compare_with_internal(external, {**just_under, "accuracy": 0.70}, CLASSES, ece=0.1)
    assert rise["large_drop"] is False and rise["figures"]["accuracy"]["drop"] == pytest.approx(-0.10)
    assert "higher than the internal figures by 0.10 or more" in rise["verdict"]
    assert "within" not in rise["verdict"]


def test_without_internal_figures_the_comparison_says_so() -> None:
    external = {
        "classes_present": ["COVID"], "accuracy": 0.5, "accuracy_ci95": [0.2, 0.8], "macro_f1": 0.5, "n": 10,
        "predicted_absent": {"Normal": 5},
        "overlap_with_training_data": {"checked": True, "in_split": {"val": 2}},
    }  # fmt: skip
    block = compare_with_internal(external, None, CLASSES, ece=0.2)
    assert block["reference"] is None and block["large_drop"] is None
    assert block["figures"]["accuracy"] == {"internal": None, "external": 0.5, "drop": None}
    assert "The model's card records no internal test or validation figures" in block["verdict"]
    assert "accuracy 0.50 (95% CI 0.20–0.80)" in block["verdict"]
    assert "called 5 image(s) Normal" in block["verdict"]
    assert block["verdict"].startswith("Not a clean external validation")
    assert "copies of 2 of these 10 images" in block["verdict"] and block["clean"] is False
    clean = {**external, "overlap_with_training_data": {"checked": True, "in_split": {"test": 2}}}
    block = compare_with_internal(clean, None, CLASSES, ece=0.2)
    assert block["clean"] is True and "clean" not in block["verdict"]


def test_internal_figures_are_restricted_to_the_classes_present() -> None:
    # Internally, COVID and Normal are perfect and the other two classes are always wrong.
    matrix = [[10, 0, 0, 0], [0, 0, 10, 0], [0, 0, 10, 0], [0, 0, 10, 0]]
    reference = {"kind": "test", "source": "r", "accuracy": 0.5, "macro_f1": 0.4, "confusion_matrix": matrix}
    external = {
        "classes_present": ["COVID", "Normal"], "accuracy": 0.95, "accuracy_ci95": [0.8, 1.0],
        "macro_f1": 0.95, "predicted_absent": {}, "overlap_with_training_data": {"checked": False},
    }  # fmt: skip
    block = compare_with_internal(external, reference, CLASSES, ece=0.1)
    assert block["restricted_to"] == ["COVID", "Normal"] and block["restricted_n"] == 20
    assert block["figures"]["accuracy"]["internal"] == 1.0  # the 20 COVID and Normal images, all right
    assert block["figures"]["macro_f1"]["internal"] == 1.0
    assert block["large_drop"] is False
    # the internal ECE is of all 40 images: not set beside figures of 20 (a review, session 56)
    with_ece = compare_with_internal(external, {**reference, "ece": 0.2}, CLASSES, ece=0.1)
    assert with_ece["figures"]["ece"] == {"internal": None, "external": 0.1, "drop": None}
    floors = compare_with_internal(
        external, {**reference, "ece_floor": 0.05}, CLASSES, ece=0.1, ece_floor=0.2
    )
    assert floors["figures"]["ece_floor"] == {"internal": None, "external": 0.2, "drop": None}  # restricted
    unrestricted = {**external, "classes_present": list(CLASSES)}
    both = compare_with_internal(
        unrestricted, {**reference, "ece": 0.2, "ece_floor": 0.05}, CLASSES, 0.1, 0.2
    )
    assert both["figures"]["ece"]["internal"] == 0.2 and both["figures"]["ece_floor"]["internal"] == 0.05


def _card(**metrics: Any) -> ModelCard:
    return ModelCard(model={"name": "tiny_cnn_lstm"}, input_spec={}, metrics=metrics, epoch=4)


def test_internal_reference_prefers_the_registered_test_report() -> None:
    card = _card(val_accuracy=0.9, val_macro_f1=0.85, val_confusion_matrix=PERFECT)
    test_report = {"accuracy": 0.8, "macro_f1": 0.7, "calibration": {"split": "test"}, "n": 40}
    reference = internal_reference(card, test_report)
    assert reference is not None and reference["kind"] == "test" and reference["accuracy"] == 0.8
    served = {**test_report, "with predicted masks": {"accuracy": 0.75, "macro_f1": 0.6, "n": 40}}
    reference = internal_reference(card, served, predicted_masks=True)
    assert reference is not None and reference["accuracy"] == 0.75
    assert "predicted masks" in reference["source"]
    # Reports since `evaluated.mask_source` lead with the segmenter's masks, the dataset's as the extra.
    internal = {"relation": "internal", "split": "test", "mask_source": "segmenter"}
    as_served = {
        **test_report, "evaluated": internal, "with ground-truth masks": {"accuracy": 0.95, "n": 40}
    }  # fmt: skip
    reference = internal_reference(card, as_served, predicted_masks=True)
    assert reference is not None and reference["accuracy"] == 0.8
    assert reference["source"].endswith("(with predicted masks)")
    reference = internal_reference(card, as_served, predicted_masks=False)
    assert reference is not None and reference["accuracy"] == 0.95
    assert reference["source"].endswith("(with ground-truth masks)")
    no_mask = {**test_report, "evaluated": {**internal, "mask_source": None}}
    reference = internal_reference(card, no_mask)
    assert reference is not None and reference["source"] == "the test split report registered with the model"
    for not_internal_test in (
        {**test_report, "calibration": {"split": "val"}},
        {**test_report, "evaluated": {"relation": "external", "split": "all"}},
        {**test_report, "external": {}},
    ):
        reference = internal_reference(card, not_internal_test)
        assert reference is not None and reference["kind"] == "validation", not_internal_test
    reference = internal_reference(card, None)
    assert reference is not None and reference["accuracy"] == 0.9 and "epoch 5" in reference["source"]
    assert internal_reference(_card(), None) is None


def test_config_takes_the_registry_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_REGISTRY", "s3://bucket/registry")
    config = EvaluateConfig(model="production", data="d", out="o")
    assert config.registry == "s3://bucket/registry" and config.split == "auto"
    assert EvaluateConfig(checkpoint="c", data="d", out="o").registry is None  # a folder needs none
    with pytest.raises(ConfigError, match="--split"):
        EvaluateConfig(checkpoint="c", data="d", out="o", split="testing")


def test_a_large_drop_that_sampling_could_make_says_so_and_one_it_could_not_stays_a_warning() -> None:
    """0.33 on 18 internal images against 0.19 on 130 external ones is a fall of 0.14, but the drop's 95%
    interval holds 0: the verdict says the figures cannot tell, not that the model fails to carry over.
    0.71 on 45 against 0.51 on 130 is beyond sampling (Fisher's p = 0.023), though the two accuracies'
    own intervals overlap: overlapping intervals called it chance."""
    external = {
        "classes_present": list(CLASSES), "accuracy": 25 / 130, "accuracy_ci95": [0.13, 0.27], "n": 130,
        "macro_f1": 0.19,
        "predicted_absent": {}, "overlap_with_training_data": {"checked": False},
    }  # fmt: skip
    few = [[2, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 1], [1, 1, 1, 1]]  # 6 of 18 right
    reference = {"kind": "test", "source": "r", "accuracy": 6 / 18, "macro_f1": 0.33, "confusion_matrix": few}
    block = compare_with_internal(external, reference, CLASSES, ece=0.1)
    assert block["large_drop"] is True and block["drop_beyond_sampling"] is False
    assert block["internal_n"] == 18 and block["internal_accuracy_ci95"][0] < 0.27
    assert "rests on 18 images (95% CI 0.16–0.56)" in block["verdict"]
    assert "may be chance" in block["verdict"] and "Do not rely" not in block["verdict"]
    low, high = block["accuracy_drop_ci95"]
    assert low < 0 < 6 / 18 - 25 / 130 < high and f"95% CI {low:.2f} to {high:.2f}" in block["verdict"]
    fair = [[8, 1, 1, 1], [1, 8, 1, 1], [1, 1, 8, 1], [1, 1, 1, 8]]  # 32 of 44 right; external 66 of 130
    reference = {
        "kind": "test",
        "source": "r",
        "accuracy": 32 / 44,
        "macro_f1": 0.73,
        "confusion_matrix": fair,
    }
    block = compare_with_internal({**external, "accuracy": 66 / 130}, reference, CLASSES, ece=0.1)
    assert block["drop_beyond_sampling"] is True and block["accuracy_drop_ci95"][0] > 0
    assert "Do not rely on it" in block["verdict"]
    many = [[45, 2, 2, 1], [2, 45, 2, 1], [1, 2, 46, 1], [2, 1, 1, 46]]  # 182 of 200 right: 0.87-0.94
    reference = {"kind": "test", "source": "r", "accuracy": 0.91, "macro_f1": 0.91, "confusion_matrix": many}
    block = compare_with_internal(external, reference, CLASSES, ece=0.1)
    assert block["drop_beyond_sampling"] is True and "Do not rely on it" in block["verdict"]


def test_the_report_names_the_sources_too_few_to_score_apart() -> None:
    """A split of many sources scored per source only where one has MIN_SOURCE_IMAGES: the others were left
    out without a word, and a reader took the sections shown for the whole split."""
    from cxrcore.evaluate.evaluation import MIN_SOURCE_IMAGES, _per_source_note

    sources = np.array(["a.org"] * 12 + ["b.org"] * 3 + ["c.org"])
    assert _per_source_note(sources) == (
        f"1 source(s) scored apart below (12 images); 2 with fewer than {MIN_SOURCE_IMAGES} images each not "
        "(4 images: b.org 3, c.org 1)"
    )
    assert _per_source_note(np.array(["a.org"] * 3)) is None


def test_a_film_re_encoded_as_jpeg_counts_as_a_copy_of_the_training_image_it_is(tmp_path: Path) -> None:
    """Public sets share films re-encoded (the Kaggle database's Viral Pneumonia images are the pediatric
    set's JPEGs): a check by pixel hash alone called such an external set clean."""
    import io

    from PIL import Image

    def jpeg(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))

    films = [xray(seed, size=SIZE) for seed in range(8)]
    own_rows = [
        ("Normal", split, seed) for seed, split in enumerate(["train"] * 4 + ["val", "val", "test", "test"])
    ]
    own = write_dataset(tmp_path / "own", own_rows, "own", images=films)
    # A train film and a val film as JPEGs, a train film pixel for pixel, and two films the model never saw.
    copies = [jpeg(films[0]), jpeg(films[4]), films[1], xray(100, size=SIZE), xray(101, size=SIZE)]
    assert not any(np.array_equal(copies[i], films[j]) for i, j in ((0, 0), (1, 4)))
    rows = [("Normal", "test", seed) for seed in range(len(copies))]
    external = write_dataset(tmp_path / "external", rows, "elsewhere", images=copies)
    card = ModelCard(model={}, input_spec={}, data={"dataset": own, "fingerprint": FINGERPRINTS["own"]})

    overlap = training_overlap(card, external, "all")
    assert overlap["in_split"] == {"train": 2, "val": 1, "test": 0}
    assert (overlap["total"], overlap["pixel_exact"], overlap["near"]) == (3, 1, 2)
    assert overlap["near_duplicate_bits"] == 12  # IngestConfig's default: the report here records none
    # Datasets without perceptual hashes are still checked, pixel for pixel.
    plain = write_dataset(tmp_path / "plain", rows, "elsewhere")
    assert training_overlap(card, plain, "all")["near_duplicate_bits"] is None


def test_a_dataset_whose_rows_were_changed_since_ingest_is_refused(tmp_path: Path) -> None:
    """An audit (session 47): three test rows relabelled in place, the row counts unchanged; `cxr evaluate`
    scored the model on them and reported the dataset's original fingerprint, with nothing said."""
    import pyarrow.parquet as pq

    from cxrcore.data.ingest import DatasetError, verify_dataset

    rows = [(label, split, i) for i, (label, split) in enumerate([("COVID", "train"), ("Normal", "train"),
            ("COVID", "test"), ("Normal", "test"), ("Viral Pneumonia", "test")])]  # fmt: skip
    data = write_dataset(tmp_path / "ds", rows, "ds")
    assert verify_dataset(data)["fingerprint"] == FINGERPRINTS["ds"]
    (test_file,) = (tmp_path / "ds" / "split=test").glob("*.parquet")
    table = pq.read_table(test_file)
    labels = table["label"].to_pylist()
    relabelled = table.set_column(
        table.schema.get_field_index("label"), "label", pa.array(labels[1:] + labels[:1])
    )
    pq.write_table(relabelled, test_file)
    with pytest.raises(DatasetError, match=r"and splits \(fingerprint [0-9a-f]{16}\) are not those ingest"):
        verify_dataset(data)
    # What training and scoring read, label_index, changed alone (a verifier: every test row made Normal)
    pq.write_table(table.set_column(table.schema.get_field_index("label_index"), "label_index",
                                    pa.array([2] * table.num_rows, pa.int64())), test_file)  # fmt: skip
    with pytest.raises(DatasetError, match=r"label numbers and splits"):
        verify_dataset(data)
    pq.write_table(table, test_file)  # as it was: read again
    assert verify_dataset(data)["fingerprint"] == FINGERPRINTS["ds"]


def test_a_registered_model_knows_its_training_images_where_its_dataset_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another hospital gets a model through a registry, not its dataset: `cxr evaluate` there said the
    overlap with the training images was "not checked: cannot read it here", and of the model's own
    dataset ingested again in place, that which images it had trained on "cannot be told". The version
    keeps a manifest of its dataset's rows (no pixels), which the card's fingerprint vouches for."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cxrcore.data.manifest import MANIFEST_NAME

    films = [xray(seed, size=SIZE) for seed in range(8)]
    own_rows = [
        ("Normal", split, seed) for seed, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2)
    ]
    own = write_dataset(tmp_path / "own", own_rows, "own", images=films)
    checkpoint = write_biased_checkpoint(tmp_path / "checkpoint", own)
    registry = ModelRegistry(tmp_path / "registry")
    assert main(["models", "register", str(checkpoint), "--registry", str(tmp_path / "registry")]) == 0
    assert "data manifest: 8 images (train 4, val 2, test 2) of " in capsys.readouterr().out
    version = registry.get("tiny_cnn_lstm:1")
    block = version.card.data["manifest"]
    # near_duplicate_bits: where the dataset's report records it (ingest's do; this hand-made one does not),
    # and the columns of an earlier cxr's fingerprint, as its report records none
    # and how its perceptual hashes were taken (an earlier cxr's way: of the resized images)
    stored = hashlib.sha256((Path(version.uri) / MANIFEST_NAME).read_bytes()).hexdigest()
    assert block == {"file": MANIFEST_NAME, "images": 8, "by_split": {"test": 2, "train": 4, "val": 2},
                     "fingerprint_columns": ["sha256", "label", "split"], "phash_of": "resized",
                     "sha256": stored}  # fmt: skip
    manifest = pq.read_table(Path(version.uri) / MANIFEST_NAME)
    assert manifest.column_names == ["sha256", "phash", "label", "split", "source"] and manifest.num_rows == 8
    # A re-registration finds the version (the manifest is the registry's, not the checkpoint's).
    assert registry.register_once(checkpoint).found

    shutil.rmtree(own)  # the dataset stays where the model was trained
    rows = [("Normal", "test", seed) for seed in range(4)]
    external = write_dataset(tmp_path / "external", rows, "elsewhere", images=[films[0], films[4], *(
        xray(100 + i, size=SIZE) for i in range(2))])  # fmt: skip
    assert "cannot be read here" in training_overlap(version.card, external, "all")["reason"]
    folder = registry.local_checkpoint(version.ref)
    overlap = training_overlap(version.card, external, "all", folder)
    assert overlap["checked"] and overlap["in_split"] == {"train": 1, "val": 1, "test": 0}
    assert overlap["read_from"] == "the data manifest of the model's registry version"
    # The card's `file` is not a path to follow: a card naming another file still reads the manifest.
    elsewhere = ModelCard.from_dict(version.card.to_dict())
    elsewhere.data["manifest"]["file"] = "../../../etc/passwd"
    assert training_overlap(elsewhere, external, "all", folder)["in_split"] == overlap["in_split"]

    # Evaluated through the registry, as the other hospital runs it: the copies are found and scored apart.
    out = tmp_path / "eval"
    args = ["evaluate", "--model", "tiny_cnn_lstm:1", "--registry", str(tmp_path / "registry")]
    assert main([*args, "--data", external, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["external"]["overlap_with_training_data"]["total"] == 2
    assert metrics["external"]["unseen"]["n"] == 2
    assert "its images read from the data manifest" in (out / "report.html").read_text()

    # A manifest edited since (one training image relabelled) describes another dataset: refused, named.
    relabelled = manifest.set_column(
        manifest.column_names.index("label"),
        "label",
        pc.if_else(pc.equal(manifest["sha256"], manifest["sha256"][0]), "COVID", manifest["label"]),
    )
    pq.write_table(relabelled, Path(version.uri) / MANIFEST_NAME)
    overlap = training_overlap(version.card, external, "all", folder)
    assert overlap["checked"] is False and "since the model was registered" in overlap["reason"]
    assert "is not the file registered" in overlap["manifest_problem"]  # and its dataset is gone: both said
    assert "cannot be read here" in overlap["reason"]


def test_a_model_registered_away_from_its_dataset_says_it_has_no_manifest(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_biased_checkpoint(tmp_path / "checkpoint", world["own"])
    card = json.loads((checkpoint / "card.json").read_text())
    card["data"]["dataset"] = str(tmp_path / "elsewhere")
    (checkpoint / "card.json").write_text(json.dumps(card))
    assert main(["models", "register", str(checkpoint), "--registry", str(tmp_path / "registry")]) == 0
    printed = capsys.readouterr().out
    assert f"no data manifest: its dataset {tmp_path / 'elsewhere'} cannot be read here" in printed
    version = ModelRegistry(tmp_path / "registry").get("tiny_cnn_lstm:1")
    assert "cannot be read here" in version.card.data["manifest"]["missing"]
    assert not (Path(version.uri) / "data_manifest.parquet").exists()


def test_cxr_models_seal_brings_an_earlier_cxrs_versions_under_the_checks(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Versions an earlier cxr registered record neither their weights' hash nor a data manifest, so they
    were served unchecked and could not tell their training images elsewhere."""
    from cxrcore.data.manifest import MANIFEST_NAME

    reg = tmp_path / "registry"
    version = ModelRegistry(reg).register(world["checkpoint"])
    folder = Path(version.uri)
    card = json.loads((folder / "card.json").read_text())
    for key in ("weights_sha256", "registered_at", "registered_from", "registered_by", "card_sha256"):
        card.pop(key)
    card["data"].pop("manifest")
    (folder / "card.json").write_text(json.dumps(card))  # as an earlier cxr left it
    (folder / MANIFEST_NAME).unlink()
    before = (folder / "card.json").read_bytes()

    args = ["models", "seal", "--registry", str(reg)]
    assert main([*args, "--dry-run"]) == 0
    weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    printed = capsys.readouterr().out
    assert f"tiny_cnn_lstm:1: would record weights sha256 {weights[:12]}" in printed
    assert "data manifest: 16 images (train 8, val 4, test 4) of " in printed
    assert (folder / "card.json").read_bytes() == before and not (folder / MANIFEST_NAME).exists()

    assert main(args) == 0
    assert "tiny_cnn_lstm:1: recorded weights sha256" in capsys.readouterr().out
    sealed = ModelRegistry(reg).get("tiny_cnn_lstm:1").card
    assert sealed.weights_sha256 == weights and sealed.sealed_at and sealed.registered_at is None
    assert sealed.data["manifest"]["images"] == 16 and (folder / MANIFEST_NAME).is_file()
    assert main(args) == 0 and "are recorded" in capsys.readouterr().out  # nothing left to add
    assert ModelRegistry(reg).register_once(world["checkpoint"]).found  # still the same checkpoint's
    (folder / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(RegistryError, match="not the ones it was registered with"):
        ModelRegistry(reg).local_checkpoint("tiny_cnn_lstm:1")


def test_a_version_whose_manifest_is_lost_is_checked_against_its_dataset_and_says_so(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A registry copied without its manifests (a sync of cards and weights only): the overlap check had
    stopped at the manifest, reported "not checked" on the console with nothing said, and so called the
    external figures clean, where the model's dataset beside it still told the copies."""
    import shutil

    from cxrcore.data.manifest import MANIFEST_NAME

    registry = shutil.copytree(world["registry"], tmp_path / "registry")
    (registry / "tiny_cnn_lstm/v1" / MANIFEST_NAME).unlink()
    args = ["evaluate", "--model", "production", "--registry", str(registry), "--data", world["external"]]
    assert main([*args, "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    overlap = json.loads((tmp_path / "e/metrics.json").read_text())["external"]["overlap_with_training_data"]
    assert overlap["checked"] and overlap["read_from"] == "the dataset" and overlap["in_split"]["train"] == 1
    assert overlap["manifest_problem"].endswith("is missing (the card records one of 16 images)")
    assert "WARNING: Not a clean external validation" in printed
    assert "the model's images were read from its dataset instead" in printed

    # Neither manifest nor dataset: the console warns that the figures may be on the model's own images.
    from cxrcore.checkpoint import card_digest

    card = json.loads((registry / "tiny_cnn_lstm/v1/card.json").read_text())
    card["data"]["dataset"] = str(tmp_path / "gone")
    card["card_sha256"] = card_digest(card)  # a registry moved as the card says, not one edited by hand
    (registry / "tiny_cnn_lstm/v1/card.json").write_text(json.dumps(card))
    assert main([*args, "--out", str(tmp_path / "f")]) == 0
    printed = capsys.readouterr().out
    assert (
        "WARNING: " in printed
        and "Whether the model trained on any of these images was not checked" in printed
    )


def test_a_remote_registrys_manifest_travels_with_its_version_and_its_loss_stops_nothing(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving node's copy of a version from object storage: the manifest comes with it; a bucket that
    lost it (a sync of cards and weights only) had failed serve, promote and evaluate on the missing file."""
    from cxrcore.data.manifest import MANIFEST_NAME
    from tests.unit.test_registry import remote_root

    registry = ModelRegistry(remote_root(tmp_path, monkeypatch), cache_dir=tmp_path / "cache")
    version = registry.register(world["checkpoint"], alias="production")
    assert (registry.local_checkpoint("production") / MANIFEST_NAME).is_file()
    (tmp_path / "store/reg/tiny_cnn_lstm/v1" / MANIFEST_NAME).unlink()
    fresh = ModelRegistry(registry.root, cache_dir=tmp_path / "other-node")
    folder = fresh.local_checkpoint("production")  # served, promoted and evaluated all the same
    assert (folder / "model.safetensors").is_file() and not (folder / MANIFEST_NAME).exists()
    overlap = training_overlap(version.card, world["external"], "all", folder)
    assert overlap["checked"] and "is missing" in overlap["manifest_problem"]  # its dataset, read instead
    assert fresh.promote("tiny_cnn_lstm:1", "staging").ref == "tiny_cnn_lstm:1"
    # `cxr models seal` makes it again where the dataset is readable
    assert [item.ref for item in fresh.seal()] == ["tiny_cnn_lstm:1"]
    assert (tmp_path / "store/reg/tiny_cnn_lstm/v1" / MANIFEST_NAME).is_file()


def test_seal_keeps_the_record_of_a_manifest_it_cannot_make_again(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """A second site's copy without the manifest, the first site's dataset out of reach: `seal` replaced the
    card's record of it (200 images, its sha256) with "missing", for good (a second-site review)."""
    import shutil

    from cxrcore.data.manifest import MANIFEST_NAME

    registry = shutil.copytree(world["registry"], tmp_path / "registry")
    (registry / "tiny_cnn_lstm/v1" / MANIFEST_NAME).unlink()
    card_file = registry / "tiny_cnn_lstm/v1/card.json"
    recorded = json.loads(card_file.read_text())["data"]["manifest"]
    card = json.loads(card_file.read_text())
    card["data"]["dataset"] = str(tmp_path / "elsewhere")  # as read at the second site
    from cxrcore.checkpoint import card_digest

    card["card_sha256"] = card_digest(card)
    card_file.write_text(json.dumps(card))
    assert ModelRegistry(registry).seal() == []
    assert json.loads(card_file.read_text())["data"]["manifest"] == recorded and recorded.get("file")


def test_near_copies_are_found_across_the_two_ways_perceptual_hashes_were_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest now hashes the decoded picture; an earlier cxr hashed the stored (resized) image. A model of
    an earlier dataset scored on data ingested now compared the two as one, and missed 2 of 6 JPEG copies
    of its training images (55 of 130 real X-rays at 32 px): the evaluated rows are hashed again from their
    stored images, as the model's were; the other way round, the report says near copies may be missed."""
    import io

    from PIL import Image

    def jpeg(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=75)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))

    films = [xray(seed, size=SIZE) for seed in range(6)]
    own = write_dataset(
        tmp_path / "own", [("Normal", "train", seed) for seed in range(6)], "own", images=films
    )
    data = {"dataset": own, "fingerprint": FINGERPRINTS["own"], "size": SIZE}
    card = ModelCard(model={}, input_spec={}, data=data)
    rows = [("Normal", "test", seed) for seed in range(4)]
    copies = [jpeg(films[0]), jpeg(films[1]), xray(100, size=SIZE), xray(101, size=SIZE)]
    # Hashes unlike the stored images' (as the decoded pictures' are unlike their resized copies')
    with monkeypatch.context() as patch:
        original = perceptual_hash
        patch.setattr(sys.modules[__name__], "perceptual_hash", lambda image: original(image.T))
        external = write_dataset(tmp_path / "external", rows, "elsewhere", images=copies)
    assert training_overlap(card, external, "all")["in_split"]["train"] == 0  # compared as one: missed
    report_path = tmp_path / "external/ingest_report.json"
    report = json.loads(report_path.read_text())
    report_path.write_text(json.dumps({**report, "phash_of": "decoded"}))
    overlap = training_overlap(card, external, "all")
    assert overlap["in_split"]["train"] == 2 and overlap["near"] == 2 and "near_note" not in overlap
    # The model's hashed from decoded pictures, the evaluated data's as stored: said, not hidden.
    own_report = tmp_path / "own/ingest_report.json"
    own_report.write_text(json.dumps({**json.loads(own_report.read_text()), "phash_of": "decoded"}))
    report_path.write_text(json.dumps(report))
    assert "near copies may be missed" in training_overlap(card, external, "all")["near_note"]


def test_a_reingest_that_drops_a_copy_changes_no_class_or_mask(tmp_path: Path) -> None:
    """One of two identical files removed from RAW was reported as "1 class, 1 lung mask" changed."""
    from cxrcore.data.ingest import _replaced

    rows = [("COVID", "train", 1), ("COVID", "train", 1), ("Normal", "val", 2)]
    old = write_dataset(tmp_path / "ds", rows, "old")
    table = read_table_sorted(old)
    covid = next(i for i, row in enumerate(table) if row[1] == "COVID")
    new_rows = [(sha, label, split, "") for i, (sha, label, split) in enumerate(table) if i != covid]
    replaced = _replaced(old, "another", new_rows)
    assert replaced is not None and replaced["shared_images"] == 3
    assert (replaced["changed_split"], replaced["changed_class"], replaced["changed_mask"]) == (0, 0, None)
    relabelled = [
        (sha, "Lung_Opacity" if label == "Normal" else label, split, m) for sha, label, split, m in new_rows
    ]
    assert _replaced(old, "another", relabelled)["changed_class"] == 1


def read_table_sorted(dataset: str) -> list[tuple[str, str, str]]:
    from cxrcore.data.ingest import read_table

    table = read_table(dataset, ["sha256", "label", "split"])
    return sorted(zip(*(table[name].to_pylist() for name in ("sha256", "label", "split")), strict=True))
