"""Metrics: the paper's binarised protocol (``paper_*``) kept apart from real instance metrics."""

from .report import GLAS_KEYS, MONUSEG_KEYS, MetricTable, atomic_write_text, evaluate_case
from .segmentation import (
    aji,
    as_numpy,
    binarise,
    gland_object_dice,
    gland_object_hausdorff,
    instances_from_binary,
    pair_arrays,
    panoptic_quality,
    paper_binary_aji,
    paper_dice,
    paper_iou_from_dice,
)

__all__ = [
    "GLAS_KEYS",
    "MONUSEG_KEYS",
    "MetricTable",
    "aji",
    "as_numpy",
    "atomic_write_text",
    "binarise",
    "evaluate_case",
    "gland_object_dice",
    "gland_object_hausdorff",
    "instances_from_binary",
    "pair_arrays",
    "panoptic_quality",
    "paper_binary_aji",
    "paper_dice",
    "paper_iou_from_dice",
]

from .multiclass import MultiClassIoU, mean_iou, per_class_iou

__all__ += ["MultiClassIoU", "mean_iou", "per_class_iou"]
