"""GPU: ResNet50 at 224 px with bf16 autocast and channels_last, the limit and cxr's own path to it.

Training images/s with the batches already on the GPU (the limit; eager and `torch.compile`d, with and
without cxr's augmentation), through cxr's Ray Data → Ray Train path (with the share of time the host
waits for the next batch), DDP over every visible GPU (as many steps per worker as the 1-GPU run), and
inference at batch 64: the Predictor that Serve runs vs the bare bf16 forward. Sized to finish in under
8 minutes on one GPU. `--device cpu --quick` runs the same code on a tiny model, so tests exercise it
where there is no GPU.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrcore.bench.data import write_phantoms
from cxrcore.bench.report import Row, Section, Target, ray_installed, usable_cores
from cxrcore.bench.train import ray_train_run
from cxrcore.config import BenchmarkConfig, ConfigError, IngestConfig, TrainConfig

TARGET = Target("figure", 4000.0)
"""Issue 9: ≥ 4,000 training images/s on an H100/H200-class GPU (NVIDIA's ResNet50 v1.5 with AMP: 2,470
on an A100)."""


@dataclass(frozen=True)
class GpuPlan:
    """What the gpu section runs: the model, the sizes, and how long each measurement lasts."""

    model: str
    size: int
    batch_size: int
    steps: int
    """timed training steps per limit measurement (after `warmup_steps`, which include compiling)."""
    warmup_steps: int
    images: int
    """synthetic images for the Ray Data → Ray Train path's 1-GPU run; its DDP run gets this many per GPU."""
    epochs: int
    inference_batch: int
    inference_seconds: float


FULL = GpuPlan("resnet50", 224, 256, 30, 8, 4096, 3, 64, 3.0)
QUICK = GpuPlan("tiny_resnet", 64, 8, 2, 1, 48, 2, 8, 0.2)


def check_device(device: str) -> None:
    """Fail at once, saying why, when the gpu section is asked for CUDA on a machine without it."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "gpu: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU machine, "
            "or run its code path on a tiny model with `gpu --device cpu --quick`"
        )


def benchmark_gpu(config: BenchmarkConfig, through_ray: bool = True) -> Section:
    """The limit, cxr's Ray path (skipped when `through_ray` is False, or Ray is not installed) and
    inference, as one section."""
    import torch

    check_device(config.device)
    without_ray = None if through_ray else "its code is the train section's"
    if through_ray and not ray_installed():
        # A GPU machine lent with torch but not Ray (its wheel is larger than what such a machine can be
        # sent) still measures the limit, which is the target, and inference.
        without_ray = "Ray is not installed on this machine"
    plan = QUICK if config.quick else FULL
    device = torch.device(config.device)
    backend = "inductor" if device.type == "cuda" else "eager"
    with tempfile.TemporaryDirectory(prefix="cxr-bench-gpu-", dir=config.work_dir) as work:
        with torch.backends.cudnn.flags(enabled=True, benchmark=True):  # the limit: cuDNN picks its kernels
            limit, checkpoint, compile_error = train_limit(plan, device, backend, Path(work) / "limit")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # leave the GPU's memory to the Ray Train workers
        ray = None
        if without_ray is None:
            try:
                ray = train_through_ray(config, plan, Path(work))
            except Exception as error:  # the limit and inference measured above still make a table
                traceback.print_exc()
                without_ray = f"it failed, {_failure(error)}"
        with torch.backends.cudnn.flags(enabled=True, benchmark=True):
            inference = measure_inference(
                checkpoint, plan, device, backend if compile_error is None else None
            )
    return gpu_section(plan, device.type, backend, limit, ray, inference, compile_error, without_ray)


def gpu_section(
    plan: GpuPlan,
    device: str,
    backend: str,
    limit: dict[str, dict[str, float]],
    ray: dict[str, Any] | None,
    inference: dict[str, Any],
    compile_error: str | None = None,
    without_ray: str | None = None,
) -> Section:
    """The gpu section's tables from its measurements; `compile_error` says why torch.compile failed, and
    `without_ray` why the Ray path was not run (where `ray` is None)."""
    best = max(limit, key=lambda name: limit[name]["images_per_s"])
    target = TARGET if device == "cuda" else None
    rows = [Row(f"training, data on the {device}, best ({best})", limit[best]["images_per_s"], "images/s",
                target=target)]  # fmt: skip
    breakdown: list[list[Any]] = [
        [f"data on the {device}: {name}", figures["images_per_s"], None, figures["warmup_s"]]
        for name, figures in limit.items()
    ]
    if ray is not None:
        one, ddp, devices = ray["one_worker"], ray["ddp"], ray["devices"]
        rows.append(
            Row("training through Ray Data → Ray Train, 1 worker", one["images_per_s"], "images/s",
                f"data on the {device}, the same eager step", limit["eager"]["images_per_s"])
        )  # fmt: skip
        breakdown.append(["Ray Data → Ray Train, 1 worker", one["images_per_s"], one["data_wait_share"],
                          one["seconds"]])  # fmt: skip
        if ddp is not None:
            rows.append(
                Row(f"DDP over {devices} GPUs (Ray Train)", ddp["images_per_s"], "images/s",
                    f"{devices} × 1 worker", devices * one["images_per_s"])
            )  # fmt: skip
            ddp_figures = [ddp["images_per_s"], ddp["data_wait_share"], ddp["seconds"]]
            breakdown.append([f"Ray Train DDP, {devices} workers", *ddp_figures])
    forward = "bare forward, bf16, channels_last" + (", compiled" if inference["compiled"] else "")
    rows.append(
        Row(f"inference, batch {plan.inference_batch}: Predictor.predict_proba",
            inference["predictor_images_per_s"], "images/s", forward, inference["forward_images_per_s"])
    )  # fmt: skip
    tracing = " (on the CPU: traces the model, generates no kernels)" if backend == "eager" else ""
    notes = [
        f"{plan.model} at {plan.size} px, batch {plan.batch_size}, AdamW, bf16 autocast, channels_last. The "
        "step is cxr's `run_epoch`: batch preparation, augmentation, forward, backward, optimizer. "
        f"torch.compile backend: {backend}{tracing}.",
        f"Data on the {device}: uint8 batches already there, timed over {plan.steps} steps after "
        f"{plan.warmup_steps} warm-up step(s) (warm-up s includes compiling), cuDNN autotuning on. cxr's "
        "own loop has the same channels_last model and cuDNN autotuning on a GPU, and does not compile.",
        "host wait for data %: share of the training time the training loop's host thread spent waiting "
        "for the next batch (`run_epoch`'s wall-clock timer, not CUDA events): the GPU may still run the "
        "kernels queued before it, so this is not the GPU's idle time, only an upper bound on it.",
        "Inference: `Predictor.predict_proba` as Serve calls it (uint8 images resized on the CPU, fp32) vs "
        "the bare model forward on a batch already on the device.",
    ]
    if compile_error:
        notes.append(f"torch.compile failed, so every figure is eager: {compile_error}")
    elif inference.get("compile_error"):
        notes.append(
            f"torch.compile failed for the inference forward, which is eager: {inference['compile_error']}"
        )
    if ray is None:
        notes.append(f"The Ray Data → Ray Train path was not run here: {without_ray or 'not asked for'}.")
    elif ray["ddp"] is None:
        notes.append(f"DDP: {ray['devices']} GPU(s) visible, nothing to spread over; not measured.")
    else:
        notes.append(
            f"DDP: {ray['ddp_images']} synthetic images ({plan.images} per GPU), so each of the "
            f"{ray['devices']} workers runs as many steps per epoch as the 1-GPU run on {plan.images}."
        )
    return Section(
        name="gpu",
        title=f"GPU: {plan.model} at {plan.size} px",
        rows=rows,
        breakdown=(["run", "images/s", "host wait for data %", "warm-up or run s"], breakdown),
        notes=notes,
        details={
            "plan": dataclasses.asdict(plan),
            "compile_backend": backend,
            "compile_error": compile_error,
            "limit": limit,
            "ray": ray,
            "inference": inference,
        },
    )


def train_limit(
    plan: GpuPlan, device: Any, backend: str, checkpoint_dir: Path
) -> tuple[dict[str, dict[str, float]], Path, str | None]:
    """Images/s of cxr's training step on batches already on `device`: eager and compiled, augmented or not.

    Returns the figures, a checkpoint of the trained model (for the inference measurement) and, where
    `torch.compile` failed (inductor needs Triton and a C compiler on the machine), why: the figures are
    then the eager ones, and one missing tool does not cost the whole table.
    """
    import torch

    from cxrcore.checkpoint import ModelCard, save_checkpoint
    from cxrcore.data.batches import AugmentConfig
    from cxrcore.models import create_model, get_build_args, get_input_spec
    from cxrcore.train.engine import run_epoch

    torch.manual_seed(0)
    model = create_model(plan.model, image_size=plan.size).to(device)  # built channels_last
    spec = get_input_spec(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _device_batches(plan, device)
    figures: dict[str, dict[str, float]] = {}
    compile_error = None
    for compiled in (False, True):
        net = torch.compile(model, backend=backend) if compiled else model
        for augmented in (True, False):
            name = ("compiled" if compiled else "eager") + ("" if augmented else ", no augmentation")

            def epoch(steps: int, net: Any = net, augmented: bool = augmented) -> Any:
                return run_epoch(
                    net, (batches[i % len(batches)] for i in range(steps)), spec, optimizer=optimizer,
                    augmentation=AugmentConfig() if augmented else None, autocast_dtype=torch.bfloat16,
                )  # fmt: skip

            started = time.perf_counter()
            try:
                epoch(plan.warmup_steps)
            except Exception as error:
                if not compiled:
                    raise
                compile_error = _failure(error)
                break
            warmup = time.perf_counter() - started
            result = epoch(plan.steps)
            figures[name] = {"images_per_s": result.count / result.seconds, "warmup_s": warmup}
    card = ModelCard(model=get_build_args(model), input_spec=spec.to_dict(), data={"size": plan.size})
    return figures, save_checkpoint(checkpoint_dir, model, card), compile_error


def train_through_ray(config: BenchmarkConfig, plan: GpuPlan, work: Path) -> dict[str, Any]:
    """cxr's own path: synthetic phantoms, Ray Data ingest, `cxr train` on 1 GPU, then DDP on all of them
    with as many images per GPU: each DDP worker takes its share of the data, so on the 1-GPU run's 4,096
    images 8 workers at batch 256 would run 2 steps an epoch, timing start-up and the epoch's ends."""
    import torch

    from cxrcore.data.ingest import ingest_dataset
    from cxrcore.runtime import init_ray

    init_ray(config.address)
    raw, dataset = work / "raw", str(work / "dataset")
    processes = 1 if config.quick else usable_cores()
    write_phantoms(raw, plan.images, processes=processes)
    ingest_dataset(IngestConfig(raw=str(raw), out=dataset, size=plan.size))
    on_gpu = config.device == "cuda"
    train = TrainConfig(
        data=dataset, model=plan.model, epochs=plan.epochs, workers=1, gpu=on_gpu, batch_size=plan.batch_size,
        image_size=plan.size, pretrained="none", out=str(work / "runs"), name="gpu-1", max_failures=0,
        address=config.address,
    )  # fmt: skip
    devices = torch.cuda.device_count() if on_gpu else 0
    one = ray_train_run(train)
    ddp, ddp_images = None, None
    if devices > 1:
        raw_ddp, dataset_ddp = work / "raw-ddp", str(work / "dataset-ddp")
        ddp_images = write_phantoms(raw_ddp, plan.images * devices, processes=processes)
        ingest_dataset(IngestConfig(raw=str(raw_ddp), out=dataset_ddp, size=plan.size))
        ddp = ray_train_run(dataclasses.replace(train, data=dataset_ddp, workers=devices, name="gpu-ddp"))
    return {"devices": devices, "one_worker": one, "ddp": ddp, "ddp_images": ddp_images}


def measure_inference(checkpoint: Path, plan: GpuPlan, device: Any, backend: str | None) -> dict[str, Any]:
    """Images/s of `Predictor.predict_proba` on uint8 images vs the bare bf16 forward (eager, and compiled
    with `backend` unless it is None), at one batch size."""
    import numpy as np
    import torch

    from cxrcore.inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device)
    images = list(np.random.default_rng(0).integers(0, 256, (plan.inference_batch, plan.size, plan.size),
                                                    dtype=np.uint8))  # fmt: skip
    predictor_rate = _rate(lambda: predictor.predict_proba(images), plan, device)
    model = predictor.model  # channels_last, as every model is built
    inputs = torch.randn(plan.inference_batch, 1, plan.size, plan.size, device=device)
    inputs = inputs.to(memory_format=torch.channels_last)
    forwards = {"eager": model, **({"compiled": torch.compile(model, backend=backend)} if backend else {})}
    rates, compile_error = {}, None
    for name, net in forwards.items():

        def forward(net: Any = net) -> Any:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return net(inputs)

        try:
            rates[name] = _rate(forward, plan, device)
        except Exception as error:
            if name == "eager":
                raise
            compile_error = _failure(error)
    best = max(rates, key=rates.__getitem__)
    return {
        "predictor_images_per_s": predictor_rate,
        "forward_images_per_s": rates[best],
        "forward_images_per_s_by_mode": rates,
        "compiled": best == "compiled",
        "compile_error": compile_error,
    }


def _rate(call: Callable[[], Any], plan: GpuPlan, device: Any) -> float:
    """Images/s of `call` (one batch of plan.inference_batch each): 2 warm-up calls, then ≥ 3 calls over at
    least plan.inference_seconds, synchronised with the device."""
    for _ in range(2):
        call()
    _sync(device)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < plan.inference_seconds:
        call()
        calls += 1
    _sync(device)
    return calls * plan.inference_batch / (time.perf_counter() - started)


def _failure(error: BaseException) -> str:
    """One line on why a step failed: the exception's type and the first line of its message."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:300]}"


def _device_batches(plan: GpuPlan, device: Any, count: int = 4) -> list[dict[str, Any]]:
    """`count` batches of random uint8 images (and empty masks) already on `device`, as the loader yields."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (plan.batch_size, plan.size, plan.size)
    return [
        {
            "image": torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(device),
            "mask": torch.zeros(shape, dtype=torch.uint8, device=device),
            "has_mask": torch.zeros(plan.batch_size, dtype=torch.bool, device=device),
            "label_index": torch.randint(0, 4, (plan.batch_size,), generator=generator).to(device),
        }
        for _ in range(count)
    ]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
