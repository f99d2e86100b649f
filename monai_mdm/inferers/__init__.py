"""Inference: frozen MDM features + pixel head as one network, ready for MONAI's sliding-window inferer."""

from .segmenter import MDMSegmenter, make_sliding_window_inferer

__all__ = ["MDMSegmenter", "make_sliding_window_inferer"]
