"""Checkpoint directories: safetensors weights plus a card.json that rebuilds the model on its own.

Weights are read only as safetensors, or as a torch state_dict with `weights_only=True`: a file that
would need general unpickling (which can run any code it names) is refused with UnsafeWeightsError.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import pickle
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cxrcore.config import ConfigError, UnsafeWeightsError  # their home is torch-free: the CLI catches them
from cxrcore.labels import CLASSES

log = logging.getLogger(__name__)
CARD_NAME = "card.json"
WEIGHTS_NAME = "model.safetensors"
TRAIN_STATE_NAME = "train_state.pt"
BESIDE_WEIGHTS_PREFIX = "cxr."
"""Arrays stored in the weights file's metadata (the safetensors header's string map), not among its
tensors: they travel and are checked (`weights_sha256`) with the weights, while any loader of the weights,
an earlier cxr's included, reads the model's tensors alone (the input check's reference,
`cxrcore.inputcheck`). `read_beside_weights` reads them."""
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin")
"""Files read as a torch state_dict (with `weights_only=True`); .safetensors is read as safetensors."""


@functools.cache
def software_versions() -> dict[str, str]:
    """The versions a card records (ModelCard.software), found once per process."""
    from cxrcore.provenance import versions

    found = versions("ray", "timm", "torchvision", "numpy", "safetensors", "pyarrow")
    found["torch"] = torch.__version__
    if torch.version.cuda:
        found["cuda"] = str(torch.version.cuda)
    return found


@dataclass
class ModelCard:
    """Everything needed to rebuild, judge and serve a checkpoint, without the code that trained it."""

    model: dict[str, Any]
    """create_model arguments: name, image_size and builder kwargs."""
    input_spec: dict[str, Any]
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    data: dict[str, Any] = field(default_factory=dict)
    """dataset location, fingerprint and base size (images are resized to it before the model size)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """validation metrics of this checkpoint's epoch."""
    history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    """temperature scaling, fitted on the validation split after training (cxrcore.calibration): the
    Predictor serves softmax(logits / temperature). 1.0 (no scaling) on cards written before it existed."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """calibration_report of that fit on the validation split: temperature, ece/nll before and after."""
    epoch: int = 0
    segmenter: str | None = None
    """checkpoint of the U-Net that supplies lung masks when a request has none (dual-channel models)."""
    version: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    software: dict[str, str] = field(default_factory=lambda: dict(software_versions()))
    """What trained it: cxr (and its source's commit, where it ran from a git checkout), the libraries whose
    versions change the result, Python, and the machine's architecture."""
    weights_sha256: str | None = None
    """sha256 of model.safetensors, recorded when the registry stored this version: whoever loads the version
    (`cxr serve`'s replicas, `cxr evaluate`, a promote) checks the file against it, and each HTTP answer
    names it. None on a checkpoint not registered, and on versions an earlier cxr registered."""
    registered_at: str | None = None
    """When the registry stored this version (UTC); `created_at` is when training saved the checkpoint."""
    registered_from: str | None = None
    """The checkpoint the registry stored (a `cxr train` run's, a Tune trial's folder): its run's record."""
    input_reference: dict[str, Any] = field(default_factory=dict)
    """How the input check's reference was fitted (`cxrcore.inputcheck`): its images, patterns and
    threshold; the reference itself is in the weights file. Empty where there is none (a segmenter, a split
    too small, a checkpoint an earlier cxr saved): no image is then checked."""
    report_sha256: str | None = None
    """sha256 of the registered evaluation report's metrics.json, recorded when the report was registered:
    its test figures are shown (`GET /v1/model`, `cxr models show`) only while the file is that one."""
    segmenter_weights_sha256: str | None = None
    """sha256 of the segmenter's weights when the registry stored this version (dual-channel models): the
    segmenter found for it later, in a moved or copied registry too, must be that one."""
    registered_by: dict[str, str] | None = None
    """The cxr that registered this version (its version, commit and source hash); a card that has it and
    lacks `card_sha256` was edited, as every cxr that writes the one writes the other."""
    card_sha256: str | None = None
    """sha256 of this card (`card_digest`: its JSON without this field), recorded by the registry whenever
    it writes the card: every load of the version checks it, so a hand-edited temperature, input spec or
    class list never serves under the registered version's name. None on a checkpoint not registered, and
    on versions registered before it existed until `cxr models seal` records it."""
    sealed_at: str | None = None
    """When `cxr models seal` recorded weights_sha256 of a version an earlier cxr registered: the file as
    it was then (trust on first use)."""

    def __post_init__(self) -> None:
        # A card edited by hand or written as null must not serve NaN or negative-temperature probabilities.
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"a model card's temperature must be finite and positive, got {self.temperature!r}"
            )
        self.temperature = temperature
        self.calibration = dict(self.calibration or {})

    @property
    def name(self) -> str:
        return str(self.model["name"])

    @property
    def probability_prior(self) -> dict[str, float] | None:
        """The class mix a classifier's probabilities are made for: equal shares where it trained with
        class weights (they weigh each class's images as if every class were as common), else its training
        split's shares (`data.train_class_counts`). A site whose prevalence π differs reads a probability
        p_k at π as p_k π_k / prior_k, renormalised. None for a segmenter, or a card that does not say.

        >>> ModelCard(model={}, input_spec={}, classes=["a", "b"], training={"class_weights": True},
        ...           data={"train_class_counts": {"a": 30, "b": 10}}).probability_prior
        {'a': 0.5, 'b': 0.5}
        >>> ModelCard(model={}, input_spec={}, classes=["a", "b"], training={"class_weights": False},
        ...           data={"train_class_counts": {"a": 30, "b": 10}}).probability_prior
        {'a': 0.75, 'b': 0.25}
        >>> ModelCard(model={}, input_spec={}, classes=["a", "b", "c"], training={"class_weights": True},
        ...           data={"train_class_counts": {"a": 30, "b": 0, "c": 10}}).probability_prior
        {'a': 0.5, 'b': 0.0, 'c': 0.5}
        """
        if self.input_spec.get("task", "classify") != "classify" or not self.classes:
            return None
        counts = self.data.get("train_class_counts") or {}
        if self.training.get("class_weights"):  # equal shares of the classes it trained on (an absent one: 0)
            present = [name for name in self.classes if counts.get(name, 1)] if counts else list(self.classes)
            return {name: (1 / len(present) if name in present else 0.0) for name in self.classes}
        total = sum(counts.get(name, 0) for name in self.classes)
        if not total:
            return None
        return {name: counts.get(name, 0) / total for name in self.classes}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    card: ModelCard,
    train_state: dict[str, Any] | None = None,
    beside_weights: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write weights, card and (optionally) optimizer/scheduler state for resuming into `directory`;
    `beside_weights` (float32 arrays named BESIDE_WEIGHTS_PREFIX...) go into the weights file's metadata."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {"format": "pt"}
    for name, array in (beside_weights or {}).items():
        if not name.startswith(BESIDE_WEIGHTS_PREFIX):
            raise ValueError(
                f"{name!r} cannot be stored beside the weights: not named {BESIDE_WEIGHTS_PREFIX}..."
            )
        metadata[name] = _array_text(array)
    try:
        save_file(state, directory / WEIGHTS_NAME, metadata=metadata)
        if len(metadata) > 1:  # safetensors writes a map of several keys in a random order
            _sort_metadata(directory / WEIGHTS_NAME)
        (directory / CARD_NAME).write_text(json.dumps(card.to_dict(), indent=2, default=_json_default))
        if train_state is not None:
            torch.save(train_state, directory / TRAIN_STATE_NAME)
    except (SafetensorError, RuntimeError) as exc:  # neither says it is the disk as an OSError would
        if not _out_of_space(exc, directory, sum(t.numel() * t.element_size() for t in state.values())):
            raise
        reason = f"{os.strerror(errno.ENOSPC)} (saving a checkpoint: {type(exc).__name__})"
        raise OSError(errno.ENOSPC, reason, str(directory)) from exc
    return directory


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata's keys in order, in place: equal weights and
    metadata then save to equal bytes, and hash equal (`weights_sha256`), whatever order safetensors'
    map gave them. The header keeps its length (the same JSON, reordered), so the tensors do not move."""
    with path.open("r+b") as file:
        length = int.from_bytes(file.read(8), "little")
        raw = file.read(length)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length or raw[len(text) :].strip(b" "):
            raise ValueError(f"{path}: its safetensors header is not the compact JSON expected")
        file.seek(8)
        file.write(text + b" " * (length - len(text)))


def _out_of_space(error: BaseException, directory: Path, needed: int) -> bool:
    """Whether saving into `directory` failed on a full disk: safetensors says so in its message ("No space
    left on device (os error 28)"); torch's writer only that the file came out short ("unexpected pos ..."),
    where the disk has no room for the weights."""
    if "os error 28" in str(error) or "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def local_checkpoint_dir(location: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder holding the checkpoint at `location`: the folder itself, or for a URI (s3://,
    gs://) a copy of its card and weights cached on this machine (under `cache_dir`), refreshed when
    the checkpoint there changed."""
    from cxrcore.data import storage

    if not storage.is_remote(location):
        return Path(storage.resolve(str(location))[1])
    try:
        return storage.cached_copy(
            str(location), [CARD_NAME, WEIGHTS_NAME], cache_dir or storage.cache_folder("checkpoints")
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{location} is not a cxr checkpoint ({exc})") from exc


def load_card(directory: str | Path) -> ModelCard:
    """The card of a checkpoint directory (a local folder or a URI), with a clear error when it is not one."""
    from cxrcore.data import storage

    if storage.is_remote(directory):
        filesystem, root = storage.resolve(str(directory))
        text = storage.read_text(filesystem, f"{root}/{CARD_NAME}")
        if text is None:
            raise FileNotFoundError(f"{directory} is not a cxr checkpoint (no {CARD_NAME})")
        return _card_from_text(text, directory)
    if str(directory).startswith("file://"):  # `cxr models register file:///...` as the path it names
        from cxrcore.config import resolve_location

        directory = resolve_location(str(directory))
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a cxr checkpoint (no {CARD_NAME})")
    return _card_from_text(path.read_text(), directory)


def _card_from_text(text: str, directory: str | Path) -> ModelCard:
    """The card, or ConfigError naming a damaged one (a checkpoint copy killed midway cuts it short), or
    CardChangedError naming a registered card edited since (`check_card_recorded`)."""
    from cxrcore.config import ConfigError

    try:
        raw = json.loads(text)
        card = ModelCard.from_dict(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"{directory}/{CARD_NAME} is damaged ({type(exc).__name__}: {exc}); it cannot say what the "
            "checkpoint is: copy the checkpoint again from where it was saved"
        ) from None
    check_card_recorded(raw, directory)
    return card


def card_digest(card: Mapping[str, Any]) -> str:
    """sha256 of a card's JSON (keys sorted, compact) without its `card_sha256` and its `data.manifest`:
    what the registry records. The manifest's block is checked against its own file (its sha256), and an
    earlier cxr's `cxr models seal` adds it to a card registered without one: counted, that had made the
    version unloadable everywhere (a verifier's rolling-upgrade find)."""
    import hashlib

    body = {key: value for key, value in card.items() if key != "card_sha256"}
    if isinstance(body.get("data"), Mapping):
        body["data"] = {key: value for key, value in body["data"].items() if key != "manifest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


class CardChangedError(ConfigError):
    """A registered version's card is not the one the registry wrote (`card_sha256`), or lost its weights'
    hash: it was edited since, and what it says (preprocessing, temperature, classes) is not what was
    registered and tested."""


def check_card_recorded(card: Mapping[str, Any], directory: str | Path) -> None:
    """Raise CardChangedError where a card the registry wrote was changed since: its `card_sha256` no longer
    matches it, or it was registered (`registered_at`) but records no `weights_sha256`, which every cxr that
    records the one records the other with (a hash set to null skipped the weights' check)."""
    where = f"{directory}/{CARD_NAME}"
    restore = (
        "; copy the version's folder again from a good copy of the registry, or register its checkpoint again"
    )
    if card.get("registered_by") and not card.get("card_sha256"):
        raise CardChangedError(
            f"{where} was registered by a cxr that records its hash, and records none: its card was "
            f"edited{restore}"
        )
    if card.get("registered_at") and not card.get("weights_sha256"):
        raise CardChangedError(
            f"{where} was registered at {card['registered_at']} but records no weights_sha256: its card was "
            f"edited, and its weights cannot be checked{restore}"
        )
    recorded = card.get("card_sha256")
    if recorded and card_digest(card) != recorded:
        raise CardChangedError(
            f"{where} is not the card the registry recorded (sha256 {str(recorded)[:12]}…): it was edited "
            f"since, and what it says (preprocessing, temperature, classes) would serve under the registered "
            f"version's name{restore}"
        )


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the model from its card and load its weights (safetensors: nothing is unpickled).

    `directory` may be a URI: its card and weights are then fetched into this machine's cache first.
    """
    loaded = load_checkpoint(directory, device)
    return loaded.model, loaded.card


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: nn.Module
    card: ModelCard
    input_reference: Any
    """its `cxrcore.inputcheck.InputReference`, or None where the checkpoint has none."""


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """`load_model`'s model and card, with the input check's reference stored beside the weights."""
    from cxrcore.inputcheck import InputReference
    from cxrcore.models import create_model

    directory = local_checkpoint_dir(directory)
    card = load_card(directory)
    check_weights_recorded(card, Path(directory))
    args = dict(card.model)
    model = create_model(args.pop("name"), **args)
    weights = read_weights(Path(directory) / WEIGHTS_NAME, device=str(device))
    check_finite_weights(weights, Path(directory) / WEIGHTS_NAME)
    model.load_state_dict(weights)
    reference = None
    if card.input_reference:
        reference = InputReference.from_arrays(
            read_beside_weights(Path(directory) / WEIGHTS_NAME), card.input_reference
        )
    return LoadedCheckpoint(model.to(device).eval(), card, reference)


class NonFiniteWeightsError(ConfigError):
    """A checkpoint's weights hold NaN or infinite values: no prediction of it is a number."""


def check_finite_weights(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that hold NaN or infinite values (blown up in training, or damaged since): a review
    (session 57) registered, promoted and served such a checkpoint; `cxr evaluate` ended in a traceback
    and every request to the server in HTTP 500. About 20 ms for a ResNet50's 25 million weights."""
    bad = [
        name for name, tensor in weights.items() if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteWeightsError(
            f"{path}: its weights hold NaN or infinite values ({bad[0]}{more}, of {len(weights)} tensors), "
            "so it predicts nothing; blown up in training (a learning rate too high) or damaged since: use "
            "another checkpoint"
        )


class WeightsChangedError(ConfigError):
    """A checkpoint's weights are not the ones its card records (`weights_sha256`)."""


def check_weights_recorded(card: ModelCard, directory: Path) -> None:
    """Raise WeightsChangedError where `directory`'s weights are not those its card records: a registry
    version's folder, served or evaluated as a checkpoint folder, had answered with other weights copied
    over it while the HTTP answer named the recorded ones. A card that records none (a training run's
    checkpoint) is not checked."""
    import pyarrow.fs as pafs

    from cxrcore.data.storage import file_sha256

    if not card.weights_sha256:
        return
    found = file_sha256(pafs.LocalFileSystem(), str(directory / WEIGHTS_NAME))
    if found != card.weights_sha256:
        raise WeightsChangedError(
            f"{directory / WEIGHTS_NAME} (sha256 {found[:12]}…) are not the weights its card "
            f"records (sha256 {card.weights_sha256[:12]}…): they were replaced or damaged since it was "
            "registered"
            + (f"; copy them back from {card.registered_from}/{WEIGHTS_NAME}" if card.registered_from else "")
        )


def drop_resume_state(checkpoints: Iterable[str]) -> None:
    """Delete the resume state (TRAIN_STATE_NAME) of `checkpoints` (folders or URIs): those of a run that
    it will not resume from, every kept checkpoint but its latest. A run resumes from its latest checkpoint
    only; evaluation, the registry and Serve read the weights and the card. The state is mostly AdamW's two
    moments, twice the weights (about 190 MB for a ResNet50, beside 94 MB of weights), in each of the up to
    four checkpoints a run or trial keeps. A state that cannot be deleted is left, with a warning: the run
    it belongs to has finished."""
    from cxrcore.data import storage

    for checkpoint in checkpoints:
        try:
            filesystem, path = storage.resolve(checkpoint)
            storage.remove(filesystem, f"{path.rstrip('/')}/{TRAIN_STATE_NAME}")
        except OSError as exc:
            log.warning("could not delete %s/%s, which resuming does not need: %s", checkpoint,
                        TRAIN_STATE_NAME, exc)  # fmt: skip


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """Optimizer, scheduler and epoch state for resuming; tensors and plain types only."""
    path = Path(directory) / TRAIN_STATE_NAME
    if not path.is_file():
        return None
    state: dict[str, Any] = _load_weights_only(path)
    return state


def read_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a .pth/.pt/.bin state_dict read with `weights_only=True`.

    Nothing is ever unpickled: a file that is not what its suffix says, or a pickle naming anything
    but tensors and plain containers (one that would run code on load), raises UnsafeWeightsError.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device=device)
        except SafetensorError as exc:
            raise UnsafeWeightsError(
                f"refusing to load {path}: it is not a valid safetensors file ({exc}); it is damaged, "
                "or another format (such as a pickle) under a .safetensors name"
            ) from exc
    if path.suffix in STATE_DICT_SUFFIXES:
        state = _load_weights_only(path, device)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UnsafeWeightsError(f"{path} is not a plain state_dict (a mapping of names to tensors)")
        return state
    raise UnsafeWeightsError(
        f"unsupported weights file {path}: expected .safetensors or {', '.join(STATE_DICT_SUFFIXES)}"
    )


def read_beside_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays `save_checkpoint` stored in a .safetensors weights file's metadata (BESIDE_WEIGHTS_PREFIX);
    none for another format, or a file that has none (or whose entries are damaged: each is checked)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt", device="cpu") as stored:
        metadata = stored.metadata() or {}
    arrays = {}
    for name, text in metadata.items():
        if name.startswith(BESIDE_WEIGHTS_PREFIX):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                arrays[name] = _text_array(text)
    return arrays


def _array_text(array: np.ndarray) -> str:
    """A float32 array as the JSON text of its shape and its bytes (little-endian) in base64."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return json.dumps({"shape": list(data.shape), "float32": base64.b64encode(data.tobytes()).decode()})


def _text_array(text: str) -> np.ndarray:
    value = json.loads(text)
    shape = tuple(int(n) for n in value["shape"])
    return np.frombuffer(base64.b64decode(value["float32"], validate=True), dtype="<f4").reshape(shape).copy()


SAFETENSORS_MAX_HEADER = 100 * 2**20
"""The largest header safetensors itself reads (its own limit): a longer one is not a safetensors file."""


def safetensors_problem(stream: Any, size: int) -> str | None:
    """Why the .safetensors file read through `stream` (a binary file object of `size` bytes, local or an
    object store's) cannot be loaded, or None: its header checked against its length, without reading
    the tensors. A checkpoint copy killed midway (`cp`, rsync, a sync to storage) leaves a file cut short,
    which the registry had stored and promoted, and `cxr serve` failed on 30 s later.
    """
    import struct

    head = stream.read(8)
    if len(head) < 8:
        return f"{size} bytes, too short to hold a safetensors header"
    (length,) = struct.unpack("<Q", head)
    if length > min(SAFETENSORS_MAX_HEADER, size - 8):
        return f"its header claims {length:,} bytes of a {size:,}-byte file: damaged, or not safetensors"
    try:
        header = json.loads(stream.read(length))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not a safetensors header"
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        what = "cut short" if size < expected else "longer than its header says"
        return f"{what}: {size:,} of the {expected:,} bytes its header describes"
    return None


def _load_weights_only(path: Path, device: str = "cpu") -> Any:
    """torch.load restricted to tensors and plain containers, with a refusal that says why."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests weights_only=False, which would run whatever the file names.
        lines = [line.strip() for line in str(exc).splitlines()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise UnsafeWeightsError(
            f"refusing to load {path}: it holds more than tensors and plain values ({reason}); cxr never "
            "unpickles arbitrary objects, since that can run any code. Save the weights as .safetensors "
            "(or a plain state_dict) where you trust the file"
        ) from exc


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a model card")
