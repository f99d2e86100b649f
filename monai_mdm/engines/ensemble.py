"""Training an ensemble of pixel heads in one engine: every head sees the same batches, each learns alone.

DDPM-seg trains 10 heads one after another and lets them vote. Their parameters never interact, so the
sum of their losses has exactly each head's own gradient: one ``SupervisedTrainer`` can train them all
in a single pass over the cached features instead of ten.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai_mdm.networks.pixel_head import PixelHeadEnsemble


class EnsembleLogits(nn.Module):
    """Training view of a :class:`PixelHeadEnsemble`: the logits of every head, stacked on dim 1.

    Takes assembled features (B, C, *spatial), or native-resolution blocks with ``spatial_size`` and
    ``norms`` as :class:`~monai_mdm.engines.CachedFeaturePrepareBatch` returns them (the fast path, see
    :meth:`PixelMLPHead.forward_blocks`); returns (B, N, classes, *spatial). Inference uses the ensemble
    itself (majority vote).
    """

    def __init__(self, ensemble: PixelHeadEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(
        self,
        features: torch.Tensor | Sequence[torch.Tensor],
        spatial_size: Sequence[int] | None = None,
        norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.is_tensor(features):
            return torch.stack([head(features) for head in self.ensemble.heads], dim=1)
        if spatial_size is None:
            raise ValueError("native-resolution blocks need spatial_size (and norms) to be assembled.")
        return torch.stack([h.forward_blocks(features, spatial_size, norms) for h in self.ensemble.heads], dim=1)


class EnsembleCrossEntropy(nn.Module):
    """Sum over heads of each head's cross-entropy, so each head gets exactly its own gradient.

    ``logits`` (B, N, classes, *spatial) from :class:`EnsembleLogits`; ``target`` (B, *spatial) class ids,
    ``ignore_index`` pixels excluded (255 in the face sets).
    """

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3:
            raise ValueError(f"expected stacked head logits (B, N, classes, ...), got shape {tuple(logits.shape)}.")
        return sum(self.ce(logits[:, i], target) for i in range(logits.shape[1]))
