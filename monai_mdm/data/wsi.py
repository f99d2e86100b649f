"""Whole-slide images: a tile-wise tifffile reader, the level for a resolution, the tissue mask, and the
pyramidal label TIFF that slide inference writes.

MONAI's :class:`monai.data.TiffFileWSIReader` decodes the whole level for every patch it returns and counts
levels as TIFF pages (an SVS file's second page is a thumbnail, an OME / SubIFD pyramid has one page), so a
20,000 px slide costs gigabytes per patch. :class:`TiffSlideReader` keeps MONAI's reader interface and reads
the levels of the slide's pyramid series through tifffile's zarr store: only the tiles under a patch are decoded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from monai.data import CuCIMWSIReader, OpenSlideWSIReader, TiffFileWSIReader
from monai.data.wsi_reader import BaseWSIReader
from monai.utils import optional_import

from monai_mdm.utils import atomic_path

__all__ = [
    "SLIDE_BACKENDS", "TiffSlideReader", "open_slide", "select_level", "slide_reader_class", "tissue_mask",
    "write_label_pyramid",
]  # fmt: skip

SLIDE_BACKENDS = ("tifffile", "openslide", "cucim")
_MICRONS_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit INCH, CENTIMETER (1 = none: no resolution)
_BACKGROUND_RGB = 255  # what a patch reaching past the slide's border is filled with: empty glass


class TiffSlideReader(TiffFileWSIReader):
    """MONAI's tifffile slide reader that decodes only the tiles a patch covers (pyramidal TIFF, SVS, OME-TIFF).

    Levels are those of the file's first series (tifffile finds SVS, OME, SubIFD and generic reduced-resolution
    page pyramids); the resolution of a level is its own ``X/YResolution`` tags, else the SVS description's
    ``MPP``, else level 0's times the downsampling. A patch reaching past the border is filled with white
    (glass), as a scanner shows it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._arrays: dict[tuple[int, int], tuple[Any, Any]] = {}

    @staticmethod
    def _levels(wsi) -> list:
        return wsi.series[0].levels

    def get_level_count(self, wsi) -> int:
        return len(self._levels(wsi))

    def get_size(self, wsi, level: int) -> tuple[int, int]:
        series = self._levels(wsi)[level]
        return int(series.shape[series.axes.index("Y")]), int(series.shape[series.axes.index("X")])

    def get_downsample_ratio(self, wsi, level: int) -> float:
        return self.get_size(wsi, 0)[0] / self.get_size(wsi, level)[0]

    def level_mpp(self, wsi, level: int) -> tuple[float, float] | None:
        """(y, x) microns per pixel of ``level``, or None when the file does not record its resolution."""
        mpp = _tag_mpp(self._levels(wsi)[level].keyframe)
        if mpp is not None:
            return mpp
        if wsi.is_svs:
            from tifffile.tifffile import svs_description_metadata

            value = svs_description_metadata(wsi.pages[0].description).get("MPP")
            if value:
                ratio = self.get_downsample_ratio(wsi, level)
                return float(value) * ratio, float(value) * ratio
        if level > 0:
            base = self.level_mpp(wsi, 0)
            if base is not None:
                ratio = self.get_downsample_ratio(wsi, level)
                return base[0] * ratio, base[1] * ratio
        return None

    def get_mpp(self, wsi, level: int) -> tuple[float, float]:
        mpp = self.level_mpp(wsi, level)
        if mpp is None:
            raise ValueError(f"'{self.get_file_path(wsi)}' records no resolution (microns per pixel).")
        return mpp

    def _level_array(self, wsi, level: int):
        key = (id(wsi), level)
        if key not in self._arrays:
            zarr = optional_import("zarr")[0]
            self._arrays[key] = (wsi, zarr.open(wsi.series[0].aszarr(level=level), mode="r"))
        return self._arrays[key][1]

    def _get_patch(self, wsi, location, size, level, dtype, mode) -> np.ndarray:
        series = self._levels(wsi)[level]
        if series.axes not in ("YXS", "YX"):
            raise ValueError(
                f"'{self.get_file_path(wsi)}': level {level} has axes {series.axes!r}; slide inference reads "
                "2D RGB (YXS) or grey (YX) pyramids."
            )
        ratio = self.get_downsample_ratio(wsi, level)
        top, left = (round(c / ratio) for c in location)
        height, width = self.get_size(wsi, level)
        region = self._level_array(wsi, level)[
            max(top, 0) : min(top + size[0], height), max(left, 0) : min(left + size[1], width)
        ]
        if region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=-1)
        patch = np.full((size[0], size[1], region.shape[-1]), _BACKGROUND_RGB, dtype=dtype)
        patch[max(-top, 0) : max(-top, 0) + region.shape[0], max(-left, 0) : max(-left, 0) + region.shape[1]] = region
        patch = np.moveaxis(patch, -1, self.channel_dim)
        return np.take(patch, [0, 1, 2], self.channel_dim) if mode == "RGB" else patch


def _tag_mpp(page) -> tuple[float, float] | None:
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    per_unit = _MICRONS_PER_UNIT.get(int(unit.value) if unit is not None else 2)
    x, y = tags.get("XResolution"), tags.get("YResolution")
    if per_unit is None or x is None or y is None or not x.value[0] or not y.value[0]:
        return None
    return per_unit * y.value[1] / y.value[0], per_unit * x.value[1] / x.value[0]


def slide_reader_class(backend: str = "tifffile") -> type[BaseWSIReader]:
    """The MONAI slide reader of ``backend``: ``tifffile`` (:class:`TiffSlideReader`, no extra install),
    ``openslide`` (``pip install openslide-bin openslide-python``) or ``cucim`` (where installed)."""
    name = str(backend).lower()
    if name == "tifffile":
        return TiffSlideReader
    if name == "openslide":
        if not optional_import("openslide")[1]:
            raise ImportError(
                "--backend openslide needs OpenSlide: pip install openslide-bin openslide-python "
                "(or pip install 'monai-mdm[openslide]'); or use --backend tifffile."
            )
        return OpenSlideWSIReader
    if name == "cucim":
        if not optional_import("cucim")[1]:
            raise ImportError("--backend cucim needs cuCIM (pip install cucim-cu12); or use --backend tifffile.")
        return CuCIMWSIReader
    raise ValueError(f"--backend {backend!r} is not a slide reader; choose one of {', '.join(SLIDE_BACKENDS)}.")


def open_slide(path: str | os.PathLike, reader: BaseWSIReader) -> Any:
    """``reader.read(path)`` with errors that name the file and what the reader can open."""
    if not str(path):
        raise ValueError("--slide: no slide given; pass --slide <slide file> (.tif, .tiff, .svs).")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--slide: slide '{path}' not found; pass --slide <slide file>.")
    try:
        wsi = reader.read(str(path))
        reader.get_size(wsi, 0)
    except Exception as e:  # each backend raises its own error types for a file it cannot parse
        raise ValueError(
            f"--slide: '{path}' is not a slide the {reader.backend} backend can read ({type(e).__name__}: {e}). "
            f"It reads {', '.join('.' + s for s in reader.supported_suffixes)}; convert the slide to a pyramidal "
            "TIFF or choose another --backend."
        ) from e
    return wsi


def _mpp_or_none(reader: BaseWSIReader, wsi, level: int) -> float | None:
    try:
        mpp = reader.level_mpp(wsi, level) if isinstance(reader, TiffSlideReader) else reader.get_mpp(wsi, level)
    except (ValueError, KeyError):
        return None
    return None if mpp is None or not all(m > 0 for m in mpp) else float(np.mean(mpp))


def select_level(
    reader: BaseWSIReader, wsi, mpp: float | None = None, level: int | None = None, mpp_rtol: float = 0.25
) -> tuple[int, float | None]:
    """The level to run at and its microns per pixel: ``level`` when given, else the level nearest ``mpp``.

    ``mpp_rtol`` is the relative difference accepted: scanners at "20x" record 0.46-0.5 um/px where GlaS was
    taken at 0.62, and the model sees the nearest level rather than a resampled one.
    """
    path, count = reader.get_file_path(wsi), reader.get_level_count(wsi)
    sizes = ", ".join(f"{n}: {'x'.join(map(str, reader.get_size(wsi, n)))}" for n in range(count))
    if level is not None:
        if not 0 <= int(level) < count:
            raise ValueError(f"--level {level}: '{path}' has levels 0..{count - 1} ({sizes} px).")
        return int(level), _mpp_or_none(reader, wsi, int(level))
    if mpp is None or not float(mpp) > 0:
        raise ValueError(f"--mpp {mpp}: give the microns per pixel to run at (or --level; '{path}': {sizes} px).")
    available = [_mpp_or_none(reader, wsi, n) for n in range(count)]
    if all(m is None for m in available):
        raise ValueError(
            f"--mpp {mpp}: '{path}' records no resolution (microns per pixel), so no level can be chosen by "
            f"--mpp; give the level to read with --level (0 = full resolution; levels {sizes} px)."
        )
    best = min((n for n, m in enumerate(available) if m is not None), key=lambda n: abs(math.log(available[n] / mpp)))
    if abs(available[best] - mpp) > mpp_rtol * mpp:
        found = ", ".join(f"{n}: {m:.3g}" for n, m in enumerate(available) if m is not None)
        raise ValueError(
            f"--mpp {mpp}: '{path}' has no level within {mpp_rtol:.0%} of {mpp} um/px (levels {found} um/px). "
            "The model was trained at --mpp's default; pass one of these with --mpp (or --level), or widen --mpp_rtol."
        )
    return best, available[best]


def tissue_mask(
    reader: BaseWSIReader, wsi, threshold: float | None = None, max_size: int = 2048, min_threshold: float = 0.05
) -> tuple[np.ndarray, float]:
    """Where the slide holds tissue, from its lowest-resolution level: (mask (h, w) bool, level-0 px per mask px).

    Stained tissue is coloured and glass is grey-white, so the mask is HSV saturation above ``threshold``
    (default: Otsu's threshold of the slide, at least ``min_threshold`` so an empty slide finds nothing), with the
    holes tissue encloses (gland lumens) filled. The
    level is read in bands of rows and subsampled to at most ``max_size`` px a side, so memory stays small even
    for a slide without sub-resolution levels.
    """
    level = reader.get_level_count(wsi) - 1
    height, width = reader.get_size(wsi, level)
    step = max(1, math.ceil(max(height, width) / max_size))
    ratio = reader.get_downsample_ratio(wsi, level)
    band = step * max(1, 4096 // step)
    rows = []
    for top in range(0, height, band):
        size = (min(band, height - top), width)
        patch, _ = reader.get_data(wsi, location=(round(top * ratio), 0), size=size, level=level)
        rgb = np.asarray(patch)[:3, ::step, ::step].astype(np.float32)
        brightest = rgb.max(axis=0)
        rows.append((brightest - rgb.min(axis=0)) / np.maximum(brightest, 1.0))
    saturation = np.concatenate(rows, axis=0)
    if threshold is None:
        from skimage.filters import threshold_otsu

        threshold = max(float(threshold_otsu(saturation)) if np.ptp(saturation) > 0 else 1.0, min_threshold)
    # a gland's lumen is white but inside tissue: fill what tissue encloses, and close gaps of a few pixels
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(saturation > threshold, np.ones((3, 3)), border_value=0))
    if not mask.any():
        raise ValueError(
            f"'{reader.get_file_path(wsi)}': the tissue mask found no tissue (no pixel of level {level}, "
            f"{height}x{width} px, has saturation above {threshold:.3g}). Check that it is a stained RGB slide, or "
            "lower --tissue_threshold (0 runs every window)."
        )
    return mask, ratio * step


def _pyramid_shapes(shape: Sequence[int], tile: int) -> list[tuple[int, int]]:
    """Level 0 and its halvings down to the first that fits in one tile."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > tile:
        shapes.append(tuple(math.ceil(s / 2) for s in shapes[-1]))  # type: ignore[arg-type]
    return shapes


def _tiles(labels: np.ndarray, shape: tuple[int, int], factor: int, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of ``labels`` subsampled by ``factor`` (nearest: a label map has no in-between values)."""
    for top in range(0, shape[0], tile):
        for left in range(0, shape[1], tile):
            block = labels[top * factor : (top + tile) * factor : factor, left * factor : (left + tile) * factor : factor]
            out = np.zeros((tile, tile), np.uint8)
            out[: block.shape[0], : block.shape[1]] = block
            yield out


def write_label_pyramid(
    path: str | os.PathLike,
    labels: np.ndarray,
    mpp: float | None = None,
    tile: int = 256,
    level0_tiles: Callable[[], Iterator[np.ndarray]] | None = None,
) -> Path:
    """Write a label map (H, W) uint8 as a tiled pyramidal TIFF (zlib; the halved levels follow as
    reduced-resolution pages, the generic TIFF pyramid OpenSlide, QuPath and tifffile read) atomically.

    ``mpp`` becomes the resolution tags (pixels per centimetre), so a viewer (QuPath) places the mask on the
    slide. ``labels`` may be a memory map: it is read tile by tile. ``level0_tiles``, when given, yields
    level 0's tiles instead (e.g. computing them while filling ``labels``); the sub-levels are read from
    ``labels`` afterwards.
    """
    import tifffile

    shapes = _pyramid_shapes(labels.shape, tile)
    options: dict[str, Any] = {
        "dtype": np.uint8, "tile": (tile, tile), "photometric": "minisblack", "compression": "zlib",
        "compressionargs": {"level": 1}, "metadata": None,
    }  # fmt: skip
    with atomic_path(path, suffix=".tif") as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as writer:
        for level, shape in enumerate(shapes):
            factor = 2**level
            if mpp is not None:
                per_cm = 1e4 / (mpp * factor)
                options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            tiles = level0_tiles() if level == 0 and level0_tiles is not None else _tiles(labels, shape, factor, tile)
            writer.write(tiles, shape=shape, **options, subfiletype=1 if level else 0)
    return Path(path)
