"""The examples in the docstrings run (they are documentation that can go stale, and some pin behaviour:
`epoch_seed` differs per epoch, rank and seed)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "cxrcore.bench", "cxrcore.bench.report", "cxrcore.checkpoint", "cxrcore.config", "cxrcore.data.ingest",
    "cxrcore.data.layout", "cxrcore.data.spec", "cxrcore.data.split", "cxrcore.data.storage",
    "cxrcore.evaluate.comparison",
    "cxrcore.evaluate.evaluation", "cxrcore.evaluate.external", "cxrcore.evaluate.paired",
    "cxrcore.evaluate.report", "cxrcore.inference", "cxrcore.metrics", "cxrcore.models.pretrained",
    "cxrcore.models.registry", "cxrcore.plan", "cxrcore.runtime", "cxrcore.summaries", "cxrcore.tables",
    "cxrcore.telemetry",
    "cxrcore.train.engine", "cxrcore.train.loop", "cxrcore.train.trainer", "serve.schemas", "serve.ingress",
)  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no example left: drop it from MODULES"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (above)"


def test_every_module_with_examples_is_listed() -> None:
    from pathlib import Path

    root = Path(__file__).parents[2]
    found = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for package in ("cxrcore", "serve", "jobs")
        for path in (root / package).rglob("*.py")
        if any(">>> " in line and "doctest: +SKIP" not in line for line in path.read_text().splitlines())
    }
    assert found == set(MODULES)
