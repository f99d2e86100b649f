"""Deterministic synthetic H&E-like histology tiles written in the official GlaS and MoNuSeg layouts.

The tiles are rendered with a Beer-Lambert stain model: two concentration maps (hematoxylin, eosin)
are turned into optical density with stain vectors and then into RGB, then blurred and given sensor
noise. Images vary between cases as in the real sets (``docs/synthetic_data.md``): each GlaS slide
(patient) has its own stain and gland size, some slides only give test images, the grade drives the
gland morphology, and blur, tissue folds, tissue edges and fat vary per image; each MoNuSeg tile has
its own stain and an organ (named by the TCGA site code of its file name) setting its nuclei. Labelled structures are built as polygons first and the picture is
painted from them, so the instance maps are exact: MoNuSeg nuclei are rasterised with
``skimage.draw.polygon`` from the very vertices written to the XML (snapped to a 1/4-pixel grid, so
the text round-trips exactly), hence a reader that rasterises the XML the same way gets the same
instance map back. GlaS glands are irregular blobs with an epithelial rim (basal nuclei, goblet
cells when benign; thick, stratified, vesicular nuclei when malignant) around a pale lumen, in an
eosin-rich stroma with unlabelled stromal nuclei.

Nothing here downloads anything: the demo data, the tests and the bundles can run offline.

Examples::

    python -m monai_mdm.data.synthetic --out demo_data --seed 0

    from monai_mdm.data import write_demo_data
    paths = write_demo_data("demo_data")   # {"glas": .../GlaS, "monuseg": .../MoNuSeg}
"""

from __future__ import annotations

import argparse
import sys
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours
from skimage.segmentation import find_boundaries

from monai_mdm.data import monuseg
from monai_mdm.utils import atomic_write

__all__ = [
    "GLAS_GRADE_HEADER",
    "MONUSEG_ORGANS",
    "MONUSEG_TEST_DIR",
    "MONUSEG_TRAIN_DIR",
    "SyntheticTile",
    "make_sample",
    "monuseg_organ",
    "synthesize_tile",
    "write_demo_data",
    "write_glas",
    "write_monuseg",
]

GLAS_GRADE_HEADER = ("name", "patient ID", "grade (GlaS)", "grade (Sirinukunwattana et al. 2015)")
# the folder names the MoNuSeg reader looks for (one definition: data/monuseg.py)
MONUSEG_TRAIN_DIR, MONUSEG_TEST_DIR = monuseg.TRAIN_DIR, monuseg.TEST_DIR
MONUSEG_TRAIN_IMAGES, MONUSEG_TRAIN_ANNOTATIONS = monuseg.TRAIN_IMAGES, monuseg.TRAIN_ANNOTATIONS
MONUSEG_MICRONS_PER_PIXEL = 0.252

# Unit optical-density vectors (R, G, B) of the two stains, of the order of those that stain
# estimation methods report for real H&E slides; jittered per tile.
_H_OD = np.array([0.58, 0.72, 0.38], dtype=np.float32)
_E_OD = np.array([0.12, 0.88, 0.46], dtype=np.float32)

# Polygon vertices are snapped to this grid; multiples of 1/4 are exact in binary floating point
# and in the 6-decimal text of the XML files, so writer and reader rasterise identical numbers.
_VERTEX_STEP = 0.25

_KINDS = ("glas", "monuseg")
_GLAS_SPLITS = ("train", "testA", "testB")
_MONUSEG_SPLITS = ("train", "test")
_BENIGN_SUBGRADES = ("healthy", "adenomatous")
_MALIGNANT_SUBGRADES = (
    "moderately differentiated",
    "moderately-to-poorly differentiated",
    "poorly differentiated",
)


@dataclass
class SyntheticTile:
    """One rendered tile.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        instances: ``(H, W)`` int32 instance map, 0 background, objects numbered 1..K.
        polygons: K arrays of shape ``(N, 2)`` holding ``(x, y)`` = (column, row) vertices of the
            objects. For MoNuSeg tiles object k is exactly ``skimage.draw.polygon(y, x, shape)`` of
            ``polygons[k - 1]``; GlaS glands are filled by a scanline rule that can differ from it
            on boundary pixels (their ground truth is the annotation image, not the polygon).
        grade: ``"benign"`` or ``"malignant"`` for GlaS tiles, ``None`` for MoNuSeg tiles.
        stain: the stain the image was rendered with (its slide's, with per-image jitter).
        slide: GlaS patient / slide number (the ``patient ID`` of ``Grade.csv``); ``None`` otherwise.
        organ: MoNuSeg organ (a key of :data:`MONUSEG_ORGANS`); ``None`` for GlaS tiles.
    """

    image: np.ndarray
    instances: np.ndarray
    polygons: list[np.ndarray] = field(default_factory=list)
    grade: str | None = None
    stain: _Stain | None = None
    slide: int | None = None
    organ: str | None = None


# ----------------------------------------------------------------------------------------------
# low-level helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``sigma`` pixels.

    Large sigmas are computed on a coarse grid and upsampled (linear), which keeps the cost
    independent of sigma.
    """
    h, w = shape
    factor = max(1, int(sigma // 3))
    small = (h // factor + 2, w // factor + 2)
    noise = rng.standard_normal(small).astype(np.float32)
    noise = ndi.gaussian_filter(noise, sigma / factor, mode="wrap")
    if factor > 1:
        noise = ndi.zoom(noise, factor, order=1)
    noise = noise[:h, :w]
    noise -= noise.mean()
    noise /= noise.std() + 1e-6
    return noise


def _fibres(rng: np.random.Generator, shape: tuple[int, int], orientation: np.ndarray) -> np.ndarray:
    """Wavy collagen fibres traced along a smooth orientation field, values in about [0, 1]."""
    h, w = shape
    n = int(h * w / 90)
    steps = 28
    y = rng.uniform(0, h, n)
    x = rng.uniform(0, w, n)
    weight = rng.uniform(0.4, 1.0, n)
    wiggle = rng.normal(0.0, 0.25, (steps, n))
    acc = np.zeros(shape, np.float32)
    for s in range(steps):
        iy = y.astype(np.intp)
        ix = x.astype(np.intp)
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        if not inside.any():
            break
        np.add.at(acc, (iy[inside], ix[inside]), weight[inside])
        th = orientation[np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)] + wiggle[s]
        y = y + 1.3 * np.sin(th)
        x = x + 1.3 * np.cos(th)
    acc = ndi.gaussian_filter(acc, 0.7)
    return np.clip(acc / (np.percentile(acc, 99) + 1e-6), 0.0, 1.0)


def _snap(values: np.ndarray, upper: float) -> np.ndarray:
    """Clip coordinates into ``[0, upper]`` and snap them to the vertex grid."""
    return np.clip(np.round(values / _VERTEX_STEP) * _VERTEX_STEP, 0.0, upper)


def _harmonics(rng: np.random.Generator, n: int, irregularity) -> tuple[np.ndarray, np.ndarray]:
    """Random amplitudes and phases of the radial harmonics 2..5 of ``n`` blobs."""
    k = np.arange(2, 6, dtype=np.float64)
    amp = np.asarray(irregularity, dtype=np.float64).reshape(-1, 1) * rng.standard_normal((n, 4)) / k
    phase = rng.uniform(0.0, 2.0 * np.pi, (n, 4))
    return amp, phase


def _radial_profile(theta: np.ndarray, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """``1 + sum_k amp_k cos(k theta + phase_k)``, clipped; theta ``(N, M)``, amp/phase ``(N, 4)``."""
    k = np.arange(2, 6, dtype=np.float64)
    rel = 1.0 + np.sum(amp[:, :, None] * np.cos(k[None, :, None] * theta[:, None, :] + phase[:, :, None]), axis=1)
    return np.clip(rel, 0.55, 1.5)


def _blob_vertices(
    rng: np.random.Generator,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    phi: np.ndarray,
    irregularity,
    n_vertices: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(N, n_vertices)`` (y, x) of N star-shaped irregular ellipses.

    ``a`` is the semi-axis along direction ``phi`` (angle from the x/column axis towards +y/row),
    ``b`` the one across it; the radius is modulated by a few random low harmonics.
    """
    cy, cx, a, b, phi = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (cy, cx, a, b, phi))
    n = cy.size
    t = np.broadcast_to(np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False), (n, n_vertices))
    rel = _radial_profile(t, *_harmonics(rng, n, irregularity))
    u = np.cos(t) * a[:, None] * rel
    v = np.sin(t) * b[:, None] * rel
    cos_p, sin_p = np.cos(phi)[:, None], np.sin(phi)[:, None]
    return cy[:, None] + u * sin_p + v * cos_p, cx[:, None] + u * cos_p - v * sin_p


def _offset_radially(y: np.ndarray, x: np.ndarray, cy: float, cx: float, delta) -> tuple[np.ndarray, np.ndarray]:
    """Move every vertex along its ray from the centre by ``delta`` pixels (negative = inwards)."""
    dy, dx = y - cy, x - cx
    r = np.hypot(dy, dx) + 1e-6
    scale = np.maximum(r + delta, 0.5) / r
    return cy + dy * scale, cx + dx * scale


def _paint_ellipses(
    rng: np.random.Generator,
    target: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    phi: np.ndarray,
    strength: np.ndarray,
    irregularity: float = 0.08,
    vesicular: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    allowed_value: np.ndarray | None = None,
) -> None:
    """Paint many irregular filled ellipses at once into ``target`` (running maximum).

    Vectorised over a small window around each ellipse. ``vesicular`` (0..1) pales the centre
    (open chromatin). If ``allowed`` is given, ellipse ``i`` only paints pixels where
    ``allowed == allowed_value[i]`` (or where ``allowed`` is True when ``allowed_value`` is None).
    """
    n = int(np.size(cy))
    if n == 0:
        return
    h, w = target.shape
    cy, cx, a, b, phi, strength = (np.asarray(v, dtype=np.float32).reshape(-1) for v in (cy, cx, a, b, phi, strength))
    amp, phase = _harmonics(rng, n, irregularity)
    r_max = 1.0 + 1.5 * irregularity
    half = int(np.ceil(float(a.max()) * r_max)) + 1
    off = np.arange(-half, half + 1, dtype=np.float32)
    # window pixels in ellipse coordinates; keep only those that may be inside before the details
    ry0, rx0 = np.rint(cy), np.rint(cx)
    ly = (ry0 - cy)[:, None, None] + off[None, :, None]
    lx = (rx0 - cx)[:, None, None] + off[None, None, :]
    cos_p, sin_p = np.cos(phi)[:, None, None], np.sin(phi)[:, None, None]
    u = (lx * cos_p + ly * sin_p) / a[:, None, None]
    v = (-lx * sin_p + ly * cos_p) / b[:, None, None]
    rho2 = u * u + v * v
    i, j, k = np.nonzero(rho2 <= r_max * r_max)
    yy = (ry0[i] + off[j]).astype(np.intp)
    xx = (rx0[i] + off[k]).astype(np.intp)
    u, v, rho = u[i, j, k], v[i, j, k], np.sqrt(rho2[i, j, k])
    # radius modulation by the 2nd and 3rd harmonics of the polar angle, without trigonometry
    c = u / (rho + 1e-6)
    s = v / (rho + 1e-6)
    cp, sp = np.cos(phase[i, :2]).astype(np.float32), np.sin(phase[i, :2]).astype(np.float32)
    rel = (
        1.0
        + amp[i, 0] * ((c * c - s * s) * cp[:, 0] - (2.0 * c * s) * sp[:, 0])
        + amp[i, 1] * (c * (4.0 * c * c - 3.0) * cp[:, 1] - s * (3.0 - 4.0 * s * s) * sp[:, 1])
    )
    rel = np.clip(rel, 0.6, r_max)
    keep = (rho <= rel) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    i, yy, xx, rho, rel = i[keep], yy[keep], xx[keep], rho[keep], rel[keep]
    values = strength[i]
    if vesicular is not None:
        ves = np.asarray(vesicular, dtype=np.float32).reshape(-1)[i]
        values = values * (1.0 - ves * np.clip(1.0 - rho / rel, 0.0, 1.0) ** 1.5)
    if allowed is not None:
        if allowed_value is None:
            keep = allowed[yy, xx]
        else:
            keep = allowed[yy, xx] == np.asarray(allowed_value).reshape(-1)[i]
        yy, xx, values = yy[keep], xx[keep], values[keep]
    np.maximum.at(target, (yy, xx), values.astype(target.dtype))


def _fill_polygon(y: np.ndarray, x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the pixel centres inside a polygon (even-odd rule, one scanline per row).

    Used for the large gland polygons, where it is much faster than a per-pixel test; the MoNuSeg
    nuclei, whose polygons go into the XML, are rasterised with ``skimage.draw.polygon`` instead.
    """
    h, w = shape
    mask = np.zeros(shape, bool)
    r0 = max(int(np.ceil(y.min())), 0)
    r1 = min(int(np.floor(y.max())), h - 1)
    if r1 < r0:
        return mask
    rows = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    y0, x0 = y[None, :], x[None, :]
    y1, x1 = np.roll(y, -1)[None, :], np.roll(x, -1)[None, :]
    crosses = (y0 <= rows) != (y1 <= rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
    rr, ee = np.nonzero(crosses)
    # a crossing at xc toggles "inside" for every pixel centre at column >= xc
    col = np.clip(np.ceil(xc[rr, ee]), 0, w).astype(np.intp)
    toggles = np.zeros((r1 - r0 + 1, w + 1), np.int16)
    np.add.at(toggles, (rr, col), 1)
    mask[r0 : r1 + 1] = (np.cumsum(toggles, axis=1)[:, :w] % 2).astype(bool)
    return mask


@dataclass
class _Stain:
    h_vec: np.ndarray
    e_vec: np.ndarray
    h_gain: float
    e_gain: float
    background: np.ndarray
    blur: float = 0.7
    noise: float = 3.0


def _unit(vec: np.ndarray) -> np.ndarray:
    out = np.clip(vec, 0.02, None)
    return (out / np.linalg.norm(out)).astype(np.float32)


def _slide_stain(rng: np.random.Generator) -> _Stain:
    """Stain of one slide: H and E vectors drawn around the reference ones, and their strengths.

    Slides of one data set differ in hue (the vectors turn by up to ~10 degrees) and in intensity
    (under- to over-stained: each stain's strength spans ~0.55x-1.6x), as between labs and batches.
    """
    return _Stain(
        h_vec=_unit(_H_OD + rng.normal(0.0, 0.09, 3)),
        e_vec=_unit(_E_OD + rng.normal(0.0, 0.09, 3)),
        h_gain=float(np.exp(rng.uniform(np.log(0.55), np.log(1.6)))),
        e_gain=float(np.exp(rng.uniform(np.log(0.5), np.log(1.5)))),
        background=np.abs(rng.normal(0.05, 0.03, 3)).astype(np.float32),
    )


def _image_stain(rng: np.random.Generator, slide: _Stain) -> _Stain:
    """One image of a slide: the slide's stain with small jitter, its own focus and sensor noise.

    About one image in five is out of focus (blur sigma 1.2-2.4 px instead of 0.5-0.9).
    """
    blurred = rng.uniform() < 0.2
    return _Stain(
        h_vec=_unit(slide.h_vec + rng.normal(0.0, 0.012, 3)),
        e_vec=_unit(slide.e_vec + rng.normal(0.0, 0.012, 3)),
        h_gain=slide.h_gain * float(np.exp(rng.normal(0.0, 0.05))),
        e_gain=slide.e_gain * float(np.exp(rng.normal(0.0, 0.05))),
        background=np.clip(slide.background + rng.normal(0.0, 0.005, 3), 0.0, None).astype(np.float32),
        blur=float(rng.uniform(1.2, 2.4) if blurred else rng.uniform(0.5, 0.9)),
        noise=float(rng.uniform(2.0, 4.5)),
    )


@dataclass
class _Slide:
    """What the images of one GlaS slide (patient) share: the stain and the gland size."""

    stain: _Stain
    gland_scale: float


def _random_slide(rng: np.random.Generator) -> _Slide:
    return _Slide(_slide_stain(rng), float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))))


def _compose(rng: np.random.Generator, hema: np.ndarray, eosin: np.ndarray, stain: _Stain) -> np.ndarray:
    """Concentration maps -> blurred, noisy uint8 RGB through the Beer-Lambert law."""
    od = (
        (stain.h_gain * hema)[..., None] * stain.h_vec
        + (stain.e_gain * eosin)[..., None] * stain.e_vec
        + stain.background
    )
    rgb = 255.0 * np.exp(-od)
    rgb = ndi.gaussian_filter(rgb, (stain.blur, stain.blur, 0.0))
    rgb += rng.normal(0.0, stain.noise, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _stroma(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eosin-rich connective tissue with wavy fibres and pale loose gaps.

    Returns (hematoxylin, eosin, fibre orientation field).
    """
    short = min(shape)
    orientation = (rng.uniform(0.0, np.pi) + 1.2 * _smooth_noise(rng, shape, short / 4.0)).astype(np.float32)
    fib = _fibres(rng, shape, orientation)
    low = _smooth_noise(rng, shape, short / 8.0)
    mid = _smooth_noise(rng, shape, 2.0)
    eosin = rng.uniform(0.45, 0.75) * (0.75 + 0.1 * low + 0.5 * fib + 0.05 * mid)
    hema = rng.uniform(0.05, 0.16) * (1.0 + 0.3 * mid)
    gaps_field = 0.8 * _smooth_noise(rng, shape, short / 14.0) - 0.6 * fib
    gap = np.clip((gaps_field - rng.uniform(0.8, 1.5)) / 0.4, 0.0, 1.0)
    eosin = eosin * (1.0 - 0.85 * gap)
    hema = hema * (1.0 - 0.7 * gap)
    return hema.astype(np.float32), np.clip(eosin, 0.0, None).astype(np.float32), orientation


def _chromatin(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    grain = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.7)
    return grain / (grain.std() + 1e-6)


def _stromal_cells(
    rng: np.random.Generator, target: np.ndarray, orientation: np.ndarray, allowed: np.ndarray, density: float
) -> None:
    """Unlabelled stromal nuclei: round dark lymphocytes (partly clustered) and spindle fibroblasts."""
    h, w = target.shape
    n = int(h * w * density)
    n_lymph = int(n * rng.uniform(0.4, 0.7))
    n_spindle = n - n_lymph
    centre = rng.uniform((0, 0), (h, w))
    clustered = rng.uniform(size=n_lymph) < 0.4
    ly = np.where(clustered, centre[0] + rng.normal(0.0, 0.08 * h, n_lymph), rng.uniform(0, h, n_lymph))
    lx = np.where(clustered, centre[1] + rng.normal(0.0, 0.08 * w, n_lymph), rng.uniform(0, w, n_lymph))
    r = rng.uniform(1.7, 2.6, n_lymph)
    _paint_ellipses(
        rng,
        target,
        ly,
        lx,
        r,
        r * rng.uniform(0.8, 1.0, n_lymph),
        rng.uniform(0, np.pi, n_lymph),
        rng.uniform(1.3, 1.8, n_lymph),
        irregularity=0.05,
        allowed=allowed,
    )
    sy, sx = rng.uniform(0, h, n_spindle), rng.uniform(0, w, n_spindle)
    phi = orientation[sy.astype(np.intp), sx.astype(np.intp)] + rng.normal(0.0, 0.15, n_spindle)
    _paint_ellipses(
        rng,
        target,
        sy,
        sx,
        rng.uniform(3.0, 5.5, n_spindle),
        rng.uniform(0.9, 1.4, n_spindle),
        phi,
        rng.uniform(0.9, 1.3, n_spindle),
        irregularity=0.06,
        allowed=allowed,
    )


# ----------------------------------------------------------------------------------------------
# GlaS-like tiles


def _grid_pick(rng: np.random.Generator, mask: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """One random pixel of ``mask`` per cell of a randomly shifted grid: evenly spread points."""
    yy, xx = np.nonzero(mask)
    if yy.size == 0:
        return np.zeros(0), np.zeros(0)
    oy, ox = rng.uniform(0.0, cell, 2)
    key = ((yy + oy) // cell).astype(np.int64) * 1_000_003 + ((xx + ox) // cell).astype(np.int64)
    order = rng.permutation(yy.size)
    pick = order[np.unique(key[order], return_index=True)[1]]
    jitter = rng.uniform(-0.5, 0.5, (2, pick.size))
    return yy[pick] + jitter[0], xx[pick] + jitter[1]


def _band(rng: np.random.Generator, shape: tuple[int, int], wobble: float) -> np.ndarray:
    """Signed distance (pixels) to a random wavy line crossing the tile."""
    h, w = shape
    theta = rng.uniform(0.0, np.pi)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)
    return d + wobble * _smooth_noise(rng, shape, min(shape) / 4.0)


def _glas_tissue(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Tissue mask: ~30% of images reach the tissue edge, leaving 8-35% of white glass."""
    if rng.uniform() >= 0.3:
        return np.ones(shape, bool)
    d = _band(rng, shape, 0.08 * min(shape))
    return d < np.quantile(d, 1.0 - rng.uniform(0.08, 0.35))


def _fold(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Optical-density factor of a tissue fold (doubled tissue): ~1 off the fold, 1.6-2.0 on it."""
    width = rng.uniform(5.0, 0.12 * min(shape) + 6.0)
    d = np.abs(_band(rng, shape, 0.05 * min(shape)))
    return 1.0 + rng.uniform(0.6, 1.0) * np.clip((width / 2 - d) / 1.5, 0.0, 1.0)


def _place_glands(
    rng: np.random.Generator, shape: tuple[int, int], malignant: bool, scale: float, keep_out: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Gland instance map: benign = single smooth round/oval blobs (sometimes budding in two);
    malignant = irregular blobs fused from 1-4 lobes, more of the tile covered.

    ``keep_out`` (glass, margins around placed glands) is updated in place.
    """
    h, w = shape
    short = min(h, w)
    instances = np.zeros(shape, np.int32)
    outlines: list[np.ndarray] = []
    coverage_target = (rng.uniform(0.35, 0.6) if malignant else rng.uniform(0.25, 0.45)) * (~keep_out).mean()
    margin = (2.0 if malignant else 3.0) + 0.02 * short
    min_area = min(150.0, 0.01 * h * w)
    covered = 0
    for attempt in range(61):
        if covered >= coverage_target * h * w or len(outlines) >= 250 or (attempt == 60 and outlines):
            break
        fallback = attempt == 60  # nothing fitted (a tiny tile): one gland in the middle, always
        if fallback:
            lobes, a0, irregular = 1, 0.3 * short, 0.05
        elif malignant:
            lobes = int(rng.integers(1, 5))
            a0, irregular = short * scale * rng.uniform(0.08, 0.2), rng.uniform(0.15, 0.4)
        else:
            lobes = 2 if rng.uniform() < 0.15 else 1
            a0, irregular = short * scale * rng.uniform(0.07, 0.19), rng.uniform(0.03, 0.12)
        cy = 0.5 * h if fallback else rng.uniform(-0.05 * h, 1.05 * h)
        cx = 0.5 * w if fallback else rng.uniform(-0.05 * w, 1.05 * w)
        if not fallback and keep_out[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))]:
            continue  # centre already taken: skip drawing it
        gland = np.zeros(shape, bool)
        margins = []
        for lobe in range(lobes):
            a = a0 if lobe == 0 else a0 * rng.uniform(0.5, 1.0)
            if lobe:  # next lobe overlaps the previous one, so the union stays one gland
                step, turn = a0 * rng.uniform(0.6, 1.1), rng.uniform(0.0, 2.0 * np.pi)
                cy, cx = cy + step * np.sin(turn), cx + step * np.cos(turn)
            b = a / (1.2 if fallback else rng.uniform(1.0, 2.0))
            y, x = _blob_vertices(rng, cy, cx, a, b, rng.uniform(0.0, np.pi), irregular, 40)
            y, x = _snap(y[0], h - 1.0), _snap(x[0], w - 1.0)
            gland |= _fill_polygon(y, x, shape)
            margins.append(_offset_radially(y, x, cy, cx, margin))
        area = int(gland.sum())
        if not fallback and (area < min_area or (gland & keep_out).any() or ndi.label(gland)[1] != 1):
            continue
        if fallback:
            gland &= instances == 0
        instances[gland] = len(outlines) + 1
        covered += area
        for my, mx in margins:
            keep_out |= _fill_polygon(my, mx, shape)
        contour = max(find_contours(np.pad(gland, 1).astype(np.float32), 0.5), key=len)
        outlines.append(np.stack([contour[:, 1] - 1.0, contour[:, 0] - 1.0], axis=1))
    return instances, outlines


def _gland_tile(rng: np.random.Generator, shape: tuple[int, int], grade: str, slide: _Slide) -> SyntheticTile:
    h, w = shape
    malignant = grade == "malignant"
    stain = _image_stain(rng, slide.stain)
    hema, eosin, orientation = _stroma(rng, shape)
    mid = _smooth_noise(rng, shape, 2.0)
    chromatin = _chromatin(rng, shape)
    tissue = _glas_tissue(rng, shape)

    # gland size varies per slide (patient) and per image (cut, field of view)
    scale = slide.gland_scale * float(np.exp(rng.uniform(np.log(0.7), np.log(1.45))))
    keep_out = ndi.binary_dilation(~tissue, iterations=3) if not tissue.all() else np.zeros(shape, bool)
    instances, polygons = _place_glands(rng, shape, malignant, scale, keep_out)
    n = len(polygons)
    inside = instances > 0
    dist = ndi.distance_transform_edt(inside).astype(np.float32)  # glands never touch
    grad_y, grad_x = np.gradient(dist)

    # epithelium thickness per gland (a little wavy); the lumen is what lies deeper
    thick = rng.uniform(8.0, 16.0, n + 1) if malignant else rng.uniform(6.0, 10.0, n + 1)
    thick_map = thick[instances] * (1.0 + 0.2 * _smooth_noise(rng, shape, 6.0))
    lumen = inside & (dist > thick_map)
    if malignant:
        # per gland: open, cribriform (several small lumina in an epithelial sheet) or barely any lumen
        mode = rng.choice(3, n + 1, p=[0.35, 0.4, 0.25])[instances]
        holes = _smooth_noise(rng, shape, rng.uniform(2.5, 4.0)) > 0.7
        cribriform = inside & (dist > 0.5 * thick_map) & holes
        slit = inside & (dist > 1.7 * thick_map) & (_smooth_noise(rng, shape, 3.0) > 0.3)
        lumen = np.select([mode == 1, mode == 2], [cribriform, slit], lumen)
    rim = inside & ~lumen

    # nuclei: benign = one basal palisade, long axes towards the centre; malignant = crowded,
    # enlarged, pleomorphic and stratified through the whole epithelium
    if malignant:
        ny, nx = _grid_pick(rng, rim & (dist > 2.0), rng.uniform(4.0, 5.5))
        m = ny.size
        a_n, b_n = rng.uniform(2.6, 5.0, m), rng.uniform(1.8, 3.4, m)
        strength, ves, spread = rng.uniform(1.1, 1.6, m), rng.uniform(0.1, 0.45, m), 0.6
    else:
        depth = rng.uniform(3.5, 5.0)
        ny, nx = _grid_pick(rng, rim & (np.abs(dist - depth) < 0.75), rng.uniform(2.8, 3.6))
        m = ny.size
        a_n, b_n = rng.uniform(2.6, 4.0, m), rng.uniform(1.1, 1.7, m)
        strength, ves, spread = rng.uniform(1.0, 1.4, m), np.zeros(m), 0.12
    iy, ix = np.clip(ny.astype(np.intp), 0, h - 1), np.clip(nx.astype(np.intp), 0, w - 1)
    phi = np.arctan2(grad_y[iy, ix], grad_x[iy, ix]) + rng.normal(0.0, spread, m)
    nuclei = np.zeros(shape, np.float32)
    _paint_ellipses(
        rng, nuclei, ny, nx, a_n, b_n, phi, strength, irregularity=0.06, vesicular=ves,
        allowed=instances, allowed_value=instances[iy, ix],
    )
    goblet_mask = np.zeros(shape, bool)
    if not malignant:
        # goblet cells: mucin vacuoles between the nuclei and the lumen
        gy, gx = _grid_pick(rng, rim & (dist > depth + 3.5) & (dist < thick_map - 1.0), rng.uniform(4.5, 6.5))
        keep = rng.uniform(size=gy.size) < rng.uniform(0.3, 0.7)
        gy, gx = gy[keep], gx[keep]
        g_a = rng.uniform(2.0, 4.0, gy.size)
        goblet = np.zeros(shape, np.float32)
        jy, jx = np.clip(gy.astype(np.intp), 0, h - 1), np.clip(gx.astype(np.intp), 0, w - 1)
        _paint_ellipses(
            rng, goblet, gy, gx, g_a, 0.7 * g_a, np.arctan2(grad_y[jy, jx], grad_x[jy, jx]), np.ones(gy.size),
            irregularity=0.05, allowed=instances, allowed_value=instances[jy, jx],
        )
        goblet_mask = (goblet > 0) & rim & (nuclei == 0)
    stroma = ~keep_out & tissue
    # stromal cellularity varies a lot between cases (sparse fibrous stroma to a lamina propria
    # crowded with inflammatory cells); around carcinoma it is more cellular (desmoplasia)
    density = float(np.exp(rng.uniform(np.log(1 / 450), np.log(1 / 55)))) * (1.5 if malignant else 1.0)
    _stromal_cells(rng, nuclei, orientation, stroma, density=density)

    # glandular appearance: purple-pink cytoplasm, from clearly bluer than the stroma to nearly
    # the same colour (cases differ); pale lumen with a little secretion
    cyto_e = rng.uniform(0.25, 0.55) * (1.15 if malignant else 1.0)
    cyto_h = rng.uniform(0.1, 0.28) * (1.3 if malignant else 1.0)
    eosin = np.where(rim, cyto_e * (1.0 + 0.2 * mid), eosin)
    hema = np.where(rim, cyto_h * (1.0 + 0.25 * mid), hema)
    secretion = np.clip(_smooth_noise(rng, shape, 3.0) - 0.8, 0.0, None)
    eosin = np.where(lumen, 0.03 + 0.3 * secretion, eosin)
    hema = np.where(lumen, 0.015 + 0.06 * secretion, hema)
    eosin = np.where(goblet_mask, 0.07 + 0.03 * mid, eosin)
    hema = np.where(goblet_mask, 0.14 + 0.04 * mid, hema)
    if malignant:
        # necrotic debris in some lumina
        debris = lumen & (_smooth_noise(rng, shape, 1.2) > 1.8)
        hema = np.where(debris, 0.6, hema)
        eosin = np.where(debris, 0.5, eosin)
    hema = hema + nuclei * (1.0 + 0.3 * chromatin)

    if rng.uniform() < 0.3:
        # fat: clusters of large empty adipocytes in the stroma, thin septa between them
        r = rng.uniform(7.0, 15.0)
        centre = rng.uniform((0, 0), (h, w))
        yy, xx = np.ogrid[0:h, 0:w]
        region = stroma & (np.hypot(yy - centre[0], xx - centre[1]) < rng.uniform(0.2, 0.45) * max(h, w))
        fy, fx = _grid_pick(rng, region, 2.0 * r + 2.0)
        fat = np.zeros(shape, np.float32)
        _paint_ellipses(
            rng, fat, fy, fx, np.full(fy.size, r), r * rng.uniform(0.75, 1.0, fy.size), rng.uniform(0, np.pi, fy.size),
            np.ones(fy.size), irregularity=0.08, allowed=stroma,
        )
        hema = np.where(fat > 0, 0.01, hema)
        eosin = np.where(fat > 0, 0.02, eosin)
    hema = np.where(tissue, hema, 0.0)
    eosin = np.where(tissue, eosin, 0.0)
    if rng.uniform() < 0.25:
        fold = np.where(tissue, _fold(rng, shape), 1.0)
        hema, eosin = hema * fold, eosin * fold
    image = _compose(rng, hema, eosin, stain)
    return SyntheticTile(image=image, instances=instances, polygons=polygons, grade=grade, stain=stain)


# ----------------------------------------------------------------------------------------------
# MoNuSeg-like tiles


@dataclass(frozen=True)
class _Organ:
    """Nucleus morphology of one organ (MoNuSeg tiles); lengths in pixels of the 250 px tiles.

    ``radius``: long semi-axis of epithelial/tumour nuclei; ``aspect``: short/long axis;
    ``cover``: fraction of the tile that nuclei cover; ``sheet``: fraction of the tile that is
    epithelium/tumour; ``touch``: how far the bounding circles of neighbours may overlap (touching,
    crowded nuclei); ``cytoplasm``: (eosin, hematoxylin) of the epithelial cytoplasm;
    ``sites``: TCGA tissue-source-site codes of that organ used in MoNuSeg file names.
    """

    radius: tuple[float, float]
    aspect: tuple[float, float]
    cover: tuple[float, float]
    sheet: tuple[float, float]
    vesicular: tuple[float, float]
    touch: float
    cytoplasm: tuple[float, float]
    sites: tuple[str, ...]


MONUSEG_ORGANS: dict[str, _Organ] = {
    # large pleomorphic carcinoma nuclei, open chromatin
    "breast": _Organ(
        (4.5, 7.5), (0.65, 0.95), (0.18, 0.3), (0.4, 0.8), (0.25, 0.5), 0.35, (0.32, 0.22), ("A7", "AR", "E2", "AC")
    ),
    # clear-cell carcinoma: small round nuclei, pale cytoplasm, sparse
    "kidney": _Organ(
        (3.2, 4.8), (0.8, 1.0), (0.1, 0.18), (0.5, 0.85), (0.1, 0.3), 0.1, (0.12, 0.08), ("B0", "HE", "2Z")
    ),
    # hepatocytes: round nuclei with a nucleolus, eosin-rich cytoplasm, sparse
    "liver": _Organ(
        (3.8, 5.2), (0.85, 1.0), (0.08, 0.15), (0.6, 0.9), (0.3, 0.5), 0.0, (0.5, 0.18), ("18", "38", "49", "50")
    ),
    # acinar adenocarcinoma: medium round-oval nuclei
    "prostate": _Organ(
        (3.5, 5.5), (0.7, 0.95), (0.12, 0.22), (0.35, 0.7), (0.15, 0.4), 0.2, (0.3, 0.2), ("G9", "CH", "EJ")
    ),
    # urothelial carcinoma: crowded oval nuclei
    "bladder": _Organ(
        (4.0, 6.0), (0.6, 0.9), (0.2, 0.32), (0.5, 0.85), (0.1, 0.35), 0.45, (0.3, 0.26), ("DK", "G2", "ZF")
    ),
    # colorectal adenocarcinoma: elongated pencil-like, crowded stratified nuclei
    "colon": _Organ(
        (5.0, 8.0), (0.35, 0.6), (0.18, 0.28), (0.4, 0.75), (0.05, 0.25), 0.4, (0.3, 0.25), ("AY", "NH", "A6")
    ),
    # gastric adenocarcinoma: medium, variably elongated
    "stomach": _Organ(
        (3.5, 6.0), (0.5, 0.85), (0.14, 0.24), (0.35, 0.7), (0.1, 0.35), 0.3, (0.28, 0.22), ("KB", "RD")
    ),
    # lung carcinoma (test only in the real set): large, pleomorphic
    "lung": _Organ(
        (4.5, 7.0), (0.6, 0.95), (0.15, 0.28), (0.3, 0.7), (0.2, 0.45), 0.3, (0.3, 0.2), ("44", "69")
    ),
    # glioma (test only in the real set): small-medium glial nuclei scattered in pink neuropil
    "brain": _Organ(
        (3.0, 4.5), (0.6, 0.95), (0.07, 0.14), (0.85, 1.0), (0.0, 0.2), 0.1, (0.35, 0.1), ("HT",)
    ),
}
# the real training set: 6 images each of breast, kidney, liver, prostate; 2 of bladder, colon,
# stomach; its test set holds organs the training set lacks (lung, brain)
_MONUSEG_TRAIN_ORGANS = ("breast", "kidney", "liver", "prostate", "bladder", "colon", "stomach")
_MONUSEG_TEST_ORGANS = ("breast", "kidney", "prostate", "bladder", "colon", "lung", "brain")
_MONUSEG_TRAIN_WEIGHTS = (6, 6, 6, 6, 2, 2, 2)


def monuseg_organ(name: str) -> str | None:
    """Organ of a MoNuSeg image from the tissue-source-site field of its TCGA name, ``None`` if unknown."""
    parts = Path(str(name)).name.split("-")
    site = parts[1] if len(parts) > 2 and parts[0] == "TCGA" else None
    return next((organ for organ, o in MONUSEG_ORGANS.items() if site in o.sites), None)


def _place_nuclei(
    rng: np.random.Generator, shape: tuple[int, int], sheet: np.ndarray, organ: _Organ
) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """Nucleus polygons that share no pixel, rasterised into an instance map.

    Candidates are drawn in bulk and accepted greedily when their bounding circle (which contains
    every rasterised pixel centre) overlaps no accepted one by more than the organ allows and their
    pixels are free, so each accepted polygon is rasterised exactly once. A share ``organ.touch`` of
    the candidates is instead pressed against an accepted nucleus of its kind (:func:`_press_against`):
    touching clusters, the case where connected components merge nuclei and a watershed has to split them.
    """
    h, w = shape
    scale = rng.uniform(0.85, 1.2)
    n_cand = max(int(h * w / 30), 64)
    n_vertices = 16
    cy = rng.uniform(-2.0, h + 1.0, n_cand)
    cx = rng.uniform(-2.0, w + 1.0, n_cand)
    in_sheet = sheet[np.clip(cy, 0, h - 1).astype(np.intp), np.clip(cx, 0, w - 1).astype(np.intp)]
    u = rng.uniform(size=n_cand)
    epithelial = in_sheet & (u < 0.85)
    lymph = ~epithelial & (in_sheet | (u < 0.5))
    a = scale * np.select(
        [epithelial, lymph],
        [rng.uniform(*organ.radius, n_cand), rng.uniform(2.6, 3.6, n_cand)],
        rng.uniform(5.0, 8.0, n_cand),
    )
    b = np.select(
        [epithelial, lymph],
        [a * rng.uniform(*organ.aspect, n_cand), a * rng.uniform(0.85, 1.0, n_cand)],
        scale * rng.uniform(1.6, 2.4, n_cand),
    )
    irregular = np.select([epithelial, lymph], [0.12, 0.06], 0.08)
    strength = np.select(
        [epithelial, lymph],
        [rng.uniform(0.8, 1.2, n_cand), rng.uniform(1.3, 1.7, n_cand)],
        rng.uniform(1.0, 1.4, n_cand),
    )
    vesicular = np.where(epithelial, rng.uniform(*organ.vesicular, n_cand), 0.0)
    phi = rng.uniform(0.0, np.pi, n_cand)
    oy, ox = _blob_vertices(rng, np.zeros(n_cand), np.zeros(n_cand), a, b, phi, irregular, n_vertices)
    vy, vx = _snap(cy[:, None] + oy, h - 1.0), _snap(cx[:, None] + ox, w - 1.0)
    ry = np.hypot(vy - cy[:, None], vx - cx[:, None]).max(axis=1)
    nucleolus = rng.uniform(-0.4, 0.4, (n_cand, 2))
    # pressed candidates: which, against which accepted neighbour (a fraction of the list) and from where
    pressed = (rng.uniform(size=n_cand) < organ.touch) & (epithelial | lymph)
    neighbour_at = rng.uniform(size=n_cand)
    side = rng.uniform(0.0, 2.0 * np.pi, n_cand)

    area_goal = rng.uniform(*organ.cover) * h * w
    instances = np.zeros(shape, np.int32)
    polygons: list[np.ndarray] = []
    chosen: list[int] = []
    # accepted circles bucketed on a grid whose cells exceed any interaction distance
    cell = 2.0 * float(ry.max()) + 1.0
    grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    cy_l, cx_l, ry_l = cy.tolist(), cx.tolist(), ry.tolist()
    area = 0
    touch = organ.touch
    by_kind: dict[bool, list[int]] = {True: [], False: []}  # accepted epithelial / other nuclei
    for i in range(n_cand):
        if area >= area_goal:
            break
        kind = bool(epithelial[i])
        if pressed[i] and by_kind[kind]:
            j = by_kind[kind][int(neighbour_at[i] * len(by_kind[kind]))]
            reach = ry[j] + 0.6 * ry[i]
            cy[i], cx[i] = cy[j] + reach * np.sin(side[i]), cx[j] + reach * np.cos(side[i])
            placed = _press_against(instances, cy[i], cx[i], oy[i], ox[i])
            if placed is None:
                continue
            vy[i], vx[i], (rr, cc) = *placed[:2], placed[2]
            if rr.size < max(6, 0.4 * np.pi * a[i] * b[i]):  # not a sliver
                continue
            cy_l[i], cx_l[i] = float(cy[i]), float(cx[i])
        else:
            yi, xi, ri = cy_l[i], cx_l[i], ry_l[i]
            gy, gx = int((yi + 3.0) // cell), int((xi + 3.0) // cell)
            if any(
                (yj - yi) ** 2 + (xj - xi) ** 2 <= (rj + ri + 1.0 - touch * min(ri, rj)) ** 2
                for key in ((gy + dy, gx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
                for yj, xj, rj in grid.get(key, ())
            ):
                continue
            rr, cc = draw_polygon(vy[i], vx[i], shape=shape)
            if rr.size < 6 or (touch and instances[rr, cc].any()):
                continue
        yi, xi, ri = cy_l[i], cx_l[i], ry_l[i]
        chosen.append(i)
        by_kind[kind].append(i)
        grid.setdefault((int((yi + 3.0) // cell), int((xi + 3.0) // cell)), []).append((yi, xi, ri))
        instances[rr, cc] = len(chosen)
        polygons.append(np.stack([vx[i], vy[i]], axis=1))
        area += rr.size
    idx = np.asarray(chosen, dtype=np.intp)
    props = {
        "cy": cy[idx],
        "cx": cx[idx],
        "a": a[idx],
        "b": b[idx],
        "phi": phi[idx],
        "strength": strength[idx],
        "vesicular": vesicular[idx],
        "nucleolus": nucleolus[idx],
    }
    return instances, polygons, props


def _press_against(
    instances: np.ndarray, cy: float, cx: float, oy: np.ndarray, ox: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]] | None:
    """A nucleus at ``(cy, cx)`` (vertex offsets ``oy``, ``ox``) flattened where it meets accepted nuclei.

    Each vertex is pulled in along its ray to the last free pixel before an occupied one, so the nucleus
    takes the contact face of its neighbour, as crowded nuclei do, and touches it without sharing a pixel.
    Returns ``(vy, vx, (rr, cc))``, the snapped vertices and their pixels, or None when the centre is taken
    or the polygon still claims an occupied pixel after a few pulls.
    """
    h, w = instances.shape
    if not (0 <= cy <= h - 1 and 0 <= cx <= w - 1) or instances[int(round(cy)), int(round(cx))]:
        return None
    radius = np.hypot(oy, ox)
    steps = np.arange(0.0, float(radius.max()) + 0.5, 0.5)
    ray_y = cy + oy[:, None] / radius[:, None] * steps[None, :]
    ray_x = cx + ox[:, None] / radius[:, None] * steps[None, :]
    inside = (ray_y > -0.5) & (ray_y < h - 0.5) & (ray_x > -0.5) & (ray_x < w - 0.5)
    taken = np.zeros_like(inside)
    py = np.clip(np.round(ray_y), 0, h - 1).astype(np.intp)
    px = np.clip(np.round(ray_x), 0, w - 1).astype(np.intp)
    taken[inside] = instances[py[inside], px[inside]] > 0
    first = np.where(taken.any(axis=1), taken.argmax(axis=1), steps.size)
    reach = np.minimum(radius, steps[np.maximum(first - 1, 0)])
    for _ in range(4):
        scale = np.maximum(reach, 0.5) / radius
        vy, vx = _snap(cy + oy * scale, h - 1.0), _snap(cx + ox * scale, w - 1.0)
        rr, cc = draw_polygon(vy, vx, shape=(h, w))
        if rr.size and not instances[rr, cc].any():
            return vy, vx, (rr, cc)
        reach = np.where(first < steps.size, reach - 0.5, reach)  # pull the contact face in further
    return None


def _shade_nuclei(instances: np.ndarray, props: dict[str, np.ndarray]) -> np.ndarray:
    """Hematoxylin of labelled nuclei from their own pixels: open chromatin and a nucleolus."""
    out = np.zeros(instances.shape, np.float32)
    yy, xx = np.nonzero(instances)
    if yy.size == 0:
        return out
    k = instances[yy, xx] - 1
    ly, lx = yy - props["cy"][k], xx - props["cx"][k]
    cos_p, sin_p = np.cos(props["phi"][k]), np.sin(props["phi"][k])
    a, b = props["a"][k], props["b"][k]
    rho = np.hypot((lx * cos_p + ly * sin_p) / a, (-lx * sin_p + ly * cos_p) / b)
    val = props["strength"][k] * (1.0 - props["vesicular"][k] * np.clip(1.0 - rho, 0.0, 1.0) ** 1.5)
    ny = props["cy"][k] + props["nucleolus"][k, 0] * b
    nx = props["cx"][k] + props["nucleolus"][k, 1] * b
    has = props["vesicular"][k] > 0
    dot = has & (np.hypot(yy - ny, xx - nx) <= 1.1)
    val = np.where(dot, props["strength"][k] * 1.2, val)
    out[yy, xx] = val
    return out


def _nuclei_tile(rng: np.random.Generator, shape: tuple[int, int], organ: str) -> SyntheticTile:
    """One MoNuSeg-like tile; every tile is a slide of its own (a different patient and site)."""
    h, w = shape
    spec = MONUSEG_ORGANS[organ]
    stain = _image_stain(rng, _slide_stain(rng))
    hema, eosin, _ = _stroma(rng, shape)
    mid = _smooth_noise(rng, shape, 2.0)
    chromatin = _chromatin(rng, shape)

    # epithelial / tumour sheets (the organ's cytoplasm, its nuclei) inside stroma
    field = _smooth_noise(rng, shape, min(shape) / 7.0)
    sheet = field > np.quantile(field, 1.0 - rng.uniform(*spec.sheet))
    cyto_e, cyto_h = (c * rng.uniform(0.8, 1.2) for c in spec.cytoplasm)
    eosin = np.where(sheet, cyto_e * (1.0 + 0.15 * mid), eosin)
    hema = np.where(sheet, cyto_h * (1.0 + 0.2 * mid), hema)

    instances, polygons, props = _place_nuclei(rng, shape, sheet, spec)

    # a few unlabelled red blood cells in the stroma
    n_groups = int(rng.integers(0, 3))
    if n_groups:
        count = rng.integers(4, 14, n_groups)
        centres = rng.uniform((0, 0), (h, w), (n_groups, 2))
        ry = np.repeat(centres[:, 0], count) + rng.normal(0.0, 6.0, count.sum())
        rx = np.repeat(centres[:, 1], count) + rng.normal(0.0, 6.0, count.sum())
        rbc = np.zeros(shape, np.float32)
        _paint_ellipses(
            rng,
            rbc,
            ry,
            rx,
            np.full(ry.size, 3.0),
            np.full(ry.size, 2.7),
            np.zeros(ry.size),
            np.ones(ry.size),
            irregularity=0.03,
            allowed=(instances == 0) & ~sheet,
        )
        eosin = np.where(rbc > 0, 1.2, eosin)
        hema = np.where(rbc > 0, 0.02, hema)

    hema = hema + _shade_nuclei(instances, props) * (1.0 + 0.3 * chromatin)
    image = _compose(rng, hema, eosin, stain)
    return SyntheticTile(image=image, instances=instances, polygons=polygons, stain=stain, organ=organ)


# public rendering API


def _render(
    size: Sequence[int],
    rng: np.random.Generator,
    kind: str,
    grade: str | None,
    slide: _Slide | None = None,
    organ: str | None = None,
) -> SyntheticTile:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    h, w = (int(size[0]), int(size[1]))
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16 x 16, got {(h, w)}")
    if kind == "glas":
        if grade is None:
            grade = "malignant" if rng.uniform() < 0.5 else "benign"
        if grade not in ("benign", "malignant"):
            raise ValueError(f"grade must be 'benign' or 'malignant', got {grade!r}")
        return _gland_tile(rng, (h, w), grade, _random_slide(rng) if slide is None else slide)
    if organ is None:
        organ = _MONUSEG_TRAIN_ORGANS[int(rng.integers(len(_MONUSEG_TRAIN_ORGANS)))]
    if organ not in MONUSEG_ORGANS:
        raise ValueError(f"organ must be one of {tuple(MONUSEG_ORGANS)}, got {organ!r}")
    return _nuclei_tile(rng, (h, w), organ)


def synthesize_tile(
    size: Sequence[int] = (256, 256),
    rng: np.random.Generator | None = None,
    kind: str = "glas",
    grade: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one H&E-like tile and its exact instance map.

    Args:
        size: ``(H, W)`` in pixels.
        rng: numpy Generator driving every random choice (default: ``default_rng(0)``).
        kind: ``"glas"`` (glands labelled, stromal nuclei unlabelled) or ``"monuseg"`` (every
            nucleus labelled).
        grade: GlaS only: ``"benign"`` or ``"malignant"`` morphology; random when ``None``.

    Returns:
        ``(rgb, instances)``: ``(H, W, 3)`` uint8 and ``(H, W)`` int32 with 0 background and
        objects numbered 1..K.
    """
    tile = _render(size, np.random.default_rng(0) if rng is None else rng, kind, grade)
    return tile.image, tile.instances


def _sample_rng(seed: int, kind: str, split: str, index: int, purpose: int = 0) -> np.random.Generator:
    """Independent stream per file, so an image does not change when the set grows."""
    kind_code = _KINDS.index(kind)
    split_code = (_GLAS_SPLITS if kind == "glas" else _MONUSEG_SPLITS).index(split)
    return np.random.default_rng(np.random.SeedSequence([int(seed), kind_code, split_code, int(index), purpose]))


def _glas_grade(seed: int, split: str, index: int) -> str:
    # alternate so every split with two or more images holds both grades; the phase depends on seed
    phase = int(_sample_rng(seed, "glas", split, 0, purpose=7).integers(2))
    return "malignant" if (index + phase) % 2 == 0 else "benign"


GLAS_SLIDES = 16  # the real set: 165 images from 16 slides (patients)
_GLAS_HELD_OUT = 4  # slides (2 benign, 2 malignant) that only test images come from
# chance that a test image comes from a held-out slide (testA mixes, testB mostly unseen)
_GLAS_UNSEEN = {"train": 0.0, "testA": 0.5, "testB": 0.75}


def _glas_slides(seed: int) -> dict[str, dict[bool, list[int]]]:
    """``{grade: {held_out: [patient ids]}}``: half the slides of each grade benign, the rest malignant."""
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0, 99])).permutation(GLAS_SLIDES) + 1
    half, held = GLAS_SLIDES // 2, _GLAS_HELD_OUT // 2
    out = {}
    for grade, ids in (("benign", order[:half]), ("malignant", order[half:])):
        out[grade] = {True: sorted(ids[:held].tolist()), False: sorted(ids[held:].tolist())}
    return out


def _glas_slide(seed: int, split: str, index: int, grade: str) -> tuple[int, _Slide]:
    """Patient id of one image and that slide's shared appearance (the same for every image of it)."""
    pick = _sample_rng(seed, "glas", split, index, purpose=8)
    pool = _glas_slides(seed)[grade][bool(pick.uniform() < _GLAS_UNSEEN[split])]
    patient = int(pool[int(pick.integers(len(pool)))])
    return patient, _random_slide(np.random.default_rng(np.random.SeedSequence([int(seed), 0, 98, patient])))


def _monuseg_organ(seed: int, split: str, index: int) -> str:
    """Organ of one MoNuSeg image: the training images follow the real set's organ mix (shuffled per
    seed, cycled so a few images already span several organs); test images cycle over the test organs."""
    rng = _sample_rng(seed, "monuseg", split, 0, purpose=6)
    if split == "train":
        cycle = [o for o, k in zip(_MONUSEG_TRAIN_ORGANS, _MONUSEG_TRAIN_WEIGHTS, strict=True) for _ in range(k // 2)]
    else:
        cycle = list(_MONUSEG_TEST_ORGANS)
    cycle = [cycle[i] for i in rng.permutation(len(cycle))]
    return cycle[(int(index) - 1) % len(cycle)]


def _glas_size(rng: np.random.Generator, size: Sequence[int]) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    if rng.uniform() < 0.25:  # a few images differ slightly in size, as in the real set
        h += int(rng.integers(-12, 13))
        w += int(rng.integers(-16, 17))
    return max(h, 64), max(w, 64)


def make_sample(kind: str, split: str, index: int, size: Sequence[int] | None = None, seed: int = 0) -> SyntheticTile:
    """The exact tile that :func:`write_glas` / :func:`write_monuseg` write for one file.

    Args:
        kind: ``"glas"`` or ``"monuseg"``.
        split: GlaS ``"train"``, ``"testA"``, ``"testB"``; MoNuSeg ``"train"``, ``"test"``.
        index: 1-based image number inside the split.
        size: nominal ``(H, W)``; defaults to the writers' defaults. GlaS images may differ from it by
            a few pixels.
        seed: data-set seed.
    """
    rng = _sample_rng(seed, kind, split, index)
    if kind == "glas":
        shape = _glas_size(rng, (192, 256) if size is None else size)
        grade = _glas_grade(seed, split, index)
        patient, slide = _glas_slide(seed, split, index, grade)
        tile = _render(shape, rng, "glas", grade, slide=slide)
        tile.slide = patient
        return tile
    shape = (250, 250) if size is None else (int(size[0]), int(size[1]))
    return _render(shape, rng, "monuseg", None, organ=_monuseg_organ(seed, split, index))


# ----------------------------------------------------------------------------------------------
# file writing


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _bmp_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="BMP")
    return buf.getvalue()


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or min(int(s) for s in size) < 64:
        raise ValueError(f"size must be (H, W) with both >= 64, got {tuple(size)}")
    return int(size[0]), int(size[1])


def write_glas(
    root: str | os.PathLike,
    n_train: int = 12,
    n_test_a: int = 4,
    n_test_b: int = 2,
    size: Sequence[int] = (192, 256),
    seed: int = 0,
) -> Path:
    """Write a synthetic GlaS set in the official flat layout and return ``root``.

    Files: ``train_<i>.bmp`` (24-bit RGB) with ``train_<i>_anno.bmp`` (8-bit greyscale, pixel =
    gland instance id, 0 background), the same for ``testA_<i>`` and ``testB_<i>``, and
    ``Grade.csv`` with one row per image. Existing files of the same names are overwritten.
    """
    _check_counts(n_train=n_train, n_test_a=n_test_a, n_test_b=n_test_b)
    size = _check_size(size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in (("testA", n_test_a), ("testB", n_test_b), ("train", n_train)):
        for index in range(1, count + 1):
            name = f"{split}_{index}"
            tile = make_sample("glas", split, index, size=size, seed=seed)
            n_glands = int(tile.instances.max())
            if n_glands > 255:
                raise RuntimeError(f"{name}: {n_glands} glands do not fit an 8-bit annotation")
            _write_atomic(root / f"{name}.bmp", _bmp_bytes(tile.image, "RGB"))
            _write_atomic(root / f"{name}_anno.bmp", _bmp_bytes(tile.instances.astype(np.uint8), "L"))
            pick = _sample_rng(seed, "glas", split, index, purpose=9)
            sub = _MALIGNANT_SUBGRADES if tile.grade == "malignant" else _BENIGN_SUBGRADES
            rows.append((name, str(tile.slide), tile.grade, sub[int(pick.integers(len(sub)))]))
    lines = [",".join(GLAS_GRADE_HEADER)] + [",".join(r) for r in rows]
    _write_atomic(root / "Grade.csv", ("\n".join(lines) + "\n").encode("ascii"))
    return root


def _tcga_name(seed: int, split: str, index: int, organ: str, taken: set[str]) -> str:
    """A TCGA-style slide name (synthetic; not a real case) whose tissue-source-site code names the organ."""
    rng = _sample_rng(seed, "monuseg", split, index, purpose=5)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    sites = MONUSEG_ORGANS[organ].sites
    while True:
        site = sites[int(rng.integers(len(sites)))]
        name = f"TCGA-{site}-{''.join(rng.choice(alphabet, 4))}-01Z-00-DX1"
        if name not in taken:
            taken.add(name)
            return name


def _polygon_length_area(poly: np.ndarray) -> tuple[float, float]:
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    length = float(np.hypot(xn - x, yn - y).sum())
    area = float(abs(np.dot(x, yn) - np.dot(xn, y)) / 2.0)
    return length, area


def monuseg_xml(polygons: Sequence[np.ndarray], microns_per_pixel: float = MONUSEG_MICRONS_PER_PIXEL) -> str:
    """Aperio ImageScope-style annotation XML, one ``Region`` per polygon of ``(x, y)`` vertices."""
    mpp = float(microns_per_pixel)
    out = [
        f'<Annotations MicronsPerPixel="{mpp:.6f}">',
        '<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" Incremental="0" '
        'Type="4" LineColor="65280" Visible="1" Selected="1" MarkupImagePath="" MacroName="">',
        "<Attributes>",
        '<Attribute Name="Description" Id="0" Value=""/>',
        "</Attributes>",
        "<Regions>",
        "<RegionAttributeHeaders>",
        '<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>',
        '<AttributeHeader Id="9997" Name="Length" ColumnWidth="-1"/>',
        '<AttributeHeader Id="9996" Name="Area" ColumnWidth="-1"/>',
        '<AttributeHeader Id="9998" Name="Text" ColumnWidth="-1"/>',
        '<AttributeHeader Id="1" Name="Description" ColumnWidth="-1"/>',
        "</RegionAttributeHeaders>",
    ]
    for k, poly in enumerate(polygons, start=1):
        length, area = _polygon_length_area(poly)
        out.append(
            f'<Region Id="{k}" Type="0" Zoom="1.000000" Selected="0" ImageLocation="" ImageFocus="-1" '
            f'Length="{length:.1f}" Area="{area:.1f}" LengthMicrons="{length * mpp:.1f}" '
            f'AreaMicrons="{area * mpp * mpp:.1f}" Text="" NegativeROA="0" InputRegionId="0" Analyze="1" '
            f'DisplayId="{k}">'
        )
        out.append("<Attributes/>")
        out.append("<Vertices>")
        out.extend(f'<Vertex X="{vx:.6f}" Y="{vy:.6f}" Z="0"/>' for vx, vy in poly)
        out.append("</Vertices>")
        out.append("</Region>")
    out += ["</Regions>", "<Plots/>", "</Annotation>", "</Annotations>", ""]
    return "\n".join(out)


def _tiff_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, photometric="rgb", metadata=None)
    return buf.getvalue()


def write_monuseg(
    root: str | os.PathLike,
    n_train: int = 6,
    n_test: int = 2,
    size: Sequence[int] = (250, 250),
    seed: int = 0,
) -> Path:
    """Write a synthetic MoNuSeg set in both official layouts and return ``root``.

    Training: ``root/MoNuSeg 2018 Training Data/Tissue Images/<name>.tif`` with
    ``root/MoNuSeg 2018 Training Data/Annotations/<name>.xml``; test: ``root/MoNuSegTestData/<name>.tif``
    and ``<name>.xml`` side by side. Images are RGB uint8 TIFF; each XML Region is one nucleus
    polygon whose ``skimage.draw.polygon(Y, X, shape)`` rasterisation is that nucleus.
    """
    _check_counts(n_train=n_train, n_test=n_test)
    size = _check_size(size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    train_dir = root / MONUSEG_TRAIN_DIR
    test_dir = root / MONUSEG_TEST_DIR
    layouts = (
        ("train", n_train, train_dir / MONUSEG_TRAIN_IMAGES, train_dir / MONUSEG_TRAIN_ANNOTATIONS),
        ("test", n_test, test_dir, test_dir),
    )
    for split, count, image_dir, xml_dir in layouts:
        image_dir.mkdir(parents=True, exist_ok=True)
        xml_dir.mkdir(parents=True, exist_ok=True)
        for index in range(1, count + 1):
            tile = make_sample("monuseg", split, index, size=size, seed=seed)
            name = _tcga_name(seed, split, index, tile.organ, taken)
            _write_atomic(image_dir / f"{name}.tif", _tiff_bytes(tile.image))
            _write_atomic(xml_dir / f"{name}.xml", monuseg_xml(tile.polygons).encode("ascii"))
    return root


def write_demo_data(
    root: str | os.PathLike,
    seed: int = 0,
    *,
    glas_kwargs: Mapping | None = None,
    monuseg_kwargs: Mapping | None = None,
) -> dict[str, Path]:
    """Write both synthetic sets, ``root/GlaS`` and ``root/MoNuSeg``.

    Args:
        root: output folder (created if needed).
        seed: seed of both sets.
        glas_kwargs: extra arguments of :func:`write_glas` (``n_train``, ``size`` ...).
        monuseg_kwargs: extra arguments of :func:`write_monuseg`.

    Returns:
        ``{"glas": root/GlaS, "monuseg": root/MoNuSeg}``.
    """
    root = Path(root)
    return {
        "glas": write_glas(root / "GlaS", seed=seed, **dict(glas_kwargs or {})),
        "monuseg": write_monuseg(root / "MoNuSeg", seed=seed, **dict(monuseg_kwargs or {})),
    }


def _summarise(paths: Mapping[str, Path]) -> list[str]:
    lines = []
    for key, path in paths.items():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        counts: dict[str, int] = {}
        for p in files:
            counts[p.suffix] = counts.get(p.suffix, 0) + 1
        detail = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items()))
        lines.append(f"{key}: {path} ({detail})")
    return lines


def _overlay(tile: SyntheticTile) -> np.ndarray:
    """The image with the label outlines drawn in green."""
    out = tile.image.copy()
    out[find_boundaries(tile.instances, mode="inner")] = (0, 255, 0)
    return out


def write_examples(out: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Write ``glas_examples.png`` and ``monuseg_examples.png`` (2 x 3 tiles, raw above outlined).

    GlaS: three training images of different slides and grades; MoNuSeg: three organs.
    """
    out = Path(out)
    glas = [make_sample("glas", split, i, seed=seed) for split, i in (("train", 1), ("train", 2), ("testB", 1))]
    monuseg = [make_sample("monuseg", "train", i, seed=seed) for i in (1, 2, 3)]
    paths = []
    for name, tiles, crop in (("glas_examples.png", glas, 256), ("monuseg_examples.png", monuseg, 200)):
        h = min(crop, *(t.image.shape[0] for t in tiles))
        w = min(crop, *(t.image.shape[1] for t in tiles))
        rows = [np.concatenate([f(t)[:h, :w] for t in tiles], axis=1) for f in (lambda t: t.image, _overlay)]
        buf = io.BytesIO()
        # a 256-colour palette keeps the files small (< 300 KB) for the documentation
        Image.fromarray(np.concatenate(rows, axis=0)).quantize(256).save(buf, format="PNG", optimize=True)
        _write_atomic(out / name, buf.getvalue())
        paths.append(out / name)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_mdm.data.synthetic",
        description="Write deterministic synthetic GlaS and MoNuSeg data in the official layouts.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder; GlaS/ and MoNuSeg/ go inside")
    parser.add_argument(
        "--examples", action="store_true", help="write only the example montages (docs/images) into --out"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=None, help="training images per data set")
    parser.add_argument(
        "--n-test", type=int, default=None, help="test images per data set (GlaS: testA; testB stays at its default)"
    )
    parser.add_argument("--glas-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--monuseg-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--list", action="store_true", help="print every file written")
    args = parser.parse_args(argv)
    if args.examples:
        for path in write_examples(args.out, seed=args.seed):
            print(path)
        return 0

    glas_kwargs: dict = {}
    monuseg_kwargs: dict = {}
    if args.n_train is not None:
        glas_kwargs["n_train"] = monuseg_kwargs["n_train"] = args.n_train
    if args.n_test is not None:
        glas_kwargs["n_test_a"] = monuseg_kwargs["n_test"] = args.n_test
    if args.glas_size is not None:
        glas_kwargs["size"] = tuple(args.glas_size)
    if args.monuseg_size is not None:
        monuseg_kwargs["size"] = tuple(args.monuseg_size)
    paths = write_demo_data(args.out, seed=args.seed, glas_kwargs=glas_kwargs, monuseg_kwargs=monuseg_kwargs)
    for line in _summarise(paths):
        print(line)
    if args.list:
        for path in paths.values():
            for p in sorted(q for q in path.rglob("*") if q.is_file()):
                print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
