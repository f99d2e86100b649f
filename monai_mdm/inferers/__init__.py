"""Inference: the MDM segmenter (features + pixel head), sliding windows, saved models and whole slides."""

from .models import load_segmentation_model, save_segmentation_model
from .segmenter import MDMSegmenter, make_sliding_window_inferer
from .wsi import SlideInferer

__all__ = [
    "MDMSegmenter", "SlideInferer", "load_segmentation_model", "make_sliding_window_inferer", "save_segmentation_model",
]
