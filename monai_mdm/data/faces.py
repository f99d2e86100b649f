"""Reader of the DDPM-seg face sets (FFHQ-34, CelebA-19): ``<n>.png`` images with ``<n>.npy`` class maps.

The class maps are plain integer arrays (H, W) with values 0..K-1 and 255 for "ignore". Their most common
failure modes are silent with a generic loader: a missing map, a map of another size, or a map of the other
data set (CelebA-19 maps read with K = 34 look fine, FFHQ-34 maps read with K = 19 do not). This module turns
each of them into an error that names the files and says what to change. The pipeline's loading transform is
:class:`monai_mdm.transforms.LoadClassMapd`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from monai_mdm.data.folder import files_by_stem, natural_sort_key
from monai_mdm.data.instances import image_size, read_raster

__all__ = [
    "CELEBA19_CLASSES",
    "FFHQ34_CLASSES",
    "check_num_classes",
    "face_class_names",
    "face_palette",
    "faces_datalist",
    "read_class_map",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Descriptive part names for overlays and reports, following the DatasetGAN / DDPM-seg face-part hierarchy
# ("a***b" = part b of a). The class ids (list positions) are what the data and metrics use.
FFHQ34_CLASSES: tuple[str, ...] = (
    "background",
    "head",
    "head***cheek",
    "head***chin",
    "head***ear",
    "head***ear***helix",
    "head***ear***lobule",
    "head***eye***bottom lid",
    "head***eye***eyelashes",
    "head***eye***iris",
    "head***eye***pupil",
    "head***eye***sclera",
    "head***eye***tear duct",
    "head***eye***top lid",
    "head***eyebrow",
    "head***forehead",
    "head***frown",
    "head***hair",
    "head***hair***sideburns",
    "head***jaw",
    "head***moustache",
    "head***mouth***inferior lip",
    "head***mouth***oral commissure",
    "head***mouth***superior lip",
    "head***mouth***teeth",
    "head***neck",
    "head***nose",
    "head***nose***ala of nose",
    "head***nose***bridge",
    "head***nose***nose tip",
    "head***nose***nostril",
    "head***philtrum",
    "head***temple",
    "head***wrinkles",
)

# CelebAMask-HQ's 19 labels in their usual order.
CELEBA19_CLASSES: tuple[str, ...] = (
    "background",
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
    "hair",
    "hat",
    "ear_r",
    "neck_l",
    "neck",
    "cloth",
)

_KNOWN_SETS = {34: "FFHQ-34", 19: "CelebA-19"}


def face_class_names(dataset: str) -> list[str]:
    """The part names of the face data set named by the bundle's ``dataset`` setting (``ffhq34`` or ``celeba19``).

    Any other name is refused: taking one set's names for the other would mislabel every report.
    """
    sets = {"ffhq34": FFHQ34_CLASSES, "celeba19": CELEBA19_CLASSES}
    if dataset not in sets:
        raise ValueError(f"dataset '{dataset}' is not a face-parts data set; set --dataset to one of {sorted(sets)}.")
    return list(sets[dataset])


def face_palette(num_classes: int) -> np.ndarray:
    """Deterministic, pairwise distinct RGB colours ``(num_classes, 3)`` uint8 for overlays (class 0 black).

    The bits of the class id are spread over the three channels, high bits first, so neighbouring ids get
    clearly different colours and every id below 256 gets its own colour (the scheme PASCAL VOC popularised).
    """
    k = int(num_classes)
    if not 1 <= k <= 256:
        raise ValueError(f"num_classes must be in 1..256 for a distinct palette, got {num_classes}.")
    palette = np.zeros((k, 3), dtype=np.uint8)
    for cls in range(k):
        rgb = [0, 0, 0]
        value = cls
        for shift in range(7, -1, -1):  # bit triplets of the id go to bit 7, 6, ... of r, g, b
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            if not value:
                break
        palette[cls] = rgb
    return palette


def _suggest(bad: np.ndarray, valid_max: int | None, num_classes: int) -> str:
    """What to change: usually the data set setting (FFHQ-34 maps read as CelebA-19 or the other way)."""
    if bad.size and int(bad.min()) < 0:
        return " Negative values are not class ids: re-export the maps."
    top = max(int(bad.max()), valid_max if valid_max is not None else 0)
    fits = [(k, name) for k, name in sorted(_KNOWN_SETS.items()) if top < k and k != num_classes]
    if fits:
        k, name = fits[0]
        return f" These look like {name} maps: set num_classes={k} (FFHQ-34: 34, CelebA-19: 19)."
    return f" Set num_classes to at least {top + 1}, or check that the maps belong to this data set."


def read_class_map(
    path: str | os.PathLike,
    num_classes: int,
    ignore_index: int = 255,
    image: str | os.PathLike | None = None,
) -> np.ndarray:
    """One class map as an (H, W) integer array, checked against ``num_classes`` and its image's size.

    ``.npy`` (the face sets), or a label image as MONAI Label saves them (PNG, BMP, TIFF: one class index per
    pixel; grey stored as RGB is read as grey). A leading singleton axis ((1, H, W)) is accepted. Values must
    be integers in ``0..num_classes-1`` or ``ignore_index``.
    """
    path = Path(path)
    if not path.is_file():
        what = f"image '{image}' has no class map: expected '{path}'" if image is not None else f"'{path}' not found"
        raise FileNotFoundError(
            f"{what}. The face layout needs '<n>.npy' next to each '<n>.png'; add the map or remove the image."
        )
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # np.load raises ValueError/OSError/EOFError on damaged files
            raise ValueError(f"cannot read class map '{path}' ({e}); replace it.") from e
    else:
        arr = read_raster(path)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4) and (arr[..., :3] == arr[..., :1]).all():
            arr = arr[..., 0]  # grey written as RGB(A)
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
            raise ValueError(
                f"class map '{path}' is a colour image; expected one class index per pixel (a grey or palette "
                "image, as MONAI Label saves labels)."
            )
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"class map '{path}' has shape {arr.shape}; expected (H, W) integer class ids.")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"class map '{path}' has pixel type {arr.dtype}; expected integer class ids.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"class map '{path}' holds non-integer values ({arr.dtype}); expected class ids.")
    if image is not None:
        h, w = image_size(image)
        if arr.shape != (h, w):
            raise ValueError(
                f"class map '{path}' is {arr.shape[0]} x {arr.shape[1]} (H x W) but its image '{image}' is "
                f"{h} x {w}; the map must have the size of its image (check that the pair belongs together)."
            )
    values = np.unique(arr)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (f", ... ({bad.size} values)" if bad.size > 10 else "")
        valid = values[(values >= 0) & (values != ignore_index)]
        hint = _suggest(bad, int(valid.max()) if valid.size else None, num_classes)
        raise ValueError(
            f"class map '{path}' holds values {shown}, outside the {num_classes} classes 0..{num_classes - 1} "
            f"(and not the ignore value {ignore_index}).{hint}"
        )
    return arr.astype(np.int64)


def check_num_classes(num_classes: Any, ignore_index: int) -> int:
    """``num_classes`` as an int, checked once for the datalist and the loading transform alike."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (FFHQ-34: 34, CelebA-19: 19), got {num_classes!r}.")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a valid class id for {num_classes} classes; pick another.")
    return int(num_classes)


def faces_datalist(
    root: str | os.PathLike,
    num_classes: int,
    split: str | None = None,
    validate: bool = True,
    ignore_index: int = 255,
) -> list[dict[str, str]]:
    """``[{"image", "label", "name"}, ...]`` of a DDPM-seg face folder, in natural order (``2`` before ``10``).

    Args:
        root: folder of ``<n>.png`` (or .jpg) images with ``<n>.npy`` class maps; or, with ``split``, a folder
            holding ``<split>/`` or ``real/<split>/`` (DDPM-seg's ``ffhq_34/real/train`` layout).
        num_classes: K: 34 for FFHQ-34, 19 for CelebA-19.
        split: optional sub-folder, see above.
        validate: read every map now (cheap: a few hundred 256 x 256 arrays) so that a missing or foreign map
            stops the run before training instead of in the middle of it; False only lists the files.
        ignore_index: the "ignore" value of the maps.
    """
    num_classes = check_num_classes(num_classes, ignore_index)
    root = Path(root)
    folder = root
    if split is not None:
        candidates = [root / split, root / "real" / split]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise FileNotFoundError(
                f"no folder for split {split!r} under '{root}'; looked in " + ", ".join(f"'{c}'" for c in candidates)
            )
        folder = found[0]
    if not folder.is_dir():
        raise FileNotFoundError(f"face data folder '{folder}' does not exist.")
    images = files_by_stem(folder, _IMAGE_SUFFIXES, kind="images")
    if not images:
        raise FileNotFoundError(
            f"no images (<n>.png / .jpg) in '{folder}'; the face layout is a folder of <n>.png with <n>.npy maps."
        )
    out = []
    for name in sorted(images, key=natural_sort_key):
        image = images[name]
        label = image.with_suffix(".npy")
        if validate or not label.is_file():
            read_class_map(label, num_classes, ignore_index, image=image)
        out.append({"image": str(image), "label": str(label), "name": name})
    return out
