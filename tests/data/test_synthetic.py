"""Tests of the embedded synthetic GlaS / MoNuSeg data (monai_mdm.data.synthetic)."""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon
from skimage.measure import regionprops

from monai_mdm.data import synthesize_tile, write_demo_data, write_glas, write_monuseg
from monai_mdm.data.synthetic import (
    GLAS_GRADE_HEADER,
    MONUSEG_TEST_DIR,
    MONUSEG_TRAIN_DIR,
    make_sample,
    monuseg_organ,
    write_examples,
)
from monai_mdm.data.synthetic.__main__ import main

GLAS_COUNTS = {"train": 3, "testA": 2, "testB": 1}
MONUSEG_COUNTS = {"train": 2, "test": 1}
MONUSEG_SIZE = (128, 144)


# ----------------------------------------------------------------------------------------------
# helpers (test-only readers)


def read_xml_polygons(path: Path) -> list[np.ndarray]:
    """All Region polygons of an Aperio-style XML as ``(N, 2)`` arrays of (x, y)."""
    root = ET.parse(path).getroot()
    assert root.tag == "Annotations"
    polys = []
    for region in root.iter("Region"):
        verts = region.find("Vertices")
        assert verts is not None
        polys.append(np.array([[float(v.get("X")), float(v.get("Y"))] for v in verts.iter("Vertex")]))
    return polys


def rasterise(polys: list[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Instance map of polygons (id = Region order) and the number of pixels claimed twice."""
    out = np.zeros(shape, np.int32)
    clashes = 0
    for k, poly in enumerate(polys, start=1):
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=shape)
        clashes += int(np.count_nonzero(out[rr, cc]))
        out[rr, cc] = k
    return out, clashes


def bmp_bits_per_pixel(path: Path) -> int:
    data = path.read_bytes()
    assert data[:2] == b"BM"
    return int.from_bytes(data[28:30], "little")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def monuseg_pairs(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    train = root / MONUSEG_TRAIN_DIR
    test = root / MONUSEG_TEST_DIR
    pairs = {
        "train": [
            (t, train / "Annotations" / f"{t.stem}.xml") for t in sorted((train / "Tissue Images").glob("*.tif"))
        ],
        "test": [(t, test / f"{t.stem}.xml") for t in sorted(test.glob("*.tif"))],
    }
    return pairs


@pytest.fixture(scope="module")
def glas_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glas")
    out = write_glas(
        root, n_train=GLAS_COUNTS["train"], n_test_a=GLAS_COUNTS["testA"], n_test_b=GLAS_COUNTS["testB"], seed=3
    )
    assert out == root
    return root


@pytest.fixture(scope="module")
def monuseg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("monuseg")
    out = write_monuseg(root, n_train=MONUSEG_COUNTS["train"], n_test=MONUSEG_COUNTS["test"], size=MONUSEG_SIZE, seed=3)
    assert out == root
    return root


# ----------------------------------------------------------------------------------------------
# tiles


@pytest.mark.parametrize("kind", ["glas", "monuseg"])
@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_tile_shapes_and_ids(kind, size):
    rgb, inst = synthesize_tile(size, np.random.default_rng(1), kind=kind)
    assert rgb.shape == (*size, 3) and rgb.dtype == np.uint8
    assert inst.shape == size and inst.dtype == np.int32
    k = int(inst.max())
    assert k >= 1
    np.testing.assert_array_equal(np.unique(inst), np.arange(k + 1))


def test_tile_deterministic():
    for kind in ("glas", "monuseg"):
        a = synthesize_tile((96, 96), np.random.default_rng(7), kind=kind)
        b = synthesize_tile((96, 96), np.random.default_rng(7), kind=kind)
        c = synthesize_tile((96, 96), np.random.default_rng(8), kind=kind)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synthesize_tile((64, 64), np.random.default_rng(0), kind="camelyon")
    with pytest.raises(ValueError):
        synthesize_tile((64, 64), np.random.default_rng(0), kind="glas", grade="grade 3")
    with pytest.raises(ValueError):
        write_glas(tmp_path / "glas", size=(32, 128))
    with pytest.raises(ValueError):
        write_monuseg(tmp_path / "monuseg", n_train=-1)
    assert not any(tmp_path.iterdir())


def test_glands_differ_from_stroma_but_not_by_one_threshold():
    tiles = [make_sample("glas", "train", i, seed=5) for i in range(1, 9)]
    assert {t.grade for t in tiles} == {"benign", "malignant"}
    for t in tiles:
        inside = t.instances > 0
        assert 0.1 < inside.mean() < 0.8
        gap = np.linalg.norm(t.image[inside].mean(0) - t.image[~inside].mean(0))
        assert gap > 12.0, gap
    # the best single global threshold on any channel (or grey) must stay far from perfect
    best = 0.0
    for ch in range(4):
        values = [t.image[..., ch] if ch < 3 else t.image.mean(-1) for t in tiles]
        for th in range(0, 256, 8):
            for above in (False, True):
                inter = pred = true = 0
                for v, t in zip(values, tiles, strict=True):
                    p = (v >= th) if above else (v < th)
                    m = t.instances > 0
                    inter += np.count_nonzero(p & m)
                    pred += np.count_nonzero(p)
                    true += np.count_nonzero(m)
                best = max(best, 2 * inter / (pred + true))
    assert best < 0.85, best


def test_crowded_nuclei_touch_in_clusters():
    """Touching nuclei are what instance post-processing has to split: connected components must merge
    many of them on a crowded organ, and none may share a pixel (the XML rasterises back exactly)."""
    from monai_mdm.data.synthetic.monuseg import _nuclei_tile

    for organ, least in (("colon", 0.3), ("bladder", 0.3), ("liver", 0.0)):
        tile = _nuclei_tile(np.random.default_rng(1), (160, 160), organ)
        merged = ndi.label(tile.instances > 0, structure=np.ones((3, 3)))[0]
        pairs = set(zip(merged[tile.instances > 0].tolist(), tile.instances[tile.instances > 0].tolist()))
        per_component = np.bincount([c for c, _ in pairs])
        in_clusters = sum(per_component[c] > 1 for c, _ in pairs) / len(pairs)
        assert in_clusters >= least, (organ, in_clusters)
        if organ == "liver":  # no touching share: sparse hepatocyte nuclei stay apart
            assert in_clusters < 0.05
        polys = [np.asarray(p) for p in tile.polygons]
        inst, clashes = rasterise(polys, tile.instances.shape)
        assert clashes == 0
        np.testing.assert_array_equal(inst, tile.instances)


def test_nuclei_darker_than_background():
    for i in (1, 2):
        t = make_sample("monuseg", "train", i, size=MONUSEG_SIZE)
        inside = t.instances > 0
        grey = t.image.astype(float).mean(-1)
        assert grey[inside].mean() < grey[~inside].mean() - 30


# ----------------------------------------------------------------------------------------------
# GlaS layout


def test_glas_layout(glas_root):
    names = [f"{split}_{i}" for split, n in GLAS_COUNTS.items() for i in range(1, n + 1)]
    expected = {f"{n}.bmp" for n in names} | {f"{n}_anno.bmp" for n in names} | {"Grade.csv"}
    assert {p.name for p in glas_root.iterdir()} == expected

    with open(glas_root / "Grade.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == GLAS_GRADE_HEADER
    assert rows[0] == ["name", "patient ID", "grade (GlaS)", "grade (Sirinukunwattana et al. 2015)"]
    body = rows[1:]
    assert sorted(r[0] for r in body) == sorted(names)
    for name, patient, grade, subgrade in body:
        assert patient.isdigit()
        assert grade in ("benign", "malignant")
        split, index = name.rsplit("_", 1)
        assert make_sample("glas", split, int(index), seed=3).grade == grade
        assert ("differentiated" in subgrade) == (grade == "malignant")
    train_grades = {r[2] for r in body if r[0].startswith("train_")}
    assert train_grades == {"benign", "malignant"}


def test_glas_images_and_annotations(glas_root):
    for split, n in GLAS_COUNTS.items():
        for i in range(1, n + 1):
            img_path = glas_root / f"{split}_{i}.bmp"
            ann_path = glas_root / f"{split}_{i}_anno.bmp"
            assert bmp_bits_per_pixel(img_path) == 24
            assert bmp_bits_per_pixel(ann_path) == 8
            with Image.open(img_path) as im, Image.open(ann_path) as an:
                assert im.mode == "RGB"
                assert an.mode == "L"
                assert im.size == an.size
                assert min(im.size) >= 64
                img, ann = np.asarray(im), np.asarray(an)
            k = int(ann.max())
            assert k >= 1
            np.testing.assert_array_equal(np.unique(ann), np.arange(k + 1))
            for label in range(1, k + 1):  # one connected gland per id
                assert ndi.label(ann == label)[1] == 1
            sample = make_sample("glas", split, i, seed=3)
            np.testing.assert_array_equal(ann, sample.instances)
            np.testing.assert_array_equal(img, sample.image)
            assert k == len(sample.polygons)


# ----------------------------------------------------------------------------------------------
# MoNuSeg layout


def test_monuseg_layout(monuseg_root):
    assert (monuseg_root / MONUSEG_TRAIN_DIR / "Tissue Images").is_dir()
    assert (monuseg_root / MONUSEG_TRAIN_DIR / "Annotations").is_dir()
    assert (monuseg_root / MONUSEG_TEST_DIR).is_dir()
    pairs = monuseg_pairs(monuseg_root)
    for split, n in MONUSEG_COUNTS.items():
        assert len(pairs[split]) == n
        for tif, xml in pairs[split]:
            assert xml.is_file(), xml
            parts = tif.stem.split("-")
            assert parts[0] == "TCGA" and len(parts) == 6 and parts[3:] == ["01Z", "00", "DX1"]
    stems = [t.stem for split in pairs.values() for t, _ in split]
    assert len(set(stems)) == len(stems)
    assert {p.suffix for p in (monuseg_root / MONUSEG_TEST_DIR).iterdir()} == {".tif", ".xml"}


def test_monuseg_xml_matches_instances(monuseg_root):
    for split, pairs in monuseg_pairs(monuseg_root).items():
        samples = [make_sample("monuseg", split, i, size=MONUSEG_SIZE, seed=3) for i in range(1, len(pairs) + 1)]
        for tif, xml in pairs:
            image = tifffile.imread(tif)
            assert image.shape == (*MONUSEG_SIZE, 3) and image.dtype == np.uint8
            root = ET.parse(xml).getroot()
            annotation = root.find("Annotation")
            assert annotation is not None
            assert annotation.find("Attributes") is not None and annotation.find("Plots") is not None
            assert annotation.find("Regions/RegionAttributeHeaders") is not None
            polys = read_xml_polygons(xml)
            assert all(len(p) >= 3 for p in polys)
            inst, clashes = rasterise(polys, MONUSEG_SIZE)
            assert clashes == 0
            assert len(np.unique(inst)) == len(polys) + 1  # every region covers pixels

            match = [s for s in samples if np.array_equal(s.image, image)]
            assert len(match) == 1, "the TIFF is not the tile make_sample renders"
            sample = match[0]
            assert len(polys) == int(sample.instances.max())
            np.testing.assert_array_equal(inst > 0, sample.instances > 0)
            np.testing.assert_array_equal(inst, sample.instances)
            grey = image.astype(float).mean(-1)
            assert grey[inst > 0].mean() < grey[inst == 0].mean() - 30


# ----------------------------------------------------------------------------------------------
# determinism, atomic writes, demo, CLI


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    kwargs = {
        "glas_kwargs": {"n_train": 2, "n_test_a": 1, "n_test_b": 1},
        "monuseg_kwargs": {"n_train": 1, "n_test": 1, "size": (96, 96)},
    }
    a = write_demo_data(tmp_path / "a", seed=11, **kwargs)
    write_demo_data(tmp_path / "b", seed=11, **kwargs)
    write_demo_data(tmp_path / "c", seed=12, **kwargs)
    assert set(a) == {"glas", "monuseg"}
    assert a["glas"] == tmp_path / "a" / "GlaS" and a["monuseg"] == tmp_path / "a" / "MoNuSeg"
    ta, tb, tc = (tree_bytes(tmp_path / d) for d in "abc")
    assert ta == tb
    glas_a = {k: v for k, v in ta.items() if k.startswith("GlaS")}
    glas_c = {k: v for k, v in tc.items() if k.startswith("GlaS")}
    assert glas_a.keys() == glas_c.keys()
    assert glas_a["GlaS/train_1.bmp"] != glas_c["GlaS/train_1.bmp"]
    monuseg_images_a = sorted(v for k, v in ta.items() if k.endswith(".tif"))
    monuseg_images_c = sorted(v for k, v in tc.items() if k.endswith(".tif"))
    assert monuseg_images_a != monuseg_images_c


def test_overwrite_is_clean_and_leaves_no_temp_files(tmp_path):
    write_glas(tmp_path, n_train=1, n_test_a=1, n_test_b=0, seed=0)
    first = tree_bytes(tmp_path)
    write_glas(tmp_path, n_train=1, n_test_a=1, n_test_b=0, seed=0)
    assert tree_bytes(tmp_path) == first
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_images_stable_when_set_grows(tmp_path):
    write_glas(tmp_path / "small", n_train=1, n_test_a=0, n_test_b=0, seed=4)
    write_glas(tmp_path / "large", n_train=3, n_test_a=0, n_test_b=0, seed=4)
    for name in ("train_1.bmp", "train_1_anno.bmp"):
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "large" / name).read_bytes()


def test_cli(tmp_path, capsys):
    assert (
        main(["--out", str(tmp_path), "--seed", "2", "--n-train", "1", "--n-test", "1", "--monuseg-size", "80", "80"])
        == 0
    )
    out = capsys.readouterr().out
    assert "GlaS" in out and "MoNuSeg" in out
    assert (tmp_path / "GlaS" / "train_1.bmp").is_file()
    assert not (tmp_path / "GlaS" / "train_2.bmp").exists()
    assert len(list((tmp_path / "MoNuSeg" / MONUSEG_TEST_DIR).glob("*.xml"))) == 1


# ----------------------------------------------------------------------------------------------
# variation between images, as in the real sets


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v), -1.0, 1.0))))


def test_glas_stain_is_shared_within_a_slide_and_differs_between_slides():
    tiles = [make_sample("glas", "train", i, size=(64, 96), seed=1) for i in range(1, 21)]
    by_slide: dict[int, list] = {}
    for t in tiles:
        by_slide.setdefault(t.slide, []).append(t)
    shared = [ts for ts in by_slide.values() if len(ts) >= 2]
    assert shared and len(by_slide) >= 4
    for ts in shared:  # one slide: the same vectors and strengths up to a small jitter
        for t in ts[1:]:
            assert _angle(t.stain.h_vec, ts[0].stain.h_vec) < 3.0
            assert _angle(t.stain.e_vec, ts[0].stain.e_vec) < 3.0
            assert abs(np.log(t.stain.h_gain / ts[0].stain.h_gain)) < 0.3
    firsts = [ts[0] for ts in by_slide.values()]
    h_angles = [_angle(a.stain.h_vec, b.stain.h_vec) for i, a in enumerate(firsts) for b in firsts[i + 1 :]]
    gains = [t.stain.h_gain for t in firsts]
    assert np.median(h_angles) > 4.0 and max(gains) / min(gains) > 1.4
    # and it shows in the pictures: mean tissue colour of one slide's images is closer than across slides
    colour = {id(t): t.image.reshape(-1, 3).mean(0) for t in tiles}
    within = [np.linalg.norm(colour[id(t)] - colour[id(ts[0])]) for ts in shared for t in ts[1:]]
    between = [np.linalg.norm(colour[id(a)] - colour[id(b)]) for i, a in enumerate(firsts) for b in firsts[i + 1 :]]
    assert np.median(within) < np.median(between)


def test_glas_test_images_partly_from_slides_not_in_training(tmp_path):
    write_glas(tmp_path, n_train=24, n_test_a=8, n_test_b=6, size=(64, 96), seed=2)
    with open(tmp_path / "Grade.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    slides = {split: {r[1] for r in rows if r[0].startswith(split + "_")} for split in ("train", "testA", "testB")}
    assert len(slides["train"]) >= 6
    unseen = (slides["testA"] | slides["testB"]) - slides["train"]
    assert unseen and (slides["testA"] | slides["testB"]) & slides["train"]
    for name, patient, _, _ in rows:  # Grade.csv names the slide the image was rendered from
        split, index = name.rsplit("_", 1)
        assert make_sample("glas", split, int(index), size=(64, 96), seed=2).slide == int(patient)


def _hematoxylin(tile) -> np.ndarray:
    """Hematoxylin concentration per pixel, unmixed with the tile's own stain."""
    od = -np.log((tile.image.astype(np.float64) + 1.0) / 256.0).reshape(-1, 3)
    stains = np.stack([tile.stain.h_vec, tile.stain.e_vec], axis=1)
    return (od @ np.linalg.pinv(stains).T)[:, 0].reshape(tile.image.shape[:2]) / tile.stain.h_gain


def test_glas_morphology_follows_the_grade():
    tiles = [make_sample("glas", "train", i, seed=1) for i in range(1, 13)]
    solidity: dict[str, list[float]] = {"benign": [], "malignant": []}
    nuclear: dict[str, list[float]] = {"benign": [], "malignant": []}
    for t in tiles:
        solidity[t.grade] += [r.solidity for r in regionprops(t.instances) if r.area >= 300]
        inside = t.instances > 0
        nuclear[t.grade].append(float((_hematoxylin(t)[inside] > 0.8).mean()))
    # malignant glands: irregular and fused (less convex), crowded stratified nuclei (more of the gland)
    assert np.mean(solidity["malignant"]) < np.mean(solidity["benign"]) - 0.02
    assert np.mean(nuclear["malignant"]) > 1.4 * np.mean(nuclear["benign"])


def test_monuseg_nucleus_size_and_shape_depend_on_the_organ():
    area: dict[str, list[float]] = {}
    roundness: dict[str, list[float]] = {}
    for split, n in (("train", 9), ("test", 7)):
        for i in range(1, n + 1):
            t = make_sample("monuseg", split, i, size=(128, 128), seed=2)
            props = regionprops(t.instances)
            a = np.array([r.area for r in props])
            big = [r for r in props if r.area >= np.median(a)]
            area.setdefault(t.organ, []).append(float(np.percentile(a, 90)))
            roundness.setdefault(t.organ, []).append(
                float(np.median([r.axis_minor_length / max(r.axis_major_length, 1e-6) for r in big]))
            )
    assert {"breast", "kidney", "colon", "liver"} <= set(area)
    assert {"lung", "brain"} & set(area) and not {"lung", "brain"} & {
        make_sample("monuseg", "train", i, size=(64, 64), seed=2).organ for i in range(1, 16)
    }  # the test set holds organs the training set lacks, as in the real one
    assert np.mean(area["breast"]) > 1.3 * np.mean(area["kidney"])
    assert np.mean(roundness["colon"]) < np.mean(roundness["kidney"]) - 0.2


def test_monuseg_file_names_carry_the_organ(monuseg_root):
    for split, pairs in monuseg_pairs(monuseg_root).items():
        samples = [make_sample("monuseg", split, i, size=MONUSEG_SIZE, seed=3) for i in range(1, len(pairs) + 1)]
        for tif, _ in pairs:
            image = tifffile.imread(tif)
            (sample,) = [s for s in samples if np.array_equal(s.image, image)]
            assert monuseg_organ(tif.stem) == sample.organ
    assert monuseg_organ("TCGA-ZZ-0000-01Z-00-DX1") is None and monuseg_organ("train_1") is None


def test_examples_are_small_and_reproducible(tmp_path):
    assert main(["--out", str(tmp_path / "a"), "--examples"]) == 0
    write_examples(tmp_path / "b")
    for name in ("glas_examples.png", "monuseg_examples.png"):
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
        assert len(data) < 300_000
        with Image.open(tmp_path / "a" / name) as im:
            assert im.size[0] >= 3 * 64 and im.size[1] >= 2 * 64
    assert not (tmp_path / "a" / "GlaS").exists()
