"""Whole-slide segmentation: MONAI's patch inferer over a slide file, tissue only, into a pyramidal label TIFF.

The pieces are MONAI's: :class:`monai.inferers.WSISlidingWindowSplitter` reads windows from the file at the chosen
level (through :class:`monai_mdm.data.TiffSlideReader` by default, which decodes only the tiles under a window),
:class:`monai.inferers.PatchInferer` batches them through the network, and :class:`monai.inferers.ZarrAvgMerger`
accumulates the scores on disk, so memory does not grow with the slide. The windows sit where
:class:`monai.inferers.SlidingWindowInferer` puts them on a tile (step ``int(window * (1 - overlap))``), and each
window's scores are weighted by the same Gaussian importance map, carried in one extra channel: the average the
merger takes then equals the sliding-window blend. Windows without tissue in the low-resolution mask are never
run; their pixels are background.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import PatchInferer, WSISlidingWindowSplitter, ZarrAvgMerger
from monai.utils import optional_import
from torch import nn

from monai_mdm.data.instance_export import write_slide_nuclei
from monai_mdm.data.wsi import open_slide, select_level, slide_reader_class, tissue_mask, write_label_pyramid
from monai_mdm.transforms.array import INSTANCE_METHODS
from monai_mdm.utils import prepare_output_folder

__all__ = ["SlideInferer"]

logger = logging.getLogger(__name__)


class _GaussianWeighted(nn.Module):
    """The network's scores times the sliding window's Gaussian importance map, and the map as a last channel."""

    def __init__(self, network: nn.Module, window: int, device: torch.device) -> None:
        super().__init__()
        self.network = network
        self.weights = compute_importance_map((window, window), mode="gaussian", sigma_scale=0.125, device=device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.network(images)
        weights = self.weights.to(scores.dtype).expand(scores.shape[0], 1, *scores.shape[2:])
        return torch.cat([scores * weights, weights], dim=1).float().cpu()


class SlideInferer:
    """Segment a whole slide into ``<output_dir>/<slide name>_seg.tif``, a tiled pyramidal label TIFF.

    Args:
        mpp: microns per pixel to run at (the training data's); the nearest level within ``mpp_rtol`` is used.
        level: run at this level instead (for slides that record no resolution).
        backend: the slide reader: ``tifffile`` (default), ``openslide`` or ``cucim``.
        window_size, overlap, batch_size: the sliding windows, as the tile inference uses them.
        mpp_rtol: relative difference accepted between ``mpp`` and a level's resolution.
        tissue_threshold: saturation above which the low-resolution mask counts tissue (None: Otsu's; 0 runs
            every window).
        tile_size: tile side of the output TIFF.
        device: where the network runs (default: that of its parameters).
        instances: ``watershed`` or ``connected_components`` also writes the nuclei of a
            :data:`~monai_mdm.transforms.NUCLEUS_CLASSES` model as ``<slide name>_nuclei.geojson`` (QuPath
            detections in level-0 pixels); ``none`` (default) writes only the label TIFF.
        label_values: the value the TIFF holds for each class (default: the class index); MoNuSeg's ``[0, 1, 1]``
            writes the nucleus mask QuPath users expect, interior and boundary alike.
        nucleus_tile, nucleus_margin: the nuclei are post-processed in tiles of this side with this margin (at
            least one nucleus diameter), so memory does not grow with the slide.
    """

    def __init__(
        self,
        mpp: float | None = None,
        level: int | None = None,
        backend: str = "tifffile",
        window_size: int = 256,
        overlap: float = 0.2,
        batch_size: int = 4,
        mpp_rtol: float = 0.25,
        tissue_threshold: float | None = None,
        tile_size: int = 256,
        device: str | torch.device | None = None,
        instances: str | None = None,
        label_values: Sequence[int] | None = None,
        nucleus_tile: int = 1024,
        nucleus_margin: int = 64,
    ) -> None:
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"--overlap {overlap}: must be in [0, 1).")
        if instances not in (None, "none", *INSTANCE_METHODS):
            raise ValueError(f"--instances must be one of {', '.join(INSTANCE_METHODS)}, none; got {instances!r}.")
        self.instances = None if instances in (None, "none") else instances
        self.label_values = None if label_values is None else np.asarray(label_values, dtype=np.uint8)
        self.nucleus_tile, self.nucleus_margin = int(nucleus_tile), int(nucleus_margin)
        self.mpp, self.level, self.mpp_rtol = mpp, level, float(mpp_rtol)
        self.reader_class = slide_reader_class(backend)
        self.window, self.overlap, self.batch_size = int(window_size), float(overlap), int(batch_size)
        self.tissue_threshold, self.tile_size, self.device = tissue_threshold, int(tile_size), device

    def _keep_tissue(self, mask: np.ndarray, scale: float, counts: dict[str, int]):
        """The splitter's filter: a window runs when the mask shows tissue anywhere under it."""

        def keep(patch: torch.Tensor, location) -> bool:
            top, left = (int(c // scale) for c in location)
            bottom, right = (math.ceil((c + self.window) / scale) for c in location)
            found = bool(mask[max(top, 0) : bottom, max(left, 0) : right].any())
            counts["run" if found else "skipped"] += 1
            return found

        return keep

    def __call__(self, slide: str, network: nn.Module, output_dir: str) -> dict[str, Any]:
        """Segment ``slide`` with ``network`` (images in [-1, 1] -> class scores) into ``output_dir``.

        The working files and the TIFF being written live in a hidden folder / temporary name beside the output,
        so a slide that fails leaves nothing under the final name. Returns what was done (level, windows, path).
        """
        out = prepare_output_folder(output_dir)
        final = out / f"{Path(str(slide)).stem}_seg.tif"
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=out))
        nuclei = out / f"{Path(str(slide)).stem}_nuclei.geojson"
        try:
            scores, info = self.blend(slide, network, scratch)
            if self.label_values is not None and len(self.label_values) < scores.shape[1] - 1:
                raise ValueError(
                    f"--label_values {self.label_values.tolist()}: one value per class needed, the network "
                    f"predicts {scores.shape[1] - 1}."
                )
            labels = np.lib.format.open_memmap(scratch / "labels.npy", "w+", np.uint8, info["shape"])
            for _ in self._label_tiles(scores, labels):
                pass
            if self.instances is not None:
                info["nuclei"] = write_slide_nuclei(
                    nuclei, labels, self.instances, scale=info["downsample"], tile=self.nucleus_tile,
                    margin=self.nucleus_margin,
                )  # fmt: skip
                info["nuclei_output"] = str(nuclei)
            if self.label_values is not None:
                for top in range(0, labels.shape[0], self.tile_size):
                    labels[top : top + self.tile_size] = self.label_values[labels[top : top + self.tile_size]]
            write_label_pyramid(final, labels, info["mpp"], self.tile_size)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        logger.info(
            "%s: level %d (%s um/px, %dx%d px), %d windows on tissue, %d skipped -> %s", slide, info["level"],
            "unknown" if info["mpp"] is None else f"{info['mpp']:.3g}", *info["shape"], info["run"], info["skipped"],
            final,
        )  # fmt: skip
        return {"output": str(final), **info}

    def blend(self, slide: str, network: nn.Module, folder: str | Path) -> tuple[Any, dict[str, Any]]:
        """The merged scores of ``slide``, a zarr array (1, classes + 1, H, W) in ``folder``: the Gaussian-weighted
        score sums, then the summed weight (0 or NaN where no window ran), each divided by the window count.
        Their ratio is the sliding-window blend; ``info`` holds the level, its mpp and shape, windows run/skipped."""
        reader = self.reader_class()
        wsi = open_slide(slide, reader)
        level, mpp = select_level(reader, wsi, self.mpp, self.level, self.mpp_rtol)
        height, width = reader.get_size(wsi, level)
        if self.tissue_threshold is not None and float(self.tissue_threshold) <= 0:
            mask, scale = np.ones((1, 1), bool), float(max(height, width) + self.window)
        else:
            mask, mask_ratio = tissue_mask(reader, wsi, self.tissue_threshold)
            scale = mask_ratio / reader.get_downsample_ratio(wsi, level)  # level px per mask px
        device = self.device or next(network.parameters()).device
        with torch.inference_mode():
            channels = int(network(torch.zeros(1, 3, self.window, self.window, device=device)).shape[1]) + 1
        folder = Path(folder)
        _check_free_disk(folder, slide, (height, width), channels, float(mask.mean()))
        counts = {"run": 0, "skipped": 0}
        zarr = optional_import("zarr")[0]
        step = int(self.window * (1 - self.overlap)) or self.window  # where SlidingWindowInferer steps
        with warnings.catch_warnings():  # MONAI warns that tifffile reads whole levels; TiffSlideReader does not
            warnings.filterwarnings("ignore", "WSIReader with tifffile backend")
            splitter = WSISlidingWindowSplitter(
                self.window, overlap=self.window - step, filter_fn=self._keep_tissue(mask, scale, counts),
                reader=self.reader_class, level=level,
            )  # fmt: skip
        inferer = PatchInferer(
            splitter, merger_cls=ZarrAvgMerger, batch_size=self.batch_size,
            preprocessing=lambda p: p.to(device=device, dtype=torch.float32) / 127.5 - 1.0,
            store=zarr.storage.LocalStore(folder / "scores.zarr"),
            value_store=zarr.storage.LocalStore(folder / "sums.zarr"),
            count_store=zarr.storage.LocalStore(folder / "counts.zarr"),
            chunks=(1, channels, self.window, self.window),
        )  # fmt: skip
        weighted = _GaussianWeighted(network, self.window, torch.device(device))
        with torch.inference_mode(), np.errstate(invalid="ignore", divide="ignore"):  # unvisited pixels: 0 / 0
            scores = inferer(str(slide), weighted)
        if counts["run"] == 0:
            raise ValueError(f"'{slide}': no window of the slide holds tissue; lower --tissue_threshold.")
        downsample = float(reader.get_downsample_ratio(wsi, level))
        return scores, {"level": level, "mpp": mpp, "downsample": downsample, "shape": (height, width), **counts}

    def _label_tiles(self, scores, labels: np.ndarray) -> Iterator[np.ndarray]:
        """Level-0 tiles of the argmax of the blended scores (background where no window ran), kept in ``labels``."""
        tile = self.tile_size
        height, width = labels.shape
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                block = np.asarray(scores[0, :, top : top + tile, left : left + tile])
                covered = block[-1] > 0  # the summed Gaussian weight; NaN where no window ran
                label = np.where(covered, block[:-1].argmax(axis=0), 0).astype(np.uint8)
                labels[top : top + tile, left : left + tile] = label
                out = np.zeros((tile, tile), np.uint8)
                out[: label.shape[0], : label.shape[1]] = label
                yield out


def _check_free_disk(folder: Path, slide: str, shape: tuple[int, int], channels: int, tissue: float) -> None:
    """Refuse a slide whose output and working files do not fit on the disk, before hours of inference."""
    pixels = shape[0] * shape[1]
    # scores and sums (float32) and counts (uint8) of every channel under the tissue windows, the label map,
    # and at most the uncompressed pyramid
    need = tissue * pixels * channels * 9 + pixels + pixels * 4 / 3
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(
            f"--output_dir '{folder}': {free / 1e9:.2f} GB free, but segmenting '{slide}' ({shape[0]}x{shape[1]} px "
            f"at the chosen level) needs up to {need / 1e9:.2f} GB; free space or choose another --output_dir."
        )
