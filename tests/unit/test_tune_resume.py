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
