"""Nucleus instances to a labelled TIFF and QuPath GeoJSON, and back (monai_mdm.data.instance_export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from monai_mdm.data import (
    geojson_to_instances,
    instances_to_geojson,
    make_sample,
    write_label_tiff,
    write_nucleus_instances,
)


def odd_shapes() -> np.ndarray:
    """A nucleus with a hole and a second piece, one inside that hole, a diagonal pair, a single pixel."""
    m = np.zeros((24, 24), np.int32)
    m[2:12, 2:12] = 1
    m[5:8, 5:8] = 0
    m[14:17, 14:17] = 1
    m[5:7, 5:7] = 2
    m[0, 23] = m[1, 22] = 3
    m[20, 4] = 4
    return m


def check_valid_geojson(doc: dict) -> None:
    """What RFC 7946 and QuPath's import need of a FeatureCollection of polygons."""
    assert doc["type"] == "FeatureCollection"
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        geometry = feature["geometry"]
        polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        for polygon in polygons:
            for n, ring in enumerate(polygon):
                ring = np.asarray(ring)
                assert ring.ndim == 2 and ring.shape[1] == 2 and len(ring) >= 4
                np.testing.assert_array_equal(ring[0], ring[-1])  # closed
                x, y = ring[:, 0], ring[:, 1]
                area = 0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
                assert (area > 0) == (n == 0)  # exterior counter-clockwise, holes clockwise
        props = feature["properties"]
        assert props["objectType"] in ("detection", "annotation")
        assert props["classification"]["name"] == "Nucleus" and len(props["classification"]["color"]) == 3


@pytest.mark.parametrize("index", [1, 5])
def test_polygons_rasterise_back_to_the_instances(index, tmp_path):
    inst = make_sample("monuseg", "train", index, size=(96, 112), seed=0).instances
    tiff, path = write_nucleus_instances(tmp_path / "out", "tile", inst)
    doc = json.loads(path.read_text())  # valid JSON
    check_valid_geojson(doc)
    assert len(doc["features"]) == int(inst.max())
    np.testing.assert_array_equal(geojson_to_instances(path, inst.shape), inst)
    np.testing.assert_array_equal(tifffile.imread(tiff), inst)


def test_holes_pieces_and_single_pixels_survive_the_round_trip():
    m = odd_shapes()
    doc = instances_to_geojson(m)
    check_valid_geojson(doc)
    kinds = [f["geometry"]["type"] for f in doc["features"]]
    assert kinds == ["MultiPolygon", "Polygon", "Polygon", "Polygon"]  # nucleus 1: two pieces, one with a hole
    assert len(doc["features"][0]["geometry"]["coordinates"][0]) == 2  # exterior + hole
    np.testing.assert_array_equal(geojson_to_instances(doc, m.shape), m)


def test_coordinates_are_qupaths_pixel_corners_and_map_to_the_slide():
    m = np.zeros((4, 4), np.int32)
    m[1:3, 1:3] = 1  # pixels covering x, y in [1, 3)
    (ring,) = instances_to_geojson(m)["features"][0]["geometry"]["coordinates"]
    xy = np.asarray(ring)
    # the outline runs between the pixel centres (1.5, 2.5) and their neighbours', inside the squares [1, 3)
    assert xy[:, 0].min() == 1.0 and xy[:, 0].max() == 3.0 and xy[:, 1].min() == 1.0 and xy[:, 1].max() == 3.0
    assert {1.5, 2.5} <= set(xy[:, 0])
    slide = np.asarray(instances_to_geojson(m, offset=(1000, 2000), scale=4)["features"][0]["geometry"]["coordinates"][0])
    np.testing.assert_allclose(slide, 4 * xy + [1000, 2000])
    doc = instances_to_geojson(m, offset=(1000, 2000), scale=4)
    np.testing.assert_array_equal(geojson_to_instances(doc, m.shape, offset=(1000, 2000), scale=4), m)


def test_label_tiff_is_uint16_until_the_ids_need_more(tmp_path):
    small = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert tifffile.imread(write_label_tiff(tmp_path / "a.tif", small)).dtype == np.uint16
    big = small * 10_000
    back = tifffile.imread(write_label_tiff(tmp_path / "b.tif", big))
    assert back.dtype == np.uint32 and np.array_equal(back, big)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(object_type="cell"), r"object_type must be one of detection, annotation"),
        (dict(scale=0), r"scale must be a positive number"),
        (dict(offset=(1, 2, 3)), r"offset must be two finite numbers"),
    ],
)
def test_bad_export_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        instances_to_geojson(odd_shapes(), **kwargs)


def test_a_non_polygon_feature_is_refused_naming_it(tmp_path):
    doc = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]}
    with pytest.raises(ValueError, match=r"feature 1: geometry 'Point'"):
        geojson_to_instances(doc, (4, 4))
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read GeoJSON .*bad.geojson"):
        geojson_to_instances(tmp_path / "bad.geojson", (4, 4))
