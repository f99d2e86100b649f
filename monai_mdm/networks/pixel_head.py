"""Pixel classifiers on frozen MDM features: the paper's per-pixel MLP, written as 1x1 convolutions.

A 1x1 convolution over a (B, C, *spatial) map is the same MLP applied to every pixel, and BatchNorm over
(B, *spatial) equals BatchNorm1d over the flattened pixels, so the head trains on whole crops (every pixel a
sample, as in the reference) and plugs straight into sliding-window inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

__all__ = ["PixelMLPHead", "PixelHeadEnsemble", "default_hidden_channels"]


def default_hidden_channels(num_classes: int) -> tuple[int, int]:
    """The reference's widths: (128, 32), or (256, 128) for 30 classes or more (e.g. FFHQ-34)."""
    return (256, 128) if num_classes >= 30 else (128, 32)


class PixelMLPHead(nn.Module):
    """Per-pixel MLP ``in -> h1 -> h2 -> classes`` with ``Linear, ReLU, BatchNorm`` per hidden layer.

    Args:
        in_channels: feature width (``MDMFeatureExtractor.out_channels``).
        num_classes: output logits per pixel.
        hidden_channels: hidden widths; ``None`` = :func:`default_hidden_channels`.
        spatial_dims: 2 or 3.
        init_std: weights of the 1x1 convs are drawn from N(0, init_std), biases zero (as in the reference).

    Input (B, in_channels, *spatial) -> logits (B, num_classes, *spatial).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_channels: Sequence[int] | None = None,
        spatial_dims: int = 2,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}.")
        if hidden_channels is None:
            hidden_channels = default_hidden_channels(num_classes)
        hidden = tuple(int(h) for h in hidden_channels)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.hidden_channels = hidden
        self.spatial_dims = spatial_dims
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        layers: list[nn.Module] = []
        width = self.in_channels
        for h in hidden:
            layers += [conv(width, h, 1), nn.ReLU(inplace=True), norm(h)]
            width = h
        layers.append(conv(width, self.num_classes, 1))
        self.layers = nn.Sequential(*layers)
        for m in self.layers.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, 0.0, init_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def config(self) -> dict:
        """Constructor arguments, so that a saved head can be rebuilt."""
        return dict(
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            hidden_channels=list(self.hidden_channels),
            spatial_dims=self.spatial_dims,
        )


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy over dim 1, with 0 log 0 = 0; returns (B, 1, *spatial)."""
    return -torch.special.xlogy(p, p).sum(dim=1, keepdim=True)


class PixelHeadEnsemble(nn.Module):
    """One or more :class:`PixelMLPHead` whose outputs are class scores that can be blended and argmax-ed.

    * one head: the softmax probabilities.
    * N > 1 heads: the fraction of heads voting for each class (argmax per head), so that the argmax of the
      scores is the majority vote (as in DDPM-seg). Ties between classes with equal votes are broken by the
      heads' mean softmax probability: ``scores = (votes + d * mean_prob) / (1 + d)`` with ``d = 1e-3 / N``.
      Because ``d < 1 / N`` (one vote) the tie-break never overturns a vote count, the scores still sum to 1
      and they differ from the vote fractions by less than 1e-3 / N.

    ``heads`` is a ``ModuleList`` so that each head can be trained on its own (``ensemble.heads[i]``).
    The ensemble must be in eval mode for inference (BatchNorm running statistics).

    Args:
        in_channels, num_classes, hidden_channels, spatial_dims: as for :class:`PixelMLPHead`.
        num_heads: ensemble size (1 for the MDM medical runs, 10 in DDPM-seg's face experiments).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_heads: int = 1,
        hidden_channels: Sequence[int] | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}.")
        self.heads = nn.ModuleList(
            PixelMLPHead(in_channels, num_classes, hidden_channels, spatial_dims) for _ in range(num_heads)
        )

    @classmethod
    def from_heads(cls, heads: Sequence[PixelMLPHead]) -> PixelHeadEnsemble:
        """Wrap already trained heads (all of the same configuration)."""
        heads = list(heads)
        if not heads:
            raise ValueError("need at least one head.")
        cfgs = {str(h.config()) for h in heads}
        if len(cfgs) != 1:
            raise ValueError(f"heads differ in configuration: {sorted(cfgs)}.")
        c = heads[0].config()
        ens = cls(c["in_channels"], c["num_classes"], len(heads), c["hidden_channels"], c["spatial_dims"])
        ens.heads = nn.ModuleList(heads)
        return ens

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def in_channels(self) -> int:
        return self.heads[0].in_channels

    @property
    def num_classes(self) -> int:
        return self.heads[0].num_classes

    def config(self) -> dict:
        return {**self.heads[0].config(), "num_heads": self.num_heads}

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities per head, stacked: (N, B, classes, *spatial)."""
        return torch.stack([h(x).softmax(dim=1) for h in self.heads])

    def _scores_and_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probabilities(x)
        if self.num_heads == 1:
            return probs[0], probs[0]
        votes = torch.zeros_like(probs).scatter_(2, probs.argmax(dim=2, keepdim=True), 1.0).mean(dim=0)
        d = 1e-3 / self.num_heads
        return (votes + d * probs.mean(dim=0)) / (1.0 + d), votes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, classes, *spatial): probabilities (1 head) or tie-broken vote fractions (N heads)."""
        return self._scores_and_distribution(x)[0]

    def predict_with_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, entropy)``: entropy (B, 1, *spatial), natural log, of the pure vote fractions (N heads) or
        of the probabilities (1 head); 0 when all heads agree, log 2 for a 50/50 split."""
        scores, dist = self._scores_and_distribution(x)
        return scores, _entropy(dist)

    def uncertainty(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel entropy map (B, 1, *spatial); see :meth:`predict_with_uncertainty`."""
        return self.predict_with_uncertainty(x)[1]
