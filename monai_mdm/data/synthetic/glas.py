"""Synthetic GlaS: glands (epithelial rim, lumen, goblet cells or stratified nuclei by grade) in stroma, on
slides (patients) with their own stain, written in the official flat layout with ``Grade.csv``."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.measure import find_contours

from .histology import (
    SyntheticTile,
    _Slide,
    _band,
    _blob_vertices,
    _check_counts,
    _check_size,
    _chromatin,
    _compose,
    _fill_polygon,
    _grid_pick,
    _image_stain,
    _offset_radially,
    _paint_ellipses,
    _random_slide,
    _sample_rng,
    _smooth_noise,
    _snap,
    _stroma,
    _stromal_cells,
    _tile_shape,
    _write_atomic,
)


GLAS_GRADE_HEADER = ("name", "patient ID", "grade (GlaS)", "grade (Sirinukunwattana et al. 2015)")


_BENIGN_SUBGRADES = ("healthy", "adenomatous")


_MALIGNANT_SUBGRADES = (
    "moderately differentiated",
    "moderately-to-poorly differentiated",
    "poorly differentiated",
)


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


def _glas_size(rng: np.random.Generator, size: Sequence[int]) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    if rng.uniform() < 0.25:  # a few images differ slightly in size, as in the real set
        h += int(rng.integers(-12, 13))
        w += int(rng.integers(-16, 17))
    return max(h, 64), max(w, 64)


def _bmp_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="BMP")
    return buf.getvalue()


def render_glas(
    rng: np.random.Generator, shape: tuple[int, int], grade: str | None = None, slide: _Slide | None = None
) -> SyntheticTile:
    """One GlaS tile of ``shape``: ``grade`` benign or malignant (random when None), on ``slide`` (random when None)."""
    if grade is None:
        grade = "malignant" if rng.uniform() < 0.5 else "benign"
    if grade not in ("benign", "malignant"):
        raise ValueError(f"grade must be 'benign' or 'malignant', got {grade!r}")
    return _gland_tile(rng, shape, grade, _random_slide(rng) if slide is None else slide)


def glas_sample(split: str, index: int, size: Sequence[int] | None = None, seed: int = 0) -> SyntheticTile:
    """The tile :func:`write_glas` writes as ``<split>_<index>``: its grade, its slide (patient) and its size."""
    rng = _sample_rng(seed, "glas", split, index)
    shape = _glas_size(rng, (192, 256) if size is None else size)
    grade = _glas_grade(seed, split, index)
    patient, slide = _glas_slide(seed, split, index, grade)
    tile = render_glas(rng, _tile_shape(shape), grade, slide=slide)
    tile.slide = patient
    return tile


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
            tile = glas_sample(split, index, size, seed)
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
