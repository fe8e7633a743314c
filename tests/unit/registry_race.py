"""Processes for the registry race test (a module of their own: spawned children import only this)."""

from __future__ import annotations

import json
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

TIMEOUT = 60.0


def register_and_promote(
    root: str, checkpoint: str, writer: int, count: int, start: Barrier, results: Queue[Any]
) -> None:
    """Register `count` versions; after each, point this writer's alias and "production" at it."""
    import cxrcore.checkpoint  # noqa: F401  (torch) imported before the start line: the writers race
    from cxrcore.registry import ModelRegistry

    registry = ModelRegistry(root)
    start.wait(TIMEOUT)
    numbers = []
    for _ in range(count):
        version = registry.register(checkpoint)
        registry.promote(version.ref, f"writer-{writer}")
        registry.promote(version.ref, "production")
        numbers.append(version.version)
    results.put((writer, numbers))


def watch_registry(root: str, start: Barrier, stop: Event, results: Queue[Any]) -> None:
    """Poll aliases.json and the version folders while writers run; report every inconsistency seen."""
    reads, problems = 0, []
    start.wait(TIMEOUT)
    while True:
        finished = stop.is_set()  # one last look after the writers are done
        problems += _check(Path(root))
        reads += (Path(root) / "aliases.json").is_file()
        if finished:
            break
        stop.wait(0.002)
    results.put(("reader", reads, problems))


def _check(root: Path) -> list[str]:
    problems = []
    try:
        text = (root / "aliases.json").read_text()
    except FileNotFoundError:
        text = "{}"  # nothing promoted yet
    try:
        aliases = json.loads(text)
    except json.JSONDecodeError:
        return [f"aliases.json not parseable: {text!r}"]
    for alias, target in aliases.items():
        name, _, number = target.partition(":")
        if not _complete(root / name / f"v{number}"):
            problems.append(f"alias {alias} -> {target}, an incomplete version")
    for card in root.glob("*/v*/card.json"):
        if not _complete(card.parent):
            problems.append(f"{card.parent} has a card but is incomplete")
    return problems


def _complete(folder: Path) -> bool:
    """A finished version: a parseable card naming this version, beside its weights."""
    try:
        card = json.loads((folder / "card.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    name, number = folder.parent.name, folder.name[1:]
    return card.get("version") == f"{name}:{number}" and (folder / "model.safetensors").is_file()


def register_until_killed(root: str, checkpoint: str, copying: Event, never: Event) -> None:
    """Register, stopping inside the weights copy with half the file written, until the test kills us."""
    import cxrcore.registry

    def copy_half_then_hang(source_fs: Any, source: str, target_fs: Any, target: str) -> None:
        data = Path(source).read_bytes()
        with target_fs.open_output_stream(target) as stream:
            stream.write(data[: len(data) // 2])
        copying.set()
        never.wait(TIMEOUT)  # nobody sets it: the test SIGKILLs this process here

    cxrcore.registry._copy = copy_half_then_hang
    cxrcore.registry.ModelRegistry(root).register(checkpoint)


def register_once_at_once(
    root: str, checkpoint: str, writer: int, start: Barrier, results: Queue[Any]
) -> None:
    """`register_once` of one checkpoint, released with the other processes at the same moment."""
    import cxrcore.checkpoint  # noqa: F401  (torch) imported before the start line: the writers race
    from cxrcore.registry import ModelRegistry

    registry = ModelRegistry(root)
    start.wait(TIMEOUT)
    registration = registry.register_once(checkpoint)
    results.put((writer, registration.version.ref, registration.found))
