"""Training data for the pixel head: frozen features of random crops, computed once and kept in memory.

The reference recomputes the features of a fresh crop every iteration (one UNet forward per crop per step);
DDPM-seg keeps every pixel's upsampled features (~210 GB for 50 images). This cache sits in between: a fixed
number of random crops per labelled image, stored at the blocks' native resolution (fp16 by default), upsampled
only when a batch is assembled (:class:`~monai_mdm.engines.feature_batch.CachedFeaturePrepareBatch`). It lives with
the data sets because that is what it is: a ``torch.utils.data.Dataset`` that any ``DataLoader`` can batch.

Memory per crop = sum over blocks of ``C_b * prod(crop / downsample_b)`` elements x 2 bytes (fp16) + the label crop
(1 byte per pixel for labels in 0..255) + a few bytes. For the paper network, blocks 8..12 and 256 x 256 crops the
blocks are 3 x 384 x 64^2 + 384 x 128^2 + 192 x 128^2 = 14.2 M values = 28.3 MB fp16 (the assembled float32 map
would be 1728 x 256^2 x 4 B = 453 MB); 8 GlaS images x 16 crops = 3.6 GB. Use :meth:`FeatureCache.bytes_per_crop`
to plan before computing. With ``disk_dir`` the blocks go to a temporary file there instead of the process's memory
(written per extraction batch, read back per item), so the host needs only the network, one batch and the labels:
for 85 GlaS images the 2.3 GB of blocks leave the resident set. A network cast to bfloat16
(``network.to(torch.bfloat16)``; it casts its input itself) halves the frozen weights while caching (1.24 -> 0.62
GB for the paper network); the features stay within 2 % of float32's (0.3-0.5 % relative L2 measured on the
tiny preset) and the stored norms are float32.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import CommonKeys, convert_to_tensor
from torch.utils.data import Dataset

from monai_mdm.networks.features import MDMFeatureExtractor

__all__ = ["FeatureCache"]

logger = logging.getLogger(__name__)

_ENUMERATE = 2**22  # up to this many distinct crop views per image, crops are drawn without replacement


class _DiskBlocks:
    """The cached blocks in one file, one crop after another: ``blocks[i]`` reads crop i's blocks back.

    Reads open the file by name (no shared file position), so DataLoader workers, forked or spawned (the
    object pickles as its path and index), read concurrently. The file is removed when the cache that wrote
    it is garbage-collected, not when a worker's copy is.
    """

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype) -> None:
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"disk_dir {directory!r} is not a directory: the feature cache writes its blocks there.")
        fd, self.path = tempfile.mkstemp(prefix="feature_cache_", suffix=".bin", dir=directory)
        os.close(fd)
        self.dtype = dtype
        self.np_dtype = np.dtype(np.float16 if dtype == torch.float16 else np.float32)
        self.index: list[tuple[int, list[tuple[int, ...]]]] = []  # per crop: byte offset, block shapes
        self.size = 0
        self._remove = weakref.finalize(self, _remove_file, self.path)

    def append(self, blocks: Sequence[torch.Tensor]) -> None:
        shapes = [tuple(int(d) for d in b.shape) for b in blocks]
        with open(self.path, "ab") as f:
            for b in blocks:
                f.write(memoryview(np.ascontiguousarray(b.detach().to("cpu", self.dtype).numpy())))
        self.index.append((self.size, shapes))
        self.size += sum(math.prod(sh) for sh in shapes) * self.np_dtype.itemsize

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        offset, shapes = self.index[i]
        count = sum(math.prod(sh) for sh in shapes)
        flat = torch.from_numpy(np.fromfile(self.path, dtype=self.np_dtype, count=count, offset=offset))
        out, start = [], 0
        for sh in shapes:
            n = math.prod(sh)
            out.append(flat[start : start + n].view(sh))
            start += n
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_remove")  # a worker's copy never deletes the owner's file
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class FeatureCache(Dataset):
    """In-memory dataset of cached features for ``crops_per_image`` random crops of each labelled image.

    Items are dicts (collatable by a plain ``torch.utils.data.DataLoader``)::

        {"blocks": [C_b x *native_b per block] (fp16 or fp32), "label": (1, *crop) uint8/int64 tensor,
         "norm": () float32 L2 norm of the crop's float32 assembled features, "mask_seed": () int64,
         "image_index": () int64}

    Args:
        extractor: the frozen feature extractor.
        data: a sequence of ``(image (C, *spatial) in [-1, 1], label (1, *spatial) int)`` pairs, or a dataset
            (e.g. MONAI's) whose items are such pairs or dicts with ``image_key`` / ``label_key``.
        crop_size: crop edge (int) or one size per spatial dim; must be a multiple of ``extractor.size_multiple``.
            Images smaller than the crop are padded (image with 0, label with ``ignore_index``).
        crops_per_image: how many random crops to cache per image.
        fp16: store the blocks in float16 (half the memory; the stored norms stay exact float32).
        seed: seeds the crop positions and, with ``vary_masks``, the per-crop corruption seeds.
        vary_masks: give each crop its own corruption seed (stored as ``mask_seed``) so the head sees many mask
            patterns, as in the reference's training; otherwise every crop uses the extractor's own setting.
        batch_size: crops per extractor call.
        device: where the extractor runs (default: where its parameters are); the cache is kept on CPU.
        ignore_index: label value for padded pixels (and the convention for "no label").
        image_key / label_key: keys when the items are dicts.
        num_shards / shard: keep only every ``num_shards``-th crop, starting at ``shard`` (one shard per rank
            in multi-process training: each rank computes and holds 1/``num_shards`` of the cache). The crops
            are drawn as without sharding, so the shards together are the unsharded cache; like PyTorch's
            ``DistributedSampler`` the first crops are repeated to give every shard the same length, since
            DDP ranks must take the same number of steps.
        augment: cache each crop as one random view of the baseline UNet's augmentation (flip x 90-degree
            rotation, :meth:`augment`), drawn with the position from ``seed``.
        disk_dir: a directory: keep the blocks in a temporary file there (removed with the cache), written per
            extraction batch and read per item, instead of in memory; only labels and norms stay resident.

    Crops are drawn without replacement among an image's distinct views (position x augmentation), so a view
    repeats only once all were used, and then only with a new mask (``vary_masks``); without varied masks (or
    without corruption) an image with fewer distinct views than ``crops_per_image`` (e.g. one no larger than
    the crop) gets one crop per view instead of identical copies, which is logged.
    """

    def __init__(
        self,
        extractor: MDMFeatureExtractor,
        data: Iterable[Any],
        crop_size: int | Sequence[int] = 256,
        crops_per_image: int = 16,
        fp16: bool = True,
        seed: int = 0,
        vary_masks: bool = True,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        ignore_index: int = 255,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        num_shards: int = 1,
        shard: int = 0,
        augment: bool = False,
        disk_dir: str | os.PathLike | None = None,
    ) -> None:
        nd = extractor.spatial_dims
        size = (int(crop_size),) * nd if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        if len(size) != nd:
            raise ValueError(f"crop_size {size} does not match the network's {nd} spatial dims.")
        m = extractor.size_multiple
        if any(s % m for s in size):
            raise ValueError(f"crop_size {size} must be a multiple of {m} (network size divisor and patch size).")
        if crops_per_image < 1:
            raise ValueError(f"crops_per_image must be positive, got {crops_per_image}.")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must lie in [0, num_shards={num_shards}), got {shard}.")
        self.extractor = extractor
        self.crop_size = size
        self.crops_per_image = int(crops_per_image)
        self.fp16 = fp16
        self.ignore_index = int(ignore_index)
        self.image_key, self.label_key = image_key, label_key
        # flips x 90-degree rotations in the first two spatial dims (only 0 / 180 degrees for a non-square crop)
        turns = (0, 1, 2, 3) if size[0] == size[1] else (0, 2)
        self.views = [(k, flip) for flip in (False, True) for k in turns] if augment else [(0, False)]
        # without per-crop masks (or without corruption) two crops of the same view would be identical copies
        identical = not vary_masks or extractor.corruption is None
        device = torch.device(device) if device is not None else next(extractor.parameters()).device
        gen = torch.Generator().manual_seed(int(seed))

        # plan every crop first (the same draws for every shard), then keep this shard's
        plan: list[tuple[int, tuple[int, ...], int, int]] = []  # image index, start, view, mask seed
        # what the extraction below reads, per planned crop: the crop's own image and label windows, or (when
        # the image's crops hold more pixels than the image) the whole float image; never every full-size
        # image at once (85 GlaS images: 0.4 GB of float32 pixels and 0.3 GB of int64 labels)
        sources: list[tuple[torch.Tensor, torch.Tensor]] = []
        capped = []
        for index, item in enumerate(self._iterate(data)):
            image, label = self._pad(*self._pair(item))
            first = len(plan)
            ranges = [s - c + 1 for s, c in zip(image.shape[1:], size)]
            distinct = math.prod(ranges) * len(self.views)
            count = min(self.crops_per_image, distinct) if identical else self.crops_per_image
            if count < self.crops_per_image:
                capped.append((index, distinct))
            if distinct <= _ENUMERATE:  # draw without replacement: no view repeats before all were used
                order = torch.randperm(distinct, generator=gen).repeat(-(-count // distinct))[:count].tolist()
            else:  # too many to list; a repeat is then improbable
                order = torch.randint(0, distinct, (count,), generator=gen).tolist()
            for code in order:
                code, view = divmod(code, len(self.views))
                start = []
                for r in reversed(ranges):
                    code, offset = divmod(code, r)
                    start.append(offset)
                mask_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) if vary_masks else -1
                plan.append((index, tuple(reversed(start)), view, mask_seed))
            keep_crops = (len(plan) - first) * math.prod(size) < math.prod(image.shape[1:])
            for _, start, _, _ in plan[first:]:
                window = (slice(None), *(slice(a, a + c) for a, c in zip(start, size)))
                sources.append((image[window].clone(), label[window].clone()) if keep_crops else (image, label))
            del image, label, item
        if capped:
            logger.info(
                f"{len(capped)} image(s) (first: image {capped[0][0]}) have only {capped[0][1]} distinct "
                f"crop views (position x flip/rotation) with the same mask: cached those instead of "
                f"{self.crops_per_image} identical copies."
            )
        total = len(plan)
        repeated = -total % num_shards  # crops 0 .. repeated - 1 are cached twice overall to even the shards
        repeat = {p for p in range(repeated) if (total + p) % num_shards == shard}
        mine = [(c, sources[p]) for p, c in enumerate(plan) if p % num_shards == shard or p in repeat]
        del sources

        # (image index, crop start per dim, corruption seed or -1, view index) per cached crop
        self.crops: list[tuple[int, tuple[int, ...], int, int]] = []
        dtype = torch.float16 if fp16 else torch.float32
        self.blocks: list[list[torch.Tensor]] | _DiskBlocks = [] if disk_dir is None else _DiskBlocks(disk_dir, dtype)
        self.labels: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        pending: list[tuple[torch.Tensor, int]] = []
        while mine:
            (index, start, view, mask_seed), (image, label) = mine.pop(0)  # a crop's source goes once it is used
            if tuple(image.shape[1:]) == size:
                window = (slice(None),) * image.ndim  # already the crop
            else:
                window = (slice(None), *(slice(a, a + c) for a, c in zip(start, size)))
            self.crops.append((index, start, mask_seed, view))
            lab = self.augment(label[window], view)
            self.labels.append(lab.to(torch.uint8) if lab.min() >= 0 and lab.max() <= 255 else lab.long())
            pending.append((self.augment(image[window], view), mask_seed))
            if len(pending) == batch_size:
                self._compute(pending, device)
                pending = []
        if pending:
            self._compute(pending, device)
        if not self.crops:
            raise ValueError("no labelled images were given.")
        if num_shards > 1:
            logger.info(f"cached {len(self.crops)} of {total} crops (shard {shard} of {num_shards}).")

    def augment(self, crop: torch.Tensor, view: int) -> torch.Tensor:
        """View ``view`` of a (C, *spatial) crop: rotated ``k`` quarter turns in the first two spatial dims,
        then flipped along the last one (as the UNet baseline's RandRotate90d / RandFlipd)."""
        k, flip = self.views[view]
        crop = torch.rot90(crop, k, dims=(1, 2)) if k else crop
        return torch.flip(crop, dims=(-1,)) if flip else crop

    # ------------------------------------------------------------------ building

    @staticmethod
    def _iterate(data: Iterable[Any]) -> Iterable[Any]:
        if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            return (data[i] for i in range(len(data)))  # type: ignore[index]
        return iter(data)

    def _pair(self, item: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(item, Mapping):
            image, label = item[self.image_key], item[self.label_key]
        else:
            image, label = item
        image = convert_to_tensor(image, wrap_sequence=True, track_meta=False).float()
        label = convert_to_tensor(label, wrap_sequence=True, track_meta=False)
        nd = self.extractor.spatial_dims
        if image.ndim != nd + 1:
            raise ValueError(f"images must be (C, *spatial) with {nd} spatial dims, got {tuple(image.shape)}.")
        if label.ndim == nd:
            label = label.unsqueeze(0)
        if label.shape[1:] != image.shape[1:] or label.shape[0] != 1:
            raise ValueError(
                f"label {tuple(label.shape)} does not match image {tuple(image.shape)} (want (1, *spatial))."
            )
        if label.is_floating_point():
            label = label.round()
        return image, label.long()

    def _pad(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        short = [max(c - s, 0) for s, c in zip(image.shape[1:], self.crop_size)]
        if not any(short):
            return image, label
        pad: list[int] = []
        for d in reversed(short):
            pad += [d // 2, d - d // 2]
        return F.pad(image, pad, value=0.0), F.pad(label, pad, value=self.ignore_index)

    def _compute(self, pending: list[tuple[torch.Tensor, int]], device: torch.device) -> None:
        images = torch.stack([p[0] for p in pending]).to(device)
        seeds = [p[1] for p in pending]
        seeds_arg = seeds if all(s >= 0 for s in seeds) else None
        blocks = self.extractor.extract_blocks(images, seeds_arg)
        norms = self.extractor.assemble_norms(blocks, self.crop_size).float().cpu()
        dtype = torch.float16 if self.fp16 else torch.float32
        for i in range(len(pending)):
            if isinstance(self.blocks, _DiskBlocks):
                self.blocks.append([b[i] for b in blocks])
            else:
                self.blocks.append([b[i].to(dtype).cpu().clone() for b in blocks])
            self.norms.append(norms[i])

    # ------------------------------------------------------------------ dataset protocol

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index, _, mask_seed, _ = self.crops[index]
        return {
            "blocks": list(self.blocks[index]),
            CommonKeys.LABEL: self.labels[index],
            "norm": self.norms[index],
            "mask_seed": torch.tensor(mask_seed, dtype=torch.long),
            "image_index": torch.tensor(image_index, dtype=torch.long),
        }

    def crop_slices(self, index: int) -> tuple[int, tuple[slice, ...]]:
        """``(image index, spatial slices)`` of a cached crop, in the (padded) image's coordinates."""
        image_index, start, _, _ = self.crops[index]
        return image_index, tuple(slice(a, a + c) for a, c in zip(start, self.crop_size))

    def view(self, index: int) -> int:
        """Augmentation view (index into ``views``, ``(quarter turns, flipped)``) of a cached crop."""
        return self.crops[index][3]

    # ------------------------------------------------------------------ memory

    def nbytes(self) -> int:
        """Bytes of the cached blocks (in memory, or in the file with ``disk_dir``), labels and norms."""
        total = self.blocks.size if isinstance(self.blocks, _DiskBlocks) else 0
        for i, (label, norm) in enumerate(zip(self.labels, self.norms)):
            if not isinstance(self.blocks, _DiskBlocks):
                total += sum(b.numel() * b.element_size() for b in self.blocks[i])
            total += label.numel() * label.element_size() + norm.numel() * norm.element_size()
        return total

    @property
    def disk_path(self) -> str | None:
        """The file holding the blocks (``disk_dir``), or ``None`` when they are in memory."""
        return self.blocks.path if isinstance(self.blocks, _DiskBlocks) else None

    @staticmethod
    def bytes_per_crop(extractor: MDMFeatureExtractor, crop_size: int | Sequence[int], fp16: bool = True) -> int:
        """Planned bytes of one cached crop (blocks + uint8 label + norm), without running the network."""
        nd = extractor.spatial_dims
        size = (int(crop_size),) * nd if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        per_value = 2 if fp16 else 4
        blocks = sum(math.prod(shape) for shape in extractor.native_shapes(size)) * per_value
        return blocks + math.prod(size) + 4
