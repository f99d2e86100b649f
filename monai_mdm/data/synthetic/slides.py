"""A synthetic whole slide for tests and benchmarks: embedded GlaS / MoNuSeg tiles on glass, as a pyramidal TIFF.

The slide is a grid of cells, each either glass (near-white, grey noise) or one of a few embedded tiles
(:func:`monai_mdm.data.synthesize_tile`), written tile by tile with tifffile: a 20,000 px slide is generated in
the memory of a few tiles. Which cells hold tissue and which tile they show follows from ``seed`` alone, so
:func:`slide_region` gives any region of any level without reading the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np

from monai_mdm.utils import atomic_path

from .tiles import synthesize_tile

__all__ = ["SyntheticSlide", "write_synthetic_slide"]


class SyntheticSlide:
    """The content of a synthetic slide of ``shape`` (H, W): ``cell``-sized cells, a ``tissue`` fraction of them
    showing one of ``variants`` embedded ``kind`` tiles, the others glass."""

    def __init__(
        self, shape: tuple[int, int], cell: int = 256, tissue: float = 0.5, kind: str = "glas", seed: int = 0,
        variants: int = 6,
    ) -> None:  # fmt: skip
        self.shape, self.cell = (int(shape[0]), int(shape[1])), int(cell)
        rng = np.random.default_rng([seed, 1])
        grid = (math.ceil(self.shape[0] / cell), math.ceil(self.shape[1] / cell))
        # -1: glass, else the index of the tile the cell shows
        self.cells = np.where(rng.random(grid) < tissue, rng.integers(0, variants, grid), -1)
        if tissue > 0 and (self.cells < 0).all():  # a small slide still shows some tissue
            self.cells[grid[0] // 2, grid[1] // 2] = 0
        self.tiles = [synthesize_tile((cell, cell), np.random.default_rng([seed, 2, v]), kind)[0] for v in range(variants)]
        self.glass = np.clip(rng.normal(246, 3, (cell, cell, 1)), 0, 255).astype(np.uint8).repeat(3, axis=-1)

    def region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Level-0 pixels [top, top + height) x [left, left + width), clipped to the slide, (h, w, 3) uint8."""
        bottom, right = min(top + height, self.shape[0]), min(left + width, self.shape[1])
        out = np.empty((bottom - top, right - left, 3), np.uint8)
        c = self.cell
        for i in range(top // c, math.ceil(bottom / c)):
            for j in range(left // c, math.ceil(right / c)):
                index = self.cells[i, j]
                source = self.glass if index < 0 else self.tiles[index]
                y0, y1 = max(i * c, top), min((i + 1) * c, bottom)
                x0, x1 = max(j * c, left), min((j + 1) * c, right)
                out[y0 - top : y1 - top, x0 - left : x1 - left] = source[y0 - i * c : y1 - i * c, x0 - j * c : x1 - j * c]
        return out

    def level(self, factor: int) -> np.ndarray:
        """A whole level (subsampled by ``factor``): for small slides only (tests)."""
        return self.region(0, 0, *self.shape)[::factor, ::factor]


def _level_tiles(slide: SyntheticSlide, factor: int, tile: int) -> Iterator[np.ndarray]:
    height, width = (math.ceil(s / factor) for s in slide.shape)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            block = slide.region(top * factor, left * factor, tile * factor, tile * factor)[::factor, ::factor]
            out = np.full((tile, tile, 3), 255, np.uint8)
            out[: block.shape[0], : block.shape[1]] = block
            yield out


def write_synthetic_slide(
    path: str | os.PathLike,
    shape: tuple[int, int] = (512, 768),
    mpp: float | None = 0.62,
    levels: int = 3,
    tile: int = 256,
    subifds: bool = False,
    **content,
) -> SyntheticSlide:
    """Write a pyramidal RGB TIFF (``levels`` levels, each half the previous; zlib tiles) of a
    :class:`SyntheticSlide` (``content``: its ``cell``, ``tissue``, ``kind``, ``seed``, ``variants``); ``mpp``
    (level 0's microns per pixel) goes into the resolution tags, ``None`` writes none. Returns the content.

    The halved levels follow level 0 as reduced-resolution pages, the generic tiled TIFF pyramid that OpenSlide,
    QuPath and tifffile all read; ``subifds`` nests them as SubIFDs instead (the OME-TIFF layout, which OpenSlide
    sees as one level).
    """
    import tifffile

    slide = SyntheticSlide(shape, **content)
    with atomic_path(path, suffix=".tif") as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as writer:
        for level in range(levels):
            factor = 2**level
            options: dict = {"subfiletype": 1} if level else ({"subifds": levels - 1} if subifds else {})
            if mpp is not None:
                per_cm = 1e4 / (mpp * factor)
                options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            writer.write(
                _level_tiles(slide, factor, tile), shape=(*(math.ceil(s / factor) for s in shape), 3), dtype=np.uint8,
                tile=(tile, tile), photometric="rgb", compression="zlib", compressionargs={"level": 1}, metadata=None,
                **options,
            )  # fmt: skip
    return slide
