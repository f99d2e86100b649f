"""Inference: the MDM segmenter (features + pixel head), sliding windows and saved models."""

from .models import load_segmentation_model, save_segmentation_model
from .segmenter import MDMSegmenter, make_sliding_window_inferer

__all__ = ["MDMSegmenter", "load_segmentation_model", "make_sliding_window_inferer", "save_segmentation_model"]
