"""Pixel classifiers on frozen MDM features: the paper's per-pixel MLP, written as 1x1 convolutions.

A 1x1 convolution over a (B, C, *spatial) map is the same MLP applied to every pixel, and BatchNorm over
(B, *spatial) equals BatchNorm1d over the flattened pixels, so the head trains on whole crops (every pixel a
sample, as in the reference) and plugs straight into sliding-window inference.

Training on cached native-resolution decoder blocks does not need the assembled feature map: the first layer is
a 1x1 convolution (linear, per pixel), bi/trilinear upsampling is linear and acts on each channel alike, and the
L2 normalisation is one scalar per image, so ``conv1(concat_i(up(b_i)) / n) = sum_i up(W_i b_i) / n + bias`` with
``W_i`` the first layer's weight columns for block ``i``. :meth:`PixelMLPHead.forward_blocks` computes the right
side: each projection runs at the block's native resolution and only ``h1``-channel maps are upsampled, so the
``in_channels``-wide map (1728 x 256 x 256 fp32 = 453 MB for the paper's blocks 8..12) is never built.
:class:`BlockwiseHead` exposes it as a trainer's ``network``.

DDPM-seg trains 10 heads one after another and lets them vote. Their parameters never interact, so the sum of
their losses has exactly each head's own gradient: :class:`EnsembleLogits` stacks every head's logits so that one
``SupervisedTrainer`` (with :class:`~monai_mdm.losses.EnsembleCrossEntropy`) trains them all in one pass over the
cached features instead of ten.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import nn

__all__ = ["PixelMLPHead", "PixelHeadEnsemble", "BlockwiseHead", "EnsembleLogits", "default_hidden_channels"]

_EPS = 1e-12  # norms are clamped to this, as MDMFeatureExtractor.assemble does


def default_hidden_channels(num_classes: int) -> tuple[int, int]:
    """The reference's widths: (128, 32), or (256, 128) for 30 classes or more (e.g. FFHQ-34)."""
    return (256, 128) if num_classes >= 30 else (128, 32)


def _project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1x1 convolution of (B, C, *spatial) by a (O, C) matrix, no bias."""
    conv = F.conv2d if x.ndim == 4 else F.conv3d
    return conv(x, weight.reshape(*weight.shape, *([1] * (x.ndim - 2))))


def _block_layout(
    blocks: Sequence[torch.Tensor], spatial_size: Sequence[int], spatial_dims: int, in_channels: int, norms, like
) -> tuple[list[torch.Tensor], tuple[int, ...], list[int], dict[tuple[int, ...], list[int]], torch.Tensor | None]:
    """The checks and bookkeeping both blockwise head paths share: the blocks, the output size, each block's first
    input channel (``offsets[i]:offsets[i + 1]`` are block i's), the blocks grouped by native resolution (those
    share an upsampling), and the per-image norms as a flat tensor like ``like``, clamped as ``assemble`` does."""
    blocks = list(blocks)
    size = tuple(int(s) for s in spatial_size)
    if len(size) != spatial_dims:
        raise ValueError(f"spatial_size {size} does not have {spatial_dims} dims.")
    if not blocks:
        raise ValueError("the head needs at least one block of features.")
    if any(b.ndim != spatial_dims + 2 or b.shape[0] != blocks[0].shape[0] for b in blocks):
        raise ValueError(
            f"expected (B, C, *spatial) blocks with {spatial_dims} spatial dims and one batch size, got "
            f"{[tuple(b.shape) for b in blocks]}."
        )
    widths = [int(b.shape[1]) for b in blocks]
    if sum(widths) != in_channels:
        raise ValueError(f"the blocks have {widths} = {sum(widths)} channels but the head expects {in_channels}.")
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, b in enumerate(blocks):
        groups.setdefault(tuple(b.shape[2:]), []).append(i)
    if norms is not None:
        norms = torch.as_tensor(norms).to(device=like.device, dtype=like.dtype).reshape(-1).clamp_min(_EPS)
        if norms.numel() not in (1, int(blocks[0].shape[0])):
            raise ValueError(f"got {norms.numel()} norms for a batch of {int(blocks[0].shape[0])}.")
    return blocks, size, offsets, groups, norms


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

    def forward_blocks(
        self,
        blocks: Sequence[torch.Tensor],
        spatial_size: Sequence[int],
        norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for native-resolution feature blocks, equal to ``forward(assembled features)``.

        The assembled features are ``concat_i(up(blocks[i])) / norms`` as
        :meth:`~monai_mdm.networks.features.MDMFeatureExtractor.assemble` builds them (bi/trilinear,
        ``align_corners=False``; a block already of ``spatial_size`` is used as it is). Here the first 1x1 conv's
        weight is split by the blocks' channel counts, each block (or the concatenation of the blocks that share a
        resolution) is projected to the first hidden width at its own resolution and divided by the norms there,
        the projections are upsampled and summed, and the bias is added; the rest of the head runs as in
        :meth:`forward`. The result equals :meth:`forward` up to float rounding (the sums and the scaling run in
        another order).

        Args:
            blocks: (B, C_i, *native_i) tensors in the order of the head's input channels, any float dtype
                (computed in the head's dtype); ``sum(C_i)`` must be ``in_channels``.
            spatial_size: the output (crop) size, e.g. the labels' spatial shape.
            norms: optional (B,) per-image L2 norms to divide by (clamped to 1e-12 as ``assemble`` does);
                ``None`` = no normalisation.

        Returns:
            logits (B, num_classes, *spatial_size).
        """
        first: nn.Module = self.layers[0]
        weight = first.weight.flatten(1)  # (h1, in_channels)
        nd = self.spatial_dims
        blocks, size, offsets, groups, n = _block_layout(blocks, spatial_size, nd, self.in_channels, norms, weight)
        widths = [offsets[i + 1] - offsets[i] for i in range(len(blocks))]
        batch = int(blocks[0].shape[0])
        if n is not None:
            n = n.view(-1, *([1] * (nd + 1)))
        out: torch.Tensor | None = None
        for native, members in groups.items():
            if len(members) == 1:
                x = blocks[members[0]].to(weight.dtype)
            else:  # one pass: cast (e.g. from fp16) and concatenate into one buffer
                width = sum(widths[i] for i in members)
                x = blocks[members[0]].new_empty((batch, width, *native), dtype=weight.dtype)
                c = 0
                for i in members:
                    x[:, c : c + widths[i]].copy_(blocks[i])
                    c += widths[i]
            w = torch.cat([weight[:, offsets[i] : offsets[i + 1]] for i in members], dim=1)
            y = _project(x, w)  # the first 1x1 conv without its bias, at native resolution
            if n is not None:
                y = y / n  # the per-image scale commutes with the upsampling: apply it where the map is small
            if native != size:
                mode = "bilinear" if nd == 2 else "trilinear"
                y = F.interpolate(y, size=size, mode=mode, align_corners=False)
            out = y if out is None else out.add_(y)  # in place on a map made here (autograd saved none of them)
        assert out is not None
        if first.bias is not None:
            # last, as the conv adds it: the normalised signal is tiny next to a trained bias, so adding the bias
            # before the upsampling would round the signal more coarsely
            out = out.add_(first.bias.view(1, -1, *([1] * nd)))
        return self.layers[1:](out)

    def folded_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The eval-mode head as ``(weight (O, C), bias (O,))`` per linear layer, ReLU between them: each
        BatchNorm (running statistics) is an affine map per channel, folded into the layer after it.

        ``W (s * relu(h) + t) + c = (W s) relu(h) + (W t + c)``: the same function without the two BatchNorm
        passes over the pixels, exact up to float rounding. Computed from the current weights on every call
        (a few hundred kB), so nothing goes stale when the head is trained further.
        """
        convs = [m for m in self.layers if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        norms = [m for m in self.layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        layers = [(convs[0].weight.flatten(1), convs[0].bias)]
        for conv, bn in zip(convs[1:], norms):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            w = conv.weight.flatten(1)
            layers.append((w * scale, conv.bias + w @ shift))
        return layers

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
        return self._blend(self.probabilities(x))

    def _blend(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, distribution) from the stacked per-head probabilities (N, B, classes, *spatial)."""
        if self.num_heads == 1:
            return probs[0], probs[0]
        votes = torch.zeros_like(probs).scatter_(2, probs.argmax(dim=2, keepdim=True), 1.0).mean(dim=0)
        d = 1e-3 / self.num_heads
        return (votes + d * probs.mean(dim=0)) / (1.0 + d), votes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, classes, *spatial): probabilities (1 head) or tie-broken vote fractions (N heads)."""
        return self._scores_and_distribution(x)[0]

    def forward_blocks(
        self,
        blocks: Sequence[torch.Tensor],
        spatial_size: Sequence[int],
        norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` of native-resolution blocks (see :meth:`PixelMLPHead.forward_blocks`): class scores
        (B, classes, *spatial_size) equal, up to float rounding, to ``forward`` of the assembled features."""
        probs = torch.stack([h.forward_blocks(blocks, spatial_size, norms).softmax(dim=1) for h in self.heads])
        return self._blend(probs)[0]

    @torch.no_grad()
    def infer_blocks(
        self,
        blocks: Sequence[torch.Tensor],
        spatial_size: Sequence[int],
        norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inference-only :meth:`forward_blocks` (eval mode, no autograd): the same scores up to float rounding,
        with less work per pixel.

        The first layers of all heads run as one matrix per resolution group (the blocks are read once, not
        once per head), the per-block projections of a group accumulate into one buffer instead of a
        concatenated copy of the blocks, the normalisation and the bias are one fused pass after the
        upsampling, the BatchNorms are folded into the next layer (:meth:`PixelMLPHead.folded_layers`) and every
        layer is a batched matrix product over the flattened pixels.
        """
        if self.training:
            raise RuntimeError("infer_blocks uses the BatchNorm running statistics: call .eval() on the head first.")
        folded = [h.folded_layers() for h in self.heads]
        first_w = torch.cat([f[0][0] for f in folded])  # (N * h1, in_channels)
        first_b = torch.cat([f[0][1] for f in folded])
        nd = self.heads[0].spatial_dims
        blocks, size, offsets, groups, norms = _block_layout(
            blocks, spatial_size, nd, self.in_channels, norms, first_w
        )
        dtype = first_w.dtype
        # pixels-major (B, P, channels) from here on: the matrix products read the (B, C, P) blocks transposed
        # without a copy, and bi/trilinear upsampling of a channels-last map is ~10x faster on CPUs than of a
        # channels-first one
        # 1 / norm is one scalar per image: scale each image's copy of the (small) weight instead of its pixels
        scale = None if norms is None else norms.reciprocal().view(-1, 1, 1)
        out: torch.Tensor | None = None
        for native, members in groups.items():
            y: torch.Tensor | None = None
            for i in members:
                x = blocks[i].to(dtype).flatten(2).transpose(1, 2)  # (B, P_native, C_i), a view
                w = first_w[:, offsets[i] : offsets[i + 1]].T[None]  # (1, C_i, N * h1)
                w = (w if scale is None else w * scale).expand(x.shape[0], -1, -1)  # one (scaled) copy per image
                y = torch.bmm(x, w) if y is None else y.baddbmm_(x, w)
            assert y is not None
            if native != size:
                mode = "bilinear" if nd == 2 else "trilinear"
                y = y.unflatten(1, native).movedim(-1, 1)  # channels-last (B, O, *native), no copy
                y = F.interpolate(y, size=size, mode=mode, align_corners=False)  # stays channels-last
                y = y.movedim(1, -1).flatten(1, nd)  # (B, P, O), a view of the result
            out = y if out is None else out.add_(y)
        assert out is not None
        out = out.add_(first_b).relu_()  # the bias last, as forward_blocks adds it; the first ReLU of every head
        hidden = first_w.shape[0] // self.num_heads
        out = out.view(-1, out.shape[-1])  # (B * P, N * h1)
        probs = []
        for k, layers in enumerate(folded):
            h = out[:, k * hidden : (k + 1) * hidden]
            for j, (w, b) in enumerate(layers[1:]):
                h = F.linear(h, w, b)
                if j < len(layers) - 2:
                    h = h.relu_()
            probs.append(h.softmax(dim=1).view(-1, *size, h.shape[1]).movedim(-1, 1))
        return self._blend(torch.stack(probs))[0].contiguous()

    def predict_with_uncertainty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, entropy)``: entropy (B, 1, *spatial), natural log, of the pure vote fractions (N heads) or
        of the probabilities (1 head); 0 when all heads agree, log 2 for a 50/50 split."""
        scores, dist = self._scores_and_distribution(x)
        return scores, _entropy(dist)

    def uncertainty(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel entropy map (B, 1, *spatial); see :meth:`predict_with_uncertainty`."""
        return self.predict_with_uncertainty(x)[1]


class BlockwiseHead(nn.Module):
    """A head as a trainer's ``network`` for native-resolution blocks: ``forward(blocks, spatial_size, norms)``.

    MONAI's ``SupervisedTrainer`` calls ``network(inputs, *args, **kwargs)`` with what the prepare-batch returns;
    :class:`~monai_mdm.engines.feature_batch.CachedFeaturePrepareBatch` (``blockwise=True``, the default) returns
    ``(blocks, labels, (), {"spatial_size": ..., "norms": ...})``, which this wrapper hands to
    ``head.forward_blocks``. The wrapper owns no parameters of its own: optimise ``head.parameters()`` (the same
    tensors as ``wrapper.parameters()``) and save the plain ``head`` (e.g. in ``MDMSegmenter(extractor, head)``);
    its ``state_dict`` keys carry a ``head.`` prefix.

    Args:
        head: a :class:`PixelMLPHead` or :class:`PixelHeadEnsemble` (anything with ``forward_blocks``).
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(head, "forward_blocks", None)):
            raise TypeError(f"{type(head).__name__} has no forward_blocks(blocks, spatial_size, norms) method.")
        self.head = head

    def forward(
        self,
        blocks: Sequence[torch.Tensor],
        spatial_size: Sequence[int],
        norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.is_tensor(blocks):
            raise TypeError(
                "BlockwiseHead expects a list of native-resolution blocks, got one tensor; assembled features go "
                "to the plain head (use CachedFeaturePrepareBatch(extractor, blockwise=True) with this wrapper)."
            )
        return self.head.forward_blocks(blocks, spatial_size, norms)


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
