"""A trained segmentation model as an MLflow pyfunc model: RGB images (or CT volumes) in, class masks out.

This file is MLflow "model from code": :func:`monai_mdm.handlers.save_mlflow_model` copies it into the
saved model (the package never imports it) and ``mlflow.pyfunc.load_model(uri)`` runs it, so nothing is
pickled. ``predict`` does what the bundles do around the network (0..255 -> [-1, 1], sliding windows of
the training crop size, argmax)::

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    masks = model.predict(images)  # (N, H, W, 3) uint8 -> (N, H, W) uint8 class indices
    labels = model3d.predict(volumes)  # 3D models: (N, D, H, W) float32 (e.g. HU) -> (N, D, H, W) uint8

Volumes must already be on the training grid (orientation and spacing): arrays carry no affine to resample.

Loading needs ``monai_mdm`` importable (the model file holds weights and settings, not the code).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SegmentationPyfunc(PythonModel):
    """Loads a file of :func:`monai_mdm.inferers.save_segmentation_model` and segments image or volume batches."""

    def load_context(self, context) -> None:
        import torch
        from monai.transforms import ScaleIntensityRange

        from monai_mdm.inferers import load_segmentation_model, make_sliding_window_inferer

        config = dict(context.model_config or {})
        self.device = torch.device(config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_segmentation_model(context.artifacts["model"], self.device)
        self.spatial_dims = int(config.get("spatial_dims", 2))
        low, high = config.get("intensity_range", (0.0, 255.0))
        self.scale = ScaleIntensityRange(low, high, -1.0, 1.0, clip=True)  # as the bundles' preprocessing
        self.inferer = make_sliding_window_inferer(
            roi_size=int(config["window_size"]), overlap=float(config.get("overlap", 0.2))
        )

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        from monai.utils import convert_to_tensor

        images = np.asarray(model_input)
        if self.spatial_dims == 3:
            if images.ndim != 4:
                raise ValueError(f"expected single-channel volumes as an (N, D, H, W) array, got shape {images.shape}.")
            x = torch.tensor(images, dtype=torch.float32)[:, None]
        else:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"expected RGB images as an (N, H, W, 3) array, got shape {images.shape}.")
            x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2)
        x = convert_to_tensor(self.scale(x), track_meta=False).to(self.device)
        with torch.no_grad():
            scores = self.inferer(x, self.model)
        return scores.argmax(1).to(torch.uint8).cpu().numpy()


mlflow.models.set_model(SegmentationPyfunc())
