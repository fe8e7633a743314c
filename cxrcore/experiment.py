"""The settings a run or Tune experiment was started with, kept beside it so a re-run never mixes two."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from cxrcore.config import ConfigError
from cxrcore.data import storage

SETTINGS_NAME = "cxr_settings.json"


def recorded_settings(location: str, what: str) -> dict[str, Any] | None:
    """The settings {what} recorded in the run folder `location`, None where it recorded none; raises
    ConfigError, saying what to do, where the file is damaged (`--dry-run` checks this too)."""
    filesystem, root = storage.resolve(location)
    path = f"{root}/{SETTINGS_NAME}"
    text = storage.read_text(filesystem, path)
    if text is None:
        return None
    recorded: Any = None
    with contextlib.suppress(ValueError):
        recorded = json.loads(text)
    if not isinstance(recorded, dict):
        raise ConfigError(
            f"{path}, where {what} recorded its settings, is damaged (empty or cut short: a kill or a power "
            "cut while it was written?): delete it to go on with this command's settings, or start a fresh "
            "one with another --name (or --out)"
        )
    return recorded


def check_same_experiment(
    location: str,
    settings: dict[str, Any],
    what: str,
    defaults: dict[str, Any] | None = None,
    *,
    write: bool = True,
) -> None:
    """Record `settings` in the run folder `location` (unless not `write`: `--dry-run`), or check a re-run
    against the recorded ones; `defaults`: what a setting recorded by neither side stands for (one added
    since the run started).

    Re-running with the same --name and --out resumes; that is only right when the data and the settings
    that shape the result are the same. Otherwise raise ConfigError saying which differ and how to
    start fresh, rather than silently adding new epochs or trials to another experiment.
    """
    filesystem, root = storage.resolve(location)
    path = f"{root}/{SETTINGS_NAME}"
    recorded = recorded_settings(location, what)
    if recorded is None:
        if write:
            storage.write_text(filesystem, path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return
    unset = defaults or {}

    def value(side: dict[str, Any], key: str) -> Any:
        """The side's setting; where it is not there, or None where `defaults` name it (a setting an
        earlier cxr recorded as None), what `defaults` say it stands for."""
        found = side.get(key)
        return unset.get(key) if (key not in side or found is None) and key in unset else found

    differ = [
        f"{key} {value(recorded, key)!r} → {value(settings, key)!r}"
        for key in sorted(set(recorded) | set(settings))
        if value(recorded, key) != value(settings, key)
    ]
    if differ:
        if {key.split(" ")[0] for key in differ} == {"data_fingerprint"}:
            # Only the data differs: another dataset, or this one ingested again (by a cxr that splits
            # otherwise, or from a changed folder); recorded settings cannot bring the old one back.
            advice = (
                "The dataset is not the one it started on: --data names another, or it was ingested again "
                f"since (its images or splits changed), so {what} cannot go on. Start a fresh one with "
                "another --name (or --out)"
            )
        else:
            advice = (
                "Re-run with the recorded settings to resume it, or start a fresh one with another --name "
                "(or --out)"
            )
        raise ConfigError(
            f"--name: {location} already holds {what} started with other settings "
            f"({'; '.join(differ)}). {advice}, or delete {location}."
        )
