"""One file format for every segmentation model a bundle trains (MDM segmenter or supervised baseline)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import optional_import

from monai_mdm.inferers.segmenter import MDMSegmenter
from monai_mdm.utils import atomic_torch_save, load_torch_file

_BASELINE_FORMAT = "monai_mdm.baseline"


def save_segmentation_model(model: torch.nn.Module, path: str | os.PathLike, config: Mapping[str, Any] | None = None):
    """Write ``model`` so that :func:`load_segmentation_model` can rebuild it from the file alone.

    An :class:`MDMSegmenter` stores its own settings; any other network (the supervised baseline) is
    stored as its ``_target_`` class path, the constructor ``config`` and its weights under ``"model"``.
    """
    if isinstance(model, MDMSegmenter):
        return model.save(path)
    if config is None:
        raise ValueError(f"saving {type(model).__name__} to '{path}' needs its constructor settings (config=).")
    target = f"{type(model).__module__}.{type(model).__qualname__}"
    state = {"format": _BASELINE_FORMAT, "target": target, "config": dict(config), "model": model.state_dict()}
    return atomic_torch_save(state, path)


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
    if isinstance(state, Mapping) and state.get("format") == _BASELINE_FORMAT:
        module_name, _, cls_name = state["target"].rpartition(".")
        cls, found = optional_import(module_name, name=cls_name)
        if not found:
            raise ValueError(f"model '{path}' needs {state['target']}, which cannot be imported.")
        model = cls(**state["config"])
        model.load_state_dict(state["model"])
    elif isinstance(state, Mapping) and "features" in state and "head" in state:
        model = MDMSegmenter.from_state(state, source=str(path))
    else:
        raise ValueError(
            f"'{path}' is not a monai_mdm segmentation model (no MDM segmenter or baseline format found); "
            "it may be a pretraining checkpoint: point --pretrained_weights at it instead."
        )
    return model.to(map_location).eval()
