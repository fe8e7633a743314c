"""Side-by-side speed measurements (`python -m jobs.benchmark`): ratios from one run, never timed tests."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from cxrcore.config import BenchmarkConfig, IngestConfig


def benchmark_ingest(config: BenchmarkConfig) -> dict[str, Any]:
    """Ray Data ingest vs a plain single-process PIL loop doing the same decode and resize."""
    from cxrcore.data.ingest import ingest_dataset
    from cxrcore.data.layout import scan_layout
    from cxrcore.data.synthetic import write_synthetic_dataset
    from cxrcore.data.transforms import decode_gray, resize_image, resize_mask
    from cxrcore.runtime import init_ray

    with tempfile.TemporaryDirectory(prefix="cxr-bench-", dir=config.work_dir) as work:
        raw = Path(work) / "raw"
        synth = write_synthetic_dataset(raw, per_class=config.images // 4, seed=0)
        entries = scan_layout(raw).entries

        started = time.perf_counter()
        for entry in entries:
            resize_image(decode_gray(Path(entry.image_path).read_bytes()), config.size)
            if entry.mask_path:
                resize_mask(decode_gray(Path(entry.mask_path).read_bytes()), config.size)
        loop_seconds = time.perf_counter() - started

        started = time.perf_counter()
        init_ray(config.address)
        ray_start_seconds = time.perf_counter() - started
        started = time.perf_counter()
        report = ingest_dataset(IngestConfig(raw=str(raw), out=str(Path(work) / "dataset"), size=config.size))
        ingest_seconds = time.perf_counter() - started

    n = len(entries)
    return {
        "images": n,
        "size": config.size,
        "synth_images_per_s": round(synth.images_per_second, 1),
        "pil_loop_images_per_s": round(n / loop_seconds, 1),
        "ray_ingest_images_per_s": round(n / ingest_seconds, 1),
        "ray_ingest_vs_pil_loop": round(loop_seconds / ingest_seconds, 2),
        # The decode stage alone (scan, decode, validate, resize, hash) is what the loop does, plus hashing.
        "ray_decode_stage_images_per_s": round(n / report["seconds_by_stage"]["scan_and_decode"], 1),
        "ray_seconds_by_stage": report["seconds_by_stage"],
        "ray_start_s": round(ray_start_seconds, 1),
        "ingested": report["ingested"],
    }


def benchmark_train(config: BenchmarkConfig) -> dict[str, Any]:
    """Training throughput (images/s) of each model with 1 and with 2 Ray Train workers."""
    from cxrcore.config import TrainConfig
    from cxrcore.data.ingest import ingest_dataset
    from cxrcore.data.synthetic import write_synthetic_dataset
    from cxrcore.runtime import init_ray
    from cxrcore.train.trainer import fit

    init_ray(config.address)
    results: dict[str, Any] = {"images": config.images, "size": config.size}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-", dir=config.work_dir) as work:
        raw, dataset = Path(work) / "raw", str(Path(work) / "dataset")
        write_synthetic_dataset(raw, per_class=config.images // 4, seed=0)
        ingest_dataset(IngestConfig(raw=str(raw), out=dataset, size=config.size))
        for model in config.models.split(","):
            for workers in (1, 2):
                result = fit(
                    TrainConfig(
                        data=dataset, model=model, epochs=2, workers=workers, gpu=config.gpu,
                        pretrained="none", out=str(Path(work) / "runs"), name=f"{model}-{workers}",
                    )
                )  # fmt: skip
                # Epoch 2: the first includes worker start-up and warm-up.
                results[f"{model}_{workers}w_images_per_s"] = round(result.metrics["train_images_per_s"], 1)
            results[f"{model}_2w_vs_1w"] = round(
                results[f"{model}_2w_images_per_s"] / results[f"{model}_1w_images_per_s"], 2
            )
    return results


BENCHMARKS = {"ingest": benchmark_ingest, "train": benchmark_train}
