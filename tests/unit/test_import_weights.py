"""`cxr models import-weights`: one-channel, headless safetensors that load offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from cxrcore.cli import main
from cxrcore.models import create_model


@pytest.fixture
def rgb_weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny_resnet-shaped timm ResNet on RGB with a 1000-class head, saved as a .pth state_dict."""
    torch.manual_seed(0)
    model = timm.create_model(
        "resnet18", pretrained=False, in_chans=3, num_classes=1000,
        layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, avg_down=True,
    )  # fmt: skip
    state = model.state_dict()
    path = tmp_path / "rgb.pth"
    torch.save(state, path)
    return path, state


def test_import_weights_from_a_local_file(
    tmp_path: Path, rgb_weights: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    source, state = rgb_weights
    out = tmp_path / "w.safetensors"
    status = main(["models", "import-weights", "tiny_resnet", "--from", str(source), "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert str(out) in printed and str(source) in printed and "tensors" in printed
    written = load_file(out)
    assert written["conv1.weight"].shape[1] == 1
    torch.testing.assert_close(written["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    assert not [key for key in written if key.startswith("fc.")]
    model = create_model("tiny_resnet", pretrained=out)
    torch.testing.assert_close(model.state_dict()["conv1.weight"], written["conv1.weight"])
    assert not list(tmp_path.glob(".w.safetensors.*"))  # no staged file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file: workers of another user read it


def test_import_weights_rejects_an_unknown_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w.safetensors"
    status = main(["models", "import-weights", "cnn_lstm", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert "resnet18" in err and "resnet50" in err and "tiny_resnet" in err
    assert not out.exists()


def test_import_weights_rejects_weights_for_another_arch(
    tmp_path: Path, rgb_weights: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    source, _ = rgb_weights
    out = tmp_path / "w.safetensors"
    status = main(["models", "import-weights", "resnet18", "--from", str(source), "--out", str(out)])
    assert status == 2
    assert f"weights from {source} do not fit resnet18 (another architecture's?)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".w.safetensors.*"))


def test_import_weights_says_tiny_resnet_has_no_hub_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["models", "import-weights", "tiny_resnet", "--out", str(tmp_path / "w.safetensors")])
    assert status == 2
    assert "tiny_resnet has no hub weights" in capsys.readouterr().err


def test_import_weights_hub_unreachable_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # Offline: the hub fails at once instead of retrying for 45 s (the constant is read at import time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "w.safetensors"
    status = main(["models", "import-weights", "resnet18", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert "could not fetch pretrained resnet18" in err and "--from" in err
    assert not out.exists()


def test_a_folder_of_weights_serves_each_architecture_its_own(
    tmp_path: Path, rgb_weights: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    """One `--pretrained FILE` for a comparison of resnet18 and resnet50 fitted one of them, and the other's
    trials failed on a shape mismatch; a folder holds one file per architecture, by its name."""
    from cxrcore.config import ConfigError
    from cxrcore.train.trainer import check_pretrained, resolve_pretrained
    from tests.unit.test_external_eval import class_rows, write_dataset

    source, _ = rgb_weights
    folder = tmp_path / "weights"
    status = main(["models", "import-weights", "tiny_resnet", "--from", str(source), "--out", f"{folder}/"])
    assert status == 0, capsys.readouterr().err
    assert f"--pretrained {folder}/" in capsys.readouterr().out
    assert resolve_pretrained("tiny_resnet", str(folder)) == str(folder / "tiny_resnet-1ch.safetensors")
    assert check_pretrained("tiny_resnet", str(folder)) == str(folder / "tiny_resnet-1ch.safetensors")
    with pytest.raises(ConfigError, match=r"no resnet18-1ch.safetensors for resnet18 in that folder.*"
                       r"`cxr models import-weights resnet18 --out .*weights`$"):  # fmt: skip
        resolve_pretrained("resnet18", str(folder))
    (folder / "tiny_resnet-1ch.safetensors").rename(folder / "resnet18-1ch.safetensors")  # misnamed
    data = write_dataset(
        tmp_path / "ds",
        class_rows("COVID", train=4, val=1, test=1),
        "f",
    )
    dry_run = ["train", "--data", data, "--model", "resnet18", "--pretrained", str(folder), "--dry-run"]
    assert main(dry_run) == 2  # the dry run loads the folder's file as the run would: it does not fit
    assert "resnet18-1ch.safetensors do not fit ResNet" in capsys.readouterr().err
    (folder / "resnet18-1ch.safetensors").rename(folder / "tiny_resnet-1ch.safetensors")
    with pytest.raises(ConfigError, match=r"tiny_resnet-1ch.safetensors: .* \(for resnet18; a folder holds"):
        check_pretrained("resnet18", str(folder / "tiny_resnet-1ch.safetensors"))  # a file for another one


def test_behind_a_proxy_the_hub_is_left_to_its_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hospital's network reaches the hub through its proxy alone: the probe's direct socket failed, and
    weights the hub client would have fetched through the proxy were refused. NO_PROXY is honoured."""
    import socket

    import cxrcore.models.pretrained as pretrained

    def no_route(address: tuple[str, int], timeout: float) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_route)
    for name in (
        "HF_HUB_OFFLINE",
        "NO_PROXY",
        "no_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert "Name or service not known" in (pretrained.hub_unreachable() or "")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.example:3128")
    assert pretrained.hub_unreachable() is None
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert "Name or service not known" in (pretrained.hub_unreachable() or "")


def test_an_unreachable_hub_is_refused_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cxr train --model resnet18` offline printed the dashboard's address and refused 20 s later, while
    its `--dry-run` passed: both now say it before Ray starts (the dry run as a note: it may plan for a
    cluster that reaches the hub)."""
    import cxrcore.cli as cli
    import cxrcore.models.pretrained as pretrained
    from tests.unit.test_external_eval import class_rows, write_dataset

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "_connect", no_ray)
    monkeypatch.setattr(
        pretrained, "hub_unreachable", lambda: "huggingface.co:443: Name or service not known"
    )
    data = write_dataset(
        tmp_path / "ds",
        class_rows("COVID", train=4, val=1, test=1),
        "f",
    )
    for command in (
        ["train", "--data", data, "--model", "resnet18", "--out", str(tmp_path / "runs")],
        ["tune", "--data", data, "--models", "resnet,tiny_cnn_lstm", "--registry", str(tmp_path / "reg")],
    ):
        assert main(command) == 2
        assert "resnet18 weights come from the model hub, which is unreachable" in capsys.readouterr().err
        assert main([*command, "--dry-run"]) == 0
        assert (
            "note: on this machine the run would stop: --pretrained auto: resnet18" in capsys.readouterr().err
        )
        with pytest.raises(AssertionError, match="Ray was started"):  # from scratch: no hub to reach
            main([*command, "--pretrained", "none"])


def test_offline_with_an_empty_hub_cache_is_refused_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The unreachable hub's refusal suggests HF_HUB_OFFLINE=1; with no weights in the hub's cache the run
    then failed only after Ray's start, in the hub client's words. It is refused first, saying so."""
    import huggingface_hub

    from cxrcore.config import ConfigError
    from cxrcore.train.trainer import check_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    with pytest.raises(
        ConfigError, match=r"HF_HUB_OFFLINE is set and the hub's cache holds no resnet18 weights"
    ):
        check_hub("resnet18", "auto")
    assert check_hub("tiny_cnn_lstm", "auto") is None  # no hub weights: nothing to look for
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert check_hub("resnet18", "auto") == "hub"  # cached: the run loads them offline


def test_the_weights_a_run_starts_from_are_recorded_and_not_replaced_unasked(
    tmp_path: Path, rgb_weights: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A review (session 52): a card said only `training.pretrained: wout` (a folder), and `import-weights`
    replaced the file in it without a word: a tune run then started from other weights than a train run
    whose card said the same. The written file records its source; a run's card the file by its sha256."""
    import hashlib

    from safetensors import safe_open

    from cxrcore.train.trainer import started_from

    source, _ = rgb_weights
    folder = tmp_path / "weights"
    command = ["models", "import-weights", "tiny_resnet", "--from", str(source), "--out", f"{folder}/"]
    assert main(command) == 0
    written = folder / "tiny_resnet-1ch.safetensors"
    with safe_open(str(written), framework="pt") as file:
        assert file.metadata() == {"cxr.source": "rgb.pth", "cxr.source_sha256": _sha(source)}
    before = written.read_bytes()
    capsys.readouterr()
    assert main(command) == 2  # the same again: refused, the file kept
    assert f"--out {written} exists (sha256 {_sha(written)[:12]}…, from rgb.pth)" in capsys.readouterr().err
    assert written.read_bytes() == before and main([*command, "--force"]) == 0
    assert written.read_bytes() == before  # the same source writes the same bytes: its metadata sorted

    record = started_from("tiny_resnet", str(written))
    assert record == {
        "file": "tiny_resnet-1ch.safetensors",
        "sha256": hashlib.sha256(before).hexdigest(),
        "source": "rgb.pth",
        "source_sha256": _sha(source),
    }
    assert started_from("tiny_resnet", str(source)) == {"file": "rgb.pth", "sha256": _sha(source)}
    assert started_from("resnet18", "hub") == {"source": "hub:timm/resnet18.a1_in1k"}
    assert started_from("tiny_resnet", None) is None

    from cxrcore.config import TrainConfig
    from cxrcore.train.trainer import loop_config
    from tests.unit.test_external_eval import write_dataset

    rows = [("COVID", "train", 1), ("Normal", "train", 4), ("COVID", "val", 2), ("COVID", "test", 3)]
    data = write_dataset(tmp_path / "ds", rows, "f")
    config = loop_config(TrainConfig(data=data, model="tiny_resnet", pretrained=str(folder), workers=1))
    assert config["data"]["initial_weights"] == record  # the card's data block


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_checkpoints_and_data_parallel_names_are_read_as_their_weights(
    tmp_path: Path, rgb_weights: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A review (session 52): `{'state_dict': ...}`, `{'model': ...}`, timm's `model_best.pth.tar` (with an
    argparse.Namespace of its arguments) and DataParallel's `module.` names were each refused, with advice
    a user could not act on (torch's `add_safe_globals`); each is read as the weights it holds. A pickle
    naming anything else is still refused."""
    import argparse

    from cxrcore.checkpoint import UnsafeWeightsError
    from cxrcore.models.pretrained import read_pretrained

    _, state = rgb_weights
    layouts = {
        "lightning.ckpt": {"state_dict": state, "epoch": 3},
        "reference.pth": {"model": state, "optimizer": {}, "args": argparse.Namespace(lr=0.1)},
        "model_best.pth.tar": {"state_dict": state, "state_dict_ema": state, "args": argparse.Namespace(a=1)},
        "dataparallel.pth": {f"module.{key}": value for key, value in state.items()},
        "lightning-module.ckpt": {"state_dict": {f"model.{key}": value for key, value in state.items()}},
    }
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        read = read_pretrained(tmp_path / name)
        assert read.keys() == state.keys(), name
        torch.testing.assert_close(read["conv1.weight"], state["conv1.weight"])
        out = str(tmp_path / f"{name}.safetensors")
        assert (
            main(["models", "import-weights", "tiny_resnet", "--from", str(tmp_path / name), "--out", out])
            == 0
        )
    # Other wrappers' attributes (a verifier, session 52): taken off where the names then are the model's.
    from safetensors.torch import load_file

    for prefix in ("net.", "backbone.", "student.backbone."):
        torch.save({f"{prefix}{key}": value for key, value in state.items()}, tmp_path / "wrapped.pth")
        out = str(tmp_path / f"{prefix}safetensors")
        command = ["models", "import-weights", "tiny_resnet", "--from", str(tmp_path / "wrapped.pth")]
        assert main([*command, "--out", out, "--force"]) == 0, prefix
        assert set(load_file(out)) == {key for key in state if not key.startswith("fc.")}, prefix
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "no-weights.pth")
    with pytest.raises(UnsafeWeightsError, match=r"nor a checkpoint holding one under 'state_dict'.*'epoch'"):
        read_pretrained(tmp_path / "no-weights.pth")

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("ran",))

    torch.save({"state_dict": state, "hook": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeWeightsError, match="cxr never unpickles arbitrary objects"):
        read_pretrained(tmp_path / "evil.pth")
    assert "ran" not in capsys.readouterr().out


def test_a_run_resumes_only_from_the_weights_file_it_started_from(tmp_path: Path) -> None:
    """A verifier (session 52): after `import-weights --force` replaced the file, the same command resumed the
    run and the next card named the new file, though its weights grew from the old one. A run recorded
    before cards named the file (or before --freeze-backbone) still resumes."""
    import json

    from cxrcore.config import ConfigError
    from cxrcore.experiment import SETTINGS_NAME, check_same_experiment
    from cxrcore.train.trainer import added_run_settings

    def settings(sha: str | None) -> dict[str, object]:
        return {"data_fingerprint": "f", "image_size": 64, "lr": 0.002, "freeze_backbone": False,
                "initial_weights": sha}  # fmt: skip

    run = tmp_path / "run"
    run.mkdir()

    def resume(sha: str | None) -> None:
        now = settings(sha)
        check_same_experiment(str(run), now, "a training run", added_run_settings(now))

    resume("a" * 64)  # records
    resume("a" * 64)  # resumes
    with pytest.raises(ConfigError, match=r"initial_weights 'a{64}' → 'b{64}'"):
        resume("b" * 64)
    old = {"data_fingerprint": "f", "image_size": 64, "lr": 0.002}  # recorded by an earlier cxr
    (run / SETTINGS_NAME).write_text(json.dumps(old))
    now = settings("c" * 64)
    check_same_experiment(str(run), now, "a training run", added_run_settings(now))  # resumes
