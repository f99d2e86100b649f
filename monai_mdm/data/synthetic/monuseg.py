"""Synthetic MoNuSeg: nuclei of an organ (named by the TCGA site code of the file name), some pressed into
touching clusters, written in both official layouts with the polygon XML annotations."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import polygon as draw_polygon

from monai_mdm.data import monuseg as monuseg_reader
from .histology import (
    SyntheticTile,
    _blob_vertices,
    _check_counts,
    _check_size,
    _chromatin,
    _compose,
    _image_stain,
    _paint_ellipses,
    _sample_rng,
    _slide_stain,
    _smooth_noise,
    _snap,
    _stroma,
    _tile_shape,
    _write_atomic,
)


# the folder names the MoNuSeg reader looks for (one definition: data/monuseg.py)
MONUSEG_TRAIN_DIR, MONUSEG_TEST_DIR = monuseg_reader.TRAIN_DIR, monuseg_reader.TEST_DIR


MONUSEG_TRAIN_IMAGES, MONUSEG_TRAIN_ANNOTATIONS = monuseg_reader.TRAIN_IMAGES, monuseg_reader.TRAIN_ANNOTATIONS


MONUSEG_MICRONS_PER_PIXEL = 0.252


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


def render_monuseg(rng: np.random.Generator, shape: tuple[int, int], organ: str | None = None) -> SyntheticTile:
    """One MoNuSeg tile of ``shape`` showing the nuclei of ``organ`` (a training organ at random when None)."""
    if organ is None:
        organ = _MONUSEG_TRAIN_ORGANS[int(rng.integers(len(_MONUSEG_TRAIN_ORGANS)))]
    if organ not in MONUSEG_ORGANS:
        raise ValueError(f"organ must be one of {tuple(MONUSEG_ORGANS)}, got {organ!r}")
    return _nuclei_tile(rng, shape, organ)


def monuseg_sample(split: str, index: int, size: Sequence[int] | None = None, seed: int = 0) -> SyntheticTile:
    """The tile :func:`write_monuseg` writes as image ``index`` of ``split``, with its organ."""
    rng = _sample_rng(seed, "monuseg", split, index)
    shape = (250, 250) if size is None else (int(size[0]), int(size[1]))
    return render_monuseg(rng, _tile_shape(shape), _monuseg_organ(seed, split, index))


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
            tile = monuseg_sample(split, index, size, seed)
            name = _tcga_name(seed, split, index, tile.organ, taken)
            _write_atomic(image_dir / f"{name}.tif", _tiff_bytes(tile.image))
            _write_atomic(xml_dir / f"{name}.xml", monuseg_xml(tile.polygons).encode("ascii"))
    return root
