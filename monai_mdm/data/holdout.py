"""A held-out strip of the labelled images, so that few-shot training can stop on pixels it never trained on.

With one to a few labelled images there is no validation set to spare. :func:`holdout_split` cuts a strip of
``fraction`` of each image's longest spatial axis (ties: the last axis) off one end (which end is drawn per
image from ``seed``); the training crops come from the rest of the image only, so they never overlap the strip.
The strip's labelled pixels are returned as crop-sized windows: the window covers the strip and, where the strip
is narrower than the crop, some of the training part as context; labels outside the strip are ``ignore_index``,
so only the strip's pixels are scored. An image shorter than ``1 / fraction`` pixels along that axis gives no
strip (it is trained on whole). Both halves are data sets, so this module sits beside
:class:`~monai_mdm.data.feature_cache.FeatureCache`, which caches the windows' features.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import CommonKeys, convert_to_tensor

from monai_mdm.data.feature_cache import FeatureCache

__all__ = ["heldout_cache", "holdout_split"]

logger = logging.getLogger(__name__)


def _items(data: Iterable[Any]) -> Iterable[Any]:
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return (data[i] for i in range(len(data)))  # type: ignore[index]
    return iter(data)


def _starts(lo: int, hi: int, crop: int, size: int) -> list[int]:
    """Window starts that tile [lo, hi) with windows of ``crop`` inside [0, size)."""
    starts = list(range(lo, max(hi - crop, lo) + 1, crop)) + [hi - crop]
    return sorted({min(max(s, 0), size - crop) for s in starts})


def holdout_split(
    data: Iterable[Any],
    fraction: float,
    crop_size: int | Sequence[int],
    seed: int = 0,
    ignore_index: int = 255,
    image_key: str = CommonKeys.IMAGE,
    label_key: str = CommonKeys.LABEL,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """``(training parts, held-out windows)`` of labelled images (dicts with ``image_key`` / ``label_key``).

    Both are lists of ``{image_key: (C, *spatial), label_key: (1, *spatial)}``; every window is ``crop_size``
    (the image padded with 0 and the label with ``ignore_index`` where the image is smaller). ``fraction`` 0
    holds nothing out.
    """
    if not 0.0 <= float(fraction) <= 0.5:
        raise ValueError(f"--holdout_fraction must lie in [0, 0.5], got {fraction} (0.2 holds out a fifth).")
    gen = torch.Generator().manual_seed(int(seed))
    train: list[dict[str, torch.Tensor]] = []
    windows: list[dict[str, torch.Tensor]] = []
    held = 0
    names, foreground, scored = [], False, False
    for index, item in enumerate(_items(data)):
        image = convert_to_tensor(item[image_key], wrap_sequence=True, track_meta=False).float()
        label = convert_to_tensor(item[label_key], wrap_sequence=True, track_meta=False)
        names.append(str(item.get("name", index)) if isinstance(item, Mapping) else str(index))
        scored = scored or bool((label != ignore_index).any())
        foreground = foreground or bool(((label != 0) & (label != ignore_index)).any())
        nd = image.ndim - 1
        if label.ndim == nd:
            label = label.unsqueeze(0)
        size = (int(crop_size),) * nd if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        shape = image.shape[1:]
        axis = max(range(nd), key=lambda d: (shape[d], d))
        width = int(float(fraction) * shape[axis])
        at_end = bool(torch.randint(0, 2, (1,), generator=gen))
        if width < 1:
            train.append({image_key: image, label_key: label})
            continue
        held += 1
        cut = [slice(None)] * (nd + 1)
        cut[axis + 1] = slice(0, shape[axis] - width) if at_end else slice(width, None)
        train.append({image_key: image[tuple(cut)], label_key: label[tuple(cut)]})
        # pad as the cache does, then tile the strip with crop-sized windows, each pixel scored once
        short = [max(c - s, 0) for s, c in zip(shape, size)]
        pad: list[int] = []
        for d in reversed(short):
            pad += [d // 2, d - d // 2]
        image_p = F.pad(image, pad, value=0.0)
        strip = torch.zeros((1, *shape), dtype=torch.bool)
        keep = [slice(None)] * (nd + 1)
        keep[axis + 1] = slice(shape[axis] - width, None) if at_end else slice(0, width)
        strip[tuple(keep)] = True
        strip = F.pad(strip, pad, value=False)
        label_p = F.pad(label.long(), pad, value=ignore_index)
        padded = image_p.shape[1:]
        bounds = [(0, p) for p in padded]
        lo = short[axis] // 2 + (shape[axis] - width if at_end else 0)
        bounds[axis] = (lo, lo + width)
        for start in itertools.product(*(_starts(a, b, c, p) for (a, b), c, p in zip(bounds, size, padded))):
            window = (slice(None), *(slice(s, s + c) for s, c in zip(start, size)))
            mine = strip[window].clone()
            strip[window] = False  # a pixel already scored by an earlier window is not scored again
            if not mine.any():
                continue
            lab = torch.where(mine, label_p[window], torch.full_like(label_p[window], ignore_index))
            windows.append({image_key: image_p[window].clone(), label_key: lab})
    _check_labels(names, foreground, scored, ignore_index)
    if held:
        logger.info(
            f"held out {fraction:.0%} of {held} labelled image(s) along their longest axis for early stopping "
            f"({len(windows)} window(s)); training crops come from the rest."
        )
    else:
        logger.warning(f"no held-out strip (holdout_fraction {fraction}; images too small or fraction 0).")
    return train, windows


def _check_labels(names: Sequence[str], foreground: bool, scored: bool, ignore_index: int) -> None:
    """Refuse labels that cannot teach anything before any training: a head would learn 'always background'."""
    if foreground or not names:
        return
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    what = f"every pixel is ignored ({ignore_index})" if not scored else "every pixel is background (0)"
    raise ValueError(
        f"the labelled images have no foreground to learn: {what} in all {len(names)} of them ({shown}). Check "
        "that the label files mark the objects with values > 0 and belong to these images, or choose other images "
        "with --label_budget."
    )


def heldout_cache(
    extractor: Any, windows: Sequence[Mapping[str, Any]], fp16: bool = True, device: Any = None
) -> Any:
    """Cached features of held-out windows (:func:`holdout_split`): one item per window, no augmentation, the
    extractor's own fixed corruption seed; ``[]`` when nothing was held out."""
    if not windows:
        return []
    size = tuple(int(s) for s in convert_to_tensor(windows[0][CommonKeys.IMAGE], track_meta=False).shape[1:])
    return FeatureCache(extractor, windows, crop_size=size, crops_per_image=1, fp16=fp16, vary_masks=False,
                        augment=False, device=device)  # fmt: skip
