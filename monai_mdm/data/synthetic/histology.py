"""What the synthetic H&E tiles share: the Beer-Lambert stain model, the drawing primitives (smooth noise,
fibres, blobs from radial harmonics, ellipses, polygons), stroma and stromal nuclei, and the per-file random
streams and checks of the writers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from monai_mdm.utils import atomic_write


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


def _sample_rng(seed: int, kind: str, split: str, index: int, purpose: int = 0) -> np.random.Generator:
    """Independent stream per file, so an image does not change when the set grows."""
    kind_code = _KINDS.index(kind)
    split_code = (_GLAS_SPLITS if kind == "glas" else _MONUSEG_SPLITS).index(split)
    return np.random.default_rng(np.random.SeedSequence([int(seed), kind_code, split_code, int(index), purpose]))


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _tile_shape(size: Sequence[int]) -> tuple[int, int]:
    h, w = (int(size[0]), int(size[1]))
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16 x 16, got {(h, w)}")
    return h, w


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or min(int(s) for s in size) < 64:
        raise ValueError(f"size must be (H, W) with both >= 64, got {tuple(size)}")
    return int(size[0]), int(size[1])
