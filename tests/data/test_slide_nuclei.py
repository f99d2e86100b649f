"""Nuclei of a slide's class map, tile by tile, against the post-processing of the whole map in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monai_mdm.data import geojson_to_instances, write_slide_nuclei
from monai_mdm.transforms import NucleusBoundaryTarget, nucleus_instances

TILE, MARGIN = 64, 32
SHAPE = (200, 263)


def touching_nuclei_on_seams(seed: int = 0) -> np.ndarray:
    """A class map (0 background, 1 interior, 2 boundary) of discs, many centred on the tile seams, some touching."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    inst = np.zeros(SHAPE, np.int32)
    seams = [(r, c) for r in range(TILE, SHAPE[0], TILE) for c in range(TILE, SHAPE[1], TILE)]  # tile corners
    centres = seams + [(int(r), int(c)) for r, c in zip(rng.integers(0, SHAPE[0], 40), rng.integers(0, SHAPE[1], 40))]
    for k, (r, c) in enumerate(centres, start=1):
        disc = (rows - r) ** 2 + (cols - c) ** 2 <= rng.uniform(4, 11) ** 2
        inst[disc & (inst == 0)] = k  # overlapping discs: cut nuclei, and watershed ties at their contacts
    inst[TILE - 12 : TILE, 10:30][inst[TILE - 12 : TILE, 10:30] == 0] = 90  # two nuclei touching across a seam
    inst[TILE : TILE + 12, 10:30][inst[TILE : TILE + 12, 10:30] == 0] = 91
    return np.asarray(NucleusBoundaryTarget()(inst))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two instance maps hold the same nuclei, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("method", ["watershed", "connected_components"])
def test_each_nucleus_across_the_seams_is_written_once_as_in_the_whole_map(method, tmp_path):
    classes = touching_nuclei_on_seams()
    whole = nucleus_instances(classes, method)
    path = tmp_path / "slide_nuclei.geojson"
    count = write_slide_nuclei(path, classes, method, tile=TILE, margin=MARGIN)
    doc = json.loads(path.read_text())
    ids = [f["properties"]["measurements"]["Instance id"] for f in doc["features"]]
    assert count == len(doc["features"]) == whole.max() and sorted(ids) == list(range(1, count + 1))
    assert same_partition(geojson_to_instances(doc, SHAPE), whole)
    # without the margin, nuclei across the seams are cut: the test can fail
    write_slide_nuclei(path, classes, method, tile=TILE, margin=0)
    assert not same_partition(geojson_to_instances(path, SHAPE), whole)


def test_coordinates_are_level0_pixels_of_the_run_level(tmp_path):
    classes = touching_nuclei_on_seams()
    path = tmp_path / "n.geojson"
    write_slide_nuclei(path, classes, tile=TILE, margin=MARGIN, offset=(100, 40), scale=4.0)
    level0 = geojson_to_instances(path, SHAPE, offset=(100, 40), scale=4.0)
    assert same_partition(level0, nucleus_instances(classes))


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "n.geojson"
    path.write_text("old")

    def broken(*args, **kwargs):
        yield 0, 0, np.ones((2, 2), np.int32)
        raise MemoryError("simulated")

    monkeypatch.setattr("monai_mdm.data.instance_export.tiled_nucleus_instances", broken)
    with pytest.raises(MemoryError):
        write_slide_nuclei(path, np.ones((4, 4), np.uint8))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["n.geojson"]


def test_an_unknown_method_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="--instances must be one of watershed, connected_components, got 'otsu'"):
        write_slide_nuclei(tmp_path / "n.geojson", np.zeros((4, 4), np.uint8), "otsu")
    assert list(tmp_path.iterdir()) == []
