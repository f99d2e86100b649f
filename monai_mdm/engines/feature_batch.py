"""Prepare-batch callables that turn a batch into head inputs and labels for training a pixel head.

With MONAI's ``SupervisedTrainer(network=..., loss_function=torch.nn.CrossEntropyLoss(ignore_index=255),
prepare_batch=...)`` the stock iteration computes ``loss(network(inputs, *args, **kwargs), labels)``; the frozen
extractor lives in the prepare-batch object, outside the trained network, so the optimiser and checkpoints only
see the head. Two kinds of inputs:

* assembled features (B, C, *spatial): :class:`OnlineFeaturePrepareBatch` and
  ``CachedFeaturePrepareBatch(extractor, blockwise=False)``; the trainer's network is the plain head;
* native-resolution blocks: ``CachedFeaturePrepareBatch(extractor)`` (``blockwise=True``, the default) returns
  ``(blocks, labels, (), {"spatial_size": ..., "norms": ...})`` and the trainer's network is
  :class:`~monai_mdm.networks.pixel_head.BlockwiseHead` ``(head)``, which computes the same logits with
  :meth:`~monai_mdm.networks.pixel_head.PixelMLPHead.forward_blocks` without building the assembled map
  (several times faster; the first layer runs at the blocks' own resolutions).

Label convention: labels come back as (B, *spatial) int64 (channel dim dropped), which is what
``torch.nn.CrossEntropyLoss`` wants; pixels without a label carry ``ignore_index`` (255, as in the FFHQ-34 /
CelebA-19 maps and in the cache's padding), so use ``CrossEntropyLoss(ignore_index=255)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys, convert_to_tensor

from monai_mdm.networks.features import MDMFeatureExtractor

__all__ = ["CachedFeaturePrepareBatch", "OnlineFeaturePrepareBatch"]


def _labels(batch: Mapping[str, Any], key: str, device: Any, non_blocking: bool) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"batch has no key '{key}' (keys: {sorted(batch)}).")
    labels = convert_to_tensor(batch[key], wrap_sequence=True, track_meta=False)
    if labels.is_floating_point():
        labels = labels.round()
    labels = labels.to(device=device, non_blocking=non_blocking).long()
    if labels.ndim >= 3 and labels.shape[1] == 1:
        labels = labels.squeeze(1)  # (B, 1, *spatial) -> (B, *spatial) for CrossEntropyLoss
    return labels


class CachedFeaturePrepareBatch(PrepareBatch):
    """Batch of :class:`~monai_mdm.data.feature_cache.FeatureCache` items -> head inputs and labels.

    The cached native-resolution blocks are moved to ``device``; the stored float32 norms (so fp16 caching does
    not change the normalisation) are used when the extractor normalises, and recomputed from the blocks when the
    batch has none.

    * ``blockwise=True`` (default, the fast path): returns ``(blocks, labels, (), {"spatial_size": label size,
      "norms": (B,) or None})`` for a trainer whose network is ``BlockwiseHead(head)``: MONAI's
      ``SupervisedTrainer`` then calls ``head.forward_blocks(blocks, spatial_size=..., norms=...)``, which gives
      the same logits as the head on the assembled features without ever building them. The trainer stores the
      block list as ``engine.state.output["image"]``: use ``decollate=False`` (as the bundles do).
    * ``blockwise=False``: returns ``(features, labels)``, the blocks upsampled to the label size, concatenated
      and normalised by ``extractor.assemble`` (B, out_channels, *spatial) float32, for the plain head.

    Args:
        extractor: the extractor that filled the cache (only its assembly settings are used here).
        blocks_key / label_key / norm_key: keys of the collated batch.
        ignore_index: label value that the loss must ignore (documented convention; labels pass unchanged).
        blockwise: return the blocks for ``BlockwiseHead`` (default) instead of the assembled features.
    """

    def __init__(
        self,
        extractor: MDMFeatureExtractor,
        blocks_key: str = "blocks",
        label_key: str = CommonKeys.LABEL,
        norm_key: str = "norm",
        ignore_index: int = 255,
        blockwise: bool = True,
    ) -> None:
        self.extractor = extractor
        self.blocks_key, self.label_key, self.norm_key = blocks_key, label_key, norm_key
        self.ignore_index = int(ignore_index)
        self.blockwise = bool(blockwise)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor, tuple, dict[str, Any]]:
        if not isinstance(batchdata, Mapping) or self.blocks_key not in batchdata:
            raise KeyError(f"expected a dict batch with '{self.blocks_key}' (collated FeatureCache items).")
        blocks = convert_to_tensor(list(batchdata[self.blocks_key]), track_meta=False)
        blocks = [b.to(device=device, non_blocking=non_blocking) for b in blocks]
        labels = _labels(batchdata, self.label_key, device, non_blocking)
        spatial_size = tuple(int(s) for s in labels.shape[1:])
        norms = batchdata.get(self.norm_key)
        if norms is not None:
            norms = convert_to_tensor(norms, wrap_sequence=True, track_meta=False)
            norms = norms.to(device=device, non_blocking=non_blocking).reshape(-1)
        if not self.blockwise:
            features = self.extractor.assemble(blocks, spatial_size, norms=norms)
            return features, labels
        if len(blocks) != len(self.extractor.blocks):
            raise ValueError(
                f"expected {len(self.extractor.blocks)} blocks (for blocks {self.extractor.blocks}), got {len(blocks)}."
            )
        if not self.extractor.normalize:
            norms = None  # as extractor.assemble: stored norms are ignored when the extractor does not normalise
        elif norms is None:
            with torch.no_grad():
                norms = self.extractor.assemble_norms(blocks, spatial_size)
        if norms is not None:
            norms = norms.float()
        return blocks, labels, (), {"spatial_size": spatial_size, "norms": norms}


class OnlineFeaturePrepareBatch(PrepareBatch):
    """Batch of image crops -> (features computed now, labels), as the reference does on every iteration.

    Slower than the cache (one frozen UNet forward per batch) but sees a new crop and a new mask every step.
    The extractor is moved to the trainer's device on each call (a no-op once it is there). With a trainable
    extractor the features keep their graph, so the trainer's loss also trains the UNet (``configs/finetune.json``).

    Args:
        extractor: the frozen feature extractor.
        image_key / label_key: keys of the batch dict.
        seed_key: optional key of per-image corruption seeds (e.g. ``"mask_seed"``); without it the extractor's
            own ``seed`` setting applies.
        ignore_index: label value that the loss must ignore (documented convention; labels pass unchanged).
    """

    def __init__(
        self,
        extractor: MDMFeatureExtractor,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        seed_key: str | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.extractor = extractor
        self.image_key, self.label_key, self.seed_key = image_key, label_key, seed_key
        self.ignore_index = int(ignore_index)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            raise KeyError(f"expected a dict batch with '{self.image_key}'.")
        images = convert_to_tensor(batchdata[self.image_key], track_meta=False)
        images = images.to(device=device, non_blocking=non_blocking).float()
        labels = _labels(batchdata, self.label_key, device, non_blocking)
        if device is not None:
            self.extractor.to(device)
        seeds = batchdata.get(self.seed_key) if self.seed_key is not None else None
        features = self.extractor(images, seeds)
        return features, labels
