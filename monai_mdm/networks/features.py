"""MDM decoder features for few-shot segmentation (the paper's Step 2), frozen or trainable end to end.

The image is corrupted at one fixed timestep, the frozen UNet runs once up to the deepest needed decoder block
(:meth:`MDMUNet.decoder_features`), and the outputs of a few decoder blocks are upsampled to the image size,
concatenated and divided by one L2 norm per image.
Extraction is split in two stages (:meth:`MDMFeatureExtractor.extract_blocks` at native resolution, then
:meth:`MDMFeatureExtractor.assemble`) because the native-resolution blocks are ~16x smaller than the assembled
map, which makes caching training features affordable.
With ``trainable=True`` gradients flow through both stages into the UNet, for end-to-end fine-tuning
(:meth:`MDMFeatureExtractor.trainable_parameters` lists the weights that can receive them).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor
from torch import nn

from monai_mdm.networks.mdm_unet import MDMUNet
from monai_mdm.transforms.corruption import Corruption, PatchMasking
from monai_mdm.utils import guard_traced_size

logger = logging.getLogger(__name__)

__all__ = ["MDMFeatureExtractor"]

_EPS = 1e-12


def _upsample(block: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    block = block.float()  # interpolate and norm in float32 even when the network ran in half precision
    if tuple(block.shape[2:]) == tuple(spatial_size):
        return block
    mode = "bilinear" if block.ndim == 4 else "trilinear"
    return F.interpolate(block, size=tuple(spatial_size), mode=mode, align_corners=False)


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    return x.square().flatten(1).sum(dim=1)


@functools.lru_cache(maxsize=64)
def _upsampling_gram(native: int, size: int) -> np.ndarray:
    """``U^T U`` (native x native, float64) of the 1-D linear upsampling ``U`` (size x native) that
    ``F.interpolate(..., align_corners=False)`` applies along one dim (bi/trilinear is separable)."""
    # PyTorch's source coordinate for output pixel j: (j + 0.5) * native / size - 0.5, clamped at 0; computed
    # in numpy so that a trace (export) stores the matrix as a constant instead of recording how it was made
    src = np.maximum((np.arange(size) + 0.5) * (native / size) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), native - 1)
    high = np.minimum(low + 1, native - 1)
    frac = src - low
    u = np.zeros((size, native))
    np.add.at(u, (np.arange(size), low), 1.0 - frac)
    np.add.at(u, (np.arange(size), high), frac)
    return u.T @ u  # never written to: callers make tensors from it and only read them


def _upsampled_sum_squares(block: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """(B,) sum of squares of ``_upsample(block, spatial_size)``, without building the upsampled map.

    With the separable upsampling ``U = U_1 x U_2 (x U_3)``, ``||U X||^2 = <X, (G_1 x G_2 ...) X>`` with the
    small Gram matrices ``G_d = U_d^T U_d``: the sum is taken at the block's native resolution (1/4 or 1/16 of
    the memory and work for 2x / 4x smaller blocks). Equal to the upsampled sum up to float rounding.
    """
    x = block.float()
    y = x
    for dim, (native, size) in enumerate(zip(x.shape[2:], spatial_size)):
        if int(native) == int(size):
            continue
        # a fresh tensor from the cached array on every call, so that every trace records the same graph
        gram = torch.from_numpy(_upsampling_gram(int(native), int(size))).to(device=x.device, dtype=x.dtype)
        y = torch.movedim(torch.movedim(y, 2 + dim, -1) @ gram, -1, 2 + dim)  # G is symmetric
    return (x * y).flatten(1).sum(dim=1)


class MDMFeatureExtractor(nn.Module):
    """Pixel features from decoder blocks of a (pretrained) :class:`MDMUNet`, frozen by default.

    Args:
        network: the UNet; it is kept in eval mode, even when ``.train()`` is called on the extractor, so that a
            trainer cannot switch on dropout in it (GroupNorm does not depend on the mode); frozen
            (``requires_grad=False``) unless ``trainable``.
        blocks: indices into ``network.output_blocks`` (the paper: 8..12 for histology, 5..12 for faces). The
            channels are concatenated in this order.
        timestep: t at which the image is corrupted and which the network is told (50 for MDM).
        corruption: ``"default"`` = the way the pretraining objective recorded in ``network.pretraining`` (see
            :func:`~monai_mdm.networks.load_pretrained`) reads features: for MDM (also when nothing is recorded)
            ``PatchMasking(8, network.num_timesteps)`` (5 % of 8 x 8 patches blanked at t=50); for DDPM one
            shared Gaussian noise sample at ``timestep``; for MAE, UMD and DiffMAE the clean image at the
            objective's own timestep, which then replaces ``timestep`` (logged when they differ). Any
            :class:`Corruption`; ``None`` = the clean image is used (t is still given to the network).
        seed: with an int, every image's corruption is drawn from a CPU ``torch.Generator`` seeded with it on
            each call, so predictions are reproducible and do not depend on the batch an image shares (each
            image of a given size gets the same mask). ``None`` = fresh randomness per call, as the reference
            code does (its predictions then vary slightly from run to run).
        normalize: divide the whole C x H x W map of each image by its L2 norm (one scalar per image).
        trainable: let gradients flow into the network (end-to-end fine-tuning); it still runs in eval mode, so
            the features it is trained on are computed exactly as at inference. Build caches under
            ``torch.no_grad()``: with grad mode on, a trainable extractor records the graph.
    """

    def __init__(
        self,
        network: MDMUNet,
        blocks: Sequence[int] = (8, 9, 10, 11, 12),
        timestep: int = 50,
        corruption: Corruption | str | None = "default",
        seed: int | None = 0,
        normalize: bool = True,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        num = len(network.output_blocks)
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError(f"blocks must name at least one decoder block; valid indices are 0..{num - 1}.")
        bad = [b for b in blocks if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < num]
        if bad:
            raise ValueError(
                f"decoder block indices {bad} are out of range: this network has {num} output blocks, "
                f"valid indices are 0..{num - 1} (blocks 8..12 need the 18-block 'paper' preset)."
            )
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"blocks {blocks} contain duplicates.")
        if isinstance(corruption, str):
            if corruption != "default":
                raise ValueError(f"corruption must be a Corruption, None or 'default', got {corruption!r}.")
            corruption, timestep = self._objective_reading(network, timestep, seed)
        limit = corruption.num_timesteps if corruption is not None else network.num_timesteps
        if not 0 <= int(timestep) < limit:
            raise ValueError(f"timestep must lie in [0, {limit}), got {timestep}.")
        self.network = network
        self.blocks = blocks
        self.timestep = int(timestep)
        self.corruption = corruption
        self.seed = None if seed is None else int(seed)
        self.normalize = bool(normalize)
        self.trainable = bool(trainable)
        network.requires_grad_(self.trainable)
        network.eval()

    @staticmethod
    def _objective_reading(network: MDMUNet, timestep: int, seed: int | None) -> tuple[Corruption | None, int]:
        """The corruption and t of the objective recorded on ``network`` (MDM without a record)."""
        from monai_mdm.transforms.objectives import objective_from_record

        record = getattr(network, "pretraining", None)
        record = record.get("objective") if isinstance(record, dict) else None
        source = f"the pretrained weights '{network.pretraining.get('source')}'" if record is not None else ""
        reading = objective_from_record(record, network.num_timesteps, source).feature_reading(seed)
        if reading.timestep is not None and reading.timestep != int(timestep):
            name = record.get("name") if isinstance(record, dict) else "mdm"
            logger.info(
                f"features of the {name} objective are read from the clean image at t = {reading.timestep}, as it "
                f"defines; --timestep {timestep} is not used."
            )
            timestep = reading.timestep
        return reading.corruption, timestep

    # ------------------------------------------------------------------ properties

    @property
    def out_channels(self) -> int:
        """Width of the assembled feature map (1728 for blocks 8..12 of the paper network)."""
        return sum(self.network.decoder_channels[b] for b in self.blocks)

    @property
    def block_channels(self) -> list[int]:
        return [self.network.decoder_channels[b] for b in self.blocks]

    @property
    def spatial_dims(self) -> int:
        return self.network.spatial_dims

    @property
    def size_multiple(self) -> int:
        """Every input size must be a multiple of this (network downsampling and, unpadded, the mask patches)."""
        mult = self.network.size_divisor
        if isinstance(self.corruption, PatchMasking) and not self.corruption.pad:
            ps = self.corruption.patch_size
            for p in (ps,) if isinstance(ps, int) else ps:
                mult = math.lcm(mult, int(p))
        return mult

    def block_downsample(self, index: int) -> int:
        """Downsampling factor of ``output_blocks[index]``'s output relative to the input."""
        per_level = self.network.num_res_blocks + 1
        level = len(self.network.channel_mult) - 1 - index // per_level
        if level > 0 and index % per_level == per_level - 1:
            level -= 1  # the last block of a level ends with the x2 upsampling
        return 2**level

    def native_shapes(self, spatial_size: Sequence[int]) -> list[tuple[int, ...]]:
        """(C, *spatial) of each selected block for an input of ``spatial_size``, without running the network."""
        return [
            (self.network.decoder_channels[b], *(int(s) // self.block_downsample(b) for s in spatial_size))
            for b in self.blocks
        ]

    def train(self, mode: bool = True) -> MDMFeatureExtractor:
        super().train(mode)
        self.network.eval()  # never let a trainer switch dropout on in the backbone, frozen or trainable
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The network's parameters that compute the selected blocks: all but the decoder blocks after the
        deepest one and the ``out`` head, which never run here (so an optimiser leaves them untouched)."""
        never_run = nn.ModuleList([*self.network.output_blocks[max(self.blocks) + 1 :], self.network.out])
        unused = {id(p) for p in never_run.parameters()}
        return [p for p in self.network.parameters() if id(p) not in unused]

    def _grad_mode(self) -> torch.set_grad_enabled:
        """Record gradients only for a trainable network, and only where the caller has grad mode on."""
        return torch.set_grad_enabled(self.trainable and torch.is_grad_enabled())

    # ------------------------------------------------------------------ stage 1: native blocks

    def corrupt(self, images: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Corrupt ``images`` at ``self.timestep``; per-image ``seeds`` override the extractor's ``seed``."""
        if self.corruption is None:
            return images
        if torch.jit.is_tracing():
            return self._corrupt_traced(images, seeds)
        b = images.shape[0]
        t = torch.full((b,), self.timestep, dtype=torch.long, device=images.device)
        if seeds is None and self.seed is None:
            return self.corruption(images, t)
        if seeds is None and isinstance(self.corruption, PatchMasking):
            # every image gets the mask of the extractor's seed: draw it once for the batch (a sliding window's
            # batches of windows, a few-shot batch), not once per image
            keep = self._seeded_keep_mask([int(s) for s in images.shape[2:]], images.device)
            return images.masked_fill(~keep, self.corruption.fill_value)
        if seeds is None:
            seeds = [self.seed] * b
        seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
        if len(seeds) != b:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {b} images.")
        # one generator per image: an image's mask depends on its seed only, not on its place in the batch
        out = [
            self.corruption(images[i : i + 1], t[i : i + 1], generator=torch.Generator().manual_seed(s))
            for i, s in enumerate(seeds)
        ]
        return torch.cat(out, dim=0)

    def _corrupt_traced(self, images: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        """:meth:`corrupt` for ``torch.jit.trace`` (export): the seeded mask of the traced size becomes a constant.

        A trace cannot re-seed a generator on every call, so the mask that every image of this size gets from the
        extractor's seed is computed once, outside the recorded graph, and stored in it; the traced model then
        refuses other sizes (:func:`~monai_mdm.utils.guard_traced_size`). Sliding-window inference always feeds
        windows of one size, so an export for the window size reproduces the eager model exactly.
        """
        if not isinstance(self.corruption, PatchMasking):
            reason = f"the corruption is {self.corruption!r}"
        elif self.seed is None:
            reason = "the extractor has no seed (a fresh mask on every call)"
        else:
            reason = "per-image seeds were given" if seeds is not None else ""
        if reason:
            raise RuntimeError(
                f"cannot trace (export) these features: {reason}, and a trace would freeze one random draw. "
                "Export needs PatchMasking (MDM) features with a fixed seed, or no corruption."
            )
        images = guard_traced_size(images)
        # through numpy the mask leaves the recorded graph: the trace stores its value as a constant
        keep = torch.from_numpy(self._seeded_keep_mask([int(s) for s in images.shape[2:]], "cpu").numpy())
        return images.masked_fill(~keep.to(images.device), self.corruption.fill_value)

    def _seeded_keep_mask(self, spatial: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """(1, 1, *spatial) keep mask that every image of this size gets from the extractor's seed (PatchMasking),
        drawn on the CPU as the per-image path draws it, so both give the same mask on any device."""
        generator = torch.Generator().manual_seed(self.seed)
        keep = self.corruption.keep_mask(spatial, torch.tensor([self.timestep]), "cpu", generator)
        return keep.to(device)

    def extract_blocks(
        self, images: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Native-resolution outputs of the selected blocks, in ``blocks`` order, for images (B, C, *spatial).

        The decoder stops right after the deepest needed block, so the remaining blocks and the ``out`` head are
        never computed.
        """
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected images (B, C, *spatial) with {self.spatial_dims} spatial dims, got {tuple(images.shape)}."
            )
        mult = self.size_multiple
        if any(int(s) % mult for s in images.shape[2:]):
            raise ValueError(
                f"image size {tuple(images.shape[2:])} must be a multiple of {mult} (network size divisor "
                f"{self.network.size_divisor} and the corruption's patch size); crop or pad the image "
                f"(MDMSegmenter pads automatically)."
            )
        images = convert_to_tensor(images, track_meta=False)  # MetaTensor bookkeeping is of no use here
        if self.network.training:
            self.network.eval()
        with self._grad_mode():
            x = self.corrupt(images, seeds)
            t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device)
            return self.network.decoder_features(x, t, self.blocks)

    # ------------------------------------------------------------------ stage 2: assemble

    def assemble_norms(self, blocks: Sequence[torch.Tensor], spatial_size: Sequence[int]) -> torch.Tensor:
        """(B,) L2 norm of each image's assembled map, computed block by block at native resolution: neither the
        upsampled blocks nor their concatenation are built (see ``_upsampled_sum_squares``).

        Cache it next to low-precision blocks so that the normalisation stays that of float32.
        """
        total = None
        for blk in blocks:
            s = _upsampled_sum_squares(blk, spatial_size)
            total = s if total is None else total + s
        return total.sqrt()

    def assemble(
        self,
        blocks: Sequence[torch.Tensor],
        spatial_size: Sequence[int],
        norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upsample blocks to ``spatial_size`` (bi/trilinear, align_corners=False), concatenate, normalise.

        Args:
            blocks: output of :meth:`extract_blocks` (any float dtype; the result is float32).
            spatial_size: target spatial size (the image size).
            norms: optional precomputed (B,) norms (see :meth:`assemble_norms`); ignored when ``normalize`` is
                False.
        """
        if len(blocks) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} blocks (for blocks {self.blocks}), got {len(blocks)}.")
        with self._grad_mode():
            return self._assemble(blocks, tuple(int(s) for s in spatial_size), norms)

    def _assemble(
        self, blocks: Sequence[torch.Tensor], spatial_size: tuple[int, ...], norms: torch.Tensor | None
    ) -> torch.Tensor:
        ups = [_upsample(b, spatial_size) for b in blocks]
        feats = torch.cat(ups, dim=1)
        if self.normalize:
            if norms is None:
                norms = self.assemble_norms(blocks, spatial_size)  # the very norms a cache stores
            norms = norms.to(device=feats.device, dtype=feats.dtype).clamp_min(_EPS)
            feats = feats / norms.view(-1, *([1] * (feats.ndim - 1)))
        return feats

    def forward(self, images: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Assembled features (B, out_channels, *spatial) of images (B, C, *spatial) in [-1, 1]."""
        return self.assemble(self.extract_blocks(images, seeds), images.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"blocks={self.blocks}, timestep={self.timestep}, corruption={self.corruption!r}, seed={self.seed}, "
            f"normalize={self.normalize}, trainable={self.trainable}, out_channels={self.out_channels}"
        )
