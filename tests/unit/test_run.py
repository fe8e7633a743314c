"""`make test`'s runs (tests/run.py): the Ray tests, with the unit tests and mypy beside them; every
report printed, any failure fails it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import run

PASSING_MYPY = [sys.executable, "-c", "print('Success: no issues found')"]
"""Stands for mypy where a test runs the lanes (the real one takes 25 s)."""


def test_both_reports_are_printed_and_a_failure_beside_fails_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "test_beside.py").write_text("def test_beside():\n    assert 1 == 2\n")
    (tmp_path / "test_shared.py").write_text("def test_shared():\n    pass\n")
    monkeypatch.setattr(run, "UNIT", str(tmp_path / "test_beside.py"))
    monkeypatch.setattr(run, "WITH_RAY", (str(tmp_path / "test_shared.py"),))
    monkeypatch.setattr(run, "MYPY", PASSING_MYPY)
    assert run.main([]) == 1
    out = capfd.readouterr().out
    shared, beside = out.index("1 passed"), out.index("1 failed")
    assert shared < out.index("(run beside the above)") < beside  # the second run's report comes last
    assert "Success: no issues found" in out
    assert out.rstrip().endswith(f"FAILED: {tmp_path / 'test_beside.py'}")
    # a type error fails the command too, its report printed with the others
    (tmp_path / "test_beside.py").write_text("def test_beside():\n    pass\n")
    failing = "print('cxrcore/x.py:1: error: Incompatible types'); raise SystemExit(1)"
    monkeypatch.setattr(run, "MYPY", [sys.executable, "-c", failing])
    assert run.main([]) == 1
    out = capfd.readouterr().out
    assert "error: Incompatible types" in out and out.rstrip().endswith("FAILED: mypy")


def test_the_unit_tests_run_at_a_lower_priority_than_the_ray_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import os

    for name in ("unit", "ray"):
        (tmp_path / f"test_{name}.py").write_text(
            f"import os\nfrom pathlib import Path\ndef test_{name}():\n"
            f"    Path({str(tmp_path / name)!r}).write_text(str(os.nice(0)))\n"
        )
    monkeypatch.setattr(run, "UNIT", str(tmp_path / "test_unit.py"))
    monkeypatch.setattr(run, "WITH_RAY", (str(tmp_path / "test_ray.py"),))
    monkeypatch.setattr(run, "MYPY", PASSING_MYPY)
    assert run.main([]) == 0, capfd.readouterr().out
    here = os.nice(0)
    assert int((tmp_path / "ray").read_text()) == here
    assert int((tmp_path / "unit").read_text()) == min(here + run.UNIT_NICENESS, 19)


def test_bytecode_is_written_even_where_the_environment_says_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "test_flag.py").write_text(
        "import sys\ndef test_flag():\n    assert not sys.dont_write_bytecode\n"
    )
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert run.main([str(tmp_path / "test_flag.py")]) == 0, capfd.readouterr().out


def test_with_arguments_it_is_one_pytest(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    assert run.main([str(tmp_path / "test_one.py")]) == 0
    out = capfd.readouterr().out
    assert "1 passed" in out and "run beside" not in out
