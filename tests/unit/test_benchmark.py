"""The benchmark harness without Ray: report structure, ratios from the run's own figures, settings, the
gpu section's code path on the CPU, serve.benchmark's output read back, and the engine's data-wait timer.

Never a speed assertion: figures are whatever this machine gives.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxrcore.bench.data import sample_raw
from cxrcore.bench.gpu import benchmark_gpu, check_device
from cxrcore.bench.report import (
    CpuShare,
    Report,
    Row,
    Section,
    Target,
    format_number,
    machine_info,
    usable_cores,
    wait_for_quiet,
)
from cxrcore.bench.serve import CPU_PARTS, parse_serve_output, serve_command, serve_section
from cxrcore.bench.train import _summary, memory_batches
from cxrcore.cli import main
from cxrcore.config import SERVE_UPLOAD_FORMATS, BenchmarkConfig, ConfigError
from cxrcore.data.ingest import _shuffle_key
from cxrcore.data.layout import scan_layout
from cxrcore.data.synthetic import write_synthetic_dataset
from cxrcore.labels import CLASSES
from cxrcore.models import create_model, get_input_spec
from cxrcore.train.engine import combine, run_epoch
from tests.torch_threads import one_torch_thread


def check_report(data: dict[str, Any], sections: list[str]) -> None:
    """benchmark.json as every reader may rely on it; each ratio is its own row's figure / baseline."""
    assert set(data) == {"started", "machine", "settings", "sections"}
    assert {"cores", "cpu", "cpu_capability", "torch_threads", "gpu", "ray", "torch", "python"} <= set(
        data["machine"]
    )
    assert list(data["sections"]) == sections
    for section in data["sections"].values():
        assert section["error"] is None, section["error"]
        for row in section["rows"]:
            assert set(row) == {
                "measure",
                "value",
                "unit",
                "baseline",
                "baseline_value",
                "ratio",
                "target",
                "met",
            }
            if row["value"] is not None and row["baseline_value"]:
                assert row["ratio"] == pytest.approx(row["value"] / row["baseline_value"], abs=1e-3)
            else:
                assert row["ratio"] is None
            assert (row["met"] is None) == (row["target"] is None or row["value"] is None)


def test_rows_compute_ratio_added_and_target() -> None:
    row = Row("Ray ingest", 300.0, "images/s", "one process", 200.0, Target("ratio", 1.6))
    assert row.ratio == 1.5 and row.added == 100.0 and row.met is False
    assert Row("x", 400.0, "images/s", "y", 200.0, Target("ratio", 1.6)).met is True
    latency = Row("p50", 14.0, "ms", "one forward", 5.0, Target("added", 10, at_most=True))
    assert latency.met is True and latency.to_dict()["target"] == "added ≤ 10 ms"
    assert Row("alone", 3.0, "s").to_dict()["ratio"] is None
    assert Row("no figure", None, "images/s", "y", 2.0, Target("figure", 1)).met is None
    assert [format_number(v) for v in (0.2812, 23.61, 853.2, 2470.0)] == ["0.281", "23.6", "853", "2,470"]
    assert format_number(0.25, "%") == "25%" and format_number(None) == "n/a"


def test_report_writes_json_and_a_markdown_table_per_section(tmp_path: Path) -> None:
    rows = [Row("Ray Data ingest", 236.0, "images/s", "one process", 853.0, Target("ratio", 1.6))]
    sections = [
        Section(
            "ingest", "Ingest", rows, (["stage", "seconds", "wait %"], [["decode", 1.5, 0.25]]), ["a note"]
        ),
        Section("gpu", "GPU", skipped="no CUDA device visible on this machine"),
    ]
    report = Report(machine_info(), {"command": "python -m jobs.benchmark all", "quick": False}, sections)
    json_path, markdown_path = report.write(tmp_path / "out")
    data = json.loads(json_path.read_text())
    check_report(data, ["ingest", "gpu"])
    assert data["sections"]["ingest"]["rows"][0]["ratio"] == 0.277
    assert data["sections"]["ingest"]["breakdown"] == [{"stage": "decode", "seconds": 1.5, "wait %": 0.25}]
    markdown = markdown_path.read_text()
    assert "| measure | figure | baseline | ratio | target | met? |" in markdown
    assert (
        "| Ray Data ingest | 236 images/s | one process: 853 images/s | 0.28× | ≥ 1.6× | **no** |" in markdown
    )
    assert "| decode | 1.5 | 25% |" in markdown
    assert "Skipped: no CUDA device" in markdown and "--quick run" not in markdown and "- a note" in markdown


def test_a_quick_report_judges_no_target(tmp_path: Path) -> None:
    """A --quick figure shows that the code runs: its markdown has no target or met? column, no yes/**no**
    (the JSON keeps both, beside settings.quick)."""
    rows = [
        Row("Ray Data ingest", 236.0, "images/s", "one process", 853.0, Target("ratio", 1.6)),
        Row("Ray Train", 90.0, "images/s", "plain", 10.0, Target("ratio", 0.9)),
    ]
    report = Report(machine_info(), {"command": "x", "quick": True}, [Section("ingest", "Ingest", rows)])
    json_path, markdown_path = report.write(tmp_path)
    markdown = markdown_path.read_text()
    assert "| measure | figure | baseline | ratio |\n" in markdown and "| met? |" not in markdown
    assert "| Ray Data ingest | 236 images/s | one process: 853 images/s | 0.28× |\n" in markdown
    assert "**no**" not in markdown and "| yes |" not in markdown and "no target is judged" in markdown
    assert json.loads(json_path.read_text())["sections"]["ingest"]["rows"][0]["met"] is False


def test_usable_cores_are_the_affinitys_capped_by_a_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """taskset/cpusets narrow the affinity, a Kubernetes CPU limit sets cgroup v2's cpu.max: os.cpu_count()
    sees neither."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(cpu_max) == 4  # no cgroup file: the affinity's
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == 4  # no quota
    cpu_max.write_text("250000 100000\n")
    assert usable_cores(cpu_max) == 3  # 2.5 CPUs of quota: 3 cores busy at once
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("800000 100000\n")
    assert usable_cores(cpu_max) == 4  # a quota above the affinity does not add cores
    cpu_max.write_text("garbage")
    assert usable_cores(cpu_max) == 4

    def no_affinity(pid: int) -> set[int]:
        raise OSError("not here")

    monkeypatch.setattr(os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores(tmp_path / "none") == 6


def test_others_cpu_share_is_busy_core_time_less_this_processs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy core time less this process's CPU time, over the wall time of this process's cores."""
    from cxrcore.bench import report

    before = report._cpu_now()
    if before is None:
        pytest.skip("no /proc/stat here")
    started = time.process_time()
    while time.process_time() - started < 0.3:  # this process's own work is not others'
        pass
    after = report._cpu_now()
    assert after is not None and after[1] - before[1] >= 0.25 and after[0] - before[0] >= 0.2
    readings = iter([(10.0, 5.0, 100.0), (12.0, 6.0, 101.0)])
    monkeypatch.setattr(report, "_cpu_now", lambda: next(readings))
    monkeypatch.setattr(report, "usable_cpu_ids", lambda: {0, 1})
    assert CpuShare().others() == pytest.approx(0.5)  # 2 busy CPU-s, 1 of them ours, over 2 cores × 1 s
    monkeypatch.setattr(report, "_cpu_now", lambda: None)
    assert CpuShare().others() is None


def test_quick_presets_and_settings_errors_name_the_flag() -> None:
    full, quick = BenchmarkConfig(), BenchmarkConfig(quick=True)
    assert (full.images, full.models, full.train_size, full.epochs) == (
        2000,
        "cnn_lstm,dual_cnn,resnet18",
        128,
        3,
    )
    assert quick.images < full.images and quick.model_names()[0].startswith("tiny_")
    assert BenchmarkConfig(quick=True, images=500).images == 500  # a flag given wins over the preset
    assert full.sections() == ["ingest", "train", "serve", "gpu"] and BenchmarkConfig("serve").sections() == [
        "serve"
    ]
    assert BenchmarkConfig(workers="0,2").worker_counts() == [0, 2]
    assert BenchmarkConfig(raw="raw").images is None  # a raw folder as it is, unless --images is given
    assert BenchmarkConfig(raw="raw", images=2000).images == 2000
    for bad, flag in [
        ({"what": "everything"}, "WHAT"), ({"workers": "two"}, "--workers"), ({"epochs": 1}, "--epochs"),
        ({"device": "cpu"}, "--device"), ({"train_size": 8}, "--train-size"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=flag.replace("WHAT", "--what")):
            BenchmarkConfig(**bad)


def test_raw_folder_sampled_or_repeated_to_the_images_asked_with_masks_paired(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_synthetic_dataset(source, per_class=3, seed=0)  # 12 images, 12 masks
    found = scan_layout(source).entries
    more, fewer = tmp_path / "more", tmp_path / "fewer"
    assert sample_raw(source, more, 30) == (30, 12)
    assert sample_raw(source, fewer, 5) == (5, 12)
    repeated = scan_layout(more).entries
    assert len(repeated) == 30 and all(entry.mask_path for entry in repeated)
    in_order = sorted(found, key=_shuffle_key)  # the ingest's row order: classes interleaved
    expected = Counter(entry.label for entry in in_order * 2 + in_order[:6])  # cycled: 12 + 12 + 6
    assert Counter(entry.label for entry in repeated) == expected and set(expected) == set(CLASSES)
    for entry in repeated:  # every copy is a file of the source, byte for byte, with its own mask
        original = source / entry.label / "images" / (Path(entry.file).stem.split("~")[0] + ".png")
        assert Path(entry.image_path).read_bytes() == original.read_bytes()
    assert len(scan_layout(fewer).entries) == 5
    assert len({entry.label for entry in scan_layout(fewer).entries}) > 1  # not the first class only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_section_without_cuda_fails_at_once_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        check_device("cuda")
    assert main(["benchmark", "gpu", "--out", str(tmp_path)]) == 2
    assert "--device cpu --quick" in capsys.readouterr().err
    assert not (tmp_path / "benchmark.json").exists()


def test_gpu_section_code_path_on_cpu(tmp_path: Path) -> None:
    """The gpu section's limit, compile and inference code on a tiny model (its Ray path is train's)."""
    config = BenchmarkConfig("gpu", quick=True, device="cpu", out=str(tmp_path), work_dir=str(tmp_path))
    with one_torch_thread():
        section = benchmark_gpu(config, through_ray=False)
    report = Report(machine_info(), {"command": "test", "quick": True}, [section])
    check_report(json.loads(report.write(tmp_path)[0].read_text()), ["gpu"])
    limit = section.details["limit"]
    assert set(limit) == {"eager", "eager, no augmentation", "compiled", "compiled, no augmentation"}
    assert all(figures["images_per_s"] > 0 for figures in limit.values())
    assert [row.measure.split(",")[0].split(":")[0] for row in section.rows] == ["training", "inference"]
    assert section.rows[0].target is None  # 4,000 images/s is a GPU's target
    assert section.details["inference"]["predictor_images_per_s"] > 0


def test_gpu_section_reports_eager_figures_when_torch_compile_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU machine without a C compiler (inductor's need) still gets its table, saying why it is eager."""
    import torch

    class Uncompiled(torch.nn.Module):
        """What torch.compile returns on such a machine: a module whose first call fails to compile."""

        def __init__(self, model: torch.nn.Module, **_: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")

    monkeypatch.setattr(torch, "compile", Uncompiled)
    config = BenchmarkConfig("gpu", quick=True, device="cpu", out=str(tmp_path), work_dir=str(tmp_path))
    with one_torch_thread():
        section = benchmark_gpu(config, through_ray=False)
    why = "RuntimeError: Failed to find C compiler. Please specify via CC environment variable."
    assert set(section.details["limit"]) == {"eager", "eager, no augmentation"}
    assert section.details["compile_error"] == why
    assert section.details["inference"]["compiled"] is False
    assert set(section.details["inference"]["forward_images_per_s_by_mode"]) == {"eager"}
    assert f"torch.compile failed, so every figure is eager: {why}" in section.notes
    assert section.rows[0].measure.startswith("training, data on the cpu, best (eager")


def test_gpu_section_runs_its_torch_parts_where_ray_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lent GPU machine has torch but not Ray: the limit (the target) and inference are still measured."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    with one_torch_thread():
        assert main(["benchmark", "gpu", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark.json").read_text())
    gpu = data["sections"]["gpu"]
    assert gpu["details"]["ray"] is None and gpu["details"]["limit"]["eager"]["images_per_s"] > 0
    assert (
        "The Ray Data → Ray Train path was not run here: Ray is not installed on this machine."
        in gpu["notes"]
    )
    assert [row["measure"].split(",")[0] for row in gpu["rows"]] == ["training", "inference"]  # none via Ray
    assert gpu["quiet"]["window_s"] == 0.2 and gpu["quiet"]["waited_s"] < 5  # --quick only looks
    check_report(data, ["gpu"])


def test_a_section_waits_for_a_quiet_machine_no_longer_than_it_is_told() -> None:
    import subprocess
    import sys

    never = wait_for_quiet(max_wait_s=0.3, busy_below=0.0, window_s=0.1)  # no machine is under 0 % busy
    assert not never.quiet and 0.3 <= never.waited_s < 3 and never.busy is not None
    assert "still busy" in never.describe() and "figures may be low" in never.describe()
    at_once = wait_for_quiet(max_wait_s=30, busy_below=1.01, window_s=0.1)  # every machine is under 101 %
    assert at_once.quiet and at_once.waited_s < 3 and "waiting for a quiet machine" in at_once.describe()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        spinning = wait_for_quiet(max_wait_s=0.0, busy_below=0.0, window_s=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    cores = os.cpu_count() or 1
    assert spinning.busy is not None and spinning.busy >= 0.5 / cores  # one busy core (at least half of it)


def _http(batch: int, concurrency: int, p50: float, rate: float, **more: Any) -> dict[str, Any]:
    """One HTTP row; the limit measured around it ran at 210 images/s (and one image in 10 ms)."""
    around = {
        "batch": 8,
        "before": 200.0,
        "after": 220.0,
        "images_per_s": 210.0,
        "best": {"batch": 16, "before": 230.0, "after": 250.0, "images_per_s": 240.0},
    }
    one_image = {"direct_one_image_ms": 10.0} if concurrency == 1 else {}
    return {"max_batch_size": batch, "concurrency": concurrency, "p50_ms": p50, "p99_ms": 2 * p50,
            "requests_per_s": rate, "direct_around": around, **one_image, **more}  # fmt: skip


SERVE_SUMMARY = {  # the shape of the JSON line serve/benchmark.py prints last (int keys become strings)
    "model": "/tmp/x/tiny_dual_cnn",
    "upload_size": 299,
    "upload_format": "png",
    "direct": {
        "images_per_s": {"1": 125.0, "8": 240.0, "16": 200.0},
        "best_batch": 8,
        "best": "240.0 images/s at batch size 8",
    },
    "http": [
        _http(16, 1, 24.0, 38.0),
        _http(
            16,
            32,
            180.0,
            180.0,
            cpu_ms_per_request={"client": 1.5, "proxy": 4.0, "ingress": 6.0, "classifier": 9.0, "rest": 3.0},
        ),
        _http(1, 1, 14.0, 60.0, p95_ms=16.0),
        _http(1, 32, 400.0, 80.0),
    ],
    "burst": None,
}
SERVE_OUTPUT = "model ...: direct predict_proba, 1 thread(s): 220.0 images/s\n" + json.dumps(SERVE_SUMMARY)


def test_serve_section_reads_serve_benchmark_output() -> None:
    section = serve_section(parse_serve_output(SERVE_OUTPUT), "tiny_dual_cnn", 64, 16)
    by_measure = {row.measure: row for row in section.rows}
    at_32 = by_measure["HTTP, concurrency 32, batching on"]
    # The baseline is the limit measured around the row (210), not the sweep at the start (240).
    assert (at_32.value, at_32.baseline_value, at_32.ratio, at_32.met) == (180.0, 210.0, 180.0 / 210.0, True)
    assert by_measure["HTTP, concurrency 32, batching off"].met is False
    assert by_measure["HTTP, concurrency 1, batching on"].target is None  # issue 9 sets it at 32
    p50 = by_measure["HTTP p50, concurrency 1, batching off"]
    assert (p50.value, p50.baseline_value, p50.added, p50.met) == (14.0, 10.0, 4.0, True)
    assert by_measure["HTTP p50, concurrency 1, batching on"].met is False
    assert section.breakdown is not None
    assert [row[4] for row in section.breakdown[1]] == [None, None, 16.0, None]  # p95 where reported
    python = serve_section(parse_serve_output(SERVE_OUTPUT), "tiny_dual_cnn", 64, 16, proxy="Python proxy")
    assert "HTTP via Python proxy, concurrency 32, batching on" in {row.measure for row in python.rows}
    assert python.breakdown is not None and {row[6] for row in python.breakdown[1]} == {"Python proxy"}
    header, rows = section.breakdown
    assert header[7] == "direct at best batch" and rows[0][7] == "240 images/s (batch 16)"
    assert header[8:] == [f"CPU ms: {part}" for part in CPU_PARTS]
    assert rows[1][8:] == [1.5, 4.0, 6.0, 9.0, None, 3.0] and rows[0][8:] == [None] * len(CPU_PARTS)
    with pytest.raises(RuntimeError, match="no JSON"):
        parse_serve_output("Traceback ...\n")
    command = serve_command("cnn_lstm", 128, 200, 8123)
    assert command[1:3] == ["-m", "serve.benchmark"] and "1,8,32" in command and "8123" in command
    assert command[command.index("--sweep-rounds") + 1] == "3"
    from serve.benchmark import UPLOAD_SIZE

    assert "--upload-size" not in command and UPLOAD_SIZE == 299  # serve.benchmark's: the Kaggle database's
    big = serve_command("cnn_lstm", 128, 200, 8123, upload=2048)
    assert big[big.index("--upload-size") + 1] == "2048"
    notes = " ".join(serve_section({**SERVE_SUMMARY, "upload_size": 2048}, "tiny_dual_cnn", 64, 16).notes)
    assert "uploads are 2048 px PNGs" in notes
    assert command[command.index("--upload-format") + 1] == "png"
    dicom = serve_command("cnn_lstm", 128, 200, 8123, upload=1024, upload_format="dicom")
    assert dicom[dicom.index("--upload-format") + 1] == "dicom"
    summary = {**SERVE_SUMMARY, "upload_size": 1024, "upload_format": "dicom"}
    assert "uploads are 1024 px 12-bit DICOMs" in " ".join(
        serve_section(summary, "tiny_dual_cnn", 64, 16).notes
    )
    summary = {**SERVE_SUMMARY, "upload_size": 2048, "upload_format": "png16"}
    assert "uploads are 2048 px 16-bit PNGs" in " ".join(
        serve_section(summary, "tiny_dual_cnn", 64, 16).notes
    )


def test_the_benchmark_accepts_every_upload_format_the_serve_benchmark_makes() -> None:
    from serve.benchmark import UPLOAD_FORMATS

    assert set(SERVE_UPLOAD_FORMATS) == set(UPLOAD_FORMATS)
    with pytest.raises(ConfigError, match="--serve-upload-format: must be one of png, png16, dicom"):
        BenchmarkConfig("serve", serve_upload_format="tiff")


@pytest.mark.parametrize("fmt", sorted(SERVE_UPLOAD_FORMATS))
def test_serve_benchmark_uploads_decode_to_the_size_asked_with_detail(fmt: str) -> None:
    """The DICOM goes through both LUTs (rescale, window) as a hospital's would, and keeps its gradient."""
    from cxrcore.decode import decode_upload
    from serve.benchmark import make_upload

    upload = make_upload(fmt, 96)
    image = decode_upload(upload.data, upload.content_type)
    assert image.shape == (96, 96) and len(np.unique(image)) > 64
    assert image[:, :10].mean() < image[:, -10:].mean()  # dark to bright, left to right


def test_the_limit_sweep_takes_the_batch_sizes_in_turns_and_keeps_each_ones_median(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One lucky measurement of a batch size does not make it the best: 16 ran 89 images/s once and 60 twice,
    8 ran 75 every time."""
    from serve import benchmark

    monkeypatch.setattr(benchmark, "BATCH_SIZES", (8, 16))
    rates = {8: iter([75.0, 75.0, 75.0]), 16: iter([89.0, 60.0, 60.0])}
    taken: list[int] = []

    class Limit(benchmark.DirectLimit):
        def __init__(self) -> None:  # no model: the rates above
            pass

        def rate(self, batch_size: int, seconds: float = 1.0) -> float:
            taken.append(batch_size)
            return next(rates[batch_size])

    sweep = Limit().sweep(rounds=3)
    assert taken == [8, 16, 8, 16, 8, 16]
    assert sweep["images_per_s"] == {8: 75.0, 16: 60.0} and sweep["best_batch"] == 8
    assert sweep["rounds"][16] == [89.0, 60.0, 60.0]
    rates.update({8: iter([75.0]), 16: iter([89.0])})
    assert Limit().sweep(rounds=1)["best_batch"] == 16  # one round: the lucky measurement wins
    summary = {**SERVE_SUMMARY, "direct": {**SERVE_SUMMARY["direct"], "rounds": {"8": [1, 2, 3]}}}
    notes = " ".join(serve_section(summary, "tiny_dual_cnn", 64, 16).notes)
    assert "each the median of 3 rounds taken in turns" in notes
    assert "rounds taken" not in " ".join(serve_section(SERVE_SUMMARY, "tiny_dual_cnn", 64, 16).notes)


def test_the_serve_notes_say_what_forward_batch_the_replica_measured_and_chose() -> None:
    sweep = {
        "images_per_s": {"1": 80.0, "2": 95.0, "4": 96.0, "8": 77.0},
        "best": 4,
        "rounds": 3,
        "seconds": 1.3,
    }
    http = [
        {**row, "forward_batch_size": 4 if row["max_batch_size"] > 1 else 1, "forward_sweep": sweep}
        for row in SERVE_SUMMARY["http"]
    ]
    notes = " ".join(serve_section({**SERVE_SUMMARY, "http": http}, "tiny_dual_cnn", 64, 16).notes)
    assert "forward passes of up to 4 images" in notes and "1: 80, 2: 95, 4: 96, 8: 77" in notes
    assert "forward passes" not in " ".join(serve_section(SERVE_SUMMARY, "tiny_dual_cnn", 64, 16).notes)


def test_each_http_figure_has_the_limit_measured_just_before_and_after_it() -> None:
    from serve.benchmark import _beside_the_limit

    events: list[str] = []
    rates = {8: iter([200.0, 220.0]), 1: iter([90.0, 110.0])}

    class Limit:
        def rate(self, batch_size: int) -> float:
            events.append(f"limit {batch_size}")
            return next(rates[batch_size])

    def measure() -> dict[str, Any]:
        events.append("http")
        return {"requests_per_s": 150.0}

    figures = _beside_the_limit(Limit(), 8, True, measure)  # type: ignore[arg-type]
    assert events == ["limit 8", "limit 1", "http", "limit 8", "limit 1"]
    assert figures["direct_around"] == {"batch": 8, "before": 200.0, "after": 220.0, "images_per_s": 210.0}
    assert figures["direct_one_image_ms"] == 10.0 and figures["requests_per_s"] == 150.0
    events.clear()
    rates[8] = iter([100.0, 100.0])
    assert "direct_one_image_ms" not in _beside_the_limit(Limit(), 8, False, measure)  # type: ignore[arg-type]
    assert events == ["limit 8", "http", "limit 8"]
    events.clear()  # the sweep's best batch rides along, in its own entry
    rates.update({4: iter([90.0, 94.0]), 8: iter([100.0, 104.0])})
    figures = _beside_the_limit(Limit(), 4, False, measure, best=8)  # type: ignore[arg-type]
    assert events == ["limit 4", "limit 8", "http", "limit 4", "limit 8"]
    assert figures["direct_around"]["images_per_s"] == 92.0 and figures["direct_around"]["batch"] == 4
    assert figures["direct_around"]["best"] == {
        "batch": 8,
        "before": 100.0,
        "after": 104.0,
        "images_per_s": 102.0,
    }


def test_each_http_row_is_compared_with_the_direct_forward_at_the_batch_the_replica_runs() -> None:
    """max_batch_size 8 run as forward passes of 4: concurrency 1 runs passes of 1, 32 passes of 4; the
    direct forward at the sweep's best batch (32) is no baseline for either."""
    http = [
        {**_http(8, 1, 24.0, 38.0), "forward_batch_size": 4},
        {**_http(8, 32, 180.0, 180.0), "forward_batch_size": 4},
    ]
    http[0]["direct_around"] = {
        "batch": 1,
        "images_per_s": 100.0,
        "best": {"batch": 32, "images_per_s": 300.0},
    }
    http[1]["direct_around"] = {
        "batch": 4,
        "images_per_s": 200.0,
        "best": {"batch": 32, "images_per_s": 300.0},
    }
    direct = {"images_per_s": {"1": 100.0, "4": 200.0, "32": 300.0}, "best_batch": 32}
    section = serve_section({**SERVE_SUMMARY, "direct": direct, "http": http}, "tiny_dual_cnn", 64, 16)
    at_1, _, at_32 = section.rows
    assert (at_1.baseline_value, at_32.baseline_value, at_32.ratio) == (100.0, 200.0, 0.9)
    assert at_32.baseline.startswith("direct predict_proba, batch 4 = min(concurrency, forward batch 4)")
    assert section.breakdown is not None
    assert [row[7] for row in section.breakdown[1]] == ["300 images/s (batch 32)"] * 2


def test_run_epoch_measures_the_wait_for_data() -> None:
    model = create_model("tiny_cnn_lstm")
    spec = get_input_spec(model)
    arrays = {
        "image": np.random.default_rng(0).integers(0, 256, (8, 64, 64), dtype=np.uint8),
        "mask": np.zeros((8, 64, 64), dtype=np.uint8),
        "has_mask": np.zeros(8, dtype=bool),
        "label_index": np.arange(8) % 4,
    }

    def slow(batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            time.sleep(0.05)
            yield batch

    batches = list(memory_batches(arrays, 4, np.random.default_rng(0)))
    assert [len(b["label_index"]) for b in batches] == [4, 4]
    assert sorted(torch.cat([b["label_index"] for b in batches]).tolist()) == sorted(arrays["label_index"])
    optimizer = torch.optim.AdamW(model.parameters())
    result = run_epoch(model, slow(iter(batches)), spec, optimizer=optimizer)
    assert result.count == 8 and 0.1 <= result.data_seconds <= result.seconds
    summary = combine([result, result])
    assert summary["data_wait_share"] == pytest.approx(result.data_seconds / result.seconds)
    epochs = [
        {"images_per_s": rate, "data_wait_share": wait}
        for rate, wait in [(10.0, 0.9), (20.0, 0.1), (30.0, None)]
    ]
    run = _summary(epochs, 1.0)
    assert run["images_per_s"] == pytest.approx(24.0) and run["data_wait_share"] == 0.1  # epoch 1 not counted
    assert _summary([{"images_per_s": 5.0, "data_wait_share": None}], 1.0)["images_per_s"] == 5.0


def test_all_runs_every_section_records_failures_and_skips_gpu_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The harness itself, with stand-in sections: a failure is reported and the run goes on."""
    from cxrcore import bench

    def measured(config: BenchmarkConfig) -> Section:
        return Section(
            "ingest", "Ingest", [Row("Ray", 3.0, "images/s", "one process", 2.0, Target("ratio", 1.6))]
        )

    def failing(config: BenchmarkConfig) -> Section:
        raise RuntimeError("no workers")

    monkeypatch.setitem(bench.RUNNERS, "ingest", measured)
    monkeypatch.setitem(bench.RUNNERS, "train", failing)
    monkeypatch.setitem(bench.RUNNERS, "serve", lambda config: Section("serve", "Serving"))
    monkeypatch.setitem(bench.RUNNERS, "gpu", lambda config: Section("gpu", "GPU"))
    assert main(["benchmark", "all", "--quick", "--out", str(tmp_path)]) == 1
    assert "section(s) failed: train" in capsys.readouterr().err
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert list(data["sections"]) == ["ingest", "train", "serve", "gpu"]
    assert data["sections"]["train"]["error"] == "RuntimeError: no workers"
    assert data["sections"]["ingest"]["rows"][0]["ratio"] == 1.5
    assert data["settings"]["command"] == f"python -m jobs.benchmark all --out {tmp_path} --quick"
    if not torch.cuda.is_available():
        assert data["sections"]["gpu"]["skipped"] == "no CUDA device visible on this machine"
    assert "Failed: RuntimeError: no workers" in (tmp_path / "benchmark.md").read_text()


def test_the_reports_command_line_repeats_every_choice_of_the_run(tmp_path: Path) -> None:
    from cxrcore.bench import command
    from cxrcore.config import add_config_arguments, config_from_args

    chosen = BenchmarkConfig(
        "all", out=str(tmp_path), quick=True, raw=str(tmp_path), images=300, serve_upload=2048,
        serve_upload_format="dicom", workers="2", train_size=96,
    )  # fmt: skip
    line = command(chosen)
    assert line.startswith(f"python -m jobs.benchmark all --out {tmp_path} --quick ")
    for flag in (
        "--raw",
        "--images 300",
        "--serve-upload 2048",
        "--serve-upload-format dicom",
        "--workers 2",
    ):
        assert flag in line
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, BenchmarkConfig)
    again = config_from_args(BenchmarkConfig, parser.parse_args(shlex.split(line)[3:]))
    assert again == chosen  # the line gives back the run's settings, presets and all
    assert (
        command(BenchmarkConfig("train", out=str(tmp_path)))
        == f"python -m jobs.benchmark train --out {tmp_path}"
    )


class _Answers:
    """A real HTTP server on loopback answering POSTs 200 until `fail_after` answers, then 500."""

    def __init__(self, fail_after: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        answers = iter(range(10**6))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept-alive connections, as the load generator uses them

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                status = 200 if next(answers) < fail_after else 500
                body = b'{"label": "Normal"}'
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/predict"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_serve_throughput_is_taken_while_every_client_has_a_request_in_flight() -> None:
    """The answers of the queue's filling and of the part-full tail are left out of requests/s."""
    from serve.benchmark import steady_rate

    # Concurrency 4: the first four answers and the last four come 1 s apart, the rest 0.1 s apart.
    ends = [1.0, 2.0, 3.0, 4.0, *(4.0 + 0.1 * i for i in range(1, 11)), 6.0, 7.0, 8.0, 9.0]
    assert steady_rate(ends, 4, start=0.0) == pytest.approx(10.0)  # 10 answers in the 1 s between
    assert steady_rate(list(reversed(ends)), 4, start=0.0) == pytest.approx(10.0)  # in any order
    assert steady_rate(ends, 1, start=0.0) == pytest.approx(16 / 7.0)  # 1: the 1st to the 17th
    assert steady_rate([1.0, 2.0, 3.0], 4, start=0.0) == pytest.approx(1.0)  # too few: all, from the start


def test_serve_load_generator_counts_answers_and_refuses_a_run_with_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """serve.benchmark's load generator: real POSTs over kept-alive connections; one non-200 answer voids
    the measurement instead of leaving it out of the figures."""
    import serve.benchmark as serve_benchmark

    monkeypatch.setattr(serve_benchmark, "_serve_pids", dict)  # no Serve here: the client's CPU only
    ok = _Answers(fail_after=10**6)
    try:
        stats = serve_benchmark._load(
            ok.url, serve_benchmark.Upload(b"png bytes", "image/png"), requests=24, concurrency=3
        )
    finally:
        ok.close()
    assert stats["requests_per_s"] > 0 and 0 < stats["p50_ms"] <= stats["p99_ms"]
    assert stats["requests_per_s_overall"] > 0
    assert stats["cpu_ms_per_request"]["client"] is not None

    failing = _Answers(fail_after=5)
    try:
        with pytest.raises(RuntimeError, match="HTTP 500"):
            serve_benchmark._load(
                failing.url, serve_benchmark.Upload(b"png bytes", "image/png"), requests=24, concurrency=3
            )
    finally:
        failing.close()


def test_gpu_section_keeps_its_table_when_the_ray_path_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lent GPU machine is lent for minutes: a Ray path that fails there (a package missing from a bare
    image) must not cost the limit and inference measured before it, and the notes say what failed."""
    from cxrcore.bench import gpu

    def broken(*_: Any) -> Any:
        raise ModuleNotFoundError("No module named 'openpyxl'")

    monkeypatch.setattr(gpu, "ray_installed", lambda: True)
    monkeypatch.setattr(gpu, "train_through_ray", broken)
    config = BenchmarkConfig("gpu", quick=True, device="cpu", out=str(tmp_path), work_dir=str(tmp_path))
    with one_torch_thread():
        section = benchmark_gpu(config)
    assert section.details["ray"] is None and section.details["limit"]["eager"]["images_per_s"] > 0
    assert (
        "The Ray Data → Ray Train path was not run here: it failed, "
        "ModuleNotFoundError: No module named 'openpyxl'." in section.notes
    )
    assert "Traceback" in capsys.readouterr().err  # the whole error, for whoever reads the run's log
