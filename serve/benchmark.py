"""Serving latency and throughput, measured side by side in one run on one machine.

HTTP p50/p99 and requests/s at each client concurrency, with batching on and off (one classifier
replica, so autoscaling does not blur it), next to the model's direct `predict_proba` throughput with
the threads of one replica at the batch the replica's forward passes run at that concurrency
(min(concurrency, its forward batch size)) and at the sweep's best batch size, measured again just
before and after each HTTP measurement:

    python -m serve.benchmark --registry REG --model production
    python -m serve.benchmark --arch dual_cnn --image-size 128   # untrained weights cost the same
    python -m serve.benchmark --burst 300 --max-queued 16        # overload: 503s and accepted latency
"""

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--registry", help="model registry; without one, --model is a checkpoint folder")
    parser.add_argument("--model", help="registry reference or checkpoint folder (default: untrained --arch)")
    parser.add_argument("--arch", default="tiny_dual_cnn", help="architecture of the untrained model")
    parser.add_argument("--image-size", type=int, help="input size of the untrained model (default: its own)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--concurrency", default="1,16", help="client threads, comma-separated")
    parser.add_argument(
        "--batch-size", type=int, default=0, help="max_batch_size when batching is on (default: the app's)"
    )
    parser.add_argument(
        "--forward-batch-size",
        type=int,
        default=0,
        help="images per forward pass (default 0: the size each replica measures fastest at load)",
    )
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of each model replica")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--upload-size", type=int, default=UPLOAD_SIZE, help="side of the uploads in px")
    parser.add_argument(
        "--upload-format",
        choices=sorted(UPLOAD_FORMATS),
        default="png",
        help="8-bit PNGs, as the Kaggle database's; 16-bit PNGs holding 12 bits; or 12-bit DICOMs with "
        "rescale and window, as a hospital's digital X-rays",
    )
    parser.add_argument("--burst", type=int, default=0, help="then send this many requests at once")
    parser.add_argument("--max-queued", type=int, default=64, help="the classifier's max_queued_requests")
    parser.add_argument(
        "--sweep-rounds",
        type=int,
        default=3,
        help="rounds of the direct limit's batch-size sweep, taken in turns",
    )
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from cxrcore.inference import batch_sizes
    from cxrcore.runtime import init_ray
    from serve.app import build_app
    from serve.deployments import resolve_model
    from serve.schemas import MAX_BATCH_SIZE, ServeArgs
    from serve.server import shutdown_serve

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    batching = args.batch_size or MAX_BATCH_SIZE["cpu"]
    # Every batch size a row may be compared with, min(concurrency, the replica's forward batch): the
    # replica's forward measures the sizes of batch_sizes(max_batch_size), or runs the size it was given.
    swept = {*BATCH_SIZES, *batch_sizes(batching), *(c for c in concurrencies if c < batching)}
    swept |= {args.forward_batch_size} if args.forward_batch_size else set()
    with tempfile.TemporaryDirectory() as work:
        model = args.model or str(_untrained(Path(work), args.arch, args.image_size))
        upload = make_upload(args.upload_format, args.upload_size)
        threads = max(1, int(args.num_cpus))  # Ray gives a replica OMP_NUM_THREADS = its whole CPUs
        limit = DirectLimit(resolve_model(args.registry, model).checkpoint, upload, threads)
        direct = limit.sweep(args.sweep_rounds, sizes=sorted(swept))
        init_ray(num_cpus=max(os.cpu_count() or 1, 4))  # as `cxr serve` starts it: HAProxy unless told not
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        rows: list[dict[str, Any]] = []
        burst: dict[str, Any] | None = None
        try:
            for batch_size in (batching, 1):
                app_args = ServeArgs(
                    registry=args.registry, model=model, num_cpus=args.num_cpus, max_replicas=1,
                    max_batch_size=batch_size, max_ongoing_requests=max(32, batch_size),
                    forward_batch_size=args.forward_batch_size,
                    max_queued_requests=args.max_queued,
                )  # fmt: skip
                serve.run(build_app(app_args), name="benchmark", route_prefix="/")
                url = f"http://127.0.0.1:{args.port}/v1/predict"
                _load(url, upload, requests=20, concurrency=4)  # warm up
                forward = _forward_batching(f"http://127.0.0.1:{args.port}/v1/model")
                per_pass = min(forward["forward_batch_size"] or batch_size, batch_size)
                for concurrency in concurrencies:
                    # The replica runs forward passes of at most min(concurrency, per_pass) images: the
                    # direct forward at that batch is what it could give; the sweep's best rides along.
                    figures = _beside_the_limit(
                        limit, min(concurrency, per_pass), concurrency == 1,
                        partial(_load, url, upload, args.requests, concurrency), best=direct["best_batch"],
                    )  # fmt: skip
                    rows.append(
                        {"max_batch_size": batch_size, "concurrency": concurrency, **forward, **figures}
                    )
                if args.burst and burst is None:
                    burst = {"max_batch_size": batch_size, **_burst(url, upload, args.burst)}
        finally:
            shutdown_serve()
            ray.shutdown()
    print(f"model {model}: direct predict_proba, {threads} thread(s): {direct['best']}")
    from cxrcore.bench.serve import CPU_PARTS as parts

    print(
        "max_batch_size  forward  concurrency  p50_ms  p99_ms  req/s  direct img/s   CPU ms per request: "
        + " ".join(parts)
    )
    for row in rows:
        cpu = row["cpu_ms_per_request"]
        print(
            f"{row['max_batch_size']:>14}  {row['forward_batch_size'] or '-':>7}  {row['concurrency']:>11}  "
            f"{row['p50_ms']:>6.1f}  "
            f"{row['p99_ms']:>6.1f}  {row['requests_per_s']:>5.1f}  "
            f"{row['direct_around']['images_per_s']:>12.1f}   "
            + " ".join(f"{part} {cpu[part]:.1f}" for part in parts if cpu.get(part) is not None)
        )
    if burst:
        print(
            f"burst of {burst['requests']} at once (max_ongoing_requests 32, max_queued_requests "
            f"{args.max_queued}): {burst['answered']} answered (p50 {burst['answered_p50_ms']:.0f} ms, "
            f"p99 {burst['answered_p99_ms']:.0f} ms, max {burst['answered_max_ms']:.0f} ms), "
            f"{burst['refused']} refused with 503 (p50 {burst['refused_p50_ms']:.0f} ms, "
            f"max {burst['refused_max_ms']:.0f} ms), {burst['other']} other"
        )
    summary = {
        "model": model,
        "upload_size": args.upload_size,
        "upload_format": args.upload_format,
        "direct": direct,
        "http": rows,
        "burst": burst,
    }
    print(json.dumps(summary))
    return 0


def _untrained(directory: Path, arch: str, image_size: int | None) -> Path:
    """A checkpoint of `arch` with random weights (and a U-Net when it needs masks): the same cost."""
    import torch

    from cxrcore.checkpoint import ModelCard, save_checkpoint
    from cxrcore.models import create_model, get_build_args, get_input_spec

    def save(name: str, segmenter: Path | None = None) -> Path:
        torch.manual_seed(0)
        sized: dict[str, Any] = {"image_size": image_size} if image_size else {}
        model = create_model(name, **sized)
        spec = get_input_spec(model)
        card = ModelCard(
            model=get_build_args(model),
            input_spec=spec.to_dict(),
            data={"size": spec.image_size},
            segmenter=str(segmenter) if segmenter else None,
        )
        return save_checkpoint(directory / name, model, card)

    needs_mask = "mask" in get_input_spec(create_model(arch)).channels
    segmenter = save("tiny_unet" if arch.startswith("tiny_") else "unet") if needs_mask else None
    return save(arch, segmenter)


UPLOAD_SIZE = 299
"""The side of the uploads unless told: the Kaggle database's images."""


@dataclass(frozen=True)
class Upload:
    """The body every request sends, and its content type."""

    data: bytes
    content_type: str


def _chest(size: int) -> np.ndarray:
    """A size×size picture in [0, 1]: a gradient with noise (the model's cost does not depend on it)."""
    rng = np.random.default_rng(0)
    return np.clip((np.linspace(40, 220, size)[None, :] + rng.normal(0, 20, (size, size))) / 255, 0, 1)


def _chest_png(size: int = UPLOAD_SIZE) -> bytes:
    """A size×size 8-bit grayscale PNG like the dataset's (299 px)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(_chest(size) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _chest_png16(size: int = UPLOAD_SIZE) -> bytes:
    """A size×size 16-bit grayscale PNG holding a detector's 12 bits, as a hospital's export may be."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(_chest(size) * 4095).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _chest_dicom(size: int = UPLOAD_SIZE) -> bytes:
    """A size×size digital X-ray as a detector writes it: 12 bits stored in 16, a rescale to Hounsfield-like
    values and a window, so the server applies both LUTs as it would to a hospital's file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", size, size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.WindowCenter, ds.WindowWidth = 1000.0, 3000.0
    ds.PixelData = np.round(_chest(size) * 4095).astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


UPLOAD_FORMATS = {
    "png": (_chest_png, "image/png"),
    "png16": (_chest_png16, "image/png"),
    "dicom": (_chest_dicom, "application/dicom"),
}


def make_upload(fmt: str, size: int = UPLOAD_SIZE) -> Upload:
    """The benchmark's upload: a size×size chest-like image as a PNG or a DICOM (UPLOAD_FORMATS)."""
    make, content_type = UPLOAD_FORMATS[fmt]
    return Upload(make(size), content_type)


class DirectLimit:
    """`Predictor.predict_proba` (segmenter included) in this process, with the threads of one replica:
    the limit Serve is measured against.

    `sweep` measures the batch sizes at the start; `rate` measures the batch a row is compared with (and
    the sweep's best) again, just before and after each HTTP measurement, so that every ratio compares
    figures taken seconds apart. On a shared 2-core VM the same forward's speed drifts by ±15 % over
    minutes; a limit measured only at the start of a run put that drift into the ratios.
    """

    def __init__(self, checkpoint: Path, upload: Upload, threads: int) -> None:
        import torch

        from cxrcore.decode import decode_upload
        from cxrcore.inference import Predictor

        torch.set_num_threads(threads)
        self.predictor = Predictor.from_checkpoint(checkpoint, graph=True)
        self.image = decode_upload(upload.data, upload.content_type)

    def rate(self, batch_size: int, seconds: float = 1.0) -> float:
        """Images/s at `batch_size` over about `seconds` (at least 3 batches) after one warm-up batch."""
        images = [self.image] * batch_size
        self.predictor.predict_proba(images)
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            self.predictor.predict_proba(images)
            runs += 1
        return round(runs * batch_size / (time.perf_counter() - start), 1)

    def sweep(
        self, rounds: int = 3, seconds: float = 0.5, sizes: Iterable[int] | None = None
    ) -> dict[str, Any]:
        """Images/s per batch size of `sizes` (BATCH_SIZES unless given), the best of them and where it was
        reached.

        The sizes are measured in turns, `rounds` times, and each keeps its median: the forward's speed
        drifts within seconds, and with one measurement per size the drift picked the "best" (session 21:
        batch 16 at 89 images/s in the sweep, the others 68-79, then 58-68 when measured again around
        each HTTP figure).
        """
        runs: dict[int, list[float]] = {batch_size: [] for batch_size in sizes or BATCH_SIZES}
        for _ in range(max(1, rounds)):
            for batch_size in runs:
                runs[batch_size].append(self.rate(batch_size, seconds))
        per_batch = {batch_size: statistics.median(rates) for batch_size, rates in runs.items()}
        best = max(per_batch, key=per_batch.__getitem__)
        return {
            "images_per_s": per_batch,
            "rounds": runs,
            "best_batch": best,
            "best": f"{per_batch[best]} images/s at batch size {best}",
        }


def _beside_the_limit(
    limit: DirectLimit,
    batch: int,
    one_image: bool,
    measure: Callable[[], dict[str, Any]],
    best: int | None = None,
) -> dict[str, Any]:
    """`measure()`'s figures with the limit at batch `batch` measured just before and just after it
    (`direct_around`; at the sweep's `best` batch too, where given, in `direct_around["best"]`), and with
    `one_image` the forward of one image likewise (`direct_one_image_ms`)."""
    batches = list(dict.fromkeys([batch, *([best] if best else []), *([1] if one_image else [])]))
    before = {size: limit.rate(size) for size in batches}
    figures = measure()
    after = {size: limit.rate(size) for size in batches}

    def around(size: int) -> dict[str, Any]:
        return {
            "batch": size,
            "before": before[size],
            "after": after[size],
            "images_per_s": round((before[size] + after[size]) / 2, 1),
        }

    figures["direct_around"] = {**around(batch), **({"best": around(best)} if best else {})}
    if one_image:
        figures["direct_one_image_ms"] = round(2000 / (before[1] + after[1]), 2)
    return figures


COMPONENTS = {
    "ProxyActor": "proxy",
    "HAProxyManager": "proxy",
    "Api": "ingress",
    "Classifier": "classifier",
    "Segmenter": "segmenter",
}
"""Serve's actors by the end of their class name, and what the CPU table calls them."""


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc); None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float | None:
    """CPU seconds every core of the machine spent busy so far (Linux /proc/stat); None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _serve_pids() -> dict[str, list[int]]:
    """Component name → pids of the live Serve actors (proxy, ingress, classifier, segmenter)."""
    from ray._private.state import actors  # the GCS's actor table: no dashboard needed

    found: dict[str, list[int]] = {}
    for actor in actors(actor_state_name="ALIVE").values():
        for suffix, component in COMPONENTS.items():
            if str(actor.get("ActorClassName", "")).endswith(suffix) and actor.get("Pid"):
                found.setdefault(component, []).append(int(actor["Pid"]))
    from serve.server import haproxy_processes  # HAProxy itself: children of an HAProxyManager

    managers = set(found.get("proxy", ()))
    found.setdefault("proxy", []).extend(pid for pid, parent, _ in haproxy_processes() if parent in managers)
    return found


def _less(end: float | None, start: float | None) -> float | None:
    """end - start, or None where either was not read."""
    return None if end is None or start is None else end - start


class CpuMeter:
    """CPU seconds per request that each part of the serving path spends over one measurement.

    client: this process (the load generator's threads, and Ray's driver, which idles); proxy: Serve's
    proxy actors and, in HAProxy mode, HAProxy and its managers; ingress,
    classifier, segmenter: their Serve actors; rest: everything else busy on the machine (raylet, GCS,
    Serve's controller, other programs). The direct baseline pays for none of these but the model.
    """

    def __init__(self) -> None:
        self.pids = {"client": [os.getpid()], **_serve_pids()}
        self._start = self._read()

    def _read(self) -> dict[str, float | None]:
        read = {name: [_cpu_seconds(pid) for pid in pids] for name, pids in self.pids.items()}
        totals: dict[str, float | None] = {
            name: None if None in values else sum(v for v in values if v is not None)
            for name, values in read.items()
        }
        totals["machine"] = _busy_seconds()
        return totals

    def per_request_ms(self, requests: int) -> dict[str, float | None]:
        end = self._read()
        used = {name: _less(end[name], self._start[name]) for name in end}
        machine = used.pop("machine")
        known = [v for v in used.values() if v is not None]
        used["rest"] = None if machine is None else max(0.0, machine - sum(known))
        return {name: None if v is None else round(1000 * v / requests, 2) for name, v in used.items()}


def _forward_batching(url: str) -> dict[str, Any]:
    """The classifier's images per forward pass and the sweep that chose it, from GET /v1/model."""
    from urllib.request import urlopen

    with urlopen(url, timeout=30) as answer:
        info = json.load(answer)
    return {"forward_batch_size": info.get("forward_batch_size"), "forward_sweep": info.get("forward_sweep")}


def _load(url: str, upload: Upload, requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` POSTs from `concurrency` threads, each waiting for its answer before the next.

    The load generator shares the machine's cores with the server, so it is the standard library's
    http.client on a kept-alive connection per thread: 0.3-0.5 ms of CPU per request where httpx took
    4.65 (this benchmark's CPU table), which on 2 cores went to the client instead of Serve.
    """
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    target = urlsplit(url)
    latencies: list[float] = []
    ends: list[float] = []
    failures: list[str] = []
    remaining = iter(range(requests))
    lock = threading.Lock()
    headers = {"content-type": upload.content_type}

    def client() -> None:
        session = HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=120)
        try:
            while True:
                with lock:
                    if failures or next(remaining, None) is None:
                        return
                start = time.perf_counter()
                session.request("POST", target.path, body=upload.data, headers=headers)
                response = session.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"POST {url}: HTTP {response.status}: {body[:200]!r}")
                end = time.perf_counter()
                with lock:
                    latencies.append((end - start) * 1000)
                    ends.append(end)
        except Exception as exc:  # the measurement is void; the main thread says why
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            session.close()

    meter = CpuMeter()
    start = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} client(s) failed; the first: {failures[0]}")
    cpu_ms = meter.per_request_ms(len(latencies))
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "p50_ms": cuts[49],
        "p95_ms": cuts[94],
        "p99_ms": cuts[98],
        "requests_per_s": steady_rate(ends, concurrency, start),
        "requests_per_s_overall": len(latencies) / elapsed,
        "cpu_ms_per_request": cpu_ms,
    }


def steady_rate(ends: list[float], concurrency: int, start: float) -> float:
    """Requests/s while `concurrency` requests were in flight: the answers after the first `concurrency`
    and up to the last `concurrency`, over the time between.

    Every client sends its next request as soon as it has an answer, until none are left to send; the
    last `concurrency` answers then arrive with ever fewer requests in flight (at 32 the final batches
    run part-full), and the first ones while the server's queue first fills. The direct limit runs
    full batches throughout, so the HTTP figure is taken over the same steady state. With too few
    requests for a window (2 × concurrency or fewer), all of them from `start`.
    """
    ends = sorted(ends)
    first, last = concurrency - 1, len(ends) - concurrency - 1
    if last - first < 1:
        return len(ends) / (ends[-1] - start)
    return (last - first) / (ends[last] - ends[first])


def _burst(url: str, upload: Upload, requests: int) -> dict[str, Any]:
    """`requests` POSTs sent at once: how many were answered and how fast, how many refused (503)."""
    import asyncio

    import httpx

    async def one(client: httpx.AsyncClient) -> tuple[int, float]:
        start = time.perf_counter()
        headers = {"content-type": upload.content_type}
        response = await client.post(url, content=upload.data, headers=headers)
        return response.status_code, (time.perf_counter() - start) * 1000

    async def run() -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(requests)))

    results = asyncio.run(run())
    answered = sorted(ms for status, ms in results if status == 200)
    refused = sorted(ms for status, ms in results if status == 503)

    def at(values: list[float], quantile: float) -> float:
        return values[min(len(values) - 1, int(quantile * len(values)))] if values else float("nan")

    return {
        "requests": requests,
        "answered": len(answered),
        "answered_p50_ms": at(answered, 0.5),
        "answered_p99_ms": at(answered, 0.99),
        "answered_max_ms": at(answered, 1.0),
        "refused": len(refused),
        "refused_p50_ms": at(refused, 0.5),
        "refused_max_ms": at(refused, 1.0),
        "other": len(results) - len(answered) - len(refused),
    }


if __name__ == "__main__":
    raise SystemExit(main())
