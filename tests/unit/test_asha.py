"""cxr's ASHA: weak trials stop at their rungs, and no trial is stopped by its own last report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle
from ray.tune.schedulers import TrialScheduler

from cxrcore.config import TuneConfig
from cxrcore.tune import asha_scheduler


@dataclass
class Trial:
    trial_id: str


def _scheduler(epochs: int) -> object:
    scheduler = asha_scheduler(TuneConfig(data="ds", registry="reg", epochs=epochs, grace_epochs=1))
    scheduler.set_search_properties("val_score", "max")  # type: ignore[attr-defined]
    return scheduler


def _report(scheduler: object, trial: Trial, epoch: int, score: float) -> str:
    return str(scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_score": score}))  # type: ignore[attr-defined]


def test_a_weak_trial_stops_at_a_rung_before_its_last_epoch() -> None:
    scheduler = _scheduler(epochs=4)
    trials = [Trial(str(i)) for i in range(3)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)  # type: ignore[attr-defined]
    assert _report(scheduler, trials[0], 1, 0.5) == TrialScheduler.CONTINUE
    assert _report(scheduler, trials[1], 1, 0.8) == TrialScheduler.CONTINUE  # above the rung's median
    assert _report(scheduler, trials[2], 1, 0.1) == TrialScheduler.STOP  # below it


def test_no_trial_is_stopped_by_its_last_report_and_the_rungs_still_record_it() -> None:
    """Tune's ASHA answers STOP to every report at max_t, and the stop kills a Train run that is finishing."""
    scheduler = _scheduler(epochs=2)
    best, weak = Trial("best"), Trial("weak")
    scheduler.on_trial_add(None, best)  # type: ignore[attr-defined]
    scheduler.on_trial_add(None, weak)  # type: ignore[attr-defined]
    assert _report(scheduler, best, 1, 0.9) == TrialScheduler.CONTINUE
    assert _report(scheduler, best, 2, 0.95) == TrialScheduler.CONTINUE  # its last epoch: it ends itself
    scheduler.on_trial_complete(None, best, {"epoch": 2, "val_score": 0.95})  # type: ignore[attr-defined]
    # A weak last report is not stopped either (its run is done), while earlier rungs still cut.
    assert _report(scheduler, weak, 1, 0.95) == TrialScheduler.CONTINUE
    assert _report(scheduler, weak, 2, 0.01) == TrialScheduler.CONTINUE
    later = Trial("later")
    scheduler.on_trial_add(None, later)  # type: ignore[attr-defined]
    assert _report(scheduler, later, 1, 0.5) == TrialScheduler.STOP  # cut against the recorded rung


def test_the_scheduler_survives_the_experiments_pickle() -> None:
    """Tune saves the scheduler with the experiment (cloudpickle) and a resumed driver loads it."""
    scheduler = _scheduler(epochs=3)
    restored = ray.cloudpickle.loads(ray.cloudpickle.dumps(scheduler))
    restored.on_trial_add(None, Trial("a"))
    assert _report(restored, Trial("a"), 3, 0.1) == TrialScheduler.CONTINUE


@dataclass
class _Storage:
    storage_filesystem: object
    trial_fs_path: str


@dataclass
class RestoredTrial:
    trial_id: str
    storage: _Storage
    local_path: str | None = None


def test_a_resumed_experiment_judges_its_trials_on_the_rungs_recorded_before(tmp_path: Path) -> None:
    """Tune restores the scheduler as it was pickled at the start: empty rungs. Uninterrupted, `best`
    (0.57 at epoch 2) goes on and `late` (0.31 at epoch 2) stops at the epoch-2 rung; resumed with empty
    rungs, `best` was judged there on its epoch-3 score against no one, and `late` passed an empty rung."""
    import pyarrow.fs as pafs

    def trial(name: str, scores: list[float]) -> RestoredTrial:
        folder = tmp_path / name
        folder.mkdir()
        rows = [json.dumps({"epoch": e + 1, "val_score": s, "config": {}}) for e, s in enumerate(scores)]
        (folder / "result.json").write_text("\n".join([*rows, '{"epoch": 9, "val_sc']))  # a cut last line
        return RestoredTrial(name, _Storage(pafs.LocalFileSystem(), str(folder)))

    scheduler = asha_scheduler(TuneConfig(data="ds", registry="reg", epochs=4, grace_epochs=2))
    scheduler.set_search_properties("val_score", "max")  # type: ignore[attr-defined]
    best, other, late = trial("best", [0.24, 0.57]), trial("other", [0.3, 0.45]), trial("late", [0.12])
    for each in (best, other, late):
        scheduler.on_trial_add(None, each)  # type: ignore[attr-defined]
    assert _report(scheduler, other, 3, 0.5) == TrialScheduler.CONTINUE
    assert _report(scheduler, best, 3, 0.21) == TrialScheduler.CONTINUE  # it passed the epoch-2 rung before
    assert _report(scheduler, late, 2, 0.31) == TrialScheduler.STOP  # below the recorded 0.57 and 0.45
    new = Trial("new")  # a trial that starts after the resume: no result.json, judged on the same rungs
    scheduler.on_trial_add(None, new)  # type: ignore[attr-defined]
    assert _report(scheduler, new, 2, 0.6) == TrialScheduler.CONTINUE


def test_tune_ranks_on_the_highest_validation_score() -> None:
    from cxrcore.tune import tune_settings

    settings = tune_settings(TuneConfig(data="ds", registry="reg", epochs=4), {"CPU": 4.0})
    assert (settings.metric, settings.mode) == ("val_score", "max")
    scheduler = settings.scheduler
    scheduler.set_search_properties(settings.metric, settings.mode)
    for name, score in (("a", 0.5), ("b", 0.8)):
        scheduler.on_trial_add(None, Trial(name))
        assert _report(scheduler, Trial(name), 2, score) == TrialScheduler.CONTINUE
    scheduler.on_trial_add(None, Trial("weak"))
    assert (
        _report(scheduler, Trial("weak"), 2, 0.1) == TrialScheduler.STOP
    )  # the low score stops, not the high


@dataclass
class ModelTrial:
    trial_id: str
    config: dict[str, object]


def test_each_architecture_is_ranked_among_its_own_trials_only() -> None:
    """In one bracket for all, the second architecture to reach the grace epoch was judged against the
    first's score alone and stopped on arrival order; with one trial each, an architecture is never cut."""
    scheduler = _scheduler(epochs=4)

    def trial(name: str, model: str) -> ModelTrial:
        added = ModelTrial(name, {"trial": {"model": model}})
        scheduler.on_trial_add(None, added)  # type: ignore[attr-defined]
        return added

    fast, slow = trial("fast", "tiny_dual_cnn"), trial("slow", "tiny_resnet")
    assert _report(scheduler, fast, 1, 0.8) == TrialScheduler.CONTINUE
    assert _report(scheduler, slow, 1, 0.1) == TrialScheduler.CONTINUE  # had been STOP, behind `fast`
    assert _report(scheduler, trial("dual-2", "tiny_dual_cnn"), 1, 0.2) == TrialScheduler.STOP  # its own
    assert _report(scheduler, trial("resnet-2", "tiny_resnet"), 1, 0.5) == TrialScheduler.CONTINUE


def test_the_depths_of_models_resnet_are_one_architectures_trials() -> None:
    """`--models resnet` steps its trials through depths 18/34/50: one architecture searched, so its trials
    share rungs (each depth alone in its own had made the plan's "ASHA may stop a trial" untrue)."""
    config = TuneConfig(data="ds", registry="reg", models="resnet", trials=2, epochs=4, grace_epochs=1)
    scheduler = asha_scheduler(config)
    scheduler.set_search_properties("val_score", "max")  # type: ignore[attr-defined]
    first, second = (ModelTrial(name, {"trial": {"model": name}}) for name in ("resnet18", "resnet34"))
    for trial in (first, second):
        scheduler.on_trial_add(None, trial)  # type: ignore[attr-defined]
    assert _report(scheduler, first, 1, 0.8) == TrialScheduler.CONTINUE
    assert _report(scheduler, second, 1, 0.1) == TrialScheduler.STOP


def test_with_repeats_a_configuration_is_ranked_among_its_own_seeds_trials() -> None:
    """`--repeats` trains each configuration once per seed: a seed's trial is compared with the same seed's
    other configurations only, so an unlucky seed is not cut for another seed's luck (the spread over seeds
    is what --repeats measures)."""
    config = TuneConfig(
        data="ds", registry="reg", models="tiny_cnn", trials=2, repeats=2, epochs=4, grace_epochs=1
    )
    scheduler = asha_scheduler(config)
    scheduler.set_search_properties("val_score", "max")  # type: ignore[attr-defined]
    trials = {
        (name, seed): ModelTrial(f"{name}-{seed}", {"trial": {"model": "tiny_cnn", "seed": seed}})
        for name in ("a", "b")
        for seed in (0, 1)
    }
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)  # type: ignore[attr-defined]
    assert _report(scheduler, trials["a", 0], 1, 0.9) == TrialScheduler.CONTINUE
    assert _report(scheduler, trials["a", 1], 1, 0.3) == TrialScheduler.CONTINUE  # alone in seed 1's rung
    assert _report(scheduler, trials["b", 0], 1, 0.2) == TrialScheduler.STOP  # behind seed 0's other
    assert _report(scheduler, trials["b", 1], 1, 0.1) == TrialScheduler.STOP
