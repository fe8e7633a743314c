"""Ray Tune comparison, typed as a user would: defaults, relative paths, another working directory.

One trial per architecture ends with all three registered and the best promoted; a re-run with another
search is refused rather than mixed into the same experiment. A trial of one worker trains in Tune's own
process, a trial of two in a TorchTrainer: both give the comparison the same record.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cxrcore.cli import main
from cxrcore.metrics import best_by_validation
from cxrcore.registry import ModelRegistry

pytestmark = pytest.mark.integration
MODELS = ("tiny_cnn_lstm", "tiny_dual_cnn", "tiny_resnet")
COMMAND = ["tune", "--data", "ds", "--registry", "reg", "--models", ",".join(MODELS), "--trials", "1"]


def winner_alias(registry: ModelRegistry) -> tuple[str, Any]:
    """Where a comparison put its winner: production, or candidate where it was not shown to beat always
    answering the test split's commonest class."""
    alias = "production" if "production" in registry.aliases() else "candidate"
    return alias, registry.get(alias)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def comparison(synthetic_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """`cxr tune` of the three tiny architectures, `--out` and `--grace-epochs` omitted, `--epochs 1`,
    relative paths from another directory: (that directory, the exit status, the console output)."""
    work = tmp_path_factory.mktemp("tune")
    (work / "ds").symlink_to(synthetic_dataset)
    out = io.StringIO()
    handler = signal.getsignal(signal.SIGINT)
    with working_directory(work), contextlib.redirect_stdout(out):
        status = main([*COMMAND, "--epochs", "1", "--pretrained", "none"])
    # Tune's SIGINT handler does not outlive the sweep: a Ctrl-C or SIGTERM while the winners are
    # registered stops the command, not a finished experiment.
    assert signal.getsignal(signal.SIGINT) is handler
    return work, status, out.getvalue()


def test_tiny_comparison_registers_all_three_and_promotes_the_best(
    comparison: tuple[Path, int, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path, status, out = comparison
    assert status == 0, out
    monkeypatch.chdir(tmp_path)

    registry = ModelRegistry(str(tmp_path / "reg"))
    registered = {v.name for v in registry.versions()}
    assert registered == {*MODELS, "tiny_unet"}  # the segmenter is registered beside the dual-channel model
    # The winner is production where it is shown to beat always answering the commonest class; one epoch of
    # tiny models on ~40 test images often is not, and then it is the candidate alone (a real-sample study,
    # session 52: "do not serve it on this evidence", then made production).
    alias, production = winner_alias(registry)
    if alias == "production":
        assert f"production (*): {production.ref}" in out
    else:
        assert "production (*): (none)" in out and "No version is production: the winner" in out
    assert out.count("Winner: ") == 1
    # Quiet: none of Tune's own banners (a table per experiment, its folder, a TensorBoard command).
    assert not [
        line for line in out.splitlines() if "Configuration for experiment" in line or "View detailed" in line
    ]
    assert registry.get("tiny_dual_cnn").card.segmenter  # servable without ground-truth masks
    assert registry.get("tiny_dual_cnn").card.training["train_masks"] == "segmenter"  # trained as served
    assert registry.get("tiny_unet").card.metrics["val_dice"] > 0.3  # the segmenter segments
    # With one worker per trial the segmenter trains as the trials do, in a Tune trial's own process.
    trials_root = tmp_path / "cxr-runs/compare-trials"
    assert (trials_root / "segmenter-trial").is_dir() and not (trials_root / "segmenter").exists()

    # The registered dual-channel model, scored through its registered segmenter's masks.
    evaluate = ["evaluate", "--model", "tiny_dual_cnn", "--registry", "reg", "--data", "ds", "--out", "ev"]
    assert main(evaluate) == 0
    scored = json.loads(Path("ev/metrics.json").read_text())
    assert scored["evaluated"]["split"] == "test" and scored["evaluated"]["mask_source"] == "segmenter"
    assert scored["with ground-truth masks"]["n"] == scored["n"]  # the dataset's masks, scored apart
    # Its card's validation figures (which ranked it) are the served model's: the segmenter's masks,
    # the registered weights and temperature, through the Predictor Serve uses.
    assert main([*evaluate[:-1], "ev-val", "--split", "val"]) == 0
    on_val = json.loads(Path("ev-val/metrics.json").read_text())
    card = registry.get("tiny_dual_cnn").card
    assert on_val["n"] == card.metrics["val_count"]
    assert abs(on_val["accuracy"] - card.metrics["val_accuracy"]) <= 1.01 / on_val["n"], on_val
    # The log loss tells masks apart where accuracy may not: the ground truth's would differ.
    nll_served, nll_card = on_val["calibration"]["nll_after"], card.calibration["nll_after"]
    assert nll_served == pytest.approx(nll_card, rel=1e-3), (nll_served, nll_card)

    experiment = tmp_path / "cxr-runs/compare"  # the default --out, under the shell's directory
    comparison = json.loads((experiment / "comparison.json").read_text())
    # The top validation macro-F1, or within one validation image of it the lowest validation loss.
    best_model = best_by_validation(comparison["best"], lambda model: comparison["best"][model])
    assert production.name == best_model
    assert comparison["production"] == (production.ref if alias == "production" else None)
    assert sorted(t["model"] for t in comparison["trials"]) == sorted(MODELS)
    assert {t["error"] for t in comparison["trials"]} == {None}
    html = (experiment / "comparison.html").read_text()
    assert all(model in html for model in MODELS) and "Winner: " in html
    for row in comparison["best"].values():
        assert sum(map(sum, row["confusion_matrix"])) > 0 and Path(row["report"]).is_file()
        assert len(row["history"]) == 1 and row["best_epoch"] == 1
        assert row["temperature"] > 0 and row["test_ece"] is not None

    # Another search under the same --name is a different experiment: refused, not mixed in.
    capsys.readouterr()
    assert main([*COMMAND, "--epochs", "2", "--pretrained", "none"]) == 2
    assert "epochs 1 → 2" in capsys.readouterr().err

    # A rollback by hand, then the same command again (a CI retry, or to remake the reports): the
    # experiment's registrations are reused and production stays where the operator put it.
    rollback = next(v.ref for v in registry.versions() if v.name in MODELS and v.ref != production.ref)
    registry.promote(rollback, "production")
    versions = [v.ref for v in registry.versions()]
    assert main([*COMMAND, "--epochs", "1", "--pretrained", "none"]) == 0
    again = capsys.readouterr().out
    assert f"{experiment} had finished (its comparison.json): no trial was trained again" in again
    assert registry.get("production").ref == rollback
    html = Path(re.search(r"^html: (\S+)$", again, re.MULTILINE).group(1)).read_text()  # type: ignore[union-attr]
    assert [v.ref for v in registry.versions()] == versions  # nothing registered twice
    promoted = json.loads((experiment / "comparison.json").read_text())["promoted"]
    if alias == "candidate":  # nothing was promoted, and a winner not shown above chance unseats nothing
        assert f"Production stays {rollback}: the winner, {production.ref}, is not shown to beat" in again
        assert promoted is None and registry.get("candidate").ref == production.ref
        return
    assert f"production stays {rollback}: it was moved there after this experiment's earlier" in again
    assert f"`cxr models promote {production.ref}` serves this run's winner" in again
    assert "Production stays" not in again  # said once on the console; the report's winner line says it
    assert f"Production stays {rollback}, where it was moved since" in html
    # what the experiment promoted stays on record, so that a third run keeps the rollback too
    assert promoted == production.ref


def test_a_trial_of_two_workers_trains_in_a_torchtrainer_and_is_recorded_alike(
    comparison: tuple[Path, int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-worker trial trains in Tune's own process and Tune keeps its checkpoints in the trial's folder;
    `--workers-per-trial 2` fits a TorchTrainer (DDP) in each trial, whose checkpoints Ray Train keeps under
    `<out>/<name>-trials/<trial id>`. The comparison sees the same record either way: the same trial fields,
    card, metrics, history and checkpoint files."""
    from cxrcore.checkpoint import load_card

    work, status, out = comparison
    assert status == 0, out
    monkeypatch.chdir(work)
    command = [
        "tune", "--data", "ds", "--registry", "reg-ddp", "--models", "tiny_cnn_lstm", "--trials", "1",
        "--epochs", "1", "--pretrained", "none", "--workers-per-trial", "2", "--name", "ddp",
    ]  # fmt: skip
    assert main(command) == 0

    def record(name: str) -> tuple[dict, dict, set[str]]:
        compared = json.loads((work / "cxr-runs" / name / "comparison.json").read_text())
        (trial,) = [t for t in compared["trials"] if t["model"] == "tiny_cnn_lstm"]
        return (
            trial,
            load_card(trial["best_checkpoint"]).to_dict(),
            {p.name for p in Path(trial["best_checkpoint"]).iterdir()},
        )

    in_trial, in_trial_card, in_trial_files = record("compare")
    ddp, ddp_card, ddp_files = record("ddp")
    assert Path(in_trial["best_checkpoint"]).parent.parent == work / "cxr-runs/compare"  # Tune's trial folder
    assert (
        Path(ddp["best_checkpoint"]).parent == work / "cxr-runs/ddp-trials" / ddp["trial_id"]
    )  # Train's run
    assert in_trial_card["training"]["workers"] == 1 and ddp_card["training"]["workers"] == 2
    assert in_trial["error"] is None and ddp["error"] is None
    assert set(in_trial) == set(ddp) and in_trial_files == ddp_files
    assert set(in_trial_card) == set(ddp_card) and set(in_trial_card["metrics"]) == set(ddp_card["metrics"])
    assert [row["epoch"] for row in in_trial["history"]] == [row["epoch"] for row in ddp["history"]] == [1]
    for trial, card in ((in_trial, in_trial_card), (ddp, ddp_card)):  # the record is its checkpoint's card
        assert trial["val_score"] == card["metrics"]["val_score"] and trial["best_epoch"] == card["epoch"] + 1
        assert trial["val_macro_f1"] == card["metrics"]["val_macro_f1"]  # the kept checkpoint's, not the last
        assert card["metrics"]["val_count"] > 0 and 0 <= card["metrics"]["val_accuracy"] <= 1
    assert winner_alias(ModelRegistry(str(work / "reg-ddp")))[1].name == "tiny_cnn_lstm"
