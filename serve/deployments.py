"""The model deployments: the batched classifier and the U-Net segmenter it asks for lung masks."""

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow.fs as pafs
from ray import serve
from ray.serve.handle import DeploymentHandle

from cxrcore import telemetry
from cxrcore.checkpoint import (
    CARD_NAME,
    WEIGHTS_NAME,
    ModelCard,
    check_weights_recorded,
    load_card,
    local_checkpoint_dir,
)
from cxrcore.data.storage import file_sha256
from serve.schemas import ClassifierConfig, ModelInfo, SegmenterInfo

log = logging.getLogger("ray.serve")
T = TypeVar("T")

SEGMENTER_TIMEOUT_S = 60.0
# Segmenter checkpoints a replica keeps loaded: the current one and the one before a swap.
_SEGMENTERS_KEPT = 2


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference pinned to a checkpoint folder on this machine."""

    ref: str
    checkpoint: Path
    card: ModelCard
    version: str | None
    segmenter: SegmenterInfo | None = None
    """the lung segmenter a dual-channel model reads the masks of, once resolved (`Classifier._load`)"""
    test: dict[str, Any] | None = None
    """the test figures of the evaluation report registered with the version (`brief_test_figures`), if any"""
    registry_warnings: tuple[str, ...] = ()
    """what the registry's records say against the reference: an alias moved outside cxr, an evaluation
    added since registration whose verdict is a warning"""
    evaluations: tuple[dict[str, Any], ...] = ()
    """the evaluations added to the version since its registration (`ModelRegistry.add_evaluation`)"""

    @property
    def warnings(self) -> list[str]:
        """What the registry knows against serving this model: registered test figures not shown to beat
        always answering the commonest class, and a dataset whose sources separate classes (its scores may
        measure the sources). `cxr tune` warned of both; a server started later said nothing."""
        from cxrcore.registry import serving_warnings

        return serving_warnings(self.test, self.card.data) + list(self.registry_warnings)

    @property
    def info(self) -> ModelInfo:
        """Which model answers, as the HTTP API says it: a checkpoint folder by its last components."""
        return ModelInfo(
            name=self.card.name,
            version=self.version,
            ref=public_location(self.ref),
            weights_sha256=self.card.weights_sha256,
            segmenter=self.segmenter,
        )

    def public_card(self) -> dict[str, Any]:
        """The card as GET /v1/model shows it: every location in it (the dataset, the run's folder, the
        segmenter's checkpoint) by its last components (`public_location`)."""
        return _public_locations(self.card.to_dict())

    @property
    def needs_mask(self) -> bool:
        return "mask" in self.card.input_spec.get("channels", ())


def public_location(value: str) -> str:
    """A location as the HTTP API shows it: a folder or URI by its last two components ("…/tiny_unet/v1",
    "…/runs/ddp"), anything else (a registry reference) as it is. Clients learn which model answered, not
    the server's folders or buckets; `cxr models show` on the cluster gives the whole path."""
    if not value.startswith(("/", "~", "file:")) and "://" not in value:
        return value
    return "…/" + "/".join([part for part in value.split("/") if part][-2:])


_LOCATION_IN_TEXT = re.compile(r"(?<![\w.…/~])(?:[A-Za-z][\w+.-]*://|file:|~/|/)[^\s'\"]+")
"""An absolute path or URI inside a sentence: from a slash, `~/` or a scheme that starts a word, to the next
blank or quote ("/srv/reg/x/v1/card.json", 's3://bucket/reg/x/v1'), not a relative one ("runs/ddp", "1/2")."""


def public_text(text: str) -> str:
    """A message as the HTTP API shows it, such as an exception's text: every absolute path or URI in it
    named by its last two components, as `public_location` names one location."""
    return _LOCATION_IN_TEXT.sub(lambda match: public_location(match.group()), text)


PRIVATE_EVALUATION_FIELDS = ("user", "host", "pid", "command")
"""Who added an evaluation, which `cxr models show` prints and GET /v1/model does not: clients learn what was
found, not the operators' names, hosts or command lines."""


def public_evaluation(entry: dict[str, Any]) -> dict[str, Any]:
    """An evaluation added to the served version as GET /v1/model shows it: its dataset by its last two
    components, without who added it (PRIVATE_EVALUATION_FIELDS)."""
    kept = {key: value for key, value in entry.items() if key not in PRIVATE_EVALUATION_FIELDS}
    if isinstance(kept.get("dataset"), str):
        kept["dataset"] = public_location(kept["dataset"])
    return kept


def _public_locations(document: Any) -> Any:
    if isinstance(document, dict):
        return {key: _public_locations(value) for key, value in document.items()}
    if isinstance(document, list):
        return [_public_locations(value) for value in document]
    return public_location(document) if isinstance(document, str) else document


def resolve_model(registry: str | None, ref: str) -> ResolvedModel:
    """Look `ref` up in the registry (alias, name:N or name), or read it as a checkpoint folder or URI. A
    local checkpoint folder is one whatever the registry (`CXR_REGISTRY` set for every command had made
    `cxr serve --model runs/x/checkpoint_epoch_003` an unknown reference)."""
    # a registry's references hold no "/" (name:N, aliases): one that does is a path, mistyped or not
    folder = "://" not in ref and ("/" in ref or (Path(ref).expanduser() / CARD_NAME).is_file())
    if registry is None or folder:
        remote = "://" in ref
        if not remote and not Path(ref).expanduser().exists() and "/" not in ref:
            # `cxr serve` with neither: the default --model is an alias, which only a registry resolves.
            raise ValueError(
                f"--model {ref}: no registry to look it up in (pass --registry REG or set CXR_REGISTRY), "
                "and no such checkpoint folder"
            )
        path = local_checkpoint_dir(ref if remote else Path(ref).expanduser().resolve())
        card = load_card(path)
        check_weights_recorded(card, path)  # a version's folder served directly: before Ray starts
        card = _hashed(card, path)
        return ResolvedModel(
            ref=ref if remote else str(path), checkpoint=path, card=card, version=card.version
        )
    from cxrcore.registry import ModelRegistry, evaluation_warnings, registered_test, report_warning

    models = ModelRegistry(registry)
    version = models.get(ref)
    path = Path(models.local_checkpoint(version.ref))  # its weights checked against the card
    card, number = _hashed(load_card(path), path), version.ref.rpartition(":")[2]
    test, why = registered_test(version)
    if why and version.report is not None:  # a damaged report: the model serves, with test null
        log.warning("%s: no test figures for GET /v1/model: %s", version.ref, why)
    # an alias served: whether the history recorded its move there; evaluations added since that warn
    moved = models.unrecorded_aliases().get(ref)
    evaluations = models.evaluations(version.ref)
    # a report that shows nothing is a warning of its own: an edit must not silence "do not serve it"
    damaged = [warning] if (warning := report_warning(why)) else []
    return ResolvedModel(
        ref=version.ref, checkpoint=path, card=card, version=number, test=test,
        registry_warnings=(*([moved] if moved else []), *damaged, *evaluation_warnings(evaluations)),
        evaluations=tuple(evaluations),
    )  # fmt: skip


def segmenter_info(checkpoint: str) -> SegmenterInfo:
    """The segmenter whose folder is `checkpoint` (resolve_segmenter's), as an answer names it: by its
    registry reference where it is a version, and the sha256 of its weights. The Segmenter deployment
    loads the same version, checking those weights (`load_model`)."""
    card = _hashed(load_card(checkpoint), Path(checkpoint))
    ref = card.version if card.version and ":" in card.version else public_location(str(checkpoint))
    return SegmenterInfo(ref=ref, weights_sha256=card.weights_sha256)


def _hashed(card: ModelCard, checkpoint: Path) -> ModelCard:
    """`card` with its weights' sha256: as the registry recorded it (the file checked against it by whoever
    found it: `ModelRegistry.local_checkpoint`, `check_weights_recorded`, and `load_model` as the replica
    loads it), else (a training run's checkpoint, a version an earlier cxr registered) hashed now."""
    if card.weights_sha256 is None:
        card.weights_sha256 = file_sha256(pafs.LocalFileSystem(), str(checkpoint / WEIGHTS_NAME))
    return card


def resolve_segmenter(registry: str | None, segmenter: str, of: str | None = None) -> str:
    """A card's segmenter as a local checkpoint folder: a folder as it is, a URI's cached copy, else a
    registry reference; with a registry, as `ModelRegistry.segmenter_checkpoint` finds it for the version
    `of` (the registry's own where the card names its original's folder)."""
    if "://" in segmenter:
        return str(local_checkpoint_dir(segmenter))
    if registry is None:
        return segmenter
    from cxrcore.registry import ModelRegistry

    return str(ModelRegistry(registry).segmenter_checkpoint(segmenter, of=of))


def replica_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """`handle`, calling its deployment as this replica's Serve is set to: over gRPC in Ray's
    high-throughput mode (cxr's local default), by Ray actor calls otherwise.

    A handle carries its transport from the process that built the app, fixed when that process imported
    Ray Serve: `serve.run` in a driver that imported it before the local cluster's settings were chosen,
    as `cxr serve` and the benchmark do, made handles that called by actor calls while every replica
    served gRPC (`serve deploy` builds the app on the cluster and was not affected). Taking the replica's
    own setting cut the p50 at concurrency 1 from 17.3 to 15.6 ms (cnn_lstm 128 px, two apps alike but
    for this, 570 requests each in turns).
    """
    from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT

    by_reference = not RAY_SERVE_USE_GRPC_BY_DEFAULT
    options: Any = handle.handle_options  # `_by_reference` is the dynamic options' own, not the base's
    if handle.is_initialized or options._by_reference == by_reference:
        return handle
    # What unpickling the handle does, with the replica's transport: `options()` would also start the
    # handle's router, which belongs on the replica's event loop at its first call, not in a constructor.
    options = handle.handle_options.copy_and_update(_by_reference=by_reference)
    return type(handle)(handle.deployment_name, handle.app_name, handle_options=options)


def classify(
    predictor: Any, model: dict[str, Any], requests: Sequence[tuple[np.ndarray, int | None]]
) -> list[dict[str, Any]]:
    """The classifier's answers to `(image, resized_to)` requests, one forward pass for the batch.

    The ingress resizes each upload to the model's base size (`Predictor.base_size`, the size ingest
    resized the training images to) with the Predictor's own `resize_image`, which leaves an image of
    that size as it is, so the model sees the same pixels as if it had resized the upload itself: the
    classifier replica, which every request waits on, runs only the model, and a detector-sized upload
    crosses to it as 64 KB, not 7.5 MB. At concurrency 32, cnn_lstm at 128 px, three pairs of apps taken
    in turns: 299 px uploads 91-101 requests/s against 69-85 when the classifier resized them, 1024 px
    uploads 77-98 against 72-74. Every answer carries `input_size`, from which the ingress learns the
    size. An image resized for another size (the model was swapped in between) is answered with
    `input_size` alone, and the ingress asks again with the original upload.
    """
    size = predictor.base_size
    current = [i for i, (_, resized_to) in enumerate(requests) if resized_to in (None, size)]
    answers: list[dict[str, Any]] = [{"input_size": size} for _ in requests]
    if current:
        rows, checks = predictor.predict_checked([requests[i][0] for i in current])
        classes = predictor.card.classes
        for n, (i, row) in enumerate(zip(current, rows, strict=True)):
            probabilities = dict(zip(classes, map(float, row), strict=True))
            check = checks[n] if checks is not None else None
            answers[i] = {
                "probabilities": probabilities,
                "model": model,
                "input_size": size,
                "input_check": check,
            }
    return answers


def fit_forward(predictor: Any, max_batch_size: int, forward_batch_size: int = 0) -> dict[str, Any]:
    """Set how many images `predictor` (and a segmenter it holds) runs per forward pass; what was measured.

    `forward_batch_size` > 0 fixes it; 0 measures this replica's forward at sizes up to `max_batch_size`
    and takes the fastest (`Predictor.fit_forward_batch`): batches of `max_batch_size` then spread
    Serve's per-call work over all their requests while each pass runs at the speed of the best size
    (cnn_lstm at 128 px, one thread: 96 images/s at batch 4 and 79 at batch 16, which as four passes of
    4 ran at 96). The measurement also warms up the frozen graph at every size.
    """
    name = predictor.card.name
    if forward_batch_size:
        predictor.forward_batch_size = forward_batch_size
        sweep = None
    else:
        measured = predictor.fit_forward_batch(max_batch_size)
        sweep = measured.to_dict()
        log.info(
            "%s: forward passes of %s (images/s by batch size %s, %d rounds in %.2f s)",
            name, f"up to {measured.best} images" if measured.best else "whole batches",
            measured.images_per_s or "not measured within the budget", measured.rounds, measured.seconds,
        )  # fmt: skip
    helper = getattr(predictor, "segmenter", None)
    if helper is not None and hasattr(helper, "fit_forward_batch"):  # a segmenter loaded in this replica
        fit_forward(helper, max_batch_size, forward_batch_size)
    return {"forward_batch_size": predictor.forward_batch_size, "forward_sweep": sweep}


class _ModelThread:
    """One thread per replica runs all model work: the event loop stays free, and the model and its
    Grad-CAM hooks are never used by two threads at once."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-model")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class _Batcher:
    """Batches requests when the model is free, from what is queued by then: none waits at low load.

    Serve's `@serve.batch` forms a batch when its first request arrives and waits up to
    `batch_wait_timeout_s` for more, while the model may be idle; with a wait of 0 it forms batches of
    one that queue for the model. Here a batch is formed when the model is ready for it (as Triton's
    dynamic batcher does): a request that finds the model idle runs at once, and the requests that
    arrive during a forward pass are the next batch, up to `max_batch_size`. `wait_s` > 0 additionally
    holds a batch that is not full for up to that long for more requests.
    """

    def __init__(
        self, run: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int, wait_s: float
    ) -> None:
        self._run = run
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        return await future

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future[Any]]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # callers gone: skip

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self._run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as exc:  # every request of the batch gets the error; the loop goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class SegmenterClient:
    """Stands in for a Predictor's segmenter: its masks come from the Segmenter deployment.

    `Predictor.predict_proba` calls `mask_source` from the classifier's model thread, so the same
    code computes the mask offline and here; only the process differs. `checkpoint` is the segmenter as
    the card names it: the Segmenter replica, maybe on another node, finds its own local copy.

    The call itself runs on the replica's event loop (`loop`), where Serve's handles live: in Ray's
    throughput-optimized mode (cxr's local default) a handle's router shares that loop and refuses
    calls from any other thread.
    """

    def __init__(self, handle: DeploymentHandle, checkpoint: str, loop: asyncio.AbstractEventLoop) -> None:
        self.handle = handle
        self.checkpoint = checkpoint
        self._loop = loop

    def mask_source(self, unit_images: Any) -> Any:
        import torch

        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # waiting here would block the loop that has to make the call
            raise RuntimeError("SegmenterClient.mask_source runs in the model thread, not on the event loop")
        images = unit_images.cpu().numpy()

        async def ask() -> np.ndarray:
            masks: np.ndarray = await self.handle.mask_source.remote(images, self.checkpoint)
            return masks

        future = asyncio.run_coroutine_threadsafe(ask(), self._loop)
        try:
            masks = future.result(timeout=SEGMENTER_TIMEOUT_S)
        except BaseException:
            future.cancel()
            raise
        return torch.tensor(masks, device=unit_images.device)


@serve.deployment(
    name="Segmenter", max_ongoing_requests=8, ray_actor_options={"num_cpus": 1}, health_check_period_s=10
)
class Segmenter:
    """The lung U-Net: 0/1 masks for [0, 1] images at the classifier's input size.

    Checkpoints are named as a card names them (a folder, a URI, or a version of `registry`) and
    resolved to a local copy in this replica, wherever it runs.
    """

    def __init__(
        self,
        checkpoint: str,
        device: str = "cpu",
        registry: str | None = None,
        max_batch_size: int = 16,
        forward_batch_size: int = 0,
    ) -> None:
        self._device = device
        self._registry = registry
        self._batch_sizes = (max_batch_size, forward_batch_size)
        self._thread = _ModelThread()
        self._predictors: dict[str, Any] = {}
        self._load(checkpoint)

    async def mask_source(self, unit_images: np.ndarray, checkpoint: str) -> np.ndarray:
        return await self._thread.run(self._masks, unit_images, checkpoint)

    def _masks(self, unit_images: np.ndarray, checkpoint: str) -> np.ndarray:
        import torch

        predictor = self._predictors.get(checkpoint) or self._load(checkpoint)
        with torch.inference_mode():
            masks = predictor.mask_source(torch.tensor(unit_images, device=self._device))
        result: np.ndarray = masks.cpu().numpy()
        return result

    def _load(self, checkpoint: str) -> Any:
        from cxrcore.inference import Predictor

        predictor = Predictor.from_checkpoint(
            resolve_segmenter(self._registry, checkpoint), self._device, graph=True
        )
        if predictor.spec.task != "segment":
            raise ValueError(f"{checkpoint} holds a {predictor.spec.task} model, not a lung segmenter")
        fit_forward(predictor, *self._batch_sizes)
        self._predictors[checkpoint] = predictor
        while len(self._predictors) > _SEGMENTERS_KEPT:
            self._predictors.pop(next(iter(self._predictors)))
        log.info("segmenter loaded from %s", checkpoint)
        return predictor


@dataclass(frozen=True)
class _Served:
    """The model a classifier replica serves; replaced whole on a swap, so a batch sees one model."""

    requested: str
    resolved: ResolvedModel
    predictor: Any
    forward: dict[str, Any]
    """`fit_forward`'s answer: images per forward pass and what was measured."""
    fitted_for: tuple[int, int]
    """(max_batch_size, forward_batch_size) the forward was fitted for."""


@serve.deployment(
    name="Classifier", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1}, health_check_period_s=10
)
class Classifier:
    """Class probabilities from a registry model, batched; `user_config` (ClassifierConfig) picks the model.

    A model that needs a lung mask gets it from the Segmenter deployment when one is bound, else
    from a segmenter loaded in this replica (a swap to a dual-channel model from one that had none).
    """

    def __init__(
        self,
        registry: str | None,
        segmenter: DeploymentHandle | None = None,
        device: str = "cpu",
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.0,
        forward_batch_size: int = 0,
        app_model: str | None = None,
    ) -> None:
        self._registry = registry
        self._app_model = app_model  # the version build_app pinned: a new replica's fallback
        self._segmenter = None if segmenter is None else replica_handle(segmenter)
        self._device = device
        self._defaults = {
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": batch_wait_timeout_s,
            "forward_batch_size": forward_batch_size,
        }
        self._config: ClassifierConfig | None = None
        self._served: _Served | None = None
        self._swap_error: str | None = None
        self._thread = _ModelThread()
        self._batcher = _Batcher(self._predict_batch, max_batch_size, batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Runs at start and on every `user_config` change: loads a new model, then swaps it in.

        A model that fails to load while another is serving leaves that one serving (a mistyped
        reference must not take the service down); GET /v1/model reports the failure. A new replica has
        none yet: one started with a `user_config` it cannot load (a `serve deploy` that changed the app's
        args, so Serve replaced every replica, and named a bad version) serves the app's own model, the
        version build_app pinned, and reports the failure alike; before, no replica started and every
        prediction got 503 `model_unavailable` until a corrected deploy.
        """
        config = ClassifierConfig.model_validate({**self._defaults, **user_config})
        self._batcher.max_batch_size = config.max_batch_size
        self._batcher.wait_s = config.batch_wait_timeout_s
        self._config = config
        served = self._served
        if served is not None and served.requested == config.model:
            self._swap_error = None
            sizes = (config.max_batch_size, config.forward_batch_size)
            if served.fitted_for != sizes:
                forward = await self._thread.run(fit_forward, served.predictor, *sizes)
                self._served = replace(served, forward=forward, fitted_for=sizes)
            return
        fell_back = ""
        try:
            self._served = await self._thread.run(self._load, config, asyncio.get_running_loop())
        except Exception as exc:
            if self._served is None:
                fallback = self._app_model
                if fallback is None or fallback == config.model:
                    raise
                pinned = config.model_copy(update={"model": fallback})
                self._served = await self._thread.run(self._load, pinned, asyncio.get_running_loop())
                log.exception("serving the app's model %s: could not load %r", fallback, config.model)
                telemetry.record_model_load(public_location(fallback), "fallback")
                # A replica restarted after a failed swap: the last good model is not known here, and
                # replicas that kept it serve another version than this one. Said where clients look.
                fell_back = (
                    "; this replica started since and serves the app's own model "
                    f"{public_location(fallback)}, which other replicas may not"
                )
            else:
                log.exception("still serving %s: could not load %r", self._served.resolved.ref, config.model)
            # As /v1/model shows it: a checkpoint folder by its last components, in the exception's text too
            # (a missing file's whole path); the log above has the whole paths.
            telemetry.record_model_load(public_location(config.model), "failed")
            reason = f"{type(exc).__name__}: {public_text(str(exc))}"
            self._swap_error = f"could not load {public_location(config.model)!r}: {reason}{fell_back}"
            return
        self._swap_error = None
        telemetry.record_model_load(self._served.resolved.ref, "loaded")
        log.info("serving %s from %s", self._served.resolved.ref, self._served.resolved.checkpoint)

    def check_health(self) -> None:
        if self._served is None:
            raise RuntimeError("no model loaded")
        # between requests too, which version each replica serves (cxr_predictions says so only under traffic)
        telemetry.record_model_served(self._served.resolved.card.name, self._served.resolved.version)

    async def predict(self, image: np.ndarray, resized_to: int | None = None) -> dict[str, Any]:
        """Class probabilities of one image, computed in a batch with the others queued meanwhile.

        `resized_to`: the ingress already resized the upload to this base size (`classify`).
        """
        result: dict[str, Any] = await self._batcher.submit((image, resized_to))
        return result

    async def _predict_batch(self, requests: list[tuple[np.ndarray, int | None]]) -> list[dict[str, Any]]:
        served = self._current()
        telemetry.record_batch(len(requests), served.resolved.card.name, served.resolved.version)
        info = served.resolved.info.model_dump()
        return await self._thread.run(classify, served.predictor, info, requests)

    async def explain(self, image: np.ndarray) -> dict[str, Any]:
        from cxrcore.explain import explain

        served = self._current()
        result = await self._thread.run(explain, served.predictor, image)
        checks = await self._thread.run(served.predictor.input_checks, [image])
        classes = served.resolved.card.classes
        return {
            "probabilities": dict(zip(classes, map(float, result.probabilities), strict=True)),
            "model": served.resolved.info.model_dump(),
            "input_check": checks[0] if checks else None,
            "target": classes[result.target],
            "heatmap": result.heatmap,
            "heatmap_empty": result.empty,
            "mask": result.mask,
        }

    async def info(self) -> dict[str, Any]:
        served = self._current()
        assert self._config is not None
        return {
            "model": served.resolved.info.model_dump(),
            "card": served.resolved.public_card(),
            "test": served.resolved.test,
            "probability_prior": served.resolved.card.probability_prior,
            "evaluations": [public_evaluation(entry) for entry in served.resolved.evaluations],
            "warnings": served.resolved.warnings,
            "max_batch_size": self._config.max_batch_size,
            "batch_wait_timeout_s": self._config.batch_wait_timeout_s,
            **served.forward,
            "swap_error": self._swap_error,
        }

    def _current(self) -> _Served:
        if self._served is None:
            raise RuntimeError("no model loaded yet")
        return self._served

    def _load(self, config: ClassifierConfig, loop: asyncio.AbstractEventLoop) -> _Served:
        from cxrcore.checkpoint import load_checkpoint
        from cxrcore.inference import Predictor

        ref = config.model
        resolved = resolve_model(self._registry, ref)
        loaded = load_checkpoint(resolved.checkpoint, self._device)
        card = loaded.card
        predictor = Predictor(
            loaded.model, card, self._device, graph=True, input_reference=loaded.input_reference
        )
        if predictor.spec.task != "classify":
            raise ValueError(f"{resolved.ref} is a {predictor.spec.task} model, not a classifier")
        if predictor.needs_mask:
            if not card.segmenter:
                raise ValueError(f"{resolved.ref} needs a lung mask but its card names no segmenter")
            # one found nowhere fails the swap
            segmenter = resolve_segmenter(self._registry, card.segmenter, resolved.ref)
            resolved = replace(resolved, segmenter=segmenter_info(segmenter))
            if self._segmenter is not None:  # which resolves what the card names on its own node
                predictor.segmenter = SegmenterClient(self._segmenter, card.segmenter, loop)
            else:
                predictor.segmenter = Predictor.from_checkpoint(segmenter, self._device, graph=True)
        sizes = (config.max_batch_size, config.forward_batch_size)
        forward = fit_forward(predictor, *sizes)
        return _Served(
            requested=ref, resolved=resolved, predictor=predictor, forward=forward, fitted_for=sizes
        )
