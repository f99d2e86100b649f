"""The loss of a head ensemble trained in one engine (:class:`~monai_mdm.networks.pixel_head.EnsembleLogits`).

The heads' parameters never interact, so the sum of their cross-entropies gives every head exactly the gradient
it would get if it were trained alone, as DDPM-seg trains its 10 heads one after another.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EnsembleCrossEntropy"]


class EnsembleCrossEntropy(nn.Module):
    """Sum over heads of each head's cross-entropy, so each head gets exactly its own gradient.

    ``logits`` (B, N, classes, *spatial) from :class:`~monai_mdm.networks.pixel_head.EnsembleLogits`; ``target``
    (B, *spatial) class ids, ``ignore_index`` pixels excluded (255 in the face sets).
    """

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3:
            raise ValueError(f"expected stacked head logits (B, N, classes, ...), got shape {tuple(logits.shape)}.")
        return sum(self.ce(logits[:, i], target) for i in range(logits.shape[1]))
