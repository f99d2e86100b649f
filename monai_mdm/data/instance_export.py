"""Nucleus instances out to the tools pathologists use: a labelled TIFF and GeoJSON polygons that QuPath imports.

Coordinates follow QuPath (and its GeoJSON export): pixel units with the origin (0, 0) at the top-left corner
of the top-left pixel, so pixel (row r, column c) covers ``[c, c + 1) x [r, r + 1)`` and its centre is
``(c + 0.5, r + 0.5)``; points are ``[x, y]``. An outline is traced between the centres of a nucleus's pixels
and those of its neighbours (``skimage.measure.find_contours`` at level 0.5), so the pixels whose centres
lie inside it are exactly the nucleus: :func:`geojson_to_instances` rasterises the file back to the map.

For tiles of a whole slide, ``offset`` and ``scale`` map tile pixels to slide coordinates:
``slide = offset + scale * tile`` (``scale`` is the downsample of the level the tile was read at,
``offset`` the tile's top-left corner in full-resolution pixels).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_mdm.utils import atomic_write

__all__ = [
    "geojson_to_instances",
    "instances_to_geojson",
    "tiled_nucleus_instances",
    "write_geojson",
    "write_label_tiff",
    "write_nucleus_instances",
    "write_slide_nuclei",
]

OBJECT_TYPES = ("detection", "annotation")
NUCLEUS_COLOUR = (0, 200, 70)  # the evaluation overlays' nucleus green
ID_MEASUREMENT = "Instance id"  # the feature's value in the labelled TIFF
_COLLECTION_HEAD = b'{"type":"FeatureCollection","features":['  # a streamed FeatureCollection's opening


def _rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed ``(N, 2)`` (row, column) outlines of a binary crop padded by one background pixel."""
    from skimage.measure import find_contours

    # "high": pixels of the nucleus that meet at a corner stay one outline, as 8-connected instances are one
    return [_drop_collinear(c) for c in find_contours(mask.astype(np.float32), 0.5, fully_connected="high")
            if len(c) >= 4]  # fmt: skip


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """The closed ring without the points in the middle of a straight run (the outline is unchanged)."""
    body = ring[:-1]
    before, after = body - np.roll(body, 1, axis=0), np.roll(body, -1, axis=0) - body
    corner = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0
    kept = body[corner] if corner.sum() >= 3 else body
    return np.concatenate([kept, kept[:1]])


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _polygons(rings: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Rings (x, y) grouped into polygons ``[exterior, *holes]``: a ring inside an odd number of others is a hole
    of the smallest one around it. Exteriors run counter-clockwise and holes clockwise (RFC 7946)."""
    from skimage.measure import points_in_poly

    inside = [[j for j, other in enumerate(rings) if j != i and points_in_poly(ring[:1], other)[0]]
              for i, ring in enumerate(rings)]  # fmt: skip
    polygons: dict[int, list[np.ndarray]] = {}
    for i, ring in enumerate(rings):
        if len(inside[i]) % 2 == 0:
            polygons.setdefault(i, []).insert(0, ring if _signed_area(ring) > 0 else ring[::-1])
    for i, ring in enumerate(rings):
        if len(inside[i]) % 2 == 1:
            owner = min((j for j in inside[i] if j in polygons), key=lambda j: abs(_signed_area(rings[j])))
            polygons[owner].append(ring if _signed_area(ring) < 0 else ring[::-1])
    return list(polygons.values())


def _check_offset_scale(offset: Sequence[float], scale: float) -> tuple[np.ndarray, float]:
    offset = np.asarray(offset, dtype=np.float64).reshape(-1)
    if offset.shape != (2,) or not np.all(np.isfinite(offset)):
        raise ValueError(f"offset must be two finite numbers (x, y), got {offset.tolist()}.")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}.")
    return offset, float(scale)


def instances_to_geojson(
    instances: Any,
    *,
    offset: Sequence[float] = (0.0, 0.0),
    scale: float = 1.0,
    object_type: str = "detection",
    class_name: str = "Nucleus",
    colour: Sequence[int] = NUCLEUS_COLOUR,
) -> dict:
    """A GeoJSON FeatureCollection with one Feature per instance of an ``(H, W)`` instance map (0 background).

    Each Feature has a Polygon geometry (a MultiPolygon only for an instance in several pieces), closed rings of
    ``[x, y]`` in QuPath's pixel coordinates mapped by ``offset + scale * (x, y)`` (see the module docstring),
    and the properties QuPath reads: ``objectType`` (``"detection"``: many light objects, as QuPath's own cell
    detection makes; ``"annotation"``: editable objects), ``classification`` ``{"name", "color"}`` and
    ``measurements`` ``{"Instance id": id in the labelled TIFF}``.
    """
    from scipy import ndimage as ndi

    from monai_mdm.metrics.segmentation import as_numpy

    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, got {object_type!r}.")
    offset, scale = _check_offset_scale(offset, scale)
    inst = as_numpy(instances)
    if inst.ndim != 2 or not (np.issubdtype(inst.dtype, np.integer) or inst.dtype == bool):
        raise ValueError(f"instances must be an (H, W) integer map, got shape {inst.shape} and type {inst.dtype}.")
    features = []
    for label, box in enumerate(ndi.find_objects(inst.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        crop = np.pad(inst[box] == label, 1)
        # crop (row, column) -> image pixel centres -> QuPath corner-origin (x, y) -> output coordinates
        shift = np.array([box[1].start - 1 + 0.5, box[0].start - 1 + 0.5])
        rings = [offset + scale * (ring[:, ::-1] + shift) for ring in _rings(crop)]
        polygons = [[ring.tolist() for ring in polygon] for polygon in _polygons(rings)]
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        features.append({
            "type": "Feature",
            "geometry": geometry,
            "properties": {
                "objectType": object_type,
                "classification": {"name": class_name, "color": [int(c) for c in colour]},
                "measurements": {ID_MEASUREMENT: label},
            },
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def geojson_to_instances(
    collection: Mapping | str | os.PathLike,
    shape: Sequence[int],
    *,
    offset: Sequence[float] = (0.0, 0.0),
    scale: float = 1.0,
) -> np.ndarray:
    """``(H, W)`` int32 instance map of a FeatureCollection (a dict or a ``.geojson`` file), the inverse of
    :func:`instances_to_geojson`: a pixel belongs to a Polygon when its centre lies inside the exterior and
    outside the holes. A Feature's id is its ``"Instance id"`` measurement, else its position (1, 2, ...);
    later Features win where they overlap. QuPath exports of annotations read the same way."""
    from skimage.draw import polygon as draw_polygon

    offset, scale = _check_offset_scale(offset, scale)
    if not isinstance(collection, Mapping):
        path = Path(collection)
        try:
            collection = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read GeoJSON '{path}' ({e}).") from e
    if collection.get("type") != "FeatureCollection" or not isinstance(collection.get("features"), list):
        raise ValueError("GeoJSON must be a FeatureCollection with a list of features.")
    shape = (int(shape[0]), int(shape[1]))
    out = np.zeros(shape, np.int32)
    for k, feature in enumerate(collection["features"], start=1):
        geometry = feature.get("geometry") or {}
        kind = geometry.get("type")
        if kind not in ("Polygon", "MultiPolygon"):
            raise ValueError(f"GeoJSON feature {k}: geometry {kind!r} is not a Polygon or MultiPolygon.")
        label = int(((feature.get("properties") or {}).get("measurements") or {}).get(ID_MEASUREMENT, k))
        mask = np.zeros(shape, bool)
        for polygon in geometry["coordinates"] if kind == "MultiPolygon" else [geometry["coordinates"]]:
            for n, ring in enumerate(polygon):
                xy = (np.asarray(ring, dtype=np.float64) - offset) / scale - 0.5  # back to pixel-centre indices
                rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=shape)
                mask[rr, cc] = n == 0  # the exterior fills, holes clear
        out[mask] = label
    return out


def write_geojson(path: str | os.PathLike, collection: Mapping) -> Path:
    """Write a FeatureCollection atomically (readers never see half a file); ``.geojson`` opens in QuPath by
    drag and drop or File > Import objects."""
    text = json.dumps(collection, separators=(",", ":"), allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_label_tiff(path: str | os.PathLike, instances: Any) -> Path:
    """Write an instance map as a single-channel labelled TIFF, atomically: uint16 when the ids fit (up to
    65535 nuclei), else uint32; 0 is background. QuPath, ImageJ/Fiji and napari open it as a label image."""
    import tifffile

    from monai_mdm.metrics.segmentation import as_numpy

    inst = as_numpy(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be an (H, W) map, got shape {inst.shape}.")
    if inst.size and inst.min() < 0:
        raise ValueError("instance ids must be >= 0 (0 background).")
    top = int(inst.max()) if inst.size else 0
    dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    if top > np.iinfo(np.uint32).max:
        raise ValueError(f"instance ids up to {top} do not fit a uint32 TIFF; renumber the instances.")
    buf = io.BytesIO()
    tifffile.imwrite(buf, inst.astype(dtype), photometric="minisblack", compression="zlib")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_nucleus_instances(folder: str | os.PathLike, name: str, instances: Any, **geojson: Any) -> tuple[Path, Path]:
    """``<folder>/<name>.tif`` (labelled TIFF) and ``<folder>/<name>.geojson`` (QuPath polygons, the keyword
    arguments of :func:`instances_to_geojson`) of one image's instances; the two share the ids."""
    folder = Path(folder)
    tiff = write_label_tiff(folder / f"{name}.tif", instances)
    polygons = write_geojson(folder / f"{name}.geojson", instances_to_geojson(instances, **geojson))
    return tiff, polygons


def tiled_nucleus_instances(
    classes: np.ndarray, method: str = "watershed", tile: int = 1024, margin: int = 64, min_marker_size: int = 3
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The nuclei of a class map too large for memory (a memory map), tile by tile: ``(top, left, instances)``.

    Each tile is post-processed by :func:`~monai_mdm.transforms.nucleus_instances` with ``margin`` pixels of
    its neighbours around it, and ``instances`` (1..n, the window's ``(H, W)`` map whose top-left pixel is
    ``(top, left)`` of ``classes``) keeps only the nuclei whose first pixel in raster order lies in the tile
    itself: a nucleus across a seam is seen whole by the tiles next to it but kept by exactly one. A nucleus
    smaller than ``margin`` in both directions gets the outline the whole-map post-processing gives it; set
    ``margin`` to at least one nucleus diameter (64 px covers MoNuSeg's at 0.25 um/px).
    """
    from skimage.segmentation import relabel_sequential

    from monai_mdm.transforms.array import check_instance_method, nucleus_instances

    check_instance_method(method)
    tile, margin = int(tile), int(margin)
    if tile < 1 or margin < 0:
        raise ValueError(f"tile must be >= 1 and margin >= 0, got tile={tile}, margin={margin}.")
    height, width = classes.shape
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            y0, x0 = max(top - margin, 0), max(left - margin, 0)
            window = np.asarray(classes[y0 : min(top + tile + margin, height), x0 : min(left + tile + margin, width)])
            if not window.any():
                continue
            inst = nucleus_instances(window, method, min_marker_size)
            ids, first = np.unique(inst.ravel(), return_index=True)
            rows, cols = np.divmod(first, inst.shape[1])
            rows, cols = rows + y0, cols + x0
            own = (ids > 0) & (rows >= top) & (rows < top + tile) & (cols >= left) & (cols < left + tile)
            if not own.any():
                continue
            keep = np.zeros(int(ids.max()) + 1, bool)
            keep[ids[own]] = True
            yield y0, x0, relabel_sequential(np.where(keep[inst], inst, 0))[0].astype(np.int32)


def write_slide_nuclei(
    path: str | os.PathLike,
    classes: np.ndarray,
    method: str = "watershed",
    *,
    offset: Sequence[float] = (0.0, 0.0),
    scale: float = 1.0,
    tile: int = 1024,
    margin: int = 64,
    **geojson: Any,
) -> int:
    """Stream the nuclei of a slide's class map (``(H, W)``, a memory map is read tile by tile) into a QuPath
    GeoJSON FeatureCollection at ``path``, atomically; returns the number of nuclei.

    Memory holds one tile with its margin (:func:`tiled_nucleus_instances`), never the slide's features.
    ``offset + scale * pixel`` maps the class map's pixels to the slide's level-0 coordinates; ids
    (``"Instance id"``) run 1..N over the slide in tile order. ``geojson``: :func:`instances_to_geojson`'s
    ``object_type``, ``class_name``, ``colour``.
    """
    offset, scale = _check_offset_scale(offset, scale)
    count = 0

    def write(f) -> None:
        nonlocal count
        f.write(_COLLECTION_HEAD)
        for top, left, inst in tiled_nucleus_instances(classes, method, tile, margin):
            corner = offset + scale * np.array([left, top], np.float64)
            for feature in instances_to_geojson(inst, offset=corner, scale=scale, **geojson)["features"]:
                feature["properties"]["measurements"][ID_MEASUREMENT] += count
                separator = b"," if f.tell() > len(_COLLECTION_HEAD) else b""
                f.write(separator + json.dumps(feature, separators=(",", ":"), allow_nan=False).encode())
            count += int(inst.max())
        f.write(b"]}")

    atomic_write(path, write)
    return count
