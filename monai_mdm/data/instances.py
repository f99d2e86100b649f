"""Reading annotations into instance maps, and the dictionary transform that does it in a pipeline.

Object-level metrics (object Dice, object Hausdorff, AJI) need the instance map, and training needs
the binary foreground; both come from one read so that they cannot disagree. The annotation formats:

- GlaS ``*_anno.bmp`` (or png/tif): every pixel value is an instance id, 0 background.
- MoNuSeg ``*.xml``: one polygon per nucleus, rasterised by
  :func:`monai_mdm.data.monuseg.rasterize_monuseg_xml` at the size of the image.
- The preprocessed ``labelcol`` layout: binary masks (any value > 0 is foreground); instances are
  then the connected components.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from monai.config import KeysCollection
from monai.transforms.transform import MapTransform
from PIL import Image, UnidentifiedImageError
from scipy import ndimage as ndi

__all__ = [
    "LoadInstanceMaskd",
    "LoadInstanceMaskD",
    "LoadInstanceMaskDict",
    "image_size",
    "files_by_stem",
    "natural_sort_key",
    "read_instance_map",
]

_TIFF_SUFFIXES = (".tif", ".tiff")


def natural_sort_key(text: str | os.PathLike) -> tuple:
    """Sort key that orders embedded numbers by value, so ``train_2`` comes before ``train_10``."""
    parts = re.split(r"(\d+)", os.fspath(text))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def files_by_stem(folder: Path, suffixes: Sequence[str], kind: str = "files") -> dict[str, Path]:
    """``{stem: path}`` of the files in ``folder`` with one of ``suffixes`` (hidden files skipped).

    Readers pair images with annotations by stem, so two files with one stem (``a.png`` and ``a.tif``) are an
    error naming both rather than a silent choice.
    """
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in out:
                raise ValueError(
                    f"'{folder}' holds two {kind} named '{p.stem}': '{out[p.stem].name}' and '{p.name}'; keep one."
                )
            out[p.stem] = p
    return out


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only (no pixel decoding)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image '{path}' does not exist; check the data folder.")
    try:
        with Image.open(path) as im:
            width, height = im.size
            return int(height), int(width)
    except (UnidentifiedImageError, OSError):
        if path.suffix.lower() not in _TIFF_SUFFIXES:
            raise ValueError(f"cannot read image '{path}': not a readable image file; replace or remove it.")
    # TIFF flavours that PIL does not read (tiled, float, many samples): ask tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagelength), int(page.imagewidth)
    except Exception as e:  # tifffile raises several unrelated types on corrupt files
        raise ValueError(f"cannot read image '{path}' ({e}); replace or remove it.") from e


def _read_raster(path: Path) -> np.ndarray:
    """Pixel array of a label image: (H, W) or (H, W, C)."""
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() in _TIFF_SUFFIXES:
        try:
            return np.asarray(tifffile.imread(path))
        except Exception as e:
            raise ValueError(f"cannot read annotation '{path}' ({e}); replace or re-export it.") from e
    try:
        with Image.open(path) as im:
            if im.mode == "1":
                im = im.convert("L")
            # palette images: the indices are the labels, not the colours they are shown in
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read annotation '{path}' ({e}); replace or re-export it.") from e


def _to_single_channel(arr: np.ndarray, path: Path) -> np.ndarray:
    """Collapse a colour label image to one integer per pixel.

    Grey stored as RGB keeps its value; a colour-coded instance map gets one id per distinct colour
    (black = background), numbered in the order of the sorted colours.
    """
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # LA / RGBA: drop alpha
        arr = arr[..., :-1] if arr.shape[-1] == 4 else arr[..., :1]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        return arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            return arr[..., 0]
        colours, inverse = np.unique(arr.reshape(-1, 3), axis=0, return_inverse=True)
        # unique() sorts rows, so black, if present, is row 0 and keeps id 0; otherwise ids start at 1
        ids = np.arange(len(colours), dtype=np.int64) + (0 if not colours[0].any() else 1)
        return ids[inverse.reshape(-1)].reshape(arr.shape[:2])
    raise ValueError(
        f"annotation '{path}' has shape {arr.shape}; expected a 2-D label image (or RGB with one colour per "
        "object). Re-export it as a single-channel image."
    )


def _as_instance_ids(arr: np.ndarray, path: Path) -> np.ndarray:
    """Check that label values are usable instance ids (non-negative integers) and cast to int32."""
    if arr.dtype == bool:
        return arr.astype(np.int32)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(
                f"annotation '{path}' holds non-integer values ({arr.dtype}); an instance map needs integer "
                "ids (0 background). For a probability/binary mask use binarize=True."
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"annotation '{path}' has unsupported pixel type {arr.dtype}; re-export it as integers.")
    if arr.size and arr.min() < 0:
        raise ValueError(
            f"annotation '{path}' holds negative values (min {arr.min()}); instance ids must be >= 0 "
            "(0 background). Fix the export."
        )
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise ValueError(f"annotation '{path}' holds ids above the int32 range; renumber the instances.")
    return arr.astype(np.int32)


def read_instance_map(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    shape: tuple[int, int] | None = None,
    binarize: bool = False,
) -> np.ndarray:
    """``(H, W)`` int32 instance map (0 background, objects > 0) of one annotation file.

    Args:
        path: annotation: bmp/png/jpg/tif/npy label image, or a MoNuSeg XML.
        image: the image the annotation belongs to; its size is checked against the annotation
            (and is the raster size of an XML). Only the image header is read.
        shape: ``(H, W)`` to check against / rasterise at when ``image`` is not given.
        binarize: treat the annotation as a binary mask (value > 0 = foreground, e.g. the preprocessed
            ``labelcol`` layout, where glands are stored as 255) and number its connected components
            (8-connectivity) as the instances; otherwise every value is an instance id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation '{path}' does not exist" + (f" (for image '{image}')" if image is not None else "") + "."
        )
    expected = image_size(image) if image is not None else (None if shape is None else tuple(int(s) for s in shape))

    if path.suffix.lower() == ".xml":
        if expected is None:
            raise ValueError(
                f"annotation '{path}' is a polygon XML: pass the image (or its shape) so it can be rasterised."
            )
        from monai_mdm.data.monuseg import rasterize_monuseg_xml  # here: monuseg imports from this module

        inst = rasterize_monuseg_xml(path, expected)
        return (ndi.label(inst > 0, structure=np.ones((3, 3)))[0].astype(np.int32)) if binarize else inst

    arr = _read_raster(path)
    if binarize and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = (arr[..., :3] > 0).any(axis=-1)  # any coloured pixel is foreground
    arr = _to_single_channel(arr, path)
    if expected is not None and tuple(arr.shape) != tuple(expected):
        what = f"image '{image}' is" if image is not None else "the expected size is"
        raise ValueError(
            f"annotation '{path}' is {arr.shape[0]} x {arr.shape[1]} (H x W) but {what} "
            f"{expected[0]} x {expected[1]}; the annotation must have the size of its image: check that the "
            "pair belongs together, or re-export the annotation at the image size."
        )
    if binarize:
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError(f"annotation '{path}' holds NaN/inf values; re-export the mask.")
        return ndi.label(arr > 0, structure=np.ones((3, 3)))[0].astype(np.int32)
    return _as_instance_ids(arr, path)


def _path_of(value: Any) -> str | None:
    """The file behind a datalist value: a path, or the ``filename_or_obj`` of an already loaded MetaTensor."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if isinstance(name, (str, os.PathLike)) and os.fspath(name):
            return os.fspath(name)
    return None


class LoadInstanceMaskd(MapTransform):
    """Load annotation files into a binary class map and an instance map.

    For each key: ``d[key]`` (the annotation path) becomes the ``(1, H, W)`` uint8 foreground map
    (0/1), and ``d[key + instance_postfix]`` the ``(1, H, W)`` int32 instance map, both numpy.
    Put it before ``LoadImaged`` (or after it: the image file is then taken from the MetaTensor's
    ``filename_or_obj``), so that the annotation is checked against the size of its image, which
    also gives MoNuSeg XML polygons their raster size.

    Args:
        keys: keys of annotation paths.
        image_key: key of the image (path or loaded MetaTensor); None skips the size check.
        instance_postfix: the instance map goes to ``key + instance_postfix`` (``"label_instances"``).
        binarize: True: masks (> 0 = foreground, instances = connected components); False: pixel values
            are instance ids; None: per entry, binarise when ``d[format_key] == "binary"`` (set by
            :func:`monai_mdm.data.preprocessed.preprocessed_datalist`).
        format_key: entry key read when ``binarize`` is None.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str | None = "image",
        instance_postfix: str = "_instances",
        binarize: bool | None = None,
        format_key: str = "label_format",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not instance_postfix:
            raise ValueError("instance_postfix must be non-empty, or the instance map would replace the class map.")
        self.image_key = image_key
        self.instance_postfix = instance_postfix
        self.binarize = binarize
        self.format_key = format_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = None
        if self.image_key is not None and self.image_key in d:
            image = _path_of(d[self.image_key])
        binarize = self.binarize if self.binarize is not None else d.get(self.format_key) == "binary"
        for key in self.key_iterator(d):
            path = _path_of(d[key])
            if path is None:
                raise TypeError(
                    f"LoadInstanceMaskd expects d[{key!r}] to be an annotation path, got {type(d[key]).__name__}; "
                    "put LoadInstanceMaskd before any transform that loads the label."
                )
            inst = read_instance_map(path, image=image, binarize=binarize)
            d[f"{key}{self.instance_postfix}"] = inst[None]
            d[key] = (inst > 0).astype(np.uint8)[None]
        return d


LoadInstanceMaskD = LoadInstanceMaskDict = LoadInstanceMaskd
