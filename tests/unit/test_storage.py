"""Publishing a finished folder over an older one: whole or not at all, and what a killed run left."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cxrcore.data import storage

MARKER = "report.json"


def folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


OLD = {MARKER: "old", "split=train/a.parquet": "old a", "split=val/b.parquet": "old b"}
NEW = {MARKER: "new", "split=train/c.parquet": "new c"}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_publish_replaces_the_folder_whole(
    tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exchange:  # a kernel, filesystem or OS without RENAME_EXCHANGE
        monkeypatch.setattr(storage, "_exchange", lambda first, second: False)
    final = folder(tmp_path / "dataset", OLD)
    folder(Path(storage.staging_paths(str(final))[0]), NEW)
    storage.publish(pafs.LocalFileSystem(), str(final), MARKER)
    assert contents(final) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]  # no staging, no trash left


def test_publish_into_a_new_place(tmp_path: Path) -> None:
    final = tmp_path / "deep" / "dataset"
    folder(Path(storage.staging_paths(str(final))[0]), NEW)
    storage.publish(pafs.LocalFileSystem(), str(final), MARKER)
    assert contents(final) == NEW


def test_clear_staging_puts_back_what_a_killed_publish_moved_away(tmp_path: Path) -> None:
    """Killed between the two renames of the fallback: the old dataset waits in the trash folder."""
    final = tmp_path / "dataset"
    staging, trash = map(Path, storage.staging_paths(str(final)))
    folder(trash, OLD)
    folder(staging, {"split=train/half.parquet": "half"})
    storage.clear_staging(pafs.LocalFileSystem(), str(final), MARKER)
    assert contents(final) == OLD and not staging.exists() and not trash.exists()

    folder(trash, {"split=train/a.parquet": "deleted halfway"})  # its marker went first: not complete
    folder(staging, NEW)
    storage.clear_staging(pafs.LocalFileSystem(), str(final), MARKER)
    assert contents(final) == OLD and not staging.exists() and not trash.exists()


def test_publish_on_an_object_store_copies_the_marker_last(tmp_path: Path) -> None:
    """No rename there: files are copied, the marker last (an object store seen through SubTreeFileSystem)."""
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    folder(tmp_path / "dataset", OLD)
    folder(tmp_path / "dataset.partial", NEW)
    storage.publish(store, "dataset", MARKER)
    assert contents(tmp_path / "dataset") == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_a_state_file_is_replaced_whole_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    """A run's settings and an experiment's comparison.json, written in place, were left empty or cut
    short by a kill or a power cut, and every re-run failed on them with a JSONDecodeError traceback."""
    from cxrcore.config import ConfigError
    from cxrcore.experiment import SETTINGS_NAME, check_same_experiment
    from cxrcore.tune import _finished_before, _production_left_by_earlier_run

    local = pafs.LocalFileSystem()
    path = tmp_path / "run" / "state.json"
    storage.write_text(local, str(path), "one")
    storage.write_text(local, str(path), "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["state.json"]

    run = tmp_path / "run"
    (run / SETTINGS_NAME).write_text("")  # what a crash soon after an in-place write leaves
    with pytest.raises(ConfigError, match=r"is damaged \(empty or cut short.*\): delete it to go on"):
        check_same_experiment(str(run), {"epochs": 2}, "the run")
    (run / "comparison.json").write_text('{"trials": [{"model": "a", "err')
    assert _finished_before(str(run)) is False and _production_left_by_earlier_run(str(run)) is None


@pytest.mark.parametrize(
    ("xdg", "expected"),
    [
        (None, "~/.cache/cxr/reports"),
        ("/scratch/me", "/scratch/me/cxr/reports"),
        ("rel", "~/.cache/cxr/reports"),
    ],
)
def test_caches_are_under_xdg_cache_home_when_it_is_an_absolute_path(
    xdg: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The XDG spec: an unset or relative XDG_CACHE_HOME means ~/.cache."""
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert storage.cache_folder("reports") == Path(expected)
