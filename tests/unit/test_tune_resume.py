"""A re-run of a killed `cxr tune` registers each checkpoint once and evaluates it only when it must.

The kill itself is `tests/e2e/test_faults.py` (slow); this keeps the registration rule in the default run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cxrcore.evaluate.evaluation
from cxrcore.config import TuneConfig
from cxrcore.registry import ModelRegistry
from cxrcore.tune import _evaluate_and_register
from tests.e2e.uploads import write_checkpoint


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every checkpoint evaluated, with a metrics.json written as the real evaluation writes one."""
    done: list[str] = []

    def evaluate(config: Any) -> None:
        done.append(config.checkpoint)
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))

    monkeypatch.setattr(cxrcore.evaluate.evaluation, "evaluate_checkpoint", evaluate)
    return done


def test_a_rerun_finds_the_version_it_registered_and_registers_a_new_checkpoint(
    tmp_path: Path, evaluations: list[str]
) -> None:
    config = TuneConfig(data=str(tmp_path / "data"), registry=str(tmp_path / "registry"))
    registry = ModelRegistry(tmp_path / "registry")
    report = tmp_path / "reports" / "tiny_cnn_lstm"
    checkpoint = write_checkpoint(tmp_path / "epoch-3", "tiny_cnn_lstm", seed=1)

    first = _evaluate_and_register(config, registry, checkpoint, report)
    again = _evaluate_and_register(config, registry, checkpoint, report)
    assert first.ref == again.ref == "tiny_cnn_lstm:1" and evaluations == [str(checkpoint)]

    (report / "metrics.json").unlink()  # the report went missing: evaluated again, still registered once
    assert _evaluate_and_register(config, registry, checkpoint, report).ref == "tiny_cnn_lstm:1"
    assert len(evaluations) == 2

    # Other weights under a card that may well be the same (written in the same second): a new version.
    other = write_checkpoint(tmp_path / "epoch-4", "tiny_cnn_lstm", seed=2)
    assert _evaluate_and_register(config, registry, other, report).ref == "tiny_cnn_lstm:2"
    assert [v.ref for v in registry.versions()] == ["tiny_cnn_lstm:1", "tiny_cnn_lstm:2"]


def test_winners_are_scored_on_the_test_split_of_the_data_they_trained_on_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--data` ingested again during an experiment: its evaluation had scored the winners on every image
    of the new dataset as external data, and printed that as their test accuracy."""
    from cxrcore.config import ConfigError
    from tests.unit.test_external_eval import FINGERPRINTS, write_dataset

    splits: list[str] = []

    def evaluate(config: Any) -> None:
        splits.append(config.split)
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "metrics.json").write_text("{}")

    def trained_on(fingerprint: str) -> None:
        card = json.loads((checkpoint / "card.json").read_text())
        card["data"]["fingerprint"] = fingerprint
        (checkpoint / "card.json").write_text(json.dumps(card))

    monkeypatch.setattr(cxrcore.evaluate.evaluation, "evaluate_checkpoint", evaluate)
    data = write_dataset(tmp_path / "data", [("COVID", "test", 1)], "new")
    config = TuneConfig(data=data, registry=str(tmp_path / "registry"))
    registry, report = ModelRegistry(tmp_path / "registry"), tmp_path / "reports" / "tiny_cnn_lstm"
    checkpoint = write_checkpoint(tmp_path / "epoch-3", "tiny_cnn_lstm", seed=1)
    trained_on("old")
    changed = rf"changed during this experiment: .* fingerprint old, .* holds {FINGERPRINTS['new']}"
    with pytest.raises(ConfigError, match=changed):
        _evaluate_and_register(config, registry, checkpoint, report)
    assert splits == [] and registry.versions() == []  # nothing evaluated or registered

    trained_on(FINGERPRINTS["new"])
    assert _evaluate_and_register(config, registry, checkpoint, report).ref == "tiny_cnn_lstm:1"
    assert splits == ["test"]  # the split its trial held out, never "auto"


@pytest.mark.parametrize(
    ("workers", "in_trial_epochs", "in_run_epochs", "trained_by"),
    [
        (1, [], [], "trial"),  # nothing yet: a one-worker segmenter trains in a Tune trial
        (2, [], [], "fit"),  # several workers: in a TorchTrainer
        (1, [], [0, 1], None),  # finished in a Train run (another --workers-per-trial, or an older cxr)
        (2, [0, 1], [], None),  # finished in a trial
        (1, [], [0], "trial"),  # a Train run that stopped short, now of one worker: trained in a trial
        (2, [], [0], "fit"),  # the same with several workers: the Train run resumes
    ],
)
def test_a_finished_segmenter_is_used_wherever_it_trained_and_trained_otherwise(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    in_trial_epochs: list[int],
    in_run_epochs: list[int],
    trained_by: str | None,
) -> None:
    """The trials a re-run restores read their masks from the segmenter they trained with: a segmenter run
    that reached its last epoch is registered as it is, wherever it trained, never trained again."""
    import cxrcore.train.trainer
    import cxrcore.tune as tune

    def kept(place: str, epochs: list[int]) -> list[tuple[str, dict[str, Any]]]:
        cards = [{"epoch": e, "metrics": {"val_score": 0.5 + e / 10}} for e in epochs]  # the last is the best
        return [(f"{place}/checkpoint_{card['epoch']}", card) for card in cards]

    trained: list[str] = []
    registered: list[str] = []
    done = kept("trained", [0, 1])
    monkeypatch.setattr(tune, "_segmenter_trial_checkpoints", lambda config: kept("trial", in_trial_epochs))
    monkeypatch.setattr(
        tune, "_kept_checkpoints", lambda run: done if "fit" in trained else kept("run", in_run_epochs)
    )
    monkeypatch.setattr(tune, "_segmenter_in_trial", lambda config, train: trained.append("trial") or done)
    monkeypatch.setattr(cxrcore.train.trainer, "fit", lambda train: trained.append("fit"))

    def register(config: Any, registry: Any, checkpoint: str, report: Path) -> Any:
        registered.append(checkpoint)
        report.mkdir(parents=True, exist_ok=True)
        (report / "metrics.json").write_text("{}")
        return type("Version", (), {"ref": "tiny_unet:1", "uri": "reg/tiny_unet/v1"})()

    monkeypatch.setattr(tune, "_evaluate_and_register", register)
    config = TuneConfig(
        data="d", registry="r", out=str(tmp_path), models="tiny_dual_cnn", segmenter_epochs=2,
        workers_per_trial=workers,
    )  # fmt: skip
    record = tune._segmenter(config, None, "tiny_unet")
    assert trained == ([trained_by] if trained_by else [])
    where = "trained" if trained_by else "trial" if in_trial_epochs else "run"
    assert registered == [f"{where}/checkpoint_1"] and record["ref"] == "tiny_unet:1"


def test_what_an_earlier_run_promoted_survives_a_run_that_kept_a_rollback(tmp_path: Path) -> None:
    """Run 1 promotes dual:1; an operator rolls back to lstm:1; run 2 keeps lstm:1 and writes production
    lstm:1. Run 3 must still see that the experiment promoted dual:1, or it takes lstm:1 for its own and
    promotes over the rollback."""
    from cxrcore.tune import _production_left_by_earlier_run

    experiment = tmp_path / "exp"
    experiment.mkdir()
    assert _production_left_by_earlier_run(str(experiment)) is None  # a first run

    def earlier(**comparison: Any) -> str | None:
        (experiment / "comparison.json").write_text(json.dumps(comparison))
        return _production_left_by_earlier_run(str(experiment))

    kept = {"left_by_earlier_run": "dual:1", "winner": "dual:1"}
    assert earlier(production="lstm:1", production_kept=kept, promoted="dual:1") == "dual:1"
    assert earlier(production="lstm:1", production_kept=kept) == "dual:1"  # written before `promoted`
    assert earlier(production="dual:1", production_kept=None) == "dual:1"
    assert earlier(production="lstm:1", production_kept=None, promoted=None) is None  # promoted nothing


def test_a_failed_trial_is_reported_by_its_exception_not_rays_actor_header() -> None:
    import traceback

    from ray.exceptions import RayTaskError

    from cxrcore.tune import error_line

    try:
        raise ValueError("the val split holds no image to score epoch 1 on\nre-ingest it")
    except ValueError as exc:
        raised = RayTaskError(
            "ImplicitFunc.train", traceback.format_exc(), exc, proctitle="ray::ImplicitFunc.train()", pid=7,
            ip="192.0.2.2", actor_id="f00",
        ).as_instanceof_cause()  # fmt: skip
    assert str(raised).splitlines()[0].startswith("\x1b[36mray::ImplicitFunc.train()")  # what was reported
    assert error_line(raised) == "ValueError: the val split holds no image to score epoch 1 on"
    assert error_line(RuntimeError("out of memory")) == "RuntimeError: out of memory"
    assert error_line(RuntimeError("header\n  File x\nKeyError: 'accuracy'")) == "KeyError: 'accuracy'"
    oom = MemoryError("Task was killed due to the node running low on memory.\nRefer to the documentation")
    assert error_line(oom) == "MemoryError: Task was killed due to the node running low on memory."


def test_production_better_on_the_same_validation_images_stays_and_says_so(tmp_path: Path) -> None:
    """A shared registry's production was replaced by any later experiment's winner, even one 0.15 of
    macro-F1 below it on the very same validation split. Scores on other data do not compare."""
    import torch

    from cxrcore.checkpoint import ModelCard, save_checkpoint
    from cxrcore.evaluate.comparison import kept_better_line
    from cxrcore.models import create_model, get_build_args, get_input_spec
    from cxrcore.tune import _promote_winner

    registry = ModelRegistry(tmp_path / "registry")

    def version(name: str, fingerprint: str, score: float, loss: float = 0.3) -> dict[str, Any]:
        model = create_model(name)
        card = ModelCard(
            model=get_build_args(model),
            input_spec=get_input_spec(model).to_dict(),
            data={"fingerprint": fingerprint, "size": 64},
            metrics={"val_score": score, "val_loss": loss, "val_count": 40},
            version=str(torch.initial_seed() + len(registry.versions())),
        )
        ref = registry.register(save_checkpoint(tmp_path / f"{name}-{score}-{loss}", model, card)).ref
        return {"ref": ref, "val_score": score, "val_loss": loss, "val_count": 40}

    champion = version("tiny_cnn_lstm", "same", 0.95)
    registry.promote(champion["ref"], "production")
    winner = version("tiny_resnet", "same", 0.80)
    best = {"tiny_resnet": dict(winner)}
    kept, promoted = _promote_winner(registry, best, champion["ref"], None, "same")
    assert registry.aliases()["production"] == champion["ref"] and promoted is None
    assert kept == {"better_on_this_data": champion, "winner": winner}
    assert best["tiny_resnet"]["production"] is False
    assert kept_better_line(kept).startswith(f"Production stays {champion['ref']}: trained on this dataset")
    # within one validation image (1/40) and a lower loss: the winner ranks first, as between epochs
    best = {"tiny_resnet": version("tiny_resnet", "same", 0.94, loss=0.1)}
    assert _promote_winner(registry, best, champion["ref"], None, "same") == (
        None,
        best["tiny_resnet"]["ref"],
    )
    assert registry.aliases()["production"] == best["tiny_resnet"]["ref"]
    # a production trained on other data: the new experiment's winner is promoted
    registry.promote(champion["ref"], "production")
    best = {"tiny_resnet": version("tiny_resnet", "other", 0.50)}
    assert _promote_winner(registry, best, champion["ref"], None, "other") == (
        None,
        best["tiny_resnet"]["ref"],
    )
    # a re-run of the experiment that promoted production: no comparison with its own winner
    registry.promote(champion["ref"], "production")
    best = {"tiny_resnet": version("tiny_resnet", "same", 0.50)}
    assert _promote_winner(registry, best, champion["ref"], champion["ref"], "same")[0] is None
    assert registry.aliases()["production"] == best["tiny_resnet"]["ref"]
    # A winner not shown to beat answering the commonest class (1 of 4 test images) never unseats a
    # production version (a review's: 0.25 on 4 images replaced 1.000 on 40), nor becomes production where
    # there is none (a real-sample study, session 52: "do not serve it", then made production): candidate
    from cxrcore.evaluate.comparison import kept_chance_line

    registry.promote(champion["ref"], "production")
    chance = [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    best = {"tiny_resnet": {**version("tiny_resnet", "other", 0.5), "confusion_matrix": chance}}
    ref = best["tiny_resnet"]["ref"]
    kept, _ = _promote_winner(registry, best, champion["ref"], None, "other")
    assert kept == {"not_above_chance": ref, "winner": ref, "candidate": ref}
    assert registry.aliases()["production"] == champion["ref"] and best["tiny_resnet"]["production"] is False
    said = kept_chance_line(champion["ref"], kept)
    assert said.startswith(f"Production stays {champion['ref']}: the winner")
    kept, promoted = _promote_winner(registry, best, None, None, "other")  # no production before
    assert promoted is None and kept == {"not_above_chance": ref, "winner": ref, "candidate": ref}
    assert registry.aliases()["candidate"] == ref
    assert kept_chance_line(None, kept).startswith(f"No version is production: the winner, {ref}, is not")
    # --promote never: a review first; the winner is the alias candidate, production stays (none: none)
    from cxrcore.evaluate.comparison import kept_candidate_line

    registry.promote(champion["ref"], "production")
    best = {"tiny_resnet": version("tiny_resnet", "other", 0.99)}
    kept, promoted = _promote_winner(registry, best, champion["ref"], None, "other", "never")
    assert kept == {"not_asked": best["tiny_resnet"]["ref"], "winner": best["tiny_resnet"]["ref"]}
    assert promoted is None and registry.aliases()["production"] == champion["ref"]
    assert registry.aliases()["candidate"] == best["tiny_resnet"]["ref"]
    winner_ref = best["tiny_resnet"]["ref"]
    assert kept_candidate_line(champion["ref"], kept) == (
        f"Production stays {champion['ref']}, as --promote never asks: the winner, {winner_ref}, is the "
        "alias candidate; `cxr models promote candidate` serves it once reviewed."
    )
    # promoted since by a review, and the experiment re-run: no claim that production stays elsewhere
    assert (
        kept_candidate_line(winner_ref, kept)
        == f"The winner, {winner_ref}, is production already (--promote never moved nothing)."
    )


def test_a_trial_that_failed_is_ranked_after_those_that_finished_and_never_promoted(tmp_path: Path) -> None:
    """A review's run: the only trial of an architecture crashed at epoch 3, and its epoch-2 checkpoint
    became production with exit status 0, the winner line not saying the trial had failed."""
    from cxrcore.evaluate.comparison import ranked_architectures, winner_line
    from cxrcore.tune import _promote_winner

    registry = ModelRegistry(tmp_path / "registry")
    crashed = {"ref": "tiny_resnet:1", "val_score": 0.9, "val_loss": 0.2, "failed": "RuntimeError: boom",
               "test_accuracy": 0.9}  # fmt: skip
    finished = {
        "ref": "tiny_cnn_lstm:1",
        "val_score": 0.6,
        "val_loss": 0.9,
        "failed": None,
        "test_accuracy": 0.6,
    }
    best = {"tiny_resnet": crashed, "tiny_cnn_lstm": finished}
    assert [model for model, _ in ranked_architectures(best)] == ["tiny_cnn_lstm", "tiny_resnet"]
    promoted: list[str] = []
    registry.promote = lambda ref, alias: promoted.append(ref)  # type: ignore[method-assign]
    assert _promote_winner(registry, best, None, None, "same") == (None, "tiny_cnn_lstm:1")
    assert promoted == ["tiny_cnn_lstm:1"] and crashed.get("production") is None
    # every architecture's trials failed: registered, nothing promoted, and the winner line says why
    alone = {"tiny_resnet": dict(crashed)}
    assert _promote_winner(registry, alone, "old:1", None, "same") == ({"failed": "tiny_resnet:1"}, None)
    assert promoted == ["tiny_cnn_lstm:1"] and alone["tiny_resnet"]["production"] is False
    assert "not promoted: its trial failed (RuntimeError: boom)" in winner_line(alone)


def test_resnet_depths_are_one_architecture_when_resnet_is_named() -> None:
    """`--models resnet`: ASHA compares its depths as one architecture's trials, and the depths it stopped
    at the grace epoch for the first's sake were registered and ranked as rival architectures."""
    from cxrcore.tune import architecture

    assert {
        architecture(depth, ["resnet", "cnn_lstm"]) for depth in ("resnet18", "resnet34", "resnet50")
    } == {"resnet"}
    assert architecture("resnet18", ["resnet18", "cnn_lstm"]) == "resnet18"
    assert architecture("cnn_lstm", ["resnet", "cnn_lstm"]) == "cnn_lstm"
