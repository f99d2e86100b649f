"""MoNuSeg (MICCAI 2018) reader: datalists of the official folders and the XML polygon rasteriser.

The official download comes in two layouts: training images and XMLs in sibling folders
(``MoNuSeg 2018 Training Data/Tissue Images`` + ``.../Annotations``), test images and XMLs side by side
(``MoNuSegTestData``). Annotations are Aperio ImageScope XML files with one ``Region`` per nucleus,
a polygon of ``Vertex X`` (column) / ``Y`` (row) points; they are rasterised here rather than shipped
as masks, so that every run uses the same rasterisation (``skimage.draw.polygon``, as the synthetic
generator in :mod:`monai_mdm.data.synthetic` does).
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon

from monai_mdm.data.folder import files_by_stem, natural_sort_key

__all__ = ["MONUSEG_IMAGE_EXTENSIONS", "monuseg_datalist", "rasterize_monuseg_xml", "read_monuseg_polygons"]

logger = logging.getLogger(__name__)

TRAIN_DIR = "MoNuSeg 2018 Training Data"
TRAIN_IMAGES = "Tissue Images"
TRAIN_ANNOTATIONS = "Annotations"
TEST_DIR = "MoNuSegTestData"
MONUSEG_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")


def _parse_coordinate(vertex: ET.Element, axis: str, path: Path, region_id: str, index: int) -> float:
    raw = vertex.get(axis)
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        problem = "missing" if raw is None else f"non-numeric ({raw!r})"
        raise ValueError(
            f"MoNuSeg XML '{path}': Region Id={region_id}, Vertex {index}: {axis} is {problem}; every Vertex "
            "needs numeric X (column) and Y (row) attributes. Fix or remove that Region."
        )
    return value


def read_monuseg_polygons(xml_path: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """``[(region_id, (N, 2) float array of (x, y)), ...]`` in document order, validated."""
    path = Path(xml_path)
    if not path.is_file():
        raise FileNotFoundError(f"MoNuSeg XML '{path}' does not exist.")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"MoNuSeg XML '{path}' is not well-formed XML ({e}); re-download or repair it.") from e
    regions = list(root.iter("Region"))
    if not regions:
        raise ValueError(
            f"MoNuSeg XML '{path}' holds no <Region> element; it is not a MoNuSeg annotation (one Region per "
            "nucleus) or it is empty: replace it, or remove the image and its XML from the data folder."
        )
    polygons = []
    for k, region in enumerate(regions, start=1):
        region_id = region.get("Id", f"#{k}")
        vertices = list(region.iter("Vertex"))
        if len(vertices) < 3:
            raise ValueError(
                f"MoNuSeg XML '{path}': Region Id={region_id} has {len(vertices)} vertices; a nucleus polygon "
                "needs at least 3. Fix or remove that Region."
            )
        xy = np.array(
            [
                (_parse_coordinate(v, "X", path, region_id, i), _parse_coordinate(v, "Y", path, region_id, i))
                for i, v in enumerate(vertices, start=1)
            ],
            dtype=np.float64,
        )
        polygons.append((region_id, xy))
    return polygons


def rasterize_monuseg_xml(xml_path: str | os.PathLike, shape: Sequence[int]) -> np.ndarray:
    """``(H, W)`` int32 instance map of a MoNuSeg XML: Region k (document order) gets id k, 0 background.

    Each polygon is filled with ``skimage.draw.polygon(Y, X, shape)`` (pixel centres inside), which is
    how :mod:`monai_mdm.data.synthetic` builds its maps, so its instance maps come back exactly. Where
    regions overlap the later one wins. Polygon parts outside the image are cut off at the border
    (the pixels are clipped, so a nucleus crossing the border keeps its true shape inside); an id can
    thus be missing when its region lies entirely outside the image or under later regions.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) with positive sizes, got {shape}.")
    instances = np.zeros(shape, np.int32)
    for k, (_, xy) in enumerate(read_monuseg_polygons(xml_path), start=1):
        rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=shape)
        instances[rr, cc] = k
    return instances


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not names:
        return "it is empty"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def _resolve_folders(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation folder) for ``root`` and ``split``; see :func:`monuseg_datalist`."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"MoNuSeg folder '{root}' does not exist or is not a folder; pass the folder that holds "
            f"'{TRAIN_DIR}' and '{TEST_DIR}' (or a folder of .tif images with their .xml annotations)."
        )
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if (root / TRAIN_DIR).is_dir() or (root / TEST_DIR).is_dir():
        if split == "train":
            base = root / TRAIN_DIR
            images, annotations = base / TRAIN_IMAGES, base / TRAIN_ANNOTATIONS
            for folder in (images, annotations):
                if not folder.is_dir():
                    raise FileNotFoundError(
                        f"MoNuSeg training folder '{folder}' is missing; the official training set has "
                        f"'{TRAIN_DIR}/{TRAIN_IMAGES}' (tif) and '{TRAIN_DIR}/{TRAIN_ANNOTATIONS}' (xml) "
                        f"under '{root}'. Unpack MoNuSeg Training Data.zip there."
                    )
            return images, annotations
        test = root / TEST_DIR
        if not test.is_dir():
            raise FileNotFoundError(
                f"MoNuSeg test folder '{test}' is missing; unpack MoNuSegTestData.zip into '{root}'."
            )
        return test, test
    if (root / TRAIN_IMAGES).is_dir() and (root / TRAIN_ANNOTATIONS).is_dir():
        return root / TRAIN_IMAGES, root / TRAIN_ANNOTATIONS
    # a folder holding images and XMLs side by side: split does not apply
    return root, root


def monuseg_datalist(root: str | os.PathLike, split: str = "train") -> list[dict[str, str]]:
    """``[{"image": tif path, "label": xml path, "name": stem}, ...]`` of one MoNuSeg split, sorted by name.

    ``root`` may be the folder holding the official ``MoNuSeg 2018 Training Data`` and ``MoNuSegTestData``
    (``split`` picks one), a folder holding ``Tissue Images`` and ``Annotations``, or a folder with images
    and XMLs side by side (for the last two ``split`` is not used). Every image must have its XML and
    every XML its image. Load labels with :class:`monai_mdm.transforms.LoadInstanceMaskd`.
    """
    root = Path(root).expanduser()
    image_dir, xml_dir = _resolve_folders(root, split)
    images = files_by_stem(image_dir, MONUSEG_IMAGE_EXTENSIONS)
    xmls = files_by_stem(xml_dir, (".xml",))
    if not images and not xmls:
        raise FileNotFoundError(
            f"no MoNuSeg images ({'/'.join(MONUSEG_IMAGE_EXTENSIONS)}) or .xml annotations in '{image_dir}'"
            + (f" / '{xml_dir}'" if xml_dir != image_dir else "")
            + f" ({_listing(image_dir)}); point root at the unpacked MoNuSeg data."
        )
    for stem in sorted(set(images) - set(xmls), key=natural_sort_key):
        raise FileNotFoundError(
            f"MoNuSeg image '{images[stem]}' has no annotation '{xml_dir / (stem + '.xml')}'; add the XML or "
            "remove the image."
        )
    for stem in sorted(set(xmls) - set(images), key=natural_sort_key):
        raise FileNotFoundError(
            f"MoNuSeg annotation '{xmls[stem]}' has no image '{image_dir / (stem + '.tif')}'; add the image or "
            "remove the XML."
        )
    names = sorted(images, key=natural_sort_key)
    logger.info(f"MoNuSeg: {len(names)} image/annotation pairs in '{image_dir}'.")
    return [{"image": str(images[n]), "label": str(xmls[n]), "name": n} for n in names]
