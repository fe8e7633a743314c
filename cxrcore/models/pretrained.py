"""timm architectures on one input channel, with transfer learning from a local file or the hub: the
builder (`create_timm`), the loader of a weights file, the hub's probe, and `cxr models import-weights`.
The ResNets (`resnet.py`) are built here; so is any other timm architecture added beside them."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrcore.checkpoint import _sort_metadata, read_weights
from cxrcore.labels import NUM_CLASSES

__all__ = [
    "HUB", "create_timm", "freeze_all_but_head", "hub_unreachable", "import_weights", "load_pretrained",
]  # fmt: skip

# timm is imported where a model is built or its weights adapted, not with the module: it brings
# torchvision and torch._dynamo (1.6 of the 4.1 s a Ray worker took to import the training loop), and
# every process that imports cxrcore.models (Train workers, Tune trials, Ray Data tasks, Serve replicas)
# paid for it, whether it built a timm model or not.

logger = logging.getLogger(__name__)

HUB = "hub"
"""The `pretrained` value that downloads timm's ImageNet weights."""


WRAPPED_STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
"""Where training scripts keep the weights inside a checkpoint dict, in the order they are looked for:
PyTorch's examples and Lightning (`state_dict`), DeiT/MAE/torchvision's references (`model`), timm's
train.py (`state_dict`, and `state_dict_ema` for its EMA weights)."""
TRAINING_CHECKPOINT_SUFFIXES = (".pth.tar", ".ckpt")
"""Checkpoint names of timm's train.py (`model_best.pth.tar`) and Lightning, read as a .pth."""


def read_pretrained(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as people bring them: a state_dict (`read_weights`), or a training
    checkpoint holding one (WRAPPED_STATE_KEYS, an `argparse.Namespace` of its arguments allowed beside it),
    with DataParallel's `module.` taken off every name. What was unwrapped is logged. Nothing is unpickled
    beyond tensors, plain containers and the Namespace: a file naming anything else is refused as before.

    Those files were refused (a review, session 52) with "not a plain state_dict", torch's advice to call
    `add_safe_globals`, "unsupported weights file", or a list of `module.`-prefixed names, each a conversion
    the user had to write."""
    import argparse

    from cxrcore.checkpoint import STATE_DICT_SUFFIXES, UnsafeWeightsError, _load_weights_only

    path = Path(path)
    if path.suffix == ".safetensors":
        return _unprefixed(read_weights(path), path)
    if not path.name.endswith((*STATE_DICT_SUFFIXES, *TRAINING_CHECKPOINT_SUFFIXES)):
        return read_weights(path)  # its refusal names the formats
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = _load_weights_only(path)
    state, where = loaded, ""
    if isinstance(loaded, dict) and not _all_tensors(loaded):
        key = next((key for key in WRAPPED_STATE_KEYS if _all_tensors(loaded.get(key))), None)
        if key is None:
            entries = ", ".join(repr(k) for k in list(loaded)[:8])
            raise UnsafeWeightsError(
                f"{path} is not a plain state_dict (a mapping of names to tensors), nor a checkpoint holding "
                f"one under {', '.join(repr(k) for k in WRAPPED_STATE_KEYS)}; its entries: {entries}"
            )
        state, where = loaded[key], f"its {key!r} entry"
    if not _all_tensors(state):
        raise UnsafeWeightsError(f"{path} is not a plain state_dict (a mapping of names to tensors)")
    if where:
        logger.info("%s: a training checkpoint; read %s", path, where)
    return _unprefixed(dict(state), path)


def _all_tensors(value: Any) -> bool:
    tensors = isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())
    return tensors and bool(value)


WRAPPER_PREFIXES = ("module.", "model.")
"""What wrappers put before every name: DataParallel and DDP (`module.`), a LightningModule holding the
network as `self.model` (`model.`); taken off, outermost first, where every name starts with it."""


def _unprefixed(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`state` without a wrapper's prefix (WRAPPER_PREFIXES) before every name."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            logger.info("%s: every name starts with %r (a wrapper's); read without it", path, prefix)
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _named_as(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, levels: int = 3
) -> dict[str, torch.Tensor]:
    """`state` with the first name components all its names share taken off (up to `levels` of them),
    where its names and the model's have none in common and would have then: a wrapper's attribute other
    than WRAPPER_PREFIXES' (`net.`, `backbone.`, `encoder.`, `student.backbone.`). Otherwise as it is.

    >>> own = {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
    >>> sorted(_named_as(own, {"student.backbone.conv1.weight": torch.zeros(1)}, Path("w.pth")))
    ['conv1.weight']
    >>> sorted(_named_as(own, {"net.layer9.weight": torch.zeros(1)}, Path("w.pth")))
    ['net.layer9.weight']
    """
    if not state or state.keys() & own.keys():
        return state
    names = {name: name for name in state}
    for _ in range(levels):
        heads = {name.split(".", 1)[0] for name in names.values()}
        if len(heads) != 1 or not all("." in name for name in names.values()):
            break
        names = {key: name.split(".", 1)[1] for key, name in names.items()}
        if set(names.values()) & own.keys():
            prefix = next(iter(state))[: -len(next(iter(names.values())))]
            logger.info("%s: every name starts with %r (a wrapper's); read without it", path, prefix)
            return {names[key]: value for key, value in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a state_dict file into a timm model; return the keys skipped because the head differs.

    Reads .safetensors, or .pth/.pt/.bin with `weights_only=True` (never unpickles: a file that would
    run code on load raises cxrcore.checkpoint.UnsafeWeightsError, a ValueError). A 3-channel first
    conv is summed over RGB to fit a 1-channel model; classifier tensors of another shape (a 1000-class
    ImageNet head) are skipped. Any other mismatch means the file is for another architecture and
    raises ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {path} does not exist; pass an existing .safetensors/.pth file, "
            f"{HUB!r} to download, or None to train from scratch"
        )
    own = model.state_dict()
    state = _named_as(own, read_pretrained(path), path)
    first_conv = f"{_pretrained_cfg(model, 'first_conv', 'conv1')}.weight"
    classifier = _pretrained_cfg(model, "classifier", "fc")

    if first_conv in state and first_conv in own and state[first_conv].shape != own[first_conv].shape:
        from timm.models import adapt_input_conv

        state[first_conv] = adapt_input_conv(own[first_conv].shape[1], state[first_conv])
    skipped = sorted(
        key
        for key, value in state.items()
        if key.startswith(f"{classifier}.") and key in own and value.shape != own[key].shape
    )
    for key in skipped:
        del state[key]

    mismatched = [
        f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    # Older files lack BN's num_batches_tracked; the head is re-initialised on purpose.
    missing = [
        key
        for key in own
        if key not in state
        and not key.endswith("num_batches_tracked")
        and not key.startswith(f"{classifier}.")
    ]
    unexpected = [key for key in state if key not in own]
    if mismatched or missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit {type(model).__name__}: "
            f"shape mismatches {mismatched[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)
    if skipped:
        logger.info("loaded %s; kept the new classifier, skipping %s", path, ", ".join(skipped))
    else:
        logger.info("loaded %s", path)
    return skipped


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) cannot be reached, or None when it can or when HF_HUB_OFFLINE
    says to use the local cache. Without this, huggingface_hub retries for about 45 s before failing (a
    minute for `import-weights`' two files)."""
    import os
    import socket
    import urllib.request
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxies = urllib.request.getproxies()
    proxied = proxies.get(endpoint.scheme or "https") or proxies.get("all")
    if proxied and not urllib.request.proxy_bypass(host):
        return None  # through a proxy (a hospital's network): the hub client goes that way, not a socket
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    return None


def weights_file_name(arch: str) -> str:
    """The name `arch`'s weights go by in a --pretrained folder (as `cxr models import-weights ARCH --out
    FOLDER/` writes them)."""
    return f"{arch}-1ch.safetensors"


def offline_cache_missing(arch: str) -> str | None:
    """Why `arch`'s hub weights cannot load where HF_HUB_OFFLINE is set: the hub's cache holds none of them
    (None where it does, where the variable is not set, or where timm names no hub repository to look
    in). The refusal of an unreachable hub suggests HF_HUB_OFFLINE=1; with an empty cache the run then failed
    only after Ray's start, in the hub client's words."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
        return None
    try:
        import huggingface_hub
        import timm

        config = timm.models.get_pretrained_cfg(arch)
        repo = getattr(config, "hf_hub_id", None)
        if not repo:
            return None
        names = [getattr(config, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
        if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, name), str) for name in names if name):
            return None
    except Exception:
        return None
    return f"HF_HUB_OFFLINE is set and the hub's cache holds no {arch} weights ({repo})"


SOURCE_KEY, SOURCE_SHA_KEY = "cxr.source", "cxr.source_sha256"
"""The safetensors metadata `import_weights` writes: where the weights came from (the hub's model, or the
file's name) and, for a file, its sha256; a card records them (`initial_weights`)."""


def import_weights(
    arch: str, out: str | Path, source: str | Path | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write `arch`'s ImageNet weights for one input channel, without the classifier, as safetensors.

    The weights come from the hub (`source=None`: timm's pretrained `arch`, so this needs internet) or
    from a local 3-channel state_dict file (.safetensors, or .pth/.pt/.bin read with weights_only=True).
    The first conv is summed over RGB with timm's `adapt_input_conv` and the classifier is dropped, so
    `create_model(arch, pretrained=out)` loads the file offline; that is checked before `out` is written.
    Returns what was written: path, tensors, bytes, source. Raises ValueError for an arch that takes no
    pretrained weights or weights that do not fit it, RuntimeError when the hub cannot be reached.
    """
    import timm
    from safetensors.torch import save_file
    from timm.models import adapt_input_conv

    from cxrcore.models.registry import create_model, get_model_entry, list_models

    choices = [name for name in list_models() if get_model_entry(name).accepts_pretrained]
    if arch not in choices:
        raise ValueError(f"{arch!r} takes no pretrained weights; choices: {', '.join(choices)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the weights are written as safetensors; name the file *.safetensors")
    if out.exists() and not overwrite:  # runs that started from it would not say which weights they had
        raise ValueError(
            f"--out {out} exists ({_described_file(out)}); write elsewhere, or pass --force to replace it"
        )
    if source is None:
        if not get_model_entry(arch).hub_weights:
            raise ValueError(f"{arch} has no hub weights; pass a local 3-channel weights file with --from")
        try:
            if unreachable := hub_unreachable():  # asked once, 3 s at most: not the hub client's minute
                raise OSError(f"unreachable: {unreachable}")
            state = timm.create_model(arch, pretrained=True).state_dict()
        except Exception as exc:
            raise RuntimeError(
                f"could not fetch pretrained {arch} weights from the model hub (offline or unreachable?): "
                f"{str(exc).rstrip('.')}. Run this on a machine with internet, or pass --from <local "
                "3-channel .safetensors/.pth file>."
            ) from exc
        described = f"hub (timm {arch}, pretrained)"
        origin = {SOURCE_KEY: f"hub:{_hub_id(arch) or arch}"}
    else:
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"--from {source} does not exist")
        state = read_pretrained(source)
        described = str(source)
        origin = {SOURCE_KEY: source.name, SOURCE_SHA_KEY: _sha256(source)}

    target = create_model(arch)
    state = _named_as(target.state_dict(), state, Path(described))
    first_conv = f"{_pretrained_cfg(target, 'first_conv', 'conv1')}.weight"
    classifier = f"{_pretrained_cfg(target, 'classifier', 'fc')}."
    in_chans = target.state_dict()[first_conv].shape[1]
    if first_conv in state and state[first_conv].shape[1] != in_chans:
        state[first_conv] = adapt_input_conv(in_chans, state[first_conv])
    state = {key: value.contiguous() for key, value in state.items() if not key.startswith(classifier)}

    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(suffix=".safetensors", dir=out.parent, prefix=f".{out.name}.")
    os.close(handle)
    try:
        save_file(state, staged, metadata=origin)
        _sort_metadata(Path(staged))  # safetensors orders the keys anew each time: equal bytes, equal hash
        try:
            load_pretrained(target, staged)
        except ValueError as exc:  # named by its source, not by the staged file's temporary name
            raise ValueError(
                f"weights from {described} do not fit {arch} (another architecture's?): "
                f"{str(exc).split(': ', 1)[-1]}"
            ) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # as open() makes a file: mkstemp's 0600 kept other users out
        os.replace(staged, out)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return {
        "path": str(out),
        "arch": arch,
        "tensors": len(state),
        "bytes": out.stat().st_size,
        "source": described,
    }


def create_timm(
    variant: str,
    *,
    num_classes: int = NUM_CLASSES,
    pretrained: str | Path | None = None,
    freeze_backbone: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """timm's `variant` on one input channel, initialised randomly, from a file or from the hub (`HUB`);
    `kwargs` go to `timm.create_model` (what the architecture takes: a ResNet's `zero_init_last`, say).
    The builder of any timm architecture: `resnet.py`'s, or a new one's (the README's densenet121).

    Offline, huggingface_hub retries for about 45 s before the hub fails; HF_HUB_OFFLINE=1 fails at once.
    """
    import timm

    if pretrained == HUB:
        try:
            model = timm.create_model(variant, pretrained=True, in_chans=1, num_classes=num_classes, **kwargs)
        except Exception as exc:
            raise RuntimeError(
                f"could not fetch pretrained {variant} weights from the model hub (offline or unreachable?): "
                f"{str(exc).rstrip('.')}. Pass --pretrained PATH (pretrained=PATH in Python) to a local "
                ".safetensors/.pth file, or --pretrained none (pretrained=None) to train from scratch."
            ) from exc
    else:
        model = timm.create_model(variant, pretrained=False, in_chans=1, num_classes=num_classes, **kwargs)
        if pretrained is not None:
            load_pretrained(model, pretrained)
    if freeze_backbone:
        freeze_all_but_head(model)
    return model


def initial_weights(path: str | Path) -> dict[str, Any]:
    """What a card records of the weights file a run started from (`data.initial_weights`): its name and
    sha256 (not its folder, which names the training site's paths), and where `import_weights` wrote it,
    its source (the hub's model, or the file it came from, and that file's sha256). Before, a card said
    only `training.pretrained`: a folder, whose file `import-weights` could replace in between."""
    path = Path(path)
    record: dict[str, Any] = {"file": path.name, "sha256": _sha256(path)}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        if SOURCE_KEY in metadata:
            record["source"] = metadata[SOURCE_KEY]
        if SOURCE_SHA_KEY in metadata:
            record["source_sha256"] = metadata[SOURCE_SHA_KEY]
    return record


def hub_weights_record(arch: str) -> dict[str, Any]:
    """`initial_weights` for weights timm takes from the model hub: the hub's model id."""
    return {"source": f"hub:{_hub_id(arch) or arch}"}


def _hub_id(arch: str) -> str | None:
    import timm

    try:
        config = timm.models.get_pretrained_cfg(arch)
    except Exception:  # an architecture timm has no pretrained config for
        return None
    hub = getattr(config, "hf_hub_id", None)
    return str(hub) if hub else None


def _sha256(path: Path) -> str:
    import pyarrow.fs as pafs

    from cxrcore.data.storage import file_sha256

    return file_sha256(pafs.LocalFileSystem(), str(path.resolve()))


def _described_file(path: Path) -> str:
    try:
        record = initial_weights(path)
    except Exception as exc:  # not safetensors after all: said, the refusal stands
        return f"unreadable: {type(exc).__name__}"
    source = f", from {record['source']}" if "source" in record else ""
    return f"sha256 {record['sha256'][:12]}…{source}"


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Leave only a timm model's classifier head trainable (`requires_grad`); the names of what trains.

    Its BatchNorm layers, all of them in the backbone, are frozen too where training keeps them in eval mode
    (`cxrcore.train.engine.frozen_norms`): with their weights fixed but their statistics updated by every
    batch, the "frozen" features still moved (a review, session 52)."""
    head = f"{_pretrained_cfg(model, 'classifier', 'fc')}."
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(head)
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameters under {head!r}: no head to train")
    return trainable


def _pretrained_cfg(model: nn.Module, key: str, default: str) -> str:
    """A module name from timm's pretrained_cfg, e.g. the first conv or the classifier."""
    return str(getattr(model, "pretrained_cfg", {}).get(key, default))
