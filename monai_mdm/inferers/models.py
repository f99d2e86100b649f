"""One file format for every segmentation model a bundle trains (MDM segmenter or supervised baseline)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import optional_import

from monai_mdm.inferers.segmenter import SEGMENTER_FORMAT, MDMSegmenter
from monai_mdm.networks.interchange import UNET_FORMAT, check_model_file, model_file
from monai_mdm.utils import atomic_torch_save, load_torch_file

BASELINE_FORMAT = "monai_mdm.baseline"


def save_segmentation_model(model: torch.nn.Module, path: str | os.PathLike, config: Mapping[str, Any] | None = None):
    """Write ``model`` so that :func:`load_segmentation_model` can rebuild it from the file alone.

    An :class:`MDMSegmenter` stores its own settings; any other network (the supervised baseline) is stored
    in the same model-file layout with a MONAI ``_target_`` config: its class path and constructor ``config``.
    """
    if isinstance(model, MDMSegmenter):
        return model.save(path)
    if config is None:
        raise ValueError(f"saving {type(model).__name__} to '{path}' needs its constructor settings (config=).")
    network_config = {"_target_": f"{type(model).__module__}.{type(model).__qualname__}", **dict(config)}
    return atomic_torch_save(model_file(BASELINE_FORMAT, network_config, model.state_dict()), path)


def load_segmentation_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model written by :func:`save_segmentation_model`, in eval mode on ``map_location``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"trained model '{path}' not found. Train one with the bundle's configs/train.json "
            "(`python -m monai.bundle run --config_file <bundle>/configs/train.json --output_dir <run>` writes "
            "<run>/models/model.pt) and copy that model.pt to this path, or point --model_path at it."
        )
    state = load_torch_file(path, "trained model", "Fix: point --model_path at a complete model.pt written by the "
                            "bundle's training (train again, or copy it again if it was damaged).", weights_only=False)
    source = f"model '{path}'"
    if check_model_file(state, source, [BASELINE_FORMAT]):
        # files of the first layout held the class path and its settings as "target" and "config"
        config = dict(state.get("network_config") or {"_target_": state["target"], **state["config"]})
        target = config.pop("_target_")
        module_name, _, cls_name = target.rpartition(".")
        cls, found = optional_import(module_name, name=cls_name)
        if not found:
            raise ValueError(f"{source} needs {target}, which cannot be imported.")
        model = cls(**config)
        model.load_state_dict(state["model"])
    elif check_model_file(state, source, [SEGMENTER_FORMAT]):
        model = MDMSegmenter.from_state(state, source=str(path))
    else:
        hint = ("it is a pretrained UNet: point --pretrained_weights at it instead"
                if check_model_file(state, source, [UNET_FORMAT]) else
                "it may be a pretraining checkpoint: point --pretrained_weights at it instead")  # fmt: skip
        raise ValueError(f"'{path}' is not a monai_mdm segmentation model (no MDM segmenter or baseline format "
                         f"found); {hint}.")  # fmt: skip
    return model.to(map_location).eval()
