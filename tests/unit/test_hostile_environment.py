"""cxr where the environment is not a tidy laptop's: containers and HPC nodes (a review, session 54).

Each case ended in a traceback, a hang or a server that never answered; each is now one line that says
what to change, or works. No Ray is started here: each check runs before Ray would."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from cxrcore.config import ConfigError


def test_a_proxy_for_the_internet_is_bypassed_for_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """With http_proxy set and no no_proxy, the Serve replicas' gRPC calls to each other and `cxr predict`'s
    loopback requests went to the proxy: `cxr serve` said "serving" and never answered /readyz."""
    from cxrcore.runtime import PROXY_VARIABLES, bypass_proxy

    for name in (*PROXY_VARIABLES, "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    bypass_proxy("10.1.2.3")
    assert "no_proxy" not in os.environ  # no proxy: nothing to bypass
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "pacs.example, .internal")  # the user's own, upper-case only
    bypass_proxy("10.1.2.3")
    expected = "pacs.example,.internal,127.0.0.1,localhost,::1,10.1.2.3"
    assert os.environ["no_proxy"] == os.environ["NO_PROXY"] == expected  # both, as urllib reads lower first
    bypass_proxy("10.1.2.3")
    assert os.environ["no_proxy"] == expected  # once
    import urllib.request

    assert urllib.request.proxy_bypass_environment("127.0.0.1") and urllib.request.proxy_bypass_environment(
        "pacs.example"
    )
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    bypass_proxy("10.1.2.3")
    assert os.environ["no_proxy"] == "*"


def test_a_temporary_folder_too_long_for_rays_sockets_is_refused_in_one_line() -> None:
    from cxrcore.runtime import SOCKET_PATH_BYTES, check_socket_paths

    check_socket_paths("/tmp")
    check_socket_paths("/scratch/job-1234567")
    long = "/scratch/users/radiology-ai/jobs/1234567"
    with pytest.raises(
        ConfigError, match=r"point RAY_TMPDIR at a folder of \d+ characters or fewer"
    ) as raised:
        check_socket_paths(long)
    assert f"where Linux takes {SOCKET_PATH_BYTES}" in str(raised.value) and "\n" not in str(raised.value)
    fits = int(str(raised.value).split("a folder of ")[1].split(" ")[0])
    check_socket_paths("/" + "x" * (fits - 1))  # the length it names does fit
    with pytest.raises(ConfigError):
        check_socket_paths("/" + "x" * fits)


def test_no_home_folder_or_a_read_only_one_is_said_with_the_way_round_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random UID with HOME unset (an OpenShift-style container) had crashed with "Could not determine
    home directory", and a read-only HOME said only "Read-only file system"."""
    from cxrcore.registry import ModelRegistry
    from cxrcore.runtime import keep_token_private, make_private_token

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(ConfigError, match=r"has no home folder .* set HOME to a folder this user can write"):
        make_private_token()
    keep_token_private()  # nothing to close, and no traceback
    assert ModelRegistry(tmp_path / "reg").versions() == []  # a local registry needs no cache folder
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    make_private_token()  # the way round it: the token given
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    blocked = tmp_path / "file"
    blocked.write_text("")  # a "home" where no folder can be made
    with pytest.raises(ConfigError, match=r"RAY_AUTH_TOKEN to a token of your own"):
        make_private_token(blocked / ".ray" / "auth_token")


def test_an_address_nothing_answers_at_is_refused_in_seconds_not_minutes() -> None:
    """A stale RAY_ADDRESS: ray.init tried it 20 times, about 40 s each, and said so after 13 min 46 s."""
    from cxrcore.runtime import _check_reachable

    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"no Ray cluster reachable there .*unset RAY_ADDRESS"):
        _check_reachable(f"127.0.0.1:{port}", "RAY_ADDRESS")
    assert time.monotonic() - started < 10
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        _check_reachable(f"127.0.0.1:{listening.getsockname()[1]}", "--address")  # up: passes
    _check_reachable("auto", "RAY_ADDRESS")  # left to Ray
    _check_reachable("ray://head:10001", "--address")


def test_a_dry_run_notes_the_cluster_it_would_join_where_nothing_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run is refused there; its dry run had planned it, exit 0 and not a word (a review, session 54)."""
    from cxrcore.cli import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["train", "--data", str(tmp_path / "elsewhere"), "--model", "tiny_cnn_lstm", "--dry-run"]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(argv) == 0  # the plan may be for another machine: a note, as for the missing dataset
    err = capsys.readouterr().err
    assert f"would stop: RAY_ADDRESS 127.0.0.1:{port}: no Ray cluster reachable there" in err
    assert main([*argv, "--address", "http://127.0.0.1:8265"]) == 0
    assert "would stop: --address http://127.0.0.1:8265: that is the dashboard's" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(argv) == 0
    assert "Ray cluster" not in capsys.readouterr().err  # a local cluster would start


def test_warnings_made_errors_everywhere_are_refused_before_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrcore.runtime import check_warnings_not_errors

    with pytest.raises(ConfigError, match=r"^warnings are errors here \(PYTHONWARNINGS or -W: error\)"):
        check_warnings_not_errors(["error"])
    for narrow in (
        ["ignore"], ["error::DeprecationWarning:mypackage"], ["error::RuntimeWarning"], [],
        ["error::FutureWarning"], ["error::PendingDeprecationWarning"],  # Ray runs with these (a verifier)
    ):  # fmt: skip
        check_warnings_not_errors(narrow)
    monkeypatch.setenv("PYTHONWARNINGS", "default,error")
    with pytest.raises(ConfigError):
        check_warnings_not_errors()


def test_a_tmp_that_cannot_be_written_leaves_serve_on_its_python_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """/tmp read-only (TMPDIR on scratch): every command that starts Ray, an ingest too, had been refused
    for HAProxy's folder; and RAY_SERVE_ENABLE_HA_PROXY=0 had not spared it."""
    import cxrcore.runtime as runtime

    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    monkeypatch.delenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", raising=False)
    monkeypatch.setattr(runtime, "_haproxy_folder_used", None)
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setattr(runtime, "HAPROXY_FOLDER", str(blocked / "haproxy-serve-{uid}"))
    env = runtime.local_serve_environment()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert "Serve uses its Python proxy" in caplog.text
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    monkeypatch.setattr(runtime, "HAPROXY_FOLDER", str(tmp_path / "haproxy-serve-{uid}"))
    runtime.local_serve_environment()
    assert not list(tmp_path.glob("haproxy-serve-*"))  # HAProxy off: no folder made for it


@pytest.mark.parametrize(
    "error", [PermissionError(13, "Permission denied"), OSError(30, "Read-only file system")]
)
def test_an_output_in_a_current_folder_it_cannot_write_says_the_way_round(
    error: OSError, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only working folder (a container's, a shared one) had been refused with the path alone."""
    from cxrcore.cli import main
    from cxrcore.data import synthetic

    def refused(out: str, *args: object, **kwargs: object) -> None:
        error.filename = os.path.abspath(out)
        raise error

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", refused)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "synth", "phantoms"]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"cxr: error: {tmp_path / 'phantoms'}: ")
    assert said.endswith("(in the current folder: run from a folder you can write, or give OUT one)")
    assert main(["data", "synth", str(tmp_path.parent / "phantoms")]) == 2  # elsewhere: the path says it
    assert "current folder" not in capsys.readouterr().err


def test_a_home_where_matplotlib_cannot_write_gets_one_config_folder_of_this_users_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Matplotlib warned in every plotting process and built its font cache again, each time elsewhere."""
    from cxrcore.runtime import keep_matplotlib_config_writable

    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir reads TMPDIR again
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    keep_matplotlib_config_writable()  # a home it can write: matplotlib's own folder there
    assert "MPLCONFIGDIR" not in os.environ and (tmp_path / "home/.config/matplotlib").is_dir()

    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a "home" where no folder can be made
    monkeypatch.setenv("HOME", str(blocked))
    keep_matplotlib_config_writable()
    own = tmp_path / f"tmp/cxr-matplotlib-{os.getuid()}"
    assert os.environ["MPLCONFIGDIR"] == str(own) and own.is_dir() and own.stat().st_mode & 0o777 == 0o700
    keep_matplotlib_config_writable()  # set: left as it is
    assert os.environ["MPLCONFIGDIR"] == str(own)

    monkeypatch.delenv("MPLCONFIGDIR")
    own.rmdir()
    own.symlink_to(tmp_path / "home")  # a link someone left at the name: never used
    keep_matplotlib_config_writable()
    assert "MPLCONFIGDIR" not in os.environ


def _ingest_under_an_ascii_locale(cwd: Path, *paths: str) -> tuple[int, str]:
    """`cxr data ingest PATHS` with `PYTHONUTF8=0 LC_ALL=C` from `cwd`: its exit status and what it said."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "cxrcore", "data", "ingest", *paths],
        cwd=cwd, env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    return done.returncode, done.stderr.decode("ascii", "replace").strip()


def test_a_non_ascii_path_under_a_locale_python_reads_as_ascii_is_one_line_with_the_way_round(
    tmp_path: Path,
) -> None:
    """`PYTHONUTF8=0 LC_ALL=C` (a locale chosen against Python's default, which is UTF-8 mode under C): a
    name's non-ASCII bytes reach Python as surrogate escapes, which Arrow cannot encode. It had ended in a
    pyarrow traceback; now one line says what to set."""
    here = tmp_path / "Névé données"
    (here / "raw").mkdir(parents=True)
    status, said = _ingest_under_an_ascii_locale(here, "raw", "ds")
    assert status == 2, said
    assert said.startswith("cxr: error: a path holds characters that Python's file-system encoding (ascii) ")
    assert "N\\xe9v\\xe9 donn\\xe9es/ds" in said and "PYTHONUTF8=1" in said and "Traceback" not in said


def test_a_non_ascii_argument_under_a_locale_python_reads_as_ascii_is_told_the_locale_not_the_name(
    tmp_path: Path,
) -> None:
    """A verifier (session 56): the same locale with the non-ASCII path given as an argument had been told
    the name was not UTF-8 ("rename it"), though it was: the locale is what to change."""
    from cxrcore.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "Névé" / "raw", per_class=1, seed=0, image_size=32, mask_size=32)
    status, said = _ingest_under_an_ascii_locale(tmp_path, "Névé/raw", "ds")
    assert status == 2 and said.startswith("cxr: error: 'N\\xe9v\\xe9/raw': Python reads file names"), said
    assert "PYTHONUTF8=1" in said and "rename" not in said
