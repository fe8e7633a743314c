"""Model registry: versions, aliases, errors, local and remote stores, and the `cxr models` commands."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

import cxrcore.registry
from cxrcore.checkpoint import ModelCard, load_card, load_model, save_checkpoint
from cxrcore.cli import main
from cxrcore.data.storage import resolve
from cxrcore.models import create_model, get_build_args, get_input_spec
from cxrcore.registry import Interrupted, ModelRegistry, RegistryError
from tests.unit.registry_race import (
    TIMEOUT,
    register_and_promote,
    register_once_at_once,
    register_until_killed,
    watch_registry,
)

NAME = "tiny_cnn_lstm"


def make_checkpoint(directory: Path, seed: int = 0, accuracy: float = 0.75) -> Path:
    torch.manual_seed(seed)
    model = create_model(NAME)
    card = ModelCard(
        model=get_build_args(model),
        input_spec=get_input_spec(model).to_dict(),
        data={"fingerprint": "f1n93rpr1n7"},
        metrics={"val_accuracy": accuracy, "val_macro_f1": accuracy - 0.1},
        history=[{"epoch": 1}, {"epoch": 2}],
    )
    return save_checkpoint(directory, model, card, train_state={"epoch": 2})


def make_report(directory: Path) -> Path:
    (directory / "plots").mkdir(parents=True)
    (directory / "report.html").write_text("<html></html>")
    (directory / "metrics.json").write_text('{"accuracy": 0.7}')
    (directory / "plots/roc.png").write_bytes(b"\x89PNG")
    (directory / "predictions.csv").write_text("file,label\npatient-0042.png,COVID\n")  # stays with the data
    return directory


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "run/checkpoint_000001")


def test_register_numbers_versions_and_copies_card_weights_and_report(
    tmp_path: Path, checkpoint: Path
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    first = registry.register(checkpoint)
    second = registry.register(checkpoint, report=make_report(tmp_path / "eval"))

    assert (first.ref, second.ref) == (f"{NAME}:1", f"{NAME}:2")
    assert first.uri == str(tmp_path / f"reg/{NAME}/v1") and first.report is None and first.aliases == ()
    assert files(Path(first.uri)) == {"card.json", "model.safetensors"}  # no train_state.pt
    assert files(Path(second.uri)) == {
        "card.json", "model.safetensors", "report/report.html", "report/metrics.json", "report/plots/roc.png"
    }  # fmt: skip
    assert second.report == f"{second.uri}/report"
    assert load_card(second.uri).version == f"{NAME}:2" == second.card.version
    assert load_card(checkpoint).version is None  # the source checkpoint is left alone
    assert [v.ref for v in registry.versions()] == [f"{NAME}:1", f"{NAME}:2"]
    assert registry.versions("dual_cnn") == []


def test_get_promote_and_aliases(tmp_path: Path, checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    registry.register(checkpoint, alias="staging")
    registry.register(checkpoint)
    assert registry.get(NAME).ref == f"{NAME}:2"  # a name means its latest version
    assert registry.get(f"{NAME}:1").ref == f"{NAME}:1"
    assert registry.get("staging").ref == f"{NAME}:1"

    promoted = registry.promote(NAME)  # pinned to the version that is latest now
    assert promoted.ref == f"{NAME}:2" and promoted.aliases == ("production",)
    assert registry.aliases() == {"production": f"{NAME}:2", "staging": f"{NAME}:1"}
    assert registry.promote("staging", "production").aliases == ("production", "staging")
    assert {v.ref: v.aliases for v in registry.versions()} == {
        f"{NAME}:1": ("production", "staging"),
        f"{NAME}:2": (),
    }
    assert not list((tmp_path / "reg").glob("*.tmp-*"))


def test_unknown_refs_and_bad_aliases_explain_themselves(tmp_path: Path, checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "nowhere")
    assert registry.versions() == [] and registry.aliases() == {}
    with pytest.raises(RegistryError, match=r"no registry at .*nowhere \(no such folder here\)"):
        registry.get("production")
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(RegistryError, match=r"registry .*nowhere is empty"):
        registry.get("production")

    registry.register(checkpoint, alias="production")
    with pytest.raises(KeyError) as error:
        registry.get("tiny_cnn_lsmt")
    message = str(error.value)
    assert message.startswith("unknown model reference 'tiny_cnn_lsmt'; did you mean 'tiny_cnn_lstm'?")
    assert f"production -> {NAME}:1" in message
    with pytest.raises(RegistryError, match=f"{NAME} has no version 7; its versions: 1"):
        registry.get(f"{NAME}:7")
    with pytest.raises(RegistryError, match="expected an alias, NAME or NAME:N"):
        registry.get(f"{NAME}:latest")
    with pytest.raises(RegistryError, match="did you mean 'production'"):
        registry.promote("prodution", "staging")
    for bad in ("Prod", "1st", "a b", "x:1", ""):
        with pytest.raises(RegistryError, match=f"bad alias '{bad}': use lowercase letters"):
            registry.promote(NAME, bad)
    with pytest.raises(ValueError, match="bad alias"):  # input checks may catch it as a ValueError
        registry.register(checkpoint, alias="Prod")
    with pytest.raises(RegistryError, match="is also a model name"):
        registry.promote(NAME, NAME)
    assert registry.aliases() == {"production": f"{NAME}:1"} and len(registry.versions()) == 1
    with pytest.raises(FileNotFoundError, match="is not a cxr checkpoint"):
        registry.register(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"report folder .* not found"):
        registry.register(checkpoint, report=tmp_path / "no-report")

    (tmp_path / "nowhere/aliases.json").write_text(json.dumps({"old": "dual_cnn:4"}))
    with pytest.raises(RegistryError, match="alias 'old' points to dual_cnn:4, which is not in the registry"):
        registry.get("old")


def test_unfinished_version_is_skipped_and_its_number_not_reused(tmp_path: Path, checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    registry.register(checkpoint)
    (tmp_path / f"reg/{NAME}/v2").mkdir()  # a registration still being written (no card.json yet)
    assert [v.ref for v in registry.versions()] == [f"{NAME}:1"]
    assert registry.register(checkpoint).ref == f"{NAME}:3"


def test_a_registration_killed_midway_is_listed_then_freed_and_its_number_stays_used(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "reg"
    registry = ModelRegistry(root)
    registry.register(checkpoint)
    context = multiprocessing.get_context("spawn")
    copying, never = context.Event(), context.Event()
    process = context.Process(target=register_until_killed, args=(str(root), str(checkpoint), copying, never))
    process.start()
    try:
        assert copying.wait(TIMEOUT), "the registration never reached its weights copy"
        # While it copies, no age makes clean take its folder: it holds the folder's lock.
        assert registry.clean(0) == [] and registry.clean(0, dry_run=True) == []
        assert main(["models", "clean", "--registry", str(root), "--older-than", "0"]) == 0
        assert f"kept {NAME}/v2: an unfinished registration" in (out := capsys.readouterr().out)
        assert "a registration is writing it now" in out
        assert not (root / f"{NAME}/v2/.interrupted").exists()
    finally:
        process.kill()  # SIGKILL: no cleanup handler runs
        process.join(TIMEOUT)
    assert process.exitcode == -9
    weights = (checkpoint / "model.safetensors").stat().st_size
    assert (root / f"{NAME}/v2/model.safetensors").stat().st_size == weights // 2  # the debris

    assert [v.ref for v in registry.versions()] == [f"{NAME}:1"]  # never visible as a version
    with pytest.raises(RegistryError, match=r"no version 2 \(its folder holds an unfinished registration"):
        registry.get(f"{NAME}:2")
    [left] = registry.interrupted()
    assert (left.name, left.version, left.files, left.bytes) == (NAME, 2, 1, weights // 2)
    assert left.age_s is not None and 0 <= left.age_s < TIMEOUT
    assert main(["models", "list", "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}/v2: an unfinished registration (1 file," in out and "`cxr models clean`" in out

    # The default age spares a registration that may still be running; --dry-run frees nothing.
    assert main(["models", "clean", "--registry", str(root)]) == 0
    assert "freed 0 unfinished registrations" in capsys.readouterr().out
    assert main(["models", "clean", "--registry", str(root), "--older-than", "0", "--dry-run"]) == 0
    assert f"would free {NAME}/v2" in capsys.readouterr().out
    assert (root / f"{NAME}/v2/model.safetensors").is_file()
    assert main(["models", "clean", "--registry", str(root), "--older-than", "0s"]) == 0
    assert f"freed {NAME}/v2" in capsys.readouterr().out
    assert files(root / f"{NAME}/v2") == {".interrupted"}  # a tombstone keeps the number used
    assert registry.interrupted() == [] and registry.clean(0) == []

    assert registry.register(checkpoint).ref == f"{NAME}:3"
    assert [v.ref for v in registry.versions()] == [f"{NAME}:1", f"{NAME}:3"]
    assert main(["models", "list", "--registry", str(root)]) == 0
    assert "unfinished" not in capsys.readouterr().out
    assert main(["models", "list", "--registry", str(root), "--name", "nosuch"]) == 1  # a typo, not a listing
    assert f"cxr: error: no versions of nosuch in {root}; it holds {NAME}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["models", "clean", "--registry", str(root), "--older-than", "soon"])
    assert exit_.value.code == 2
    assert "expected an age such as 90s, 30m or 1h, got 'soon'" in capsys.readouterr().err


def test_local_checkpoint_loads_identical_weights(tmp_path: Path, checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    registry.register(checkpoint, alias="production")
    local = registry.local_checkpoint("production")
    assert local == tmp_path / f"reg/{NAME}/v1"  # a local registry serves the version folder itself
    original, _ = load_model(checkpoint)
    loaded, card = load_model(local)
    assert card.version == f"{NAME}:1"
    for key, value in original.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_file_uri_root_works_like_a_path(tmp_path: Path, checkpoint: Path) -> None:
    by_uri = ModelRegistry(f"file://{tmp_path}/reg")
    version = by_uri.register(checkpoint, report=make_report(tmp_path / "eval"), alias="production")
    assert version.uri == f"file://{tmp_path}/reg/{NAME}/v1" and version.report == f"{version.uri}/report"
    assert by_uri.local_checkpoint("production") == tmp_path / f"reg/{NAME}/v1"
    by_path = ModelRegistry(tmp_path / "reg")
    assert [(v.ref, v.aliases) for v in by_path.versions()] == [(f"{NAME}:1", ("production",))]
    assert by_path.get("production").card == by_uri.get("production").card


def remote_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A "mem://" root the registry treats as remote (no local paths, no exclusive mkdir), kept in tmp."""
    store = tmp_path / "store"
    store.mkdir()

    def fake_resolve(location: str) -> tuple[pafs.FileSystem, str]:
        if location.startswith("mem://"):
            return pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem()), location[len("mem://") :]
        return resolve(location)

    monkeypatch.setattr(cxrcore.registry, "resolve", fake_resolve)
    return "mem://reg"


def test_remote_registry_downloads_a_cached_copy(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = remote_root(tmp_path, monkeypatch)
    registry = ModelRegistry(remote, cache_dir=tmp_path / "cache")
    version = registry.register(checkpoint, report=make_report(tmp_path / "eval"), alias="production")
    assert version.uri == f"{remote}/{NAME}/v1"
    stored = tmp_path / f"store/reg/{NAME}/v1"
    assert files(stored) == {
        "card.json",
        "model.safetensors",
        "report/report.html",
        "report/metrics.json",
        "report/plots/roc.png",
    }  # fmt: skip  (the claim marker is gone)

    local = registry.local_checkpoint("production")
    assert local == tmp_path / f"cache/mem/reg/{NAME}/v1"
    assert files(local) == {"card.json", "model.safetensors"}
    assert registry.local_checkpoint(f"{NAME}:1") == local  # the finished copy is reused
    original, _ = load_model(checkpoint)
    loaded, _ = load_model(local)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in original.state_dict().items())


def test_a_remote_registrys_copies_go_under_xdg_cache_home_where_it_is_set(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HPC node's home is small and its scratch space is named by XDG_CACHE_HOME: the copies go there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "scratch"))
    registry = ModelRegistry(remote_root(tmp_path, monkeypatch))
    registry.register(checkpoint)
    assert registry.local_checkpoint(f"{NAME}:1") == tmp_path / f"scratch/cxr/registry/mem/reg/{NAME}/v1"


@pytest.mark.parametrize("store", ["local", "remote"])
def test_racing_registrations_get_distinct_versions(
    tmp_path: Path, checkpoint: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(remote_root(tmp_path, monkeypatch) if store == "remote" else tmp_path / "reg")
    with ThreadPoolExecutor(4) as pool:
        numbers = sorted(pool.map(lambda _: registry.register(checkpoint).version, range(8)))
    assert len(set(numbers)) == 8
    if store == "local":  # an object store may skip a number when two racers both back off
        assert numbers == list(range(1, 9))
    versions = registry.versions()
    assert [v.version for v in versions] == numbers
    assert all(v.card.version == v.ref and Path(v.uri).name == f"v{v.version}" for v in versions)


def test_processes_registering_one_checkpoint_at_once_make_one_version(
    tmp_path: Path, checkpoint: Path
) -> None:
    writers, root = 4, tmp_path / "reg"
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(writers), context.Queue()
    processes = [
        context.Process(target=register_once_at_once, args=(str(root), str(checkpoint), w, start, results))
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = sorted(_collect(results, processes, writers))
    finally:
        for process in processes:
            process.join(timeout=TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
    assert {ref for _, ref, _ in outcomes} == {f"{NAME}:1"}  # without the lock: 1, 2, 3 and 4
    assert sorted(found for _, _, found in outcomes) == [False] + [True] * (writers - 1)
    assert [v.ref for v in ModelRegistry(root).versions()] == [f"{NAME}:1"]


def test_processes_registering_and_promoting_at_once(tmp_path: Path, checkpoint: Path) -> None:
    """4 processes × 5 registrations, each followed by two promotions, while a reader polls."""
    writers, count = 4, 5
    root = tmp_path / "reg"
    context = multiprocessing.get_context("spawn")
    start, stop, results = context.Barrier(writers + 1), context.Event(), context.Queue()
    processes = [
        context.Process(
            target=register_and_promote, args=(str(root), str(checkpoint), w, count, start, results)
        )
        for w in range(writers)
    ]
    processes.append(context.Process(target=watch_registry, args=(str(root), start, stop, results)))
    for process in processes:
        process.start()
    finished = False
    try:
        numbers = dict(_collect(results, processes, writers))
        stop.set()
        [(_, reads, problems)] = _collect(results, processes, 1)
        finished = True
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=TIMEOUT if finished else 0)  # after a failure the rest wait at `start`
            if process.is_alive():
                process.kill()
                process.join()
    assert [p.exitcode for p in processes] == [0] * (writers + 1)

    assert sorted(n for mine in numbers.values() for n in mine) == list(range(1, writers * count + 1))
    assert all(mine == sorted(mine) for mine in numbers.values())
    assert reads > 0 and problems == []  # never torn, never pointing at a half-written version
    registry = ModelRegistry(root)
    last = {w: f"{NAME}:{mine[-1]}" for w, mine in numbers.items()}
    aliases = registry.aliases()
    assert {a: t for a, t in aliases.items() if a != "production"} == {f"writer-{w}": last[w] for w in last}
    assert aliases["production"] in last.values()  # each writer's last move was to promote its last version
    assert [v.ref for v in registry.versions()] == [f"{NAME}:{n}" for n in range(1, writers * count + 1)]
    assert all(v.card.version == v.ref for v in registry.versions())
    assert not list(root.rglob("*.tmp-*"))


def _collect(results: Any, processes: list[Any], count: int) -> list[Any]:
    """`count` results from the queue; fails as soon as a process dies with an error, or at TIMEOUT."""
    collected: list[Any] = []
    deadline = time.monotonic() + TIMEOUT
    while len(collected) < count:
        try:
            collected.append(results.get(timeout=0.5))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            assert not failed, f"a registry process failed (exit codes {failed}); its traceback is above"
            assert time.monotonic() < deadline, f"no result after {TIMEOUT:.0f} s"
    return collected


def test_cli_models_list_show_promote(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = str(tmp_path / "reg")
    assert main(["models", "list", "--registry", reg]) == 2  # a mistyped path is not an empty registry
    assert f"--registry: no registry at {reg} (no such folder here)" in capsys.readouterr().err
    (tmp_path / "reg").mkdir()
    assert main(["models", "list", "--registry", reg]) == 0
    assert "is empty" in capsys.readouterr().out
    registry = ModelRegistry(reg)
    report = make_report(tmp_path / "eval")
    tested = {"accuracy": 0.7, "macro_f1": 0.55, "n": 40}
    tested["evaluated"] = {"split": "test", "relation": "internal"}
    (report / "metrics.json").write_text(json.dumps(tested))
    registry.register(checkpoint, report=report)
    registry.register(make_checkpoint(tmp_path / "other", seed=1, accuracy=0.875), alias="production")

    assert main(["models", "list", "--registry", reg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ref", "aliases", "created", "val", "acc", "val", "F1", "val", "dice", "test",
                                "acc", "(n)", "test", "F1", "data", "fingerprint"]  # fmt: skip
    assert lines[2].split()[0] == f"{NAME}:1" and lines[2].split()[-7:] == [
        "0.750", "0.650", "-", "0.700", "(40)", "0.550", "f1n93rpr1n7",
    ]  # fmt: skip
    assert lines[3].split()[:2] == [f"{NAME}:2", "production"] and "0.875" in lines[3]
    assert lines[3].split()[-3:-1] == ["-", "-"]  # registered without a test report

    monkeypatch.setenv("CXR_REGISTRY", reg)
    assert main(["models", "promote", f"{NAME}:1"]) == 0
    assert capsys.readouterr().out.strip() == f"production: {NAME}:2 -> {NAME}:1"
    assert main(["models", "promote", f"{NAME}:1", "--alias", "canary"]) == 0
    assert capsys.readouterr().out.strip() == f"canary: (none) -> {NAME}:1"

    assert main(["models", "show", "production", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ref"] == f"{NAME}:1" and shown["aliases"] == ["canary", "production"]
    assert shown["history_length"] == 2 and "history" not in shown["card"]
    assert shown["paths"]["report"] == str(tmp_path / f"reg/{NAME}/v1/report")
    assert shown["card"]["version"] == f"{NAME}:1" and shown["card"]["metrics"]["val_accuracy"] == 0.75
    # the registered test figures beside the card's validation ones (a report without its matrix: no interval)
    assert shown["test"]["accuracy"] == 0.7 and shown["test"]["images"] == 40
    assert shown["test"]["accuracy_ci95"] is None and shown["test"]["beats_commonest_class"] is None
    assert main(["models", "show", f"{NAME}:1"]) == 0
    assert "test: accuracy 0.700 (95% CI -) on 40 images of its dataset's test split, macro-F1 0.550" in (
        capsys.readouterr().out
    )
    assert main(["models", "show", NAME]) == 0
    text = capsys.readouterr().out
    assert f"ref: {NAME}:2" in text and "history: 2 epochs" in text and "report: -" in text
    assert "test: - (registered without an evaluation report" in text

    assert main(["models", "show", "prodution"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxr: error: unknown model reference 'prodution'; did you mean 'production'?")
    assert len(err.splitlines()) == 1
    assert main(["models", "promote", NAME, "--alias", "Prod"]) == 2
    assert "cxr: error: bad alias 'Prod'" in capsys.readouterr().err
    monkeypatch.delenv("CXR_REGISTRY")
    assert main(["models", "list"]) == 2
    assert "pass --registry or set CXR_REGISTRY" in capsys.readouterr().err


def test_the_lung_segmenter_cannot_become_production(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr models promote tiny_unet:1` exited 0, and `cxr serve` then failed its deployment three times with
    a 48-line traceback: production is the classifier Serve answers with."""
    model = create_model("tiny_unet")
    card = ModelCard(model=get_build_args(model), input_spec=get_input_spec(model).to_dict())
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(save_checkpoint(tmp_path / "unet", model, card))
    assert main(["models", "promote", "tiny_unet:1", "--registry", str(tmp_path / "registry")]) == 2
    error = capsys.readouterr().err
    assert "tiny_unet:1 is a segment model (the lung segmenter), not a classifier" in error
    assert registry.aliases() == {}
    assert registry.promote("tiny_unet:1", "segmenter").aliases == ("segmenter",)  # another alias is its own


def test_cxr_models_register_brings_a_dual_channel_checkpoints_segmenter_along(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """There was no command to register a `cxr train` checkpoint; through the Python API a dual-channel one
    kept its training run's segmenter path, and serving it failed once that run was cleaned up."""
    import shutil

    from cxrcore.cli import main
    from tests.e2e.uploads import write_checkpoints

    checkpoints = write_checkpoints(tmp_path / "runs")
    reg = str(tmp_path / "reg")
    assert main(["models", "register", str(checkpoints.dual), "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert "registered its lung segmenter" in out and "as tiny_unet:1" in out and "as tiny_dual_cnn:1" in out
    registry = ModelRegistry(reg)
    assert registry.get("tiny_dual_cnn:1").card.segmenter == str(registry.local_checkpoint("tiny_unet:1"))
    # Again: found, not registered twice; an alias moves to it.
    register = ["models", "register", str(checkpoints.dual), "--registry", reg]
    assert main([*register, "--alias", "production"]) == 0
    assert "registered already, as tiny_dual_cnn:1" in capsys.readouterr().out
    assert [v.ref for v in registry.versions()] == ["tiny_dual_cnn:1", "tiny_unet:1"]
    assert registry.get("production").ref == "tiny_dual_cnn:1"
    shutil.rmtree(checkpoints.unet)  # the training run's segmenter, cleaned up: the registry has its own
    registry.promote("tiny_dual_cnn:1", "staging")
    assert main(["models", "register", str(checkpoints.cnn_lstm), "--registry", reg, "--report", "nope"]) == 2
    assert "report folder nope not found" in capsys.readouterr().err
    assert main(["models", "register", str(tmp_path / "none"), "--registry", reg]) == 2


def test_from_python_a_checkpoint_registers_once_and_a_moved_registry_still_serves(tmp_path: Path) -> None:
    """`register` stores what it is given (a second call, a second version; the card's training-run
    segmenter folder kept); `register_once` does what `cxr models register` does, and `from_registry` finds
    a dual-channel version's segmenter in a registry moved elsewhere, as `cxr serve` does."""
    import shutil

    from cxrcore.inference import Predictor
    from tests.conftest import xray
    from tests.e2e.uploads import write_checkpoints

    checkpoints = write_checkpoints(tmp_path / "runs")
    registry = ModelRegistry(tmp_path / "reg")
    done = registry.register_once(checkpoints.dual, alias="production")
    assert (done.version.ref, done.found, done.segmenter_registered) == ("tiny_dual_cnn:1", False, True)
    assert done.segmenter is not None and done.segmenter.ref == "tiny_unet:1"
    again = registry.register_once(checkpoints.dual)
    assert (again.version.ref, again.found, again.segmenter_registered) == ("tiny_dual_cnn:1", True, False)
    shutil.rmtree(checkpoints.unet)
    shutil.move(tmp_path / "reg", tmp_path / "moved")
    predictor = Predictor.from_registry(tmp_path / "moved")
    assert predictor.card.name == "tiny_dual_cnn" and predictor.segmenter is not None
    assert predictor.predict_proba([xray(1, 64)]).shape == (1, 4)


def test_a_copied_registry_reads_its_own_segmenter_and_refuses_one_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy beside its original read the original's segmenter folder (the card names it by its place), so
    a copy without the segmenter was promoted and served here, and failed where it was copied to."""
    import shutil

    from cxrcore.inference import Predictor
    from tests.e2e.uploads import write_checkpoints

    checkpoints = write_checkpoints(tmp_path / "runs")
    original = ModelRegistry(tmp_path / "reg")
    original.register_once(checkpoints.dual, alias="production")
    shutil.copytree(tmp_path / "reg", tmp_path / "copy")
    copy = ModelRegistry(tmp_path / "copy")
    named = copy.get("production").card.segmenter
    assert named == str(tmp_path / "reg" / "tiny_unet" / "v1")  # the original's folder, by its place
    assert copy.segmenter_checkpoint(named, of="tiny_dual_cnn:1") == tmp_path / "copy" / "tiny_unet" / "v1"
    assert original.segmenter_checkpoint(named, of="tiny_dual_cnn:1") == Path(named)
    assert Predictor.from_registry(copy).segmenter is not None
    assert main(["models", "show", "production", "--registry", str(tmp_path / "copy")]) == 0
    assert f"segmenter: {tmp_path / 'copy' / 'tiny_unet' / 'v1'}\n" in capsys.readouterr().out  # the one read

    shutil.rmtree(tmp_path / "copy" / "tiny_unet")  # a copy without its segmenter, the original beside it
    refused = r"of which the registry \S*copy is a copy without it: copy tiny_unet/v1"
    with pytest.raises(RegistryError, match=refused):
        copy.promote("tiny_dual_cnn:1", "staging")
    with pytest.raises(RegistryError, match="a copy without it"):
        Predictor.from_registry(copy)
    assert Predictor.from_registry(original).segmenter is not None  # the original is as it was
    # A card naming another registry's different version of that name reads that folder, as it names.
    other = ModelRegistry(tmp_path / "other")
    other.register(make_checkpoint(tmp_path / "c1"))
    shutil.copytree(tmp_path / "reg" / "tiny_unet", tmp_path / "other" / "tiny_unet")
    (tmp_path / "other" / "tiny_unet" / "v1" / "card.json").write_text("{}")  # not the same version
    assert other.segmenter_checkpoint(named, of="tiny_dual_cnn:1") == Path(named)


def test_a_registry_that_is_a_file_says_so(tmp_path: Path) -> None:
    """`cxr serve --registry afile.txt` answered pyarrow's "Cannot list directory ... [errno 20]"."""
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(RegistryError, match=r"afile.txt is a file, not a registry folder$"):
        ModelRegistry(tmp_path / "afile.txt").get("production")


def test_weights_cut_short_are_neither_registered_nor_promoted(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint copy killed midway leaves its weights cut short: registered and promoted, production
    pointed at a model `cxr serve` failed on 30 s later."""
    import shutil

    from cxrcore.checkpoint import safetensors_problem

    root, damaged = tmp_path / "reg", tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    weights = damaged / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("rb") as stream:
        assert safetensors_problem(stream, size) is None
    with weights.open("r+b") as stream:
        stream.truncate(size // 2)
    registry = ModelRegistry(root)
    with pytest.raises(
        RegistryError, match=rf"weights .* cannot be loaded \(cut short: {size // 2:,} of the"
    ):
        registry.register(damaged)
    assert registry.versions() == [] and registry.interrupted() == []  # refused before a number is taken
    assert main(["models", "register", str(damaged), "--registry", str(root)]) == 2
    assert "so they are not registered; copy the checkpoint again" in capsys.readouterr().err

    good = registry.register(checkpoint)
    version_weights = root / NAME / f"v{good.version}" / "model.safetensors"
    version_weights.write_bytes(version_weights.read_bytes()[:-1])  # damaged in the registry since
    with pytest.raises(RegistryError, match="so they are not promoted; register the checkpoint again"):
        registry.promote(good.ref)
    assert registry.aliases() == {}
    for junk in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", b"\xff" * 8 + b"x"):
        weights.write_bytes(junk)
        with weights.open("rb") as stream:
            assert safetensors_problem(stream, len(junk)) is not None


def test_clean_never_frees_a_version_finished_after_it_was_listed(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clean lists the unfinished folders, then locks each: a registration that finished in between (a
    wide gap behind 1,200 leftovers) had its version emptied while both commands said they succeeded."""
    registry = ModelRegistry(tmp_path / "reg")
    version = registry.register(checkpoint)
    listed_before = [
        Interrupted(name=NAME, version=version.version, uri=version.uri, files=1, bytes=1, age_s=9e9)
    ]
    monkeypatch.setattr(registry, "interrupted", lambda name=None: listed_before)
    assert registry.clean(0) == []
    assert [v.ref for v in registry.versions()] == [version.ref]
    assert files(tmp_path / "reg" / NAME / "v1") == {"card.json", "model.safetensors"}


def test_a_registration_waiting_for_anothers_copy_says_so(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Registrations into one registry take turns; one waiting for a 600 MB copy ahead had said nothing."""
    import subprocess
    import sys

    root = tmp_path / "reg"
    hold = (
        "import fcntl, os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
        "d = os.open(os.path.join(sys.argv[1], '.register.lock'), os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(d, fcntl.LOCK_EX); os.pwrite(d, b'pid 4242 on elsewhere', 0); "
        "print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done: list[Any] = []
        thread = threading.Thread(target=lambda: done.append(ModelRegistry(root).register_once(checkpoint)))
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while "waiting for a registration" not in capsys.readouterr().err:
            assert time.monotonic() < deadline and not done, "it neither waited nor said so"
            time.sleep(0.05)
        assert not done  # still waiting
    finally:
        holder.kill()
        holder.wait(timeout=30)
    thread.join(TIMEOUT)
    assert done and done[0].version.ref == f"{NAME}:1"


def test_a_version_records_its_weights_and_refuses_weights_replaced_under_it(tmp_path: Path) -> None:
    """An audit (session 47): weights copied over a version's were served under its name, promoted and
    evaluated with nothing said; the HTTP answer named the version, not the weights."""
    import hashlib
    import shutil

    registry = ModelRegistry(tmp_path / "reg")
    version = registry.register(make_checkpoint(tmp_path / "a", seed=0))
    stored = Path(registry.local_checkpoint(version.ref)) / "model.safetensors"
    assert version.card.weights_sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert version.card.registered_at is not None and version.card.software["ray"]
    assert version.card.registered_from == os.path.abspath(tmp_path / "a")  # its run's checkpoint
    assert registry.register_once(tmp_path / "a").found  # the same checkpoint is still found as v1
    shutil.copy(make_checkpoint(tmp_path / "b", seed=1) / "model.safetensors", stored)
    for load in (lambda: registry.local_checkpoint(version.ref), lambda: registry.promote(version.ref)):
        with pytest.raises(RegistryError, match=r"not the ones it was registered with .* copy them back"):
            load()
    assert registry.aliases() == {}
    # The version's folder served or evaluated as a checkpoint folder, without the registry (a verifier:
    # it answered with the copied weights while the HTTP answer named the recorded ones).
    from cxrcore.checkpoint import WeightsChangedError

    with pytest.raises(WeightsChangedError, match=r"not the weights its card records .* copy them back"):
        load_model(stored.parent)


def test_the_same_weights_are_the_same_file(tmp_path: Path) -> None:
    """Two saves of equal weights hashed otherwise about half the time: safetensors wrote its metadata map in
    a random order, and a faithful retrain failed a hash comparison."""
    folders = [make_checkpoint(tmp_path / str(i), seed=3) for i in range(6)]
    assert len({(folder / "model.safetensors").read_bytes() for folder in folders}) == 1


def test_every_move_of_an_alias_is_kept_with_when_and_by_whom(tmp_path: Path) -> None:
    """An audit (session 47): a rollback left no trace; aliases.json holds only the present."""
    registry = ModelRegistry(tmp_path / "reg")
    first = registry.register(make_checkpoint(tmp_path / "a", seed=0))
    second = registry.register(make_checkpoint(tmp_path / "b", seed=1))
    for ref in (first.ref, second.ref, second.ref, first.ref):  # a promotion, an update, a repeat, a rollback
        registry.promote(ref)
    moves = [(m["alias"], m["from"], m["to"]) for m in registry.history()]
    assert moves == [
        ("production", None, first.ref),
        ("production", first.ref, second.ref),
        ("production", second.ref, first.ref),
    ]  # the repeat moved nothing
    assert all(m["time"] and m["user"] and m["host"] and m["cxr"] for m in registry.history())
    with open(tmp_path / "reg" / "aliases.log.jsonl", "a") as stream:
        stream.write('{"time": "2026-12-05T15:')  # a line a kill cut short is left out
    assert len(registry.history()) == 3


def test_cxr_models_history_prints_every_move(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    first = registry.register(make_checkpoint(tmp_path / "a", seed=0))
    assert main(["models", "history", "--registry", str(tmp_path / "reg")]) == 1  # none yet
    assert "no move of an alias is recorded" in capsys.readouterr().err
    registry.promote(first.ref)
    registry.promote(first.ref, "staging")
    assert main(["models", "history", "--registry", str(tmp_path / "reg"), "--alias", "production"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["time", "alias", "from", "to", "user", "host", "cxr"] and len(lines) == 3
    assert lines[2].split()[1:4] == ["production", "-", first.ref]
    assert main(["models", "history", "--registry", str(tmp_path / "reg"), "--json"]) == 0
    moves = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [move["alias"] for move in moves] == ["production", "staging"]


def test_a_damaged_or_other_report_never_stops_a_version_serving_and_says_why_it_has_no_test_figures(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A registered report's metrics.json cut short had stopped `cxr serve` ("Expecting ',' delimiter",
    naming no file) and crashed `cxr models show`; one of external data was said not to be there at all."""
    from serve.deployments import resolve_model

    reg = str(tmp_path / "reg")
    registry = ModelRegistry(reg)
    external = make_report(tmp_path / "external")
    tested = {"accuracy": 0.7, "n": 40, "evaluated": {"split": "all", "relation": "external"}}
    (external / "metrics.json").write_text(json.dumps(tested))
    first = registry.register(checkpoint, report=external)
    assert main(["models", "show", first.ref, "--registry", reg]) == 0
    assert "test: - (its registered report scores the all split of external data, not the test split of" in (
        capsys.readouterr().out
    )
    (Path(first.report or "") / "metrics.json").write_text('{"accuracy": 0.7, "n"')  # cut short
    assert main(["models", "show", first.ref, "--registry", reg]) == 0
    assert "test: - (its report's metrics.json cannot be read (JSONDecodeError" in capsys.readouterr().out
    assert main(["models", "show", first.ref, "--registry", reg, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["test"] is None and shown["test_missing"].startswith("its report's metrics.json cannot")
    assert main(["models", "list", "--registry", reg]) == 0
    assert "?" in capsys.readouterr().out.splitlines()[2].split()
    resolved = resolve_model(reg, first.ref)  # the weights serve; GET /v1/model says test null
    assert resolved.test is None and resolved.checkpoint.is_dir()


def test_a_report_given_for_a_version_registered_without_one_is_added_and_another_refused(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Registered first, evaluated after (the README's Python example): `register --report` on the same
    checkpoint had said "registered already" and dropped the report without a word."""
    reg = str(tmp_path / "reg")
    assert main(["models", "register", str(checkpoint), "--registry", reg]) == 0
    report = make_report(tmp_path / "eval")
    tested = {"accuracy": 0.7, "n": 40, "evaluated": {"split": "test", "relation": "internal"}}
    (report / "metrics.json").write_text(json.dumps(tested))
    capsys.readouterr()
    assert main(["models", "register", str(checkpoint), "--registry", reg, "--report", str(report)]) == 0
    assert "its report is" in capsys.readouterr().out
    version = ModelRegistry(reg).get(f"{NAME}:1")
    assert (
        version.report and json.loads((Path(version.report) / "metrics.json").read_text())["accuracy"] == 0.7
    )
    assert not [p for p in (tmp_path / "reg").rglob("*.tmp-*")]
    assert main(["models", "register", str(checkpoint), "--registry", reg, "--report", str(report)]) == 0
    (report / "metrics.json").write_text(json.dumps({**tested, "accuracy": 0.9}))  # another evaluation
    assert main(["models", "register", str(checkpoint), "--registry", reg, "--report", str(report)]) == 2
    assert "with its own report" in capsys.readouterr().err


def test_promoting_a_version_says_what_is_known_against_serving_it(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr models promote candidate` is where a review signs a model off: it moved production to one the
    registry said not to serve without a word."""
    reg = str(tmp_path / "reg")
    report = make_report(tmp_path / "eval")
    chance = [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]  # 1 of 4: a quarter
    tested = {"accuracy": 0.25, "n": 4, "confusion_matrix": chance}
    tested["evaluated"] = {"split": "test", "relation": "internal"}
    (report / "metrics.json").write_text(json.dumps(tested))
    ModelRegistry(reg).register(checkpoint, report=report, alias="candidate")
    assert main(["models", "promote", "candidate", "--registry", reg]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"production: (none) -> {NAME}:1"
    assert out[1].startswith(
        f"WARNING: {NAME}:1: its registered test accuracy, 0.250 (95% CI 0.05–0.70) on 4"
    )
    # `register --alias production` says the same (it had said nothing: a review, session 57)
    again = str(tmp_path / "reg2")
    assert main(["models", "register", str(checkpoint), "--registry", again, "--report", str(report),
                 "--alias", "production"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"production: {NAME}:1" and out[-1].startswith(
        f"WARNING: {NAME}:1: its registered test"
    )


def test_a_model_that_never_trained_on_a_class_is_said_so_before_it_is_served() -> None:
    from cxrcore.registry import serving_warnings

    counts = {"COVID": 40, "Lung_Opacity": 40, "Normal": 40, "Viral Pneumonia": 0}
    assert serving_warnings(None, {"train_class_counts": counts}) == [
        "it never trained on an image of Viral Pneumonia (its training split held none), so it never "
        "answers it"
    ]
    assert serving_warnings(None, {"train_class_counts": {**counts, "Viral Pneumonia": 1}}) == []


def test_a_registered_card_edited_since_is_refused_wherever_the_version_is_loaded(
    tmp_path: Path, checkpoint: Path
) -> None:
    """An audit (session 51): a temperature or input spec edited in a version's card.json served other
    answers under the registered version's name and weights hash, and a weights hash set to null skipped
    the weights' check, after which `seal` approved weights copied over the version's."""
    from cxrcore.checkpoint import CardChangedError, card_digest

    registry = ModelRegistry(tmp_path / "reg")
    version = registry.register(checkpoint, report=make_report(tmp_path / "eval"))
    folder = Path(registry.local_checkpoint(version.ref))
    card = json.loads((folder / "card.json").read_text())
    assert card["card_sha256"] == card_digest(card) and card["report_sha256"]
    load_model(folder)  # as registered: loads

    for edit in ({"temperature": 0.2}, {"weights_sha256": None}):
        (folder / "card.json").write_text(json.dumps({**card, **edit}, indent=2))
        for load in (
            lambda: load_model(folder),
            lambda: registry.local_checkpoint(version.ref),
            lambda: registry.promote(version.ref),
        ):
            with pytest.raises(CardChangedError, match="edited"):
                load()
    assert registry.aliases() == {}
    (folder / "card.json").write_text(json.dumps(card, indent=2))  # put back: loads again
    load_model(folder)
    assert registry.promote(version.ref).ref == version.ref


def test_test_figures_show_only_for_the_registered_report_of_the_version_weights(
    tmp_path: Path, checkpoint: Path
) -> None:
    """An edited metrics.json had shown its accuracy beside an interval computed from the rest; a report
    of other weights had shown as the version's."""
    from cxrcore.checkpoint import WEIGHTS_NAME
    from cxrcore.data.storage import file_sha256
    from cxrcore.registry import registered_test

    weights = file_sha256(pafs.LocalFileSystem(), str(checkpoint / WEIGHTS_NAME))
    report = make_report(tmp_path / "eval")
    matrix = [[8, 1, 1, 0], [1, 8, 1, 0], [0, 1, 9, 0], [0, 0, 1, 9]]
    tested = {"accuracy": 0.85, "n": 40, "confusion_matrix": matrix,
              "evaluated": {"split": "test", "relation": "internal", "weights_sha256": weights}}  # fmt: skip
    (report / "metrics.json").write_text(json.dumps(tested))
    registry = ModelRegistry(tmp_path / "reg")
    version = registry.register(checkpoint, report=report)
    figures, why = registered_test(version)
    assert figures is not None and figures["accuracy"] == 0.85 and why is None
    registered = Path(version.report or "") / "metrics.json"
    registered.write_text(json.dumps({**tested, "accuracy": 0.958}))
    figures, why = registered_test(registry.get(version.ref))
    assert figures is None and why is not None and "edited since" in why

    # a version an earlier cxr registered (no report or card hash): its report still names its weights
    other = {**tested, "evaluated": {**tested["evaluated"], "weights_sha256": "0" * 64}}
    registered.write_text(json.dumps(other))
    card_file = Path(registry.local_checkpoint(version.ref)) / "card.json"
    card = json.loads(card_file.read_text())
    card_file.write_text(
        json.dumps({k: v for k, v in card.items() if k not in ("report_sha256", "card_sha256")})
    )
    figures, why = registered_test(registry.get(version.ref))
    assert figures is None and why is not None and "scored other weights" in why


def test_seal_records_the_card_hash_of_versions_registered_before_it(
    tmp_path: Path, checkpoint: Path
) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    version = registry.register(checkpoint)
    card_file = Path(registry.local_checkpoint(version.ref)) / "card.json"
    card = json.loads(card_file.read_text())
    from cxrcore.checkpoint import CardChangedError

    del card["card_sha256"]  # its hash removed by an edit: not sealed as it is
    card_file.write_text(json.dumps(card, indent=2))
    with pytest.raises(CardChangedError, match="records none"):
        load_model(card_file.parent)
    (refused,) = registry.seal()  # said, and the versions after it sealed all the same
    assert refused.problem and "records none" in refused.problem
    edited = {**card, "card_sha256": "0" * 64, "temperature": 3.0}
    card_file.write_text(json.dumps(edited, indent=2))
    (refused,) = registry.seal()  # a hash no longer matching: not "recorded"
    assert refused.problem and "edited" in refused.problem
    card_file.write_text(json.dumps(card, indent=2))
    del card["registered_by"]  # as an earlier cxr registered it
    card_file.write_text(json.dumps(card, indent=2))
    load_model(card_file.parent)  # not checked: nothing recorded
    (sealed,) = registry.seal()
    assert sealed.card and sealed.weights_sha256 is None
    assert json.loads(card_file.read_text())["card_sha256"]
    assert registry.seal() == []


def test_a_dual_channel_version_is_served_only_with_the_segmenter_it_was_registered_with(
    tmp_path: Path,
) -> None:
    """An audit (session 51): a registry copy whose tiny_unet:1 held other weights (a node's own registry,
    its card consistent with them) served the dual-channel version with its masks, under the same names."""
    import shutil

    from cxrcore.checkpoint import card_digest
    from cxrcore.data.storage import file_sha256
    from cxrcore.inference import Predictor
    from tests.e2e.uploads import write_checkpoint, write_checkpoints

    checkpoints = write_checkpoints(tmp_path / "runs")
    ModelRegistry(tmp_path / "reg").register_once(checkpoints.dual, alias="production")
    shutil.copytree(tmp_path / "reg", tmp_path / "node")
    shutil.move(tmp_path / "reg", tmp_path / "gone")  # the original out of reach, as on another machine
    node = tmp_path / "node" / "tiny_unet" / "v1"
    other = write_checkpoint(tmp_path / "other-unet", "tiny_unet", 7)
    shutil.copy(other / "model.safetensors", node / "model.safetensors")
    card = json.loads((node / "card.json").read_text())
    card["weights_sha256"] = file_sha256(pafs.LocalFileSystem(), str(node / "model.safetensors"))
    card["card_sha256"] = card_digest(card)  # a segmenter version consistent in itself
    (node / "card.json").write_text(json.dumps(card, indent=2))

    registry = ModelRegistry(tmp_path / "node")
    assert registry.get("production").card.segmenter_weights_sha256
    with pytest.raises(RegistryError, match=r"has other weights .* than the one it was registered with"):
        Predictor.from_registry(registry)

    # The other way round: a good copy, and the folder the card names (the original) now another
    # registry's: the copy's own version, with the pinned weights, is read.
    shutil.copytree(tmp_path / "gone", tmp_path / "good")
    shutil.copytree(tmp_path / "node", tmp_path / "reg")  # the card's place, now holding other weights
    good = ModelRegistry(tmp_path / "good")
    assert good.segmenter_checkpoint(str(tmp_path / "reg" / "tiny_unet" / "v1"), of="tiny_dual_cnn:1") == (
        tmp_path / "good" / "tiny_unet" / "v1"
    )
    assert Predictor.from_registry(good).segmenter is not None


def test_a_move_the_history_cannot_record_is_not_made(tmp_path: Path, checkpoint: Path) -> None:
    """An audit (session 51): with aliases.log.jsonl unwritable, a promotion moved production with a warning
    and exit 0, and `cxr models history` then crashed with a traceback."""
    registry = ModelRegistry(tmp_path / "reg")
    version = registry.register(checkpoint)
    registry.promote(version.ref, "staging")
    (move,) = registry.history()
    assert move["weights_sha256"] == version.card.weights_sha256 and move["command"]
    (tmp_path / "reg" / "aliases.log.jsonl").unlink()
    (tmp_path / "reg" / "aliases.log.jsonl").mkdir()  # cannot be appended to, nor read
    with pytest.raises(RegistryError, match=r"production was not moved to .* cannot be recorded"):
        registry.promote(version.ref)
    assert registry.aliases() == {"staging": version.ref}
    with pytest.raises(RegistryError, match="cannot be read"):
        registry.history()


def test_an_alias_moved_outside_cxr_is_said_wherever_it_is_served(tmp_path: Path) -> None:
    """An audit (session 51): aliases.json edited by hand (or restored from a backup) moved production with
    no trace, the history still ending on the move before."""
    from serve.deployments import resolve_model

    registry = ModelRegistry(tmp_path / "reg")
    first = registry.register(make_checkpoint(tmp_path / "a", seed=0))
    second = registry.register(make_checkpoint(tmp_path / "b", seed=1))
    registry.promote(second.ref)
    assert (
        registry.unrecorded_aliases() == {}
        and resolve_model(str(tmp_path / "reg"), "production").warnings == []
    )
    (tmp_path / "reg" / "aliases.json").write_text(json.dumps({"production": first.ref}))
    said = registry.unrecorded_aliases()["production"]
    assert said.startswith(f"the alias production points to {first.ref}, but the history's last move of it")
    assert said in resolve_model(str(tmp_path / "reg"), "production").warnings
    assert resolve_model(str(tmp_path / "reg"), second.ref).warnings == []  # a version named directly


def test_an_evaluation_added_to_a_version_is_kept_shown_and_warned_of(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version is immutable, and its external validation had nowhere to go: `cxr models show`, `cxr serve`
    and GET /v1/model knew its registered test figures only, whatever another hospital's data had shown."""
    from cxrcore.checkpoint import WEIGHTS_NAME
    from cxrcore.data.storage import file_sha256
    from serve.deployments import public_evaluation, resolve_model

    reg = str(tmp_path / "reg")
    version = ModelRegistry(reg).register(checkpoint, alias="production")
    weights = file_sha256(pafs.LocalFileSystem(), str(checkpoint / WEIGHTS_NAME))
    report = make_report(tmp_path / "hospital-b")
    verdict = "Not shown to beat chance on these images: accuracy 0.36 (95% CI 0.28–0.45) reaches 0.38."
    external = {
        "n": 130, "accuracy": 0.36, "accuracy_ci95": [0.28, 0.45], "macro_f1": 0.37,
        "evaluated": {"relation": "external", "split": "all", "fingerprint": "b0b", "weights_sha256": weights,
                      "dataset": str(tmp_path / "hospital-b-ds"), "evaluated_at": "2026-12-06T00:00Z"},
        "internal_comparison": {"verdict": verdict, "no_better_than_chance": True, "clean": True},
    }  # fmt: skip
    (report / "metrics.json").write_text(json.dumps(external))
    assert main(["models", "add-evaluation", "production", str(report), "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith(f"added as {version.ref}'s evaluation 1: external data ")
        and "WARNING: its evaluation 1" in out
    )
    assert (
        main(["models", "add-evaluation", "production", str(report), "--registry", reg]) == 0
    )  # again: kept
    assert capsys.readouterr().out.startswith(f"kept already, as {version.ref}'s evaluation 1")
    kept = Path(reg) / NAME / "v1" / "evaluations" / "1"
    assert (kept / "metrics.json").is_file() and not (
        kept / "predictions.csv"
    ).exists()  # stays with the data

    (entry,) = ModelRegistry(reg).evaluations("production")
    assert (entry["accuracy"], entry["alarming"], entry["changed"], entry["fingerprint"]) == (
        0.36,
        True,
        False,
        "b0b",
    )
    resolved = resolve_model(reg, "production")
    assert any(verdict in warning for warning in resolved.warnings)
    public = public_evaluation(resolved.evaluations[0])
    assert "user" not in public and "command" not in public and public["dataset"].endswith("hospital-b-ds")
    assert main(["models", "show", "production", "--registry", reg]) == 0
    shown = capsys.readouterr().out
    assert "evaluations: 1\n  1. external data" in shown and "WARNING: its evaluation 1" in shown

    (kept / "metrics.json").write_text(json.dumps({**external, "accuracy": 0.95}))  # edited since
    (entry,) = ModelRegistry(reg).evaluations("production")
    assert entry["changed"] and "changed or removed since" in resolve_model(reg, "production").warnings[-1]

    other = make_report(tmp_path / "other")
    (other / "metrics.json").write_text(json.dumps({**external, "evaluated": {"weights_sha256": "0" * 64}}))
    assert main(["models", "add-evaluation", "production", str(other), "--registry", reg]) == 2
    assert "evaluates other weights" in capsys.readouterr().err


def test_what_a_verifier_broke_the_traceability_with(tmp_path: Path, checkpoint: Path) -> None:
    """A verifier (session 51): an earlier cxr's `seal` adding a data manifest made a version unloadable;
    an edited report silenced "do not serve it"; evaluations.jsonl edited by hand showed its figures; a
    line of something else crashed the history; the version's own report was added as an evaluation."""
    from cxrcore.checkpoint import WEIGHTS_NAME
    from cxrcore.data.storage import file_sha256
    from serve.deployments import resolve_model

    reg = tmp_path / "reg"
    report = make_report(tmp_path / "eval")
    weights = file_sha256(pafs.LocalFileSystem(), str(checkpoint / WEIGHTS_NAME))
    matrix = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]  # chance: "do not serve it"
    tested = {"accuracy": 0.25, "n": 16, "confusion_matrix": matrix,
              "evaluated": {"split": "test", "relation": "internal", "weights_sha256": weights}}  # fmt: skip
    (report / "metrics.json").write_text(json.dumps(tested))
    registry = ModelRegistry(reg)
    version = registry.register(checkpoint, report=report, alias="production")
    folder = reg / NAME / "v1"

    card = json.loads((folder / "card.json").read_text())
    card["data"]["manifest"] = {"file": "data_manifest.parquet", "images": 3}  # an earlier cxr's seal
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    assert resolve_model(str(reg), "production").checkpoint == folder  # loads: the manifest is its own check

    assert any("do not serve it" in w for w in resolve_model(str(reg), "production").warnings)
    (folder / "report" / "metrics.json").write_text(json.dumps({**tested, "accuracy": 0.95}))
    assert any("shows no test figures" in w for w in resolve_model(str(reg), "production").warnings)
    (folder / "report" / "metrics.json").write_text(json.dumps(tested))

    with pytest.raises(RegistryError, match="registered report already"):
        registry.add_evaluation(version.ref, report)
    external = make_report(tmp_path / "external")
    (external / "metrics.json").write_text(
        json.dumps({**tested, "evaluated": {**tested["evaluated"], "relation": "external"}})
    )
    entry, added = registry.add_evaluation(version.ref, external)
    assert added and entry["accuracy"] == 0.25
    index = folder / "evaluations.jsonl"
    index.write_text(index.read_text().replace('"accuracy": 0.25', '"accuracy": 0.975') + "null\n[1, 2]\n")
    (shown,) = registry.evaluations(version.ref)
    assert shown["accuracy"] == 0.25 and not shown["changed"]  # the figures are the kept file's
    index.write_text("")  # its line removed: the folder is still there, and said to be unindexed
    (shown,) = registry.evaluations(version.ref)
    assert shown["changed"] and "not in evaluations.jsonl" in shown["problem"]
    with open(reg / "aliases.log.jsonl", "a") as log:
        log.write("[1, 2]\n")
    assert [m["to"] for m in registry.history()] == [version.ref]


def test_show_says_what_serve_would_refuse(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr models show candidate` is what a review reads before a promotion: an edited card showed as any."""
    reg = tmp_path / "reg"
    version = ModelRegistry(reg).register(checkpoint)
    card_file = reg / NAME / "v1" / "card.json"
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), "temperature": 2.5}, indent=2))
    assert main(["models", "show", version.ref, "--registry", str(reg)]) == 0
    assert capsys.readouterr().out.startswith("WARNING: serve, evaluate and promote refuse it: ")
    assert main(["models", "show", version.ref, "--registry", str(reg), "--json"]) == 0
    assert "edited" in json.loads(capsys.readouterr().out)["refused"]


def test_a_checkpoint_given_as_a_file_uri_is_read_as_its_path(tmp_path: Path) -> None:
    """A review (session 53): `cxr models register file:///...` said "not a cxr checkpoint" where
    `cxr evaluate` and `cxr serve` took the same URI; a space in it is %20."""
    from urllib.parse import quote

    from cxrcore.checkpoint import load_card
    from tests.e2e.uploads import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "runs é 1", "tiny_cnn_lstm", 0)
    assert load_card(f"file://{quote(str(checkpoint))}").model["name"] == "tiny_cnn_lstm"
    registry = ModelRegistry(str(tmp_path / "reg"))
    assert registry.register(f"file://{quote(str(checkpoint))}").version == 1


def test_weights_that_hold_nan_are_neither_registered_nor_promoted(tmp_path: Path, checkpoint: Path) -> None:
    """A verifier (session 57): a checkpoint whose weights were NaN was registered and made production without
    a word; only loading it (Serve, `cxr evaluate`) refused it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from cxrcore.checkpoint import WEIGHTS_NAME

    blown = tmp_path / "blown"
    shutil.copytree(checkpoint, blown)
    tensors = load_file(blown / WEIGHTS_NAME)
    name = next(key for key, tensor in tensors.items() if tensor.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, blown / WEIGHTS_NAME)
    registry = ModelRegistry(tmp_path / "reg")
    with pytest.raises(
        RegistryError, match=rf"its weights hold NaN or infinite values \({name}.*; it is not registered"
    ):
        registry.register(blown, alias="production")
    assert registry.versions() == [] and registry.aliases() == {}
