"""Model families behind one registry; importing this package registers them all."""

from cxrcore.data.spec import InputSpec
from cxrcore.models import cnn_lstm, dual_cnn, resnet, unet  # noqa: F401  (registration)
from cxrcore.models.pretrained import load_pretrained
from cxrcore.models.registry import (
    ModelEntry,
    create_model,
    get_build_args,
    get_input_spec,
    get_model_entry,
    list_models,
    register_model,
)
from cxrcore.models.segmentation import dice_score, iou_score

__all__ = [
    "InputSpec",
    "ModelEntry",
    "create_model",
    "dice_score",
    "get_build_args",
    "get_input_spec",
    "get_model_entry",
    "iou_score",
    "list_models",
    "load_pretrained",
    "register_model",
]
