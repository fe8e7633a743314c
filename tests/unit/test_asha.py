"""cxr's ASHA: weak trials stop at their rungs, and no trial is stopped by its own last report."""

from __future__ import annotations

from dataclasses import dataclass

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
