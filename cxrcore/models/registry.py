"""Name → builder registry: create_model, list_models and the input spec each name declares."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from cxrcore.data.spec import InputSpec

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """One registered model name."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    input_spec: InputSpec
    """Default spec; create_model may change its image_size."""
    description: str
    """First line of the builder's docstring."""
    accepts_pretrained: bool
    """The builder takes initial weights (a `pretrained` parameter: a local file, or "hub")."""
    hub_weights: bool = False
    """Published ImageNet weights exist for it: `--pretrained auto` fetches them, and `cxr tune` hands its
    --pretrained to it (a model without them, e.g. tiny_resnet, trains from scratch there)."""
    cam_layer: str | None = None
    """The dotted name of the module whose output Grad-CAM weighs (`model.get_submodule`); None: the
    output of the last convolutional block, after its normalisation and activation (explain._feature_map)."""


_entries: dict[str, ModelEntry] = {}


def register_model(
    input_spec: InputSpec, *, hub_weights: bool = False, cam_layer: str | None = None
) -> Callable[[Builder], Builder]:
    """Register the decorated builder under its function name, with the spec its models expect.

    `hub_weights`: timm publishes ImageNet weights under that name (the builder takes `pretrained`).
    `cam_layer`: the module Grad-CAM reads, where the last convolutional block's output is not the right
    one (a pre-activation architecture, whose blocks end before their normalisation).
    """

    def decorate(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _entries:
            raise ValueError(f"model {name!r} is already registered by {_entries[name].family}")
        doc = inspect.getdoc(builder)
        if not doc:
            raise ValueError(f"model builder {name!r} needs a one-line docstring")
        _entries[name] = ModelEntry(
            name=name,
            builder=builder,
            family=builder.__module__.rsplit(".", 1)[-1],
            input_spec=input_spec,
            description=doc.splitlines()[0],
            accepts_pretrained="pretrained" in inspect.signature(builder).parameters,
            hub_weights=hub_weights,
            cam_layer=cam_layer,
        )
        if hub_weights and not _entries[name].accepts_pretrained:
            del _entries[name]
            raise ValueError(f"model {name!r} has hub weights but its builder takes no `pretrained`")
        return builder

    return decorate


def list_models(pattern: str | None = None, *, task: str | None = None) -> list[str]:
    """Registered names, sorted; optionally filtered by a shell-style pattern and by spec task."""
    names = sorted(_entries)
    if pattern is not None:
        names = fnmatch.filter(names, pattern)
    if task is not None:
        names = [name for name in names if _entries[name].input_spec.task == task]
    return names


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for `name`; unknown names get a "did you mean" suggestion."""
    try:
        return _entries[name]
    except KeyError:
        pass
    names = sorted(_entries)
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    hint = f": did you mean {' or '.join(repr(match) for match in close)}?" if close else "."
    raise ValueError(f"unknown model {name!r}{hint} Available models: {', '.join(names)}") from None


def get_input_spec(model: str | nn.Module, *, image_size: int | None = None) -> InputSpec:
    """The spec of a registered name (without building it) or of a model built by create_model.

    `image_size` replaces the spec's default size; the architectures adapt to any size of 32 px or more.
    """
    if isinstance(model, str):
        spec = get_model_entry(model).input_spec
    else:
        spec = _built_attr(model, "input_spec", InputSpec)
    return spec if image_size is None else dataclasses.replace(spec, image_size=image_size)


def get_build_args(model: nn.Module) -> dict[str, Any]:
    """JSON-ready arguments that rebuild `model` as `create_model(**args)` (weights aside)."""
    return dict(_built_attr(model, "build_args", dict))


def create_model(
    name: str,
    *,
    image_size: int | None = None,
    pretrained: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model; it carries `input_spec`, `num_classes` and `build_args` attributes.

    `kwargs` go to the builder and must be JSON-serialisable, so a model card can rebuild the
    model. `pretrained` only chooses the initial weights (a local file, or "hub"); it is left out of
    `build_args` because a card's checkpoint replaces those weights.

    >>> model = create_model("tiny_cnn_lstm", num_classes=3)
    >>> model.input_spec.channels, model.num_classes
    (('image',), 3)
    >>> get_build_args(model)
    {'name': 'tiny_cnn_lstm', 'image_size': 64, 'num_classes': 3}
    """
    entry = get_model_entry(name)
    spec = get_input_spec(name, image_size=image_size)
    try:
        # A JSON round trip also detaches the record from the caller's (mutable) arguments.
        recorded = json.loads(json.dumps(kwargs))
    except TypeError as exc:
        raise TypeError(f"create_model({name!r}) arguments must be JSON-serialisable: {exc}") from exc
    if pretrained is None:
        model = entry.builder(**kwargs)
    elif _a_checkpoints_weights(pretrained):  # a cxr checkpoint of this architecture: all of it, strictly
        from cxrcore.checkpoint import read_weights

        model = entry.builder(**kwargs)
        try:
            model.load_state_dict(read_weights(pretrained))
        except RuntimeError as exc:
            raise ValueError(f"{pretrained} does not fit {name} at these settings: {exc}") from exc
    elif entry.accepts_pretrained:
        model = entry.builder(pretrained=pretrained, **kwargs)
    else:
        raise ValueError(
            f"model {name!r} takes no pretrained weights; models that do: "
            f"{', '.join(n for n in list_models() if _entries[n].accepts_pretrained)}"
        )
    # Convolution weights in channels_last (NHWC) memory: oneDNN on a CPU and cuDNN's tensor cores on a
    # GPU run their fastest convolutions in it, and an input in the usual layout is converted by the first
    # convolution. On 2 CPU threads at 128 px it trained cnn_lstm 1.44×, dual_cnn 1.11× and resnet18 1.18×
    # as fast, and on one thread served cnn_lstm's graph 1.8×, dual_cnn's 1.65× and the U-Net's 1.2× as
    # fast (cxrcore/bench/README.md, session 28). Loaded weights keep it (`load_state_dict` copies into
    # these tensors), and checkpoints are written contiguous.
    model = model.to(memory_format=torch.channels_last)
    # nn.Module.__setattr__ is typed for tensors and modules only; plain attributes land in
    # __dict__ either way, and the typed readers are get_input_spec / get_build_args.
    vars(model).update(input_spec=spec, build_args={"name": name, "image_size": spec.image_size, **recorded})
    return model


def _a_checkpoints_weights(pretrained: str | Path) -> bool:
    """Whether `pretrained` is the weights file of a cxr checkpoint (model.safetensors beside card.json)."""
    from cxrcore.checkpoint import CARD_NAME, WEIGHTS_NAME

    path = Path(str(pretrained))
    return path.name == WEIGHTS_NAME and (path.parent / CARD_NAME).is_file()


def _built_attr(model: nn.Module, attr: str, kind: type) -> Any:
    inner = unwrap(model)
    value = getattr(inner, attr, None)
    if not isinstance(value, kind):
        raise ValueError(f"{type(inner).__name__} has no {attr}; build it with cxrcore.models.create_model")
    return value


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(compiled := getattr(model, "_orig_mod", None), nn.Module):
            model = compiled
        else:
            return model
