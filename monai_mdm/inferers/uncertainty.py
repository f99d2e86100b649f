"""How unsure a trained head ensemble is about a whole image: the active-learning score for picking what to label next.

Two numbers per image, both natural-log nats averaged over its pixels:

* ``entropy``: entropy of the heads' averaged softmax. High where the classes are not told apart, whether the
  heads agree on that or not.
* ``disagreement``: mutual information between the prediction and the head (entropy of the mean minus the
  mean of the heads' entropies, as in BALD). High where the heads, trained from different initialisations on
  the same labels, contradict each other; 0 for a single head.

An image that the labelled images do not yet cover scores high on both; labelling it teaches the head most.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_mdm.inferers.segmenter import MDMSegmenter, make_sliding_window_inferer

__all__ = ["EnsembleProbabilities", "ensemble_uncertainty", "image_uncertainty"]


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dim=dim)


def ensemble_uncertainty(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"entropy", "disagreement"}``, each (B,), of per-head softmax probabilities (B, heads, classes, *spatial)."""
    if probs.ndim < 4:
        shape = tuple(probs.shape)
        raise ValueError(f"expected per-head probabilities (B, heads, classes, *spatial), got shape {shape}.")
    entropy = _entropy(probs.mean(dim=1), dim=1)  # (B, *spatial)
    expected = _entropy(probs, dim=2).mean(dim=1)
    reduce = tuple(range(1, entropy.ndim))
    return {"entropy": entropy.mean(dim=reduce), "disagreement": (entropy - expected).clamp_min(0).mean(dim=reduce)}


class EnsembleProbabilities(nn.Module):
    """A segmenter's per-head softmax probabilities, flattened to (B, heads * classes, *spatial) so that a sliding
    window blends them like class scores (padded to the extractor's size multiple as the segmenter pads)."""

    def __init__(self, segmenter: MDMSegmenter) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        spatial = tuple(int(s) for s in images.shape[2:])
        m = self.segmenter.extractor.size_multiple
        pad: list[int] = []
        for s in reversed(spatial):
            pad += [0, math.ceil(s / m) * m - s]
        probs = self.segmenter.head.probabilities(self.segmenter.extractor(F.pad(images, pad)))  # (N, B, C, ...)
        probs = probs[(slice(None), slice(None), slice(None), *(slice(0, s) for s in spatial))]
        return probs.transpose(0, 1).flatten(1, 2)


@torch.no_grad()
def image_uncertainty(
    segmenter: MDMSegmenter,
    images: torch.Tensor,
    roi_size: int | Sequence[int] = 256,
    overlap: float = 0.2,
    sw_batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """:func:`ensemble_uncertainty` of whole images (B, C, *spatial) in [-1, 1], through the sliding window of
    inference (use the window size the head was trained on, as for segmenting)."""
    if not isinstance(segmenter, MDMSegmenter):
        raise TypeError(
            f"the active-learning score needs an MDM segmenter (a head ensemble on MDM features), got "
            f"{type(segmenter).__name__}: the UNet baseline has no heads to compare."
        )
    segmenter = segmenter.eval()
    if isinstance(roi_size, int):
        roi_size = [roi_size] * (images.ndim - 2)
    inferer = make_sliding_window_inferer(roi_size, overlap, sw_batch_size)
    flat = inferer(images, EnsembleProbabilities(segmenter))
    heads, classes = segmenter.head.num_heads, segmenter.num_classes
    probs = flat.reshape(flat.shape[0], heads, classes, *flat.shape[2:])
    return ensemble_uncertainty(probs / probs.sum(dim=2, keepdim=True).clamp_min(1e-12))
