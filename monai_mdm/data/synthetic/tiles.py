"""One tile of either kind, the exact sample a writer writes for one file, both sets at once, and the example
montages of the documentation."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from .glas import glas_sample, render_glas, write_glas
from .histology import _KINDS, SyntheticTile, _tile_shape, _write_atomic
from .monuseg import monuseg_sample, render_monuseg, write_monuseg


def _render(size: Sequence[int], rng: np.random.Generator, kind: str, grade: str | None) -> SyntheticTile:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    shape = _tile_shape(size)
    return render_glas(rng, shape, grade) if kind == "glas" else render_monuseg(rng, shape)


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
    if kind == "glas":
        return glas_sample(split, index, size, seed)
    if kind == "monuseg":
        return monuseg_sample(split, index, size, seed)
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


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
