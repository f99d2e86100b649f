"""Multi-class IoU accumulated over a whole test set, the way the face benchmarks (DDPM-seg mIoU) score.

Intersections and unions are summed over all images per class before dividing, so a large image or a
frequent class weighs more than in a mean of per-image IoUs; that is how the published FFHQ-34 / CelebA-19
numbers are computed. Pixels whose label is ``ignore_index`` count for nothing (whatever the prediction there).
A class that appears in neither prediction nor label anywhere in the set has no IoU: it is reported as NaN
and left out of the mean (counting it as 0 or 1 would move the mean for a class nobody tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .segmentation import pair_arrays

__all__ = ["MultiClassIoU", "per_class_iou", "mean_iou"]


class MultiClassIoU:
    """Running per-class intersection and union (from a confusion matrix) over any number of images.

    Written here rather than taken from ignite's ``ConfusionMatrix`` / ``IoU``: those take score maps (B, C, ...)
    where the reports hold label maps of differing sizes, and ignite's IoU gives 0 to a class absent from both
    prediction and label, which would pull the face sets' mean down for parts no test image shows (here: NaN,
    left out of the mean, as the published mIoU is computed).

    Args:
        num_classes: K; predictions must lie in 0..K-1, labels in 0..K-1 or ``ignore_index``.
        ignore_index: label value excluded from scoring (255 in the face sets); None = no ignore value.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)  # [label, pred]

    def update(self, pred: Any, label: Any) -> MultiClassIoU:
        """Add one prediction/label pair (same shape; numpy or torch; e.g. (H, W) or (1, H, W))."""
        p, g = pair_arrays(pred, label)
        p, g = p.reshape(-1), g.reshape(-1)
        if self.ignore_index is not None:
            keep = g != self.ignore_index
            p, g = p[keep], g[keep]
        k = self.num_classes
        for what, arr in (("prediction", p), ("label", g)):
            if arr.size and (arr.min() < 0 or arr.max() >= k):
                bad = np.unique(arr[(arr < 0) | (arr >= k)])[:10].tolist()
                extra = "" if what == "prediction" or self.ignore_index is None else f" or {self.ignore_index}"
                raise ValueError(f"{what} holds values {bad} outside the classes 0..{k - 1}{extra}.")
        self.confusion += np.bincount(g.astype(np.int64) * k + p.astype(np.int64), minlength=k * k).reshape(k, k)
        return self

    @property
    def intersection(self) -> np.ndarray:
        return np.diag(self.confusion).copy()

    @property
    def union(self) -> np.ndarray:
        return self.confusion.sum(axis=0) + self.confusion.sum(axis=1) - np.diag(self.confusion)

    def per_class(self) -> np.ndarray:
        """(K,) float64 IoU per class; NaN where the class is absent from both prediction and label."""
        union = self.union
        out = np.full(self.num_classes, np.nan)
        present = union > 0
        out[present] = self.intersection[present] / union[present]
        return out

    def compute(self) -> tuple[np.ndarray, float]:
        """(per-class IoU, mean over the classes that have one); the mean is NaN when none has."""
        ious = self.per_class()
        valid = ious[~np.isnan(ious)]
        return ious, float(valid.mean()) if valid.size else float("nan")


def _pairs(preds: Any, labels: Any) -> list[tuple[Any, Any]]:
    """A list/tuple is a set of per-image maps (sizes may differ); anything else is one array of pixels."""
    if isinstance(preds, (list, tuple)) != isinstance(labels, (list, tuple)):
        raise TypeError("give predictions and labels both as lists of maps, or both as arrays.")
    if isinstance(preds, (list, tuple)):
        if len(preds) != len(labels):
            raise ValueError(f"{len(preds)} predictions but {len(labels)} labels.")
        return list(zip(preds, labels))
    return [(preds, labels)]


def per_class_iou(
    preds: Sequence[Any] | Any, labels: Sequence[Any] | Any, num_classes: int, ignore_index: int | None = 255
) -> np.ndarray:
    """(K,) IoU per class over the whole set (intersection and union summed over images); NaN = class absent."""
    acc = MultiClassIoU(num_classes, ignore_index)
    for p, g in _pairs(preds, labels):
        acc.update(p, g)
    return acc.per_class()


def mean_iou(
    preds: Sequence[Any] | Any, labels: Sequence[Any] | Any, num_classes: int, ignore_index: int | None = 255
) -> tuple[np.ndarray, float]:
    """``(per_class_iou, mIoU)`` over the whole set; classes absent everywhere are NaN and not averaged.

    ``preds`` / ``labels``: lists of per-image maps, or two arrays of the same shape (e.g. (N, H, W)).
    """
    acc = MultiClassIoU(num_classes, ignore_index)
    for p, g in _pairs(preds, labels):
        acc.update(p, g)
    return acc.compute()
