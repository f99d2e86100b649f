"""Reading annotations into instance maps: the reader behind :class:`monai_mdm.transforms.LoadInstanceMaskd`.

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
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from scipy import ndimage as ndi

from monai_mdm.data.monuseg import rasterize_monuseg_xml

__all__ = ["image_size", "read_instance_map"]

_TIFF_SUFFIXES = (".tif", ".tiff")


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


def read_raster(path: Path) -> np.ndarray:
    """Pixel array of a label image: (H, W) or (H, W, C)."""
    path = Path(path)
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


def _holds_instance_ids(arr: np.ndarray, path: Path) -> bool:
    """A single-channel integer label in a lossless format with more than one non-zero value numbers its objects
    (a binary mask has one, e.g. 255); JPEG is excluded, its compression noise would read as ids."""
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or path.suffix.lower() in (".jpg", ".jpeg"):
        return False
    return np.unique(arr[arr > 0]).size > 1


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
            (8-connectivity) as the instances; a lossless single-channel label with several non-zero values
            already numbers its instances and keeps them. Otherwise every value is an instance id.
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
        inst = rasterize_monuseg_xml(path, expected)
        return (ndi.label(inst > 0, structure=np.ones((3, 3)))[0].astype(np.int32)) if binarize else inst

    arr = read_raster(path)
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
        if _holds_instance_ids(arr, path):  # merging touching nuclei would inflate AJI and PQ
            return _as_instance_ids(arr, path)
        return ndi.label(arr > 0, structure=np.ones((3, 3)))[0].astype(np.int32)
    return _as_instance_ids(arr, path)
