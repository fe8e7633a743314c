"""Ray Tune comparison of architectures × hyperparameters; best of each evaluated, registered, compared.

A trial of one worker runs the training loop in its own process (`trains_in_trial`, `TrialSession`) and
reports each epoch to Tune, which keeps its checkpoints. A trial of several workers is a small driver that
builds and fits a TorchTrainer (the Tune + Train V2 pattern), whose metrics reach Tune through
TuneReportCallback. Either way ASHA can stop weak trials after any epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pickle
import pickletools
import re
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from cxrcore.config import CANDIDATE, ConfigError, EvaluateConfig, TrainConfig, TuneConfig, from_dict, to_dict
from cxrcore.console import is_quiet, quiet_ray_console, quiet_tune_trial
from cxrcore.data import storage
from cxrcore.experiment import check_same_experiment
from cxrcore.metrics import KEEP_SCORE, STOPPED_EARLY, best_by_validation, mcnemar_exact
from cxrcore.runtime import DATA_TASK_CPUS, Interrupted, root_cause, sigint_handler_kept

log = logging.getLogger(__name__)

RESNET_DEPTHS = ("resnet18", "resnet34", "resnet50")
TRIAL_DRIVER_CPUS = 0.1  # a trial's driver share: it waits on its TorchTrainer, or feeds its own loop
ASHA_REDUCTION_FACTOR = 2
"""ASHA keeps about one trial in this many at each of its rungs (grace epochs, twice that, ...)."""
SEARCH = {"lr": (3e-4, 4e-3), "weight_decay": (1e-4, 1e-1)}
"""Log-uniform ranges from which trials after the first are sampled, around the training defaults (lr 2e-3,
weight decay 1e-4). AdamW's weight decay shrinks the weights by lr × weight decay a step: under 1e-3 it did
nothing one could measure in a few thousand steps (2e-6 a step at most), so the range reaches the 1e-2 to
1e-1 where it regularises; the learning rate reaches down to where pretrained ResNets are fine-tuned."""


def search_plan(config: TuneConfig, train_rows: int) -> list[dict[str, Any]]:
    """Every trial's hyperparameters, decided up front from --seed: the same command runs the same search.

    The first trial of each architecture runs the training defaults (the recipe `cxr train` uses, with
    the batch size it would pick for this dataset), so every comparison includes a known-good recipe
    and `--trials 1` compares architectures, not lucky draws. Further trials sample learning rate and
    weight decay log-uniformly in SEARCH, and batch size from the automatic one, its double and (when
    at least 8) its half, once a round: every architecture gets the same configurations, whatever the
    order of --models and whichever others are compared (drawn in turn, `--models a,b` and `b,a` had
    given a and b each other's draws). Trials are ordered round by round, so the first round covers every
    architecture. 'resnet' is every depth of RESNET_DEPTHS on each configuration, three trials a round
    (it stepped through them, one a round: each depth met other hyperparameters, so ASHA's "best depth"
    compared depth and learning rate together, and with --trials 2 resnet50 never ran; a review, session
    52); the first wave of concurrent trials may then be its depths alone. With --repeats N each
    configuration is trained N times, with seeds --seed to --seed + N - 1 (the first round: every
    architecture at --seed).
    """
    import numpy as np

    from cxrcore.train.trainer import auto_batch_size

    rng = np.random.default_rng(config.seed)
    auto = auto_batch_size(train_rows, config.workers_per_trial)
    batch_sizes = sorted({auto, min(64, auto * 2)} | ({auto // 2} if auto // 2 >= 8 else set()))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    plan = []
    for round_ in range(config.trials):
        if round_ == 0:
            lr, weight_decay, batch_size = defaults["lr"], defaults["weight_decay"], auto
        else:
            lr, weight_decay = (float(np.exp(rng.uniform(*np.log(SEARCH[k])))) for k in SEARCH)
            batch_size = int(rng.choice(batch_sizes))
        drawn = [
            {"model": model, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size}
            for name in config.model_names()
            for model in (RESNET_DEPTHS if name == "resnet" else (name,))
        ]
        if config.repeats == 1:  # no seed key: an experiment started before --repeats resumes with this plan
            plan += drawn
            continue
        plan += [
            {**trial, "seed": config.seed + repeat} for repeat in range(config.repeats) for trial in drawn
        ]
    return plan


def planned_space(plan: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan as a Tune search space: a grid over trial indices, each trial's values looked up in it.

    Tune then shows every hyperparameter as its own column (trial/model, trial/lr, ...) in its progress
    table and the dashboard, rather than one opaque dict per trial.
    """
    from ray import tune

    def planned(key: str) -> Any:
        return tune.sample_from(lambda config: plan[config["index"]][key])

    return {
        "index": tune.grid_search(list(range(len(plan)))),
        "trial": {key: planned(key) for key in plan[0]},
    }


def trial_train_config(
    config: TuneConfig, params: dict[str, Any], trial_id: str, segmenter: str | None
) -> TrainConfig:
    """The TrainConfig one trial runs: the experiment's settings plus the trial's hyperparameters."""
    trial = params["trial"]
    model = trial["model"]
    return TrainConfig(
        data=config.data,
        model=model,
        epochs=config.epochs,
        workers=config.workers_per_trial,
        cpus_per_worker=int(params.get("cpus_per_worker") or 1),  # trial_worker_cpus, by the driver
        gpu=config.gpu,
        image_size=config.image_size,
        batch_size=int(trial["batch_size"]),
        lr=float(trial["lr"]),
        weight_decay=float(trial["weight_decay"]),
        pretrained=config.pretrained if takes_pretrained(model, config.pretrained) else "none",
        segmenter=segmenter if needs_mask(model) else None,
        out=_trials_root(config),
        name=trial_id,
        seed=int(trial.get("seed", config.seed)),  # an experiment started before --repeats: --seed
        patience=config.patience,
    )


def tune_driver_per_trial(params: dict[str, Any]) -> None:
    """One Tune trial: its Train loop in this process (one worker), or a TorchTrainer (several), whose
    per-epoch metrics reach Tune either way."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cxrcore.train.trainer import build_trainer, epoch_printer

    config = from_dict(TuneConfig, params["tune_config"])
    trial_id = ray.tune.get_context().get_trial_id()
    train_config = trial_train_config(config, params, trial_id, params.get("segmenter"))
    label = f"{train_config.model} (trial {trial_id})"
    # Quiet as the command that started the experiment is: on a cluster joined by address this process
    # lacks its environment, and the Train run built here takes its console settings from this process.
    quiet = bool(params.get("quiet_console"))
    with quiet_ray_console() if quiet else contextlib.nullcontext():
        if quiet:
            quiet_tune_trial()
        if not trains_in_trial(config):
            build_trainer(
                train_config, callbacks=[TuneReportCallback(), epoch_printer(train_config, label)]
            ).fit()
            return
        _train_here(train_config, label)


def segmenter_per_trial(params: dict[str, Any]) -> None:
    """The lung segmenter's training, a Tune trial of its own before the sweep: one worker's loop in this
    process, as the sweep's trials of one worker train (`_segmenter_in_trial`)."""
    train_config = from_dict(TrainConfig, params["train_config"])
    quiet = bool(params.get("quiet_console"))
    with quiet_ray_console() if quiet else contextlib.nullcontext():
        if quiet:
            quiet_tune_trial()
        _train_here(train_config, train_config.model)


def _train_here(train_config: TrainConfig, label: str) -> None:
    """One worker's Train loop in this Tune trial's process (`TrialSession`), a line printed per epoch."""
    from cxrcore.train.loop import TrialSession, run_training
    from cxrcore.train.trainer import epoch_line, training_inputs

    settings, datasets = training_inputs(train_config)

    def print_epoch(metrics: dict[str, Any]) -> None:
        print(epoch_line(label, train_config.epochs, metrics), flush=True)

    run_training(settings, TrialSession(datasets, gpu=train_config.gpu, print_epoch=print_epoch))


def trains_in_trial(config: TuneConfig) -> bool:
    """Whether each trial trains in its own process (`TrialSession`): with one worker per trial there is
    nothing to distribute, and a TorchTrainer's controller, worker and helper actors only cost start-up.
    Several workers per trial train with DDP in a TorchTrainer the trial starts."""
    return config.workers_per_trial == 1


def preflight(config: TuneConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check, once and before any trial starts, what would fail every trial of an architecture.

    Unknown model names, a missing dataset or column, weights that need an unreachable model hub or a
    file that does not fit: deterministic errors that Tune would otherwise retry in each trial. Returns
    the dataset report and the search plan.
    """
    from cxrcore.data.ingest import read_report
    from cxrcore.train.trainer import check_dataset, check_local_gpus, check_pretrained

    check_models(config)
    if config.gpu:
        check_local_gpus(config.workers_per_trial, config.address)  # a joined cluster may add GPU nodes
    report = read_report(config.data)
    check_dataset(config.data)
    check_test_split(config, report)
    check_masks(config, report)
    plan = search_plan(config, report["by_split"]["train"])
    for model in sorted({trial["model"] for trial in plan}):
        check_pretrained(model, config.pretrained if takes_pretrained(model, config.pretrained) else "none")
    return report, plan


def check_test_split(config: TuneConfig, report: dict[str, Any]) -> None:
    """Refuse a dataset without a test image: each architecture's best is scored on the test split before it
    is registered, and the winner promoted only where that beats always answering the commonest class. A
    review (session 57): every trial trained, then the command failed naming `--split`, which tune lacks."""
    if not report["by_split"].get("test"):
        raise ConfigError(
            f"--data: {config.data} has no image in its test split, on which `cxr tune` scores each "
            "architecture's best before registering it; re-ingest it with `cxr data ingest --test-fraction` "
            "above 0"
        )


def check_masks(config: TuneConfig, report: dict[str, Any]) -> None:
    """Refuse comparing mask-reading models on a dataset without a lung mask: Serve gets their masks from a
    segmenter that Tune trains on the dataset's own."""
    if segmenter_model(config) and report["without_mask"] >= report["ingested"]:
        readers = [m for m in config.model_names() if m != "resnet" and needs_mask(m)]
        raise ConfigError(
            f"--models: {', '.join(readers)} read{'s' * (len(readers) == 1)} a lung mask beside the image, "
            f"which Serve gets from a segmenter that Tune trains on the dataset's masks, and {config.data} "
            "has none; ingest the masks with the images, or compare models that read the image alone"
        )


def check_models(config: TuneConfig) -> None:
    """Every name in --models is registered, or is 'resnet' (which searches every depth of RESNET_DEPTHS); the
    experiment's settings make a valid training run for each (a trial would refuse --image-size 8 only
    after Ray and Tune had started, and a dry run passed it)."""
    from cxrcore.models import get_model_entry

    names = config.model_names()
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise ConfigError(
            f"--models: {', '.join(repeated)} named twice; each architecture is searched once (--trials sets "
            "how many configurations)"
        )
    if "resnet" in names and (depths := [name for name in names if name in RESNET_DEPTHS]):
        raise ConfigError(
            f"--models: 'resnet' already searches {', '.join(RESNET_DEPTHS)}; {', '.join(depths)} beside it "
            "would train the same trials twice"
        )
    for name in names:
        if name != "resnet":
            try:
                entry = get_model_entry(name)
            except ValueError as exc:  # an unknown name, with a "did you mean"
                raise ConfigError(f"--models: {exc}") from exc
            if entry.input_spec.task != "classify":
                raise ConfigError(
                    f"--models: {name} is a lung segmenter, not a classifier to compare; Tune trains one "
                    "itself where a compared model reads a lung mask (--segmenter-epochs)"
                )
    model = next((name for name in config.model_names() if name != "resnet"), "resnet18")
    sample = {"model": model, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0}  # within any search space
    trial_train_config(config, {"trial": sample}, "check", None)  # raises ConfigError, naming the setting
    if segmenter_model(config):
        segmenter_train_config(config, segmenter_model(config) or "unet")


def check_settings(config: TuneConfig) -> None:
    """What fails a comparison whatever the cluster, checked before Ray starts: the architectures
    (check_models) and, for those Tune gives it to, the --pretrained choice (a file there)."""
    from cxrcore.train.trainer import resolve_pretrained

    check_models(config)
    names = {m for n in config.model_names() for m in (RESNET_DEPTHS if n == "resnet" else (n,))}
    taking = sorted(n for n in names if takes_pretrained(n, config.pretrained))
    for name in taking:
        resolve_pretrained(name, config.pretrained)
    untouched = sorted(names - set(taking))
    if config.pretrained.strip().lower() not in ("auto", "none") and untouched:
        log.warning(
            "--pretrained %s goes to %s only: %s train from scratch", config.pretrained,
            ", ".join(taking) or "no architecture here", ", ".join(untouched),
        )  # fmt: skip


def segmenter_model(config: TuneConfig) -> str | None:
    """The U-Net trained before the trials when a compared model takes a lung mask (tiny when the compared
    models all are), or None: at serving time there is no ground-truth mask, so the segmenter supplies it."""
    if not any(needs_mask(m) for m in config.model_names() if m != "resnet"):
        return None
    return "tiny_unet" if all(m.startswith("tiny_") for m in config.model_names()) else "unet"


def segmenter_train_config(config: TuneConfig, model: str) -> TrainConfig:
    """The segmenter's training run: on one trial's workers, with the segmentation recipe."""
    return TrainConfig(
        data=config.data, model=model, epochs=config.segmenter_epochs or 1, workers=config.workers_per_trial,
        gpu=config.gpu, image_size=config.image_size, lr=1e-3, batch_size=16, out=_trials_root(config),
        name="segmenter", seed=config.seed,
    )  # fmt: skip


def experiment_settings(config: TuneConfig, report: dict[str, Any]) -> dict[str, Any]:
    """What makes a re-run the same experiment: the data and the settings that shape the search."""
    shaping = (
        "models",
        "trials",
        "epochs",
        "grace_epochs",
        "segmenter_epochs",
        "image_size",
        "pretrained",
        "seed",
    )
    # Recorded only where set, so that older experiments' settings stay as they were
    optional = {"repeats": config.repeats} if config.repeats != 1 else {}
    if config.patience is not None:  # which trials end when, and so which checkpoints there are to compare
        optional["patience"] = config.patience
    return {"data_fingerprint": report["fingerprint"], **{k: getattr(config, k) for k in shaping}, **optional}


def check_experiment_settings(config: TuneConfig, report: dict[str, Any], write: bool = True) -> None:
    """Record the experiment's settings (`experiment_settings`), or refuse a re-run of its name with others
    (ConfigError); `write=False` checks only (`--dry-run`)."""
    settings = experiment_settings(config, report)
    check_same_experiment(experiment_path(config), settings, "a Tune experiment", {"repeats": 1}, write=write)


def space_settings(config: TuneConfig) -> dict[str, Any]:
    """The experiment's settings as each trial reads them from its search space. Tune restores a resumed
    experiment with this space only where its keys are the ones it started with: settings added since at
    their defaults (`repeats` 1, no `patience`) are left out, as experiments from before them have none."""
    added = {"repeats": 1, "patience": None}
    return {k: v for k, v in to_dict(config).items() if k not in added or v != added[k]}


def run_comparison(config: TuneConfig) -> dict[str, Any]:
    """Train the segmenter if needed, run the sweep, evaluate and register the best of each architecture.

    Raises storage.InUse while another process runs the same experiment: it would "resume" the running
    one, train its trials again in the same folders and register them twice."""
    from cxrcore.data.ingest import reading
    from cxrcore.runtime import init_ray

    with writing(config), reading(config.data):  # an ingest into --data is refused until it ends
        checked = preflight(config)  # before Ray's start (seconds): a notebook's wrong --data fails at once
        check_experiment_settings(config, checked[0])  # a re-run of other settings: refused before it too
        init_ray(config.address)  # a library caller's too: cxr's local cluster (a no-op once Ray runs)
        return _run_comparison(config, *checked)


def writing(config: TuneConfig) -> AbstractContextManager[None]:
    """Held while an experiment runs: another run of it fails at once."""
    return storage.exclusive(experiment_path(config), "a Tune experiment", "another --name or --out")


def _run_comparison(config: TuneConfig, report: dict[str, Any], plan: list[dict[str, Any]]) -> dict[str, Any]:
    import ray
    from ray import tune

    from cxrcore.data.ingest import sources_separate_classes
    from cxrcore.evaluate.comparison import seed_spread, write_comparison_report
    from cxrcore.registry import ModelRegistry
    from cxrcore.train.trainer import unscored_classes

    registry = ModelRegistry(config.registry)
    experiment = experiment_path(config)
    work = _work_dir(config)
    finished_before = _finished_before(experiment)
    segmenter_name = segmenter_model(config)
    cpus_per_worker = trial_worker_cpus(config, ray.cluster_resources(), len(plan))
    waiting = trial_fit_note(config, cpus_per_worker, ray.cluster_resources(), ray.available_resources())
    if waiting:
        print(f"note: {waiting}", flush=True)
    _start_ray_data_actors()
    segmenter = _segmenter(config, registry, segmenter_name) if segmenter_name else None
    space = {
        **planned_space(plan),
        "tune_config": space_settings(config),
        "segmenter": segmenter["checkpoint"] if segmenter else None,
        "quiet_console": is_quiet(),  # decided here: trials on a joined cluster lack this environment
        "cpus_per_worker": cpus_per_worker,
    }
    trainable = tune.with_resources(tune_driver_per_trial, trial_request(config, cpus_per_worker))
    results = _fit_experiment(
        trainable, space, config.out, config.name, tune_settings(config, ray.cluster_resources()),
        interrupted=(
            f"only the lung segmenter was registered ({segmenter['ref']}; the re-run reuses it) and nothing "
            "was promoted"
            if segmenter
            else "nothing was registered or promoted"
        )
        + f"; run the same command again to resume the experiment ({experiment}): trials go on from their "
        "last checkpoints",
    )  # fmt: skip
    trials = [_trial_record(config, results[i]) for i in range(len(results))]
    left = _production_left_by_earlier_run(experiment)
    best = _best_per_architecture(config, trials, registry, work, experiment)
    _pair_with_runner_up(best, work)
    previous = registry.aliases().get("production")
    kept, promoted = _promote_winner(registry, best, previous, left, report["fingerprint"], config.promote)
    comparison = {
        "experiment": experiment,
        "dataset": config.data,
        "settings": to_dict(config),
        "segmenter": segmenter,
        "trials": trials,
        "best": best,
        "seeds": seed_spread(
            trials, lambda model: architecture(model, config.model_names())
        ),  # None: one seed
        "production": next((b["ref"] for b in best.values() if b.get("production")), None) or previous,
        "production_before": previous,
        "production_kept": kept,
        "finished_before": finished_before,
        "val_unscored": unscored_classes(report, tuning=True),  # a class without a val image chose nothing
        "sources_separate_classes": sources_separate_classes(report),  # test figures may measure sources
        # what this experiment made production, in this run or an earlier one: a third run after a
        # rollback must still see that the rollback moved it away (production names the kept version)
        "promoted": promoted,
    }
    reports = write_comparison_report(work, comparison)
    if work != Path(experiment):  # an object store: the reports were written to this machine's cache
        storage.copy(pafs.LocalFileSystem(), str(work), *storage.resolve(experiment))
    comparison["reports"] = {k: _published(v, work, experiment) for k, v in reports.items()}
    return comparison


def error_line(error: BaseException) -> str:
    """What went wrong in a trial, in one line: the exception raised in the trial ("ValueError: the val
    split holds no image ..."), not Ray's header for the actor it ran in ("ray::ImplicitFunc.train() (pid=,
    ip=, actor_id=)", in terminal colours), which is the first line of a RayTaskError's text."""
    cause = root_cause(error)  # RayTaskError keeps the trial's exception as `cause`; Tune may wrap it again
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
    last = text.splitlines()[-1].strip() if text else ""
    if cause is error and _RAISED.match(last):  # no cause kept, a traceback's text: its last line raised
        return last
    first = text.splitlines()[0] if text else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:")
"""A traceback's last line: the exception's type and message ("KeyError: 'accuracy'")."""


def _finished_before(experiment: str) -> bool:
    """Whether an earlier run of this experiment finished with every trial done (its comparison.json has
    no failed trial): a re-run then trains nothing. A failed trial is retried by a re-run."""
    earlier = _earlier_comparison(experiment)
    trials = (earlier or {}).get("trials") or []
    return bool(trials) and all(trial.get("error") is None for trial in trials)


_DAMAGED_SEEN: set[str] = set()


def _earlier_comparison(experiment: str) -> dict[str, Any] | None:
    """The comparison.json an earlier run of this experiment wrote, or None: none, or one damaged (then
    the experiment is taken as unfinished: Tune restores what its trials had done, and it is written
    again)."""
    path = f"{experiment.rstrip('/')}/comparison.json"
    text = storage.read_text(*storage.resolve(path))
    if not text:
        return None
    try:
        earlier = json.loads(text)
    except ValueError:
        if path not in _DAMAGED_SEEN:  # read twice by a re-run: said once
            _DAMAGED_SEEN.add(path)
            log.warning("%s is damaged (empty or cut short); it is written again when this run ends", path)
        return None
    return earlier if isinstance(earlier, dict) else None


def _promote_winner(
    registry: Any,
    best: dict[str, dict[str, Any]],
    previous: str | None,
    left: str | None,
    fingerprint: str,
    promote: str = "auto",
) -> tuple[dict[str, Any] | None, str | None]:
    """Make the winner production, unless production should stay: `promote` "never" (the winner is then
    the alias candidate), a re-run of this experiment after production was moved from what the experiment
    promoted (`left`), a winner not shown to beat the commonest class, or a production version that ranks
    above the winner on the same validation images (_better_production). Stars the production row of
    `best`; returns why production stayed (None: promoted) and what this experiment has promoted."""
    from cxrcore.evaluate.comparison import not_shown_above_chance, ranked_architectures

    if not best:
        return None, left
    winner = best[
        ranked_architectures(best)[0][0]
    ]  # by validation, a failed trial's after every finished one
    if winner.get("failed"):
        # every architecture's trials failed: their checkpoints from before the failure are registered, and
        # production is not moved to any of them (a crashed run had been promoted with exit status 0)
        for row in best.values():
            row["production"] = row["ref"] == previous
        return {"failed": winner["ref"]}, left
    if promote == "never":  # a review first: `cxr models promote candidate` serves it
        registry.promote(winner["ref"], CANDIDATE)
        kept: dict[str, Any] = {"not_asked": winner["ref"], "winner": winner["ref"]}
    elif left is not None and previous is not None and previous != left:
        # This experiment finished before and promoted `left`; production was moved since (a rollback,
        # another experiment's winner). Re-running it, to resume or to remake its reports, must not
        # undo that: an operator's rollback came back on a CI retry.
        kept = {"left_by_earlier_run": left, "winner": winner["ref"]}
    elif previous != winner["ref"] and not_shown_above_chance(winner):
        # A winner no better than answering the commonest class never unseats a production version (a
        # clinician's review: a model at 0.25 on 4 test images replaced one at 1.000 on 40), nor becomes
        # production where there is none: the comparison says "do not serve it on this evidence", and it
        # had been made production with exit 0 (a real-sample study, session 52). It is the candidate, for
        # `cxr models promote candidate` after a review.
        registry.promote(winner["ref"], CANDIDATE)
        kept = {"not_above_chance": winner["ref"], "winner": winner["ref"], "candidate": winner["ref"]}
    elif previous != left and (better := _better_production(registry, previous, winner, fingerprint)):
        kept = {"better_on_this_data": better, "winner": _ranked_figures(winner)}
    else:
        registry.promote(winner["ref"], "production")
        winner["production"] = True
        return None, winner["ref"]
    for row in best.values():
        row["production"] = row["ref"] == previous  # starred where the kept version is one of them
    return kept, left


def _better_production(
    registry: Any, production: str | None, winner: dict[str, Any], fingerprint: str
) -> dict[str, Any] | None:
    """The production version's validation figures where they rank above this experiment's winner on the
    same validation images: it was trained on this dataset (its fingerprint), and best_by_validation puts it
    first (a better macro-F1 by more than one image, or within one image a lower loss). None otherwise: no
    production, one of this experiment's own versions, one trained on other data (scores on other images
    do not compare: the winner of an experiment on new data is promoted), or the winner ahead.

    A shared registry's production had been replaced by any later experiment's winner, even one a whole
    class of images below it on the very same validation split."""
    from cxrcore.registry import RegistryError

    if production is None or production == winner["ref"]:
        return None
    try:
        version = registry.get(production)
    except (RegistryError, FileNotFoundError, ValueError):  # an alias left dangling: nothing to keep
        return None
    if version.card.data.get("fingerprint") != fingerprint or version.card.metrics.get("val_score") is None:
        return None
    held = {"ref": version.ref, **_ranked_figures(version.card.metrics)}
    return held if best_by_validation([_ranked_figures(winner), held], dict) is held else None


def _ranked_figures(row: dict[str, Any]) -> dict[str, Any]:
    """What best_by_validation ranks a version on, with its reference where the row has one."""
    keys = ("ref", "val_score", "val_loss", "val_count", "val_confusion_matrix")
    return {k: row[k] for k in keys if row.get(k) is not None}


def _production_left_by_earlier_run(experiment: str) -> str | None:
    """The production version this experiment's earlier, finished runs promoted (its comparison.json), or
    None: a first run, or one stopped before it promoted anything."""
    earlier = _earlier_comparison(experiment)
    if earlier is None:
        return None
    if "promoted" in earlier:
        promoted = earlier["promoted"]
    elif earlier.get("production_kept"):  # written before `promoted` was: the kept run promoted nothing
        promoted = earlier["production_kept"].get("left_by_earlier_run")
    else:
        promoted = earlier.get("production")
    return promoted if isinstance(promoted, str) else None


def _start_ray_data_actors() -> None:
    """Have Ray Data's stats actor, one per cluster, start from this driver before any trial reads data.

    The first Ray Data execution on a cluster creates it, detached and with no scheduling strategy of its
    own; from a trial, Tune's placement group (which captures what a trial starts) took it in, and it was
    killed with the trial, with Ray's "unexpected system state" stack trace on the console when that
    happened while it was being created. Its getter is Ray Data's internal one: on a Ray without it, the
    first trial creates the actor as before."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_stats_actor()


def _fit_experiment(
    trainable: Any,
    space: dict[str, Any],
    storage_path: str,
    name: str,
    tune_config: Any,
    interrupted: str,
    max_failures: int = 1,
    restore_space: bool = True,
) -> Any:
    """Run the Tune experiment `name` under `storage_path` (a folder or URI), restored if it was started
    before (a finished trial is not run again, an interrupted or errored one goes on from its last
    checkpoint; `restore_space` False keeps the space it was started with, whose keys a later cxr's
    configuration may not match); its ResultGrid. Ctrl-C raises Interrupted(`interrupted`)."""
    from ray import tune

    # Tune snapshots the experiment whenever a trial has saved num_to_keep checkpoints since the last one,
    # every few epochs of short trials, and then warned, four times in a review's small comparison, that
    # snapshots "may become a bottleneck": a snapshot is a few files here. The variable still decides.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    experiment = f"{storage_path.rstrip('/')}/{name}"
    check_experiment_state(experiment)
    drop_empty_error_files(experiment)
    if tune.Tuner.can_restore(experiment):
        log.info("resuming experiment %s", experiment)
        try:
            tuner = tune.Tuner.restore(
                experiment,
                trainable=trainable,
                param_space=space if restore_space else None,
                resume_errored=True,
            )
        except ValueError as exc:  # a space of other keys than it started with (a cxr of another version)
            if "param_space" not in str(exc):
                raise
            log.info("resuming %s with the search space it started with (%s)", experiment, exc)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, param_space=None, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # Each trial prints a line per epoch (epoch_printer) and the comparison its own summary;
                # Tune's status tables repeat every metric of every trial each 30 s. -v brings them back.
                verbose=0 if is_quiet() else 1,
                # Kept by Tune for trials that train in their own process (`trains_in_trial`), as Ray Train
                # keeps a TorchTrainer's: the best three by validation score, exact ties by the loss
                # (KEEP_SCORE), and the latest. A resumed experiment keeps the config it started with.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=3, checkpoint_score_attribute=KEEP_SCORE, checkpoint_score_order="max"
                ),
            ),
        )
    before = signal.getsignal(signal.SIGINT)
    with sigint_handler_kept():  # Tune leaves its handler behind when the experiment ends
        with _without_tunes_resume_advice(), _tunes_own_output(), _said_if_full(experiment):
            results = tuner.fit()
        stopped = _tune_was_interrupted(before)
    if stopped:
        raise Interrupted(interrupted)
    return results


@contextlib.contextmanager
def _said_if_full(experiment: str) -> Iterator[None]:
    """An experiment that fails on a full disk (or quota, or `ulimit -f`) raises that OSError, naming the
    experiment's folder. Tune's controller may fail on what the full disk did rather than on the disk: it
    wrote a trial's error.pkl empty and died reading it back (`EOFError: Ran out of input`, 335 lines);
    a local folder with under FULL_DISK_BYTES free after a failure is taken as full. Meanwhile Tune's own
    tracebacks of it (each trial's failure and each failed save of the experiment's state) stay off the
    console."""
    from cxrcore.console import HideStorageErrors
    from cxrcore.runtime import storage_error, storage_reason

    loggers = [logging.getLogger(name) for name in TUNE_LOGGERS]
    hidden = HideStorageErrors()
    for logger in loggers:
        logger.addFilter(hidden)
    try:
        yield
    except Exception as exc:
        full = storage_error(exc)
        if full is None and isinstance(exc, EOFError | pickle.UnpicklingError) and "://" not in experiment:
            with contextlib.suppress(OSError):  # an empty error.pkl, on a disk that is full
                if shutil.disk_usage(storage.existing_folder(experiment)).free < FULL_DISK_BYTES:
                    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if full is None:
            raise
        then = (
            f"Tune's record of the experiment was cut short by it: once there is room, run with another "
            f"--name, or delete {experiment} and run again"
            if _damaged_state(experiment)
            else "once there is room, run the same command again: finished trials are kept, the others go "
            "on from their last checkpoint"
        )
        reason = f"{storage_reason(full)} while the experiment ran; {then}"
        raise OSError(full.errno, reason, experiment) from exc
    finally:
        for logger in loggers:
            logger.removeFilter(hidden)


TUNE_LOGGERS = (
    "ray.tune.execution.tune_controller",
    "ray.tune.execution.experiment_state",
    "ray.train._internal.syncer",
)
"""Ray Tune's modules that log a trial's failure, a failed save and a failed sync with their tracebacks."""
FULL_DISK_BYTES = 4 * 1024**2
"""Free space under which an experiment that died reading an empty pickle of Tune's (a trial's error.pkl)
is taken to have filled its disk (`_said_if_full`)."""


TUNE_STATE_FILES = ("experiment_state-*.json", "basic-variant-state-*.json")
"""Ray Tune's record of an experiment, the newest of each kind being what it resumes from: its trials and
their states (JSON), and its search algorithm's (a pickle despite its name). A full disk left either
empty or cut short."""


def check_experiment_state(experiment: str) -> None:
    """Raise ConfigError, naming the file and what to do, where the newest of Tune's state files of
    `experiment` (TUNE_STATE_FILES) does not parse. Tune copies them in place: a disk that filled left one
    empty, and a re-run then logged "Failed to restore the run state", trained every trial again and exited
    0, leaving the old trials' checkpoints beside the new ones on the disk that had filled."""
    if damaged := _damaged_state(experiment):
        raise ConfigError(
            f"{damaged}, Ray Tune's record of this experiment, is damaged (empty or cut short: a full disk "
            "or a kill while Tune wrote it), so its trials cannot resume: run with another --name, or delete "
            f"{experiment} to train them again from the start"
        )


def drop_empty_error_files(experiment: str) -> list[str]:
    """Remove the empty `error.pkl` files a full disk left in `experiment`'s trial folders; return them. Tune
    keeps a failed trial's exception there and unpickles it as it restores the experiment: an empty one
    failed every re-run (`EOFError: Ran out of input`). The trial is still recorded as failed, and a re-run
    goes on with it from its last checkpoint."""
    filesystem, root = storage.resolve(experiment)
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
    empty = [
        info.path
        for info in filesystem.get_file_info(selector)
        if info.base_name == "error.pkl" and info.type == pafs.FileType.File and info.size == 0
    ]
    for path in empty:
        filesystem.delete_file(path)
    return empty


def _damaged_state(experiment: str) -> str | None:
    """The newest of `experiment`'s state files of a kind (TUNE_STATE_FILES) that does not parse, if one."""
    import fnmatch

    filesystem, root = storage.resolve(experiment)
    listed = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = [info.base_name for info in listed if info.type == pafs.FileType.File]
    for pattern in TUNE_STATE_FILES:
        if matching := fnmatch.filter(names, pattern):
            with filesystem.open_input_stream(f"{root}/{max(matching)}") as stream:
                data = stream.readall()
            try:  # the pickle's opcodes read to its end, nothing built from them
                json.loads(data) if pattern.startswith("experiment_state") else list(pickletools.genops(data))
            except ValueError:
                return f"{experiment.rstrip('/')}/{max(matching)}"
    return None


def _tune_was_interrupted(before: Any) -> bool:
    """Whether Ctrl-C ended the last `Tuner.fit`, whose results then look like finished trials' (each
    TERMINATED, at the epoch it had reached). Tune replaces the SIGINT handler for the fit and puts back
    the one from before (`before`) only when a SIGINT stops the experiment (Ray 2.60's
    `tune._setup_signal_catching`); it installs none outside the main thread or with
    TUNE_DISABLE_SIGINT_HANDLER, where a SIGINT raises KeyboardInterrupt instead."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") not in ("", "0"):
        return False
    return signal.getsignal(signal.SIGINT) is before


def _tunes_own_output() -> contextlib.AbstractContextManager[None]:
    """In a quiet command, nothing of Tune's own output engine. At verbosity 0 it still printed a table of
    each experiment's search algorithm, scheduler and trial count, its folder and a TensorBoard command:
    twice in a quiet `cxr tune`, the first time for the segmenter's experiment, a folder of cxr's own. The
    legacy engine (RAY_AIR_NEW_OUTPUT=0, read by `Tuner.fit`) prints nothing at verbosity 0; the trials'
    epoch lines and the comparison's summary are cxr's."""
    from cxrcore.runtime import environment_defaults

    return environment_defaults(RAY_AIR_NEW_OUTPUT="0") if is_quiet() else contextlib.nullcontext()


@contextlib.contextmanager
def _without_tunes_resume_advice() -> Any:
    """Tune's warning on Ctrl-C names its Python API (`Tuner.restore(path=...)`); cxr says to run the
    same command again instead (`Interrupted`)."""

    def keep(record: logging.LogRecord) -> bool:
        return "has been interrupted" not in str(record.msg)

    logger = logging.getLogger("ray.tune.tune")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def tune_settings(config: TuneConfig, resources: dict[str, float]) -> Any:
    """Tune's settings for the sweep on a cluster with `resources`.

    The search space is a grid over the planned trials (planned_space), so it is sampled once: Tune runs a
    grid `num_samples` times over, and `--trials 4` of one architecture had run 16 trials, each planned one
    four times (three architectures at the shipped jobs/configs/tune.yaml's 4: 48 instead of 12).
    """
    from ray import tune

    return tune.TuneConfig(
        metric="val_score",
        mode="max",
        num_samples=1,
        max_concurrent_trials=config.max_concurrent or max_concurrent_trials(config, resources),
        scheduler=asha_scheduler(config),
        search_alg=None,
    )


def asha_scheduler(config: TuneConfig) -> Any:
    """ASHA over the epochs each trial reports, within each architecture, which lets a trial end on its own
    after its last epoch.

    An architecture's trials are ranked among themselves: ASHA searches its hyperparameters, and every
    architecture gets the same budget to be compared on. With one trial each (`--trials 1`, the demo) no
    trial is stopped: a slow starter (resnet18 in the demo) had been cut at the grace epoch whenever it
    reached it after a faster one, and compared on fewer epochs than the others.

    Tune's ASHA stops a trial whose report reaches max_t, and a stop kills the trial's actor: Ray Train's
    run, still finishing the epoch it just reported, then loses its workers, and the console shows its
    controller's "[FailurePolicy] RETRY ... Training failed due to worker errors" on a trial that did
    everything it was asked. A trial's last report comes from a Train run about to return, so here it
    does not stop the trial; ASHA records it in its rungs when the trial completes. (Tune pickles the
    scheduler with the experiment; cloudpickle takes this class along.)

    Tune pickles it as it was when the experiment started, with empty rungs, and restores it so when a
    killed or interrupted experiment resumes: a trial resumed at epoch 3 was then judged at the epoch-2
    rung on its epoch-3 score, against no one, and the best trial of a review's run was stopped where the
    uninterrupted run had kept it. So each trial added to it replays the scores it reported before
    (its result.json) into the rungs, as they were recorded the first time.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class ASHAStopsBeforeLastEpoch(ASHAScheduler):  # the name Tune's console shows as the scheduler
        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            super().on_trial_add(tune_controller, trial)
            # Each architecture's own rungs: its trials compete with one another, never with another
            # architecture's. In one bracket for all, with one trial each, whichever reached the grace
            # epoch second was judged against the first's score alone and stopped on arrival order.
            planned = (getattr(trial, "config", None) or {}).get("trial", {})
            model = architecture(str(planned.get("model")), named)  # resnet's depths: one architecture
            # With --repeats, one seed's trials of an architecture: a configuration is compared with the
            # others on the same seed, and a seed's draw is never stopped for another seed's.
            key = (model, planned.get("seed")) if config.repeats > 1 else model
            brackets = self.__dict__.setdefault("_by_model", {})  # made on first use, pickled with the rest
            if key not in brackets:
                brackets[key] = _Bracket(grace, config.epochs, ASHA_REDUCTION_FACTOR, 0)
            self._trial_info[trial.trial_id] = brackets[key]
            bracket, metric, sign = self._trial_info[trial.trial_id], self._metric, self._metric_op
            if metric is None or sign is None:  # on_trial_add above refuses a scheduler without them
                return
            for epoch, score in reported_scores(trial, self._time_attr, metric):
                bracket.on_result(trial, epoch, sign * score)

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            if result.get(self._time_attr, 0) >= self._max_t:
                return str(TrialScheduler.CONTINUE)
            return str(super().on_trial_result(tune_controller, trial, result))

    grace = config.grace_epochs or 1  # resolved by TuneConfig
    named = config.model_names()
    return ASHAStopsBeforeLastEpoch(
        # The epoch each report names, not Tune's count of reports: a trial restored after the driver was
        # killed resumes its Train run mid-way, and Tune counts its reports from 1.
        time_attr="epoch",
        max_t=config.epochs,
        grace_period=grace,
        reduction_factor=ASHA_REDUCTION_FACTOR,
    )


def reported_scores(trial: Any, time_attr: str, metric: str) -> list[tuple[int, float]]:
    """(epoch, score) of each result a restored trial reported before, in order, from its result.json in
    the experiment's storage (or the driver's copy); [] for a trial that has reported nothing."""
    from ray.air.constants import EXPR_RESULT_FILE

    places = (
        lambda: (trial.storage.storage_filesystem, trial.storage.trial_fs_path),
        lambda: (pafs.LocalFileSystem(), trial.local_path),
    )
    for place in places:
        try:
            filesystem, folder = place()
            text = storage.read_text(filesystem, f"{folder}/{EXPR_RESULT_FILE}") if folder else None
        except (AttributeError, RuntimeError, OSError):  # a new trial: no folder named yet, nothing reported
            continue
        if text:
            rows = []
            for line in text.splitlines():
                with contextlib.suppress(ValueError):  # a line cut short by the kill
                    rows.append(json.loads(line))
            return [
                (int(row[time_attr]), float(row[metric]))
                for row in rows
                if row.get(time_attr) is not None and row.get(metric) is not None
            ]
    return []


def experiment_path(config: TuneConfig) -> str:
    """The experiment's folder: a local path, or a URI where --out is one."""
    return f"{config.out.rstrip('/')}/{config.name}"


def _work_dir(config: TuneConfig) -> Path:
    """The local folder the reports are written into: the experiment's own, or for a URI a cache folder
    (`storage.cache_folder("experiments")`), where they are written before they are copied there."""
    if not storage.is_remote(config.out):
        return Path(experiment_path(config))
    return (
        storage.cache_folder("experiments").expanduser().joinpath(*storage.cache_key(experiment_path(config)))
    )


def _published(path: Path, work: Path, experiment: str) -> str:
    """Where a file written under `work` is kept: the same file, or its copy under the URI `experiment`."""
    return str(path) if work == Path(experiment) else f"{experiment}/{path.relative_to(work).as_posix()}"


def _segmenter(config: TuneConfig, registry: Any, model: str) -> dict[str, Any]:
    """Train the U-Net `model` once, register it, return its record.

    A re-run after the driver was killed uses the segmenter run as it finished, without starting it again.
    """
    from cxrcore.train.trainer import fit

    train_config = segmenter_train_config(config, model)
    run = f"{train_config.out.rstrip('/')}/{train_config.run_name()}"
    in_trial, in_run = _segmenter_trial_checkpoints(config), _kept_checkpoints(run)
    # A segmenter that reached its last epoch is used wherever it trained: one of a re-run with another
    # --workers-per-trial, or of an experiment started before one-worker segmenters trained in a trial, is
    # what the trials restored with it read their masks from.
    kept = next((k for k in (in_trial, in_run) if k and k[-1][1]["epoch"] + 1 >= train_config.epochs), [])
    if not kept and trains_in_trial(config):
        kept = _segmenter_in_trial(config, train_config)
    elif not kept:
        fit(train_config)
        kept = _kept_checkpoints(run)
    if not kept:
        raise RuntimeError("the lung segmenter produced no checkpoint")
    checkpoint, card = best_by_validation(kept, lambda item: item[1]["metrics"]) or kept[-1]
    report = _work_dir(config) / "reports" / model
    version = _evaluate_and_register(config, registry, checkpoint, report)
    return {
        "model": model,
        "ref": version.ref,
        # Where the version is kept, readable wherever the registry is: trial workers load it from there, and
        # their cards name it (never this machine's cached copy).
        "checkpoint": version.uri,
        "val_dice": card["metrics"].get("val_dice"),
        "test": json.loads((report / "metrics.json").read_text()),
    }


SEGMENTER_EXPERIMENT = "segmenter-trial"
"""The Tune experiment, under the trials' folder, in which the segmenter of one worker trains."""


def _segmenter_in_trial(config: TuneConfig, train_config: TrainConfig) -> list[tuple[str, dict[str, Any]]]:
    """Train the segmenter of one worker as the sweep's trials of one worker train: a Tune trial running
    its loop in its own process. A TorchTrainer would add a controller, a worker and helper actors, each a
    process importing Ray and torch. On 2 cores the tiny U-Net's one epoch took 20 s from the start of its
    TorchTrainer to its epoch line, and 11 s in a trial; `cxr tune` of the three tiny models 66 s and
    58-61 s. A re-run restores the experiment: a finished trial is not run again, an interrupted one goes
    on from its last checkpoint. Returns its kept checkpoints with their cards."""
    from ray import tune

    from cxrcore.train.trainer import worker_cpus

    cpus = worker_cpus(train_config)
    train_config = dataclasses.replace(train_config, cpus_per_worker=cpus)
    trainable = tune.with_resources(segmenter_per_trial, trial_request(config, cpus))
    space = {"train_config": to_dict(train_config), "quiet_console": is_quiet()}
    results = _fit_experiment(
        trainable, space, _trials_root(config), SEGMENTER_EXPERIMENT, None,
        interrupted=f"the lung segmenter's training stopped; nothing was registered or promoted. Run the "
        f"same command again to resume the experiment ({experiment_path(config)})",
        max_failures=train_config.max_failures, restore_space=False,
    )  # fmt: skip
    (result,) = [results[i] for i in range(len(results))]
    if result.error is not None:
        raise RuntimeError(f"the lung segmenter's training failed: {error_line(result.error)}")
    return _tune_checkpoints(result)


def _segmenter_trial_checkpoints(config: TuneConfig) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints, with their cards, of the segmenter's Tune trial (`_segmenter_in_trial`) as its
    experiment recorded them; [] where it has none. Reads the experiment's state; runs nothing."""
    from ray import tune

    experiment = f"{_trials_root(config).rstrip('/')}/{SEGMENTER_EXPERIMENT}"
    check_experiment_state(experiment)
    drop_empty_error_files(experiment)
    if not tune.Tuner.can_restore(experiment):
        return []
    try:
        results = tune.Tuner.restore(experiment, trainable=segmenter_per_trial).get_results()
    except (EOFError, pickle.UnpicklingError) as exc:  # a trial's error.pkl a full disk left empty
        raise ConfigError(
            f"{experiment}, the lung segmenter's Tune experiment, holds a file a full disk (or a kill) left "
            f"empty or cut short ({exc or type(exc).__name__}): delete {experiment} to train the segmenter "
            "again, or run with another --name"
        ) from exc
    return _tune_checkpoints(results[0]) if len(results) else []


def _trial_record(config: TuneConfig, result: Any) -> dict[str, Any]:
    """What the comparison keeps of a trial of an experiment that has ended; its kept checkpoints other
    than the latest lose their resume state (`drop_resume_state`) on the way."""
    from cxrcore.checkpoint import drop_resume_state

    params = result.config
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    train = trial_train_config(config, params, trial_id, None)
    checkpoints = _tune_checkpoints(result) or _kept_checkpoints(f"{train.out.rstrip('/')}/{trial_id}")
    drop_resume_state(location for location, _ in checkpoints[:-1])  # oldest first: all but the latest
    checkpoint, card = best_by_validation(checkpoints, lambda kept: kept[1]["metrics"]) or (None, None)
    # The last epoch reported (a restored trial's Train run resumes mid-way; Tune counts its reports from 1).
    epochs_run = int(metrics.get("epoch") or 0)
    return {
        "trial_id": trial_id,
        "model": train.model,
        "seed": train.seed,
        "lr": train.lr,
        "weight_decay": train.weight_decay,
        "batch_size": train.batch_size,
        "epochs_run": epochs_run,
        "stopped_early": result.error is None and epochs_run < config.epochs,
        # by whom: a trial that --patience stopped names its best epoch in its last report
        "stopped_by": None
        if result.error is not None or epochs_run >= config.epochs
        else "--patience"
        if metrics.get(STOPPED_EARLY)
        else "ASHA",
        "error": error_line(result.error) if result.error else None,
        # The kept checkpoint's validation figures, as val_score and val_loss (the last epoch's may be lower).
        "val_accuracy": (card["metrics"] if card else metrics).get("val_accuracy"),
        "val_macro_f1": (card["metrics"] if card else metrics).get("val_macro_f1"),
        "val_score": card["metrics"]["val_score"] if card else None,
        "val_loss": card["metrics"].get("val_loss") if card else None,
        "val_count": card["metrics"].get("val_count") if card else None,
        # what one validation image is worth in val_score (score_resolution), on this split's class mix
        "val_confusion_matrix": card["metrics"].get("val_confusion_matrix") if card else None,
        "train_images_per_s": metrics.get("train_images_per_s"),
        "best_checkpoint": str(checkpoint) if checkpoint else None,
        "best_epoch": card["epoch"] + 1 if card else None,
        "history": _history(checkpoints[-1][1] if checkpoints else None),
    }


HISTORY_KEYS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "val_score", "lr",
)  # fmt: skip


def _history(card: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every epoch of a trial's Train run, from its latest checkpoint's card (each card carries the run's
    history up to it, also across resumes), in HISTORY_KEYS."""
    if card is None:
        return []
    return [{key: row[key] for key in HISTORY_KEYS if key in row} for row in card["history"]]


def _tune_checkpoints(result: Any) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints Tune kept for a trial that trained in its own process (`trains_in_trial`), oldest
    first, as locations with their cards; [] for a trial whose TorchTrainer kept them (`_kept_checkpoints`)
    or that checkpointed nothing."""
    from cxrcore.train.trainer import kept_checkpoints

    return _with_cards(checkpoint for checkpoint, _ in kept_checkpoints(result))


def _kept_checkpoints(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints Ray Train kept for a run (a folder or URI), oldest first, as locations of the same
    kind with their cards; [] before the first.

    Train's record, not the folder's listing: a worker killed during a report can leave the checkpoint
    folder of an epoch that the resumed run trained again, a checkpoint outside the run's history.
    """
    from ray.train import Result

    try:
        result = Result.from_path(run_dir)
    except RuntimeError:  # the trial failed before its Train run started
        return []
    return _with_cards(checkpoint for checkpoint, _ in result.best_checkpoints or [])


def _with_cards(checkpoints: Iterable[Any]) -> list[tuple[str, dict[str, Any]]]:
    """Ray checkpoints as their locations (URIs where they are kept on an object store) with their cards,
    oldest first."""
    from cxrcore.checkpoint import load_card

    folders = [storage.uri(c.filesystem, c.path) for c in checkpoints]
    kept = [(folder, load_card(folder).to_dict()) for folder in folders]
    return sorted(kept, key=lambda item: int(item[1]["epoch"]))


def _evaluate_and_register(config: TuneConfig, registry: Any, checkpoint: str | Path, report: Path) -> Any:
    """Evaluate `checkpoint` on the test split into `report` and register both, once per experiment.

    A re-run resumes an experiment whose driver may have been killed after registering some models: a
    version with the same card and weights is already there, and the checkpoint is not registered
    again (nor evaluated again, while its report is in place).

    The test split is the one the checkpoint's trial held out: a dataset that changed since (`--data`
    ingested again, elsewhere than this machine's lock reaches) is refused, not scored as new data.
    """
    from cxrcore.checkpoint import load_card
    from cxrcore.data.ingest import read_report
    from cxrcore.evaluate.evaluation import evaluate_checkpoint

    trained_on = load_card(checkpoint).data.get("fingerprint")
    if trained_on and trained_on != (now := read_report(config.data)["fingerprint"]):
        raise ConfigError(
            f"{config.data} changed during this experiment: its trials trained on the dataset of fingerprint "
            f"{trained_on}, and it now holds {now} (ingested again?), whose test split is not the images "
            "they held out; nothing was evaluated or registered. Run the experiment again on the new data "
            "(another --name)"
        )
    registered = registry.registered_as(checkpoint)
    if registered is None or not (report / "metrics.json").is_file():
        evaluate_checkpoint(
            EvaluateConfig(checkpoint=str(checkpoint), data=config.data, out=str(report), split="test")
        )
    if registered is not None:
        log.info("%s was registered as %s before this run", checkpoint, registered.ref)
        return registered
    return registry.register(checkpoint, report=report)


def _pair_with_runner_up(best: dict[str, dict[str, Any]], work: Path) -> None:
    """Set the winner's `versus_runner_up`: on the test images both were scored on (their evaluations'
    predictions.csv, row for row), how many each got right that the other missed, and the exact McNemar
    p-value of that split. The winner is chosen on validation; this says whether the test split, which
    chose nothing, tells the two apart. Nothing is set where either file is missing or they differ in
    their images (an evaluation of an earlier version kept its report)."""
    import pandas as pd

    from cxrcore.evaluate.comparison import ranked_architectures

    ranked = ranked_architectures(best)
    if len(ranked) < 2:
        return
    (winner, _), (runner_up, _) = ranked[0], ranked[1]
    paths = [work / "reports" / model / "predictions.csv" for model in (winner, runner_up)]
    if not all(path.is_file() for path in paths):
        return
    a, b = (pd.read_csv(path, usecols=["file", "source", "label", "correct"]) for path in paths)
    same = ["file", "source", "label"]
    if len(a) != len(b) or not a[same].equals(b[same]):
        return
    right_a, right_b = a["correct"].astype(bool).to_numpy(), b["correct"].astype(bool).to_numpy()
    only_winner, only_runner_up = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    best[winner]["versus_runner_up"] = {
        "model": runner_up,
        "n": len(a),
        "only_this": only_winner,
        "only_other": only_runner_up,
        "mcnemar_p": mcnemar_exact(only_winner, only_runner_up),
    }


def _best_per_architecture(
    config: TuneConfig, trials: list[dict[str, Any]], registry: Any, work: Path, experiment: str | None = None
) -> dict[str, dict[str, Any]]:
    """Evaluate each architecture's best trial on the test split and register it with its report.

    Reports are written under `work`; `experiment` (default: `work`) is where they are kept.

    Where ingest held sources out, the test report's `source_holdout` block comes along: the comparison
    shows the held-out-source figures beside the random-split ones.
    """
    from cxrcore.evaluate.comparison import initial_weights_text
    from cxrcore.models import create_model

    # 'resnet' searches its depths as one architecture, as ASHA compares them (its best depth stands for
    # it): ranked apart, the depths ASHA had stopped at the grace epoch for the first's sake were
    # registered and compared with the others as rival architectures trained on half the epochs.
    named = config.model_names()
    best: dict[str, dict[str, Any]] = {}
    done = [trial for trial in trials if trial["best_checkpoint"] is not None]
    for name in dict.fromkeys(architecture(trial["model"], named) for trial in done):
        mine = [t for t in done if architecture(t["model"], named) == name]
        # a trial that failed keeps the checkpoints it made before: its architecture's best only where
        # none of its trials finished (said, registered, never promoted)
        chosen = best_by_validation([t for t in mine if not t.get("error")] or mine, dict)
        assert chosen is not None
        best[chosen["model"]] = chosen
    summary: dict[str, dict[str, Any]] = {}
    for model, trial in sorted(best.items()):
        report = work / "reports" / model
        version = _evaluate_and_register(config, registry, trial["best_checkpoint"], report)
        test = json.loads((report / "metrics.json").read_text())
        calibration = test.get("calibration") or {}
        parameters = sum(p.numel() for p in create_model(model).parameters())
        summary[model] = {
            **{
                k: trial[k]
                for k in ("trial_id", "lr", "weight_decay", "batch_size", "epochs_run", "val_score")
            },
            # val_score ties within one validation image are ranked on the loss (absent from older records)
            "val_loss": trial.get("val_loss"),
            # what stopped the trial, where every trial of the architecture failed: ranked last, not promoted
            "failed": trial.get("error"),
            # --repeats: the kept trial's seed, of how many its architecture was trained with
            "seed": trial.get("seed"),
            "seeds_trained": len({t.get("seed") for t in trials if t["model"] == model}),
            "val_count": trial.get("val_count"),
            "val_confusion_matrix": trial.get("val_confusion_matrix"),
            "ref": version.ref,
            "report": _published(report / "report.html", work, experiment or str(work)),
            "parameters": parameters,
            # what its weights started from: a comparison of a pretrained ResNet with an architecture
            # trained from scratch said nothing of the head start (a review, session 52)
            "initial_weights": initial_weights_text(version.card.data),
            "train_images_per_s": trial["train_images_per_s"],
            "test_accuracy": test["accuracy"],
            "test_macro_f1": test["macro_f1"],
            "test_macro_auroc": test["macro_auroc"],
            # A class with no test image has no F1 (None: a dash in the report, not 0.000).
            "test_per_class_f1": {
                name: row["f1"] if row["support"] else None for name, row in test["per_class"].items()
            },
            "confusion_matrix": test["confusion_matrix"],
            "temperature": calibration.get("temperature"),
            "test_ece": calibration.get("ece_after"),
            "test_ece_uncalibrated": calibration.get("ece_before"),
            "test_ece_floor": calibration.get("ece_floor_after"),
            "test_ece_floor_sd": calibration.get("ece_floor_sd_after"),
            "test_ece_floor_uncalibrated": calibration.get("ece_floor_before"),
            "test_ece_floor_uncalibrated_sd": calibration.get("ece_floor_sd_before"),
            "test_nll": calibration.get("nll_after"),
            "test_nll_uncalibrated": calibration.get("nll_before"),
            "best_epoch": trial["best_epoch"],
            "history": trial["history"],
            **({"source_holdout": test["source_holdout"]} if "source_holdout" in test else {}),
        }
    return summary


def architecture(model: str, named: list[str]) -> str:
    """The architecture a trial's model is compared as: a depth of 'resnet' where --models named 'resnet'
    (its depths are one architecture's trials, as ASHA compares them), else the model itself."""
    return "resnet" if model in RESNET_DEPTHS and "resnet" in named and model not in named else model


def needs_mask(model: str) -> bool:
    """Whether `model` takes a lung mask beside the image."""
    from cxrcore.models import get_model_entry

    return "mask" in get_model_entry(model).input_spec.channels


def takes_pretrained(model: str, choice: str = "auto") -> bool:
    """Whether a trial of `model` starts from the experiment's --pretrained weights: those with published
    ImageNet weights (the ResNets) do, and a cxr checkpoint goes to its own architecture's trials (a
    fine-tune); the others, tiny_resnet among them, train from scratch (`check_settings` says which)."""
    from cxrcore.models import get_model_entry
    from cxrcore.train.trainer import checkpoint_weights

    found = checkpoint_weights(choice) if choice.strip().lower() not in ("auto", "none", "hub") else None
    if found is not None:
        return bool(found[1].name == model)
    return get_model_entry(model).hub_weights


def trial_resources(config: TuneConfig) -> dict[str, float]:
    """What one running trial holds with one CPU per worker: its workers (Ray Train asks a GPU worker for
    its GPU alone, a CPU worker for one CPU) and a driver's CPU share, whether the trial fits a TorchTrainer
    or trains its one worker's loop in its own process (`trains_in_trial`), where the share pays for the
    data iterator and the reports. On the local cluster (its cores plus DATA_CPUS logical CPUs) that keeps
    the trials at once near the cores: 3 on 2 cores, 16 on 16."""
    if config.gpu:
        return {"CPU": TRIAL_DRIVER_CPUS, "GPU": config.workers_per_trial}
    return {"CPU": config.workers_per_trial + TRIAL_DRIVER_CPUS, "GPU": 0}


def trial_request(config: TuneConfig, cpus_per_worker: int) -> dict[str, float]:
    """The resources Tune reserves for each trial's own process (`tune.with_resources`): all the trial
    holds where it trains there (its worker's CPUs and the driver's share, or its GPU), else the driver's
    share (its TorchTrainer's workers reserve their own)."""
    if not trains_in_trial(config):
        return {"cpu": TRIAL_DRIVER_CPUS}
    if config.gpu:
        return {"cpu": TRIAL_DRIVER_CPUS, "gpu": config.workers_per_trial}
    return {"cpu": cpus_per_worker * config.workers_per_trial + TRIAL_DRIVER_CPUS}


def trial_worker_cpus(
    config: TuneConfig, resources: dict[str, float], trials: int, cores: int | None = None
) -> int:
    """CPUs (and torch threads) of each trial's Train worker: 1, except on the local cluster cxr started
    when fewer trials run at once than the cores allow, which then share the cores (3 trials of 1 worker
    on 16 cores: 5 each; on 2 cores, 1). Every trial's workers still fit at once: concurrent trials ×
    workers × CPUs ≤ cores, and the cluster counts more logical CPUs than cores. GPU sweeps and clusters
    joined by address keep 1. `cores`: those of the local cluster assumed (a dry run, which starts none)."""
    from cxrcore.runtime import local_core_limit

    cores = cores or local_core_limit()
    if config.gpu or cores is None or trials < 1:
        return 1
    concurrent = min(config.max_concurrent or max_concurrent_trials(config, resources), trials)
    return max(1, cores // (concurrent * config.workers_per_trial))


def trial_fit_note(
    config: TuneConfig, cpus_per_worker: int, total: dict[str, float], free: dict[str, float]
) -> str | None:
    """Where no trial can start now: a sentence saying why and what to do; None where one can. Raises
    ConfigError where a trial needs more than the local cluster cxr started will ever have.

    A trial the cluster cannot place waits, and Ray's "requesting resources" lines are off a quiet
    console: a tune job whose trial needed 2.1 CPUs of a 2-CPU cluster stayed RUNNING for good, printing
    nothing of it, and one beside a Serve app that held a CPU waited 3 minutes without a word.
    """
    from cxrcore.runtime import local_core_limit

    kind = "GPU" if config.gpu else "CPU"
    need = (
        float(config.workers_per_trial)
        if config.gpu
        else config.workers_per_trial * cpus_per_worker + TRIAL_DRIVER_CPUS
    )
    has, idle = float(total.get(kind, 0)), float(free.get(kind, 0))
    wanted = f"each trial needs {need:g} {kind}s ({config.workers_per_trial} worker(s) per trial"
    wanted += ")" if config.gpu else f" and its driver's {TRIAL_DRIVER_CPUS:g})"
    if not config.gpu and local_core_limit() is not None and need + DATA_TASK_CPUS > has + 1e-9:
        # it would start, then wait for good: its workers' data comes from Ray Data tasks that need a CPU
        raise ConfigError(
            f"{wanted} and the local Ray cluster has {has:g}, which leaves its data reads no CPU; use fewer "
            "--workers-per-trial"
        )
    if need > has + 1e-9:
        if local_core_limit() is not None:
            raise ConfigError(
                f"{wanted} and the local Ray cluster has {has:g}; use fewer --workers-per-trial"
            )
        return (
            f"{wanted} and the cluster has {has:g}: the trials wait until the autoscaler adds a node; on a "
            "cluster of fixed size they never start (stop this, and use fewer --workers-per-trial)"
        )
    if need > idle + 1e-9:
        return (
            f"{wanted} and {idle:g} of the cluster's {has:g} are free now (a Serve app or other jobs hold "
            "the rest): the first trial starts when enough are freed"
        )
    return None


def max_concurrent_trials(config: TuneConfig, resources: dict[str, float]) -> int:
    """As many trials as the cluster can give workers to at once (idle drivers waiting would only queue)."""
    held = trial_resources(config)
    if config.gpu:
        return max(1, int(resources.get("GPU", 0) // held["GPU"]))
    return max(1, int(resources.get("CPU", 1) // held["CPU"]))


def _trials_root(config: TuneConfig) -> str:
    return f"{config.out.rstrip('/')}/{config.name}-trials"
