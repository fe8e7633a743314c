"""Faults survived for real: a Ray Train worker SIGKILLed mid-run, the `cxr tune` driver SIGKILLed mid-sweep.

Each `cxr` command runs as a user runs it: its own process and session, its own local Ray (a short temp
dir of its own, token auth with the test's token). The kills are SIGKILLs of real pids: a RayTrainWorker
found through Ray's State API, and the driver's whole process group. Minutes on 2 cores, so `slow`:
run them with `pytest -m faults -rP` (-rP prints the measured figures).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cxrcore.metrics import best_by_validation, within_one_image
from cxrcore.registry import ModelRegistry
from tests.e2e.conftest import BIN, wait_until
from tests.http_client import HTTP
from tests.processes import command_line, live_processes, read_proc

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.faults]


@dataclass(frozen=True)
class LocalRay:
    """What a `cxr` command needs to start a local Ray of its own that the test can reach."""

    env: dict[str, str]
    token: str
    temp_dir: str


class Command:
    """A `cxr` command in its own session, so that its process group can be killed whole; output to a file."""

    def __init__(self, args: list[str], ray: LocalRay, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.ray = ray
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [str(BIN / "cxr"), *args],
                env={**ray.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"`cxr` exited early ({self.process.returncode}):\n{self.output()[-3000:]}")
        return True

    def dashboard(self) -> str | None:
        """The Ray dashboard URL the command printed (`cxr` says where it is before any work)."""
        found = re.search(r"Ray dashboard: (http://\S+)", self.output())
        return found.group(1) if found else None

    def kill(self) -> None:
        """SIGKILL to every process in the command's process group, as a pre-emption would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def leftovers(self) -> list[str]:
        """Live processes of this command's session, or carrying its Ray temp dir (Ray workers, raylet...)."""
        return [f"{pid}: {command_line(pid)[:120]}" for pid in self._processes()]

    def stop(self) -> None:
        """Kill what is left of the command, also when a test failed half-way (Ray's own processes too)."""
        if self.process.poll() is None:
            self.kill()
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _processes(self) -> list[int]:
        def ours(pid: int) -> bool:
            stat = read_proc(f"/proc/{pid}/stat").rpartition(")")[2].split()
            in_session = len(stat) > 3 and int(stat[3]) == self.process.pid
            return in_session or self.ray.temp_dir in read_proc(f"/proc/{pid}/environ")

        return live_processes(ours)


def alive_actors(dashboard: str, token: str, class_name: str) -> list[dict[str, Any]]:
    """The live actors of a class (pid, node_id...), from the State API of a Ray dashboard (its REST form)."""
    response = HTTP.get(
        f"{dashboard}/api/v0/actors",
        params={
            "filter_keys": ["class_name", "state"],
            "filter_predicates": ["=", "="],
            "filter_values": [class_name, "ALIVE"],
        },
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    response.raise_for_status()
    actors: list[dict[str, Any]] = response.json()["data"]["result"]["result"]
    return actors


def train_workers(command: Command) -> list[int]:
    """The pids of the live RayTrainWorker actors of the command's Ray."""
    dashboard = command.dashboard()
    if dashboard is None:
        return []
    return sorted(int(actor["pid"]) for actor in alive_actors(dashboard, command.ray.token, "RayTrainWorker"))


def cards(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Checkpoint folder name → card, for every finished checkpoint folder of a Train run."""
    found = {}
    for path in run_dir.glob("checkpoint_*/card.json"):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # being copied into place
    return found


def kept_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoint folders Ray Train itself kept for a run (its snapshot), oldest first."""
    from ray.train import Result

    try:
        kept = Result.from_path(str(run_dir)).best_checkpoints or []
    except RuntimeError:  # no snapshot yet
        return []
    return sorted(Path(checkpoint.path).name for checkpoint, _ in kept)


def tune_trials(experiment: Path) -> dict[str, Path]:
    """Trial id → folder, for the trials of a Tune experiment that train in their own process (one worker
    each, `tune.trains_in_trial`): Tune keeps their checkpoints in folders named
    `<trainable>_<experiment id>_<number>_<index>_<parameters>_<time>`."""
    found = {}
    for folder in experiment.glob("tune_driver_per_trial_*"):
        experiment_id, number = folder.name.removeprefix("tune_driver_per_trial_").split("_")[:2]
        found[f"{experiment_id}_{number}"] = folder
    return found


def tune_kept_checkpoints(experiment: Path) -> dict[str, list[str]]:
    """Trial id → the checkpoint folders Tune itself recorded for it (its experiment state), oldest
    first; {} before Tune saved its state."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(experiment)).trials
    except (ValueError, FileNotFoundError):  # no experiment state yet
        return {}
    return {
        trial.trial_id: sorted(
            Path(result.checkpoint.path).name
            for result in trial.run_metadata.checkpoint_manager.best_checkpoint_results
        )
        for trial in trials
    }


def tune_recorded_a_checkpoint(experiment: Path) -> bool:
    """Whether Tune's saved experiment state names a trial checkpoint (read as text: cheap to poll)."""
    for state in experiment.glob("experiment_state-*.json"):
        with contextlib.suppress(OSError):
            if "checkpoint_dir_name" in state.read_text():
                return True
    return False


def epochs_of(history: list[dict[str, Any]]) -> list[int]:
    return [int(row["epoch"]) for row in history]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[LocalRay]:
    token = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="cxr-f-", dir="/tmp")  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "RAY_TMPDIR": temp_dir,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    yield LocalRay(env=env, token=token, temp_dir=temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def synthetic_dataset(root: Path, env: dict[str, str], *ingest_args: str) -> str:
    """120 synthetic phantoms ingested at 64 px by `cxr data synth` and `cxr data ingest [ingest_args]`
    (e.g. --address) under `root`; the dataset's path."""
    for args in (
        ["data", "synth", str(root / "raw"), "--per-class", "30", "--seed", "3"],
        ["data", "ingest", str(root / "raw"), str(root / "dataset"), "--size", "64", *ingest_args],
    ):
        done = subprocess.run([str(BIN / "cxr"), *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return str(root / "dataset")


@pytest.fixture(scope="module")
def dataset(local_ray: LocalRay, tmp_path_factory: pytest.TempPathFactory) -> str:
    return synthetic_dataset(tmp_path_factory.mktemp("faults-data"), local_ray.env)


@pytest.mark.timeout(600)
def test_a_training_worker_killed_mid_run_resumes_from_the_last_checkpoint(
    dataset: str, local_ray: LocalRay, tmp_path: Path
) -> None:
    epochs = 20
    run_dir = tmp_path / "runs" / "killed"
    command = Command(
        [
            "train", "--data", dataset, "--model", "tiny_cnn_lstm", "--epochs", str(epochs),
            "--workers", "2", "--out", str(tmp_path / "runs"), "--name", "killed", "--pretrained", "none",
            "--max-failures", "1",
        ],
        local_ray,
        tmp_path / "train.log",
    )  # fmt: skip
    try:
        wait_until(lambda: command.running() and cards(run_dir), timeout=300, what="the first checkpoint")
        workers = wait_until(
            lambda: len(pids := train_workers(command)) == 2 and pids, timeout=60, what="2 train workers"
        )
        # The kill lands as the second checkpoint appears: rank 0 has written it and training goes on.
        before = wait_until(
            lambda: command.running() and len(found := cards(run_dir)) >= 2 and found,
            timeout=120,
            what="the second checkpoint",
            interval=0.02,
        )
        victim = workers[-1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        restarted = wait_until(
            lambda: len(pids := train_workers(command)) == 2 and not set(pids) & set(workers) and pids,
            timeout=120,
            what="a new worker group",
        )
        new_checkpoint = wait_until(
            lambda: set(cards(run_dir)) - set(before), timeout=120, what="a checkpoint after the restart"
        )
        recovered_s = time.monotonic() - killed_at
        assert command.process.wait(timeout=300) == 0, command.output()[-5000:]
    finally:
        command.stop()
    wait_until(lambda: not command.leftovers(), timeout=60, what="the run's Ray processes to exit")
    assert victim not in restarted and new_checkpoint
    resumed = check_resumed_run(run_dir, before, epochs, command.output())
    print(
        f"FIGURE train-worker-kill: SIGKILL of RayTrainWorker pid {victim} after epoch "
        f"{resumed.checkpointed} of {epochs}; resumed after epoch {resumed.after}; next checkpoint "
        f"{recovered_s:.1f} s after the kill; epochs lost 0, counted twice 0; best epoch "
        f"{resumed.best['epoch'] + 1} (val_score {resumed.best['metrics']['val_score']:.3f})"
    )


def test_sigterm_stops_a_training_run_as_ctrl_c_does(
    dataset: str, local_ray: LocalRay, tmp_path: Path
) -> None:
    """Kubernetes, Slurm and `ray job stop` end a driver with SIGTERM. Ray's own handler printed a C++ stack
    and aborted it (exit status 134, read as a crash); now the run stops at its last checkpoint, says so,
    and exits 143, as a shell reports SIGTERM."""
    run_dir = tmp_path / "runs" / "stopped"
    command = Command(
        [
            "train", "--data", dataset, "--model", "tiny_cnn_lstm", "--epochs", "30", "--workers", "1",
            "--out", str(tmp_path / "runs"), "--name", "stopped", "--pretrained", "none",
        ],
        local_ray,
        tmp_path / "train.log",
    )  # fmt: skip
    try:
        wait_until(lambda: command.running() and cards(run_dir), timeout=300, what="the first checkpoint")
        command.process.send_signal(signal.SIGTERM)  # the driver alone, as a pod's stop does first
        status = command.process.wait(timeout=120)
    finally:
        command.stop()
    output = command.output()
    assert status == 143, output[-3000:]
    assert "cxr: interrupted: training stopped" in output and "resume it" in output
    assert "SIGTERM received" not in output and "*** " not in output, output[-3000:]


@dataclass(frozen=True)
class Resumed:
    checkpointed: int
    """epochs the latest checkpoint before the fault had recorded"""
    after: int
    """the epoch the run resumed after"""
    best: dict[str, Any]
    """the card of the run's best checkpoint"""


def check_resumed_run(run_dir: Path, before: dict[str, dict[str, Any]], epochs: int, output: str) -> Resumed:
    """Check a run that a fault interrupted after the checkpoints `before` and that resumed: `epochs`
    epochs in all, each once, none before its last checkpoint trained again, the best still the best."""
    kept = [cards(run_dir)[name] for name in kept_checkpoints(run_dir)]
    final = max(kept, key=lambda card: card["epoch"])
    history = final["history"]
    # Every epoch once, in order: none lost to the fault, none counted twice by the restart.
    assert final["epoch"] == epochs - 1 and epochs_of(history) == list(range(1, epochs + 1))
    # Epochs before the checkpoint it resumed from were not trained again: their records are the ones
    # written before the fault, to the last digit (throughput included).
    latest_before = max(before.values(), key=lambda card: card["epoch"])["history"]
    resumed = next(
        (i for i, (old, new) in enumerate(zip(latest_before, history, strict=False)) if old != new),
        len(latest_before),
    )
    assert resumed >= 1 and len(latest_before) - resumed <= 1, (resumed, len(latest_before))
    # Every checkpoint Train kept lies on that history (a folder of an epoch trained again is not one).
    assert all(card["history"] == history[: len(card["history"])] for card in kept)
    # The best checkpoint is still the best by validation over the whole run: within one validation image
    # of the top score, and of the kept checkpoints the one best_by_validation picks.
    best = Path(re.search(r"best checkpoint: (\S+)", output).group(1))  # type: ignore[union-attr]
    best_card = json.loads((best / "card.json").read_text())
    top = max(kept, key=lambda card: card["metrics"]["val_score"])["metrics"]  # Train keeps the top 3
    assert top["val_score"] == max(row["val_score"] for row in history)
    assert within_one_image(best_card["metrics"], top)
    assert best_by_validation(kept, lambda card: card["metrics"])["epoch"] == best_card["epoch"]
    assert best_card["history"] == history[: best_card["epoch"] + 1]
    return Resumed(checkpointed=len(latest_before), after=resumed, best=best_card)


def registry_folders(root: Path) -> dict[str, list[str]]:
    """Model name → the version folders on disk, whatever state they are in."""
    return {
        model.name: sorted(v.name for v in model.iterdir() if not v.name.startswith(".tmp"))
        for model in sorted(root.iterdir())
        if model.is_dir() and not model.name.startswith(".")
    }


@pytest.mark.timeout(900)
def test_a_killed_tune_driver_resumes_the_same_trials_and_registers_each_model_once(
    dataset: str, local_ray: LocalRay, tmp_path: Path
) -> None:
    out, registry = tmp_path / "runs", tmp_path / "registry"
    args = [
        "tune", "--data", dataset, "--registry", str(registry), "--models", "tiny_cnn_lstm,tiny_dual_cnn",
        "--trials", "1", "--epochs", "4", "--grace-epochs", "4", "--segmenter-epochs", "1",
        "--pretrained", "none", "--out", str(out), "--name", "sweep",
    ]  # fmt: skip
    experiment = out / "sweep"

    def trial_checkpoints() -> dict[str, dict[str, dict[str, Any]]]:
        return {trial: cards(folder) for trial, folder in tune_trials(experiment).items()}

    started = time.monotonic()
    # Tune saves its experiment state, where a restored trial finds its latest checkpoint, every 10 s or
    # more; these trials take seconds. A trial resumes from the last checkpoint Tune recorded.
    first = Command(args, local_ray, tmp_path / "tune-1.log", env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        # Mid-sweep: the segmenter is trained and registered, a trial has checkpointed and Tune recorded it
        # in its experiment state, nothing compared.
        wait_until(
            lambda: first.running() and tune_recorded_a_checkpoint(experiment),
            timeout=600,
            what="Tune's record of a trial's first checkpoint",
            interval=0.2,
        )
        first.kill()
    finally:
        first.stop()
    killed_after_s = time.monotonic() - started
    wait_until(lambda: not first.leftovers(), timeout=60, what="the killed driver's Ray processes to exit")
    assert not (out / "sweep" / "comparison.json").exists()
    trials_before = set(trial_checkpoints())
    recorded = tune_kept_checkpoints(experiment)
    kept_before = {trial: recorded.get(trial, []) for trial in trials_before}
    cards_before = trial_checkpoints()
    assert registry_folders(registry) == {"tiny_unet": ["v1"]}, registry_folders(registry)

    started = time.monotonic()
    second = Command(args, local_ray, tmp_path / "tune-2.log")
    try:
        assert second.process.wait(timeout=600) == 0, second.output()[-5000:]
    finally:
        second.stop()
    resumed_s = time.monotonic() - started
    wait_until(lambda: not second.leftovers(), timeout=60, what="the re-run's Ray processes to exit")

    comparison = json.loads((out / "sweep" / "comparison.json").read_text())
    trials = {trial["trial_id"]: trial for trial in comparison["trials"]}
    # The same trials (Tune's ids: the experiment's id, then the trial's number), each run to its last
    # epoch exactly once.
    assert len(trials) == 2 and trials_before <= set(trials), (set(trials), trials_before)
    experiments = {trial_id.split("_")[0] for trial_id in set(trials) | trials_before}
    assert len(experiments) == 1, (set(trials), trials_before)
    assert sorted(t["model"] for t in trials.values()) == ["tiny_cnn_lstm", "tiny_dual_cnn"]
    for trial_id, trial in trials.items():
        assert trial["error"] is None and trial["epochs_run"] == 4 and not trial["stopped_early"], trial
        assert epochs_of(trial["history"]) == [1, 2, 3, 4], trial["history"]
        folder = tune_trials(experiment)[trial_id]
        final = max(cards(folder).values(), key=lambda card: card["epoch"])["history"]
        for name in kept_before.get(trial_id, []):  # checkpointed before the kill: not trained again
            kept = cards_before[trial_id][name]["history"]
            assert final[: len(kept)] == kept, (trial_id, name)
    # One version per model, each complete; the dual-channel model names the one segmenter version.
    assert registry_folders(registry) == {m: ["v1"] for m in ("tiny_cnn_lstm", "tiny_dual_cnn", "tiny_unet")}
    models = ModelRegistry(registry)
    for version in models.versions():
        folder = Path(version.uri)
        assert {"card.json", "model.safetensors", "report"} <= {p.name for p in folder.iterdir()}, folder
        assert (folder / "report" / "metrics.json").is_file()
    assert models.get("tiny_dual_cnn").card.segmenter == str(models.local_checkpoint("tiny_unet:1"))
    assert models.aliases() == {"production": comparison["production"]}
    resumed_trials = sum(1 for names in kept_before.values() if names)
    print(
        f"FIGURE tune-driver-kill: process group SIGKILLed {killed_after_s:.0f} s into the sweep "
        f"({resumed_trials} of 2 trials had checkpoints); the re-run finished in {resumed_s:.0f} s with "
        f"the same 2 trials, every epoch once, 3 models registered once each (v1), no leftover process"
    )
