"""Readers of GlaS, MoNuSeg and the preprocessed layout, the instance-map loader and the labelled budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from monai_mdm.data.budget import budget_count, budget_record, select_labelled
from monai_mdm.data.folder import natural_sort_key
from monai_mdm.data.glas import glas_datalist, read_glas_grades
from monai_mdm.data.instances import read_instance_map
from monai_mdm.data.monuseg import monuseg_datalist, rasterize_monuseg_xml
from monai_mdm.data.preprocessed import preprocessed_datalist
from monai_mdm.data.synthetic import make_sample, write_glas, write_monuseg
from monai_mdm.transforms import LoadInstanceMaskd

GLAS_SIZE = (64, 80)
MONUSEG_SIZE = (64, 64)


@pytest.fixture(scope="module")
def glas_root(tmp_path_factory) -> Path:
    return write_glas(tmp_path_factory.mktemp("glas"), n_train=3, n_test_a=2, n_test_b=1, size=GLAS_SIZE, seed=0)


@pytest.fixture(scope="module")
def monuseg_root(tmp_path_factory) -> Path:
    return write_monuseg(tmp_path_factory.mktemp("monuseg"), n_train=2, n_test=1, size=MONUSEG_SIZE, seed=0)


@pytest.fixture
def glas_copy(glas_root, tmp_path) -> Path:
    return Path(shutil.copytree(glas_root, tmp_path / "glas"))


@pytest.fixture
def monuseg_copy(monuseg_root, tmp_path) -> Path:
    return Path(shutil.copytree(monuseg_root, tmp_path / "monuseg"))


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _xml(regions: list[list[tuple]]) -> str:
    """A minimal MoNuSeg-style XML; vertices given as (X, Y) strings or numbers, None = attribute missing."""
    out = ['<Annotations><Annotation Id="1"><Regions>']
    for k, vertices in enumerate(regions, start=1):
        out.append(f'<Region Id="{k}"><Vertices>')
        for x, y in vertices:
            attrs = (f' X="{x}"' if x is not None else "") + (f' Y="{y}"' if y is not None else "")
            out.append(f"<Vertex{attrs} Z=\"0\"/>")
        out.append("</Vertices></Region>")
    out.append("</Regions></Annotation></Annotations>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- GlaS


@pytest.mark.parametrize(
    "split, names",
    [
        ("train", ["train_1", "train_2", "train_3"]),
        ("testA", ["testA_1", "testA_2"]),
        ("testB", ["testB_1"]),
        ("test", ["testA_1", "testA_2", "testB_1"]),
    ],
)
def test_glas_datalist_splits_and_exact_instances(glas_root, split, names):
    datalist = glas_datalist(glas_root, split)
    assert [e["name"] for e in datalist] == names
    load = LoadInstanceMaskd(keys="label")
    for entry in datalist:
        assert set(entry) == {"image", "label", "name", "grade"}
        assert entry["label"].endswith(f"{entry['name']}_anno.bmp")
        part, index = entry["name"].split("_")
        tile = make_sample("glas", part, int(index), size=GLAS_SIZE, seed=0)
        assert entry["grade"] == tile.grade
        out = load(entry)
        assert out["label_instances"].dtype == np.int32 and out["label_instances"].shape == (1, *tile.instances.shape)
        np.testing.assert_array_equal(out["label_instances"][0], tile.instances)
        assert out["label"].dtype == np.uint8
        np.testing.assert_array_equal(out["label"][0], (tile.instances > 0).astype(np.uint8))
        assert out["image"] == entry["image"]  # the image is left to LoadImaged


def test_glas_grade_csv_with_spaces(glas_copy):
    csv = glas_copy / "Grade.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(", ".join(c.strip() for c in line.split(",")) + " " for line in lines) + "\n")
    grades = read_glas_grades(csv)
    assert grades["train_1"] in ("benign", "malignant")
    datalist = glas_datalist(glas_copy)
    assert all(e["grade"] == grades[e["name"]] for e in datalist)
    csv.unlink()  # no Grade.csv: no grade, no error
    assert all("grade" not in e for e in glas_datalist(glas_copy))


def test_glas_natural_order(tmp_path):
    img, ann = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    for i in (10, 2, 1):
        _save(tmp_path / f"train_{i}.bmp", img)
        _save(tmp_path / f"train_{i}_anno.bmp", ann)
    assert [e["name"] for e in glas_datalist(tmp_path)] == ["train_1", "train_2", "train_10"]
    assert sorted(["b10", "b2", "a3"], key=natural_sort_key) == ["a3", "b2", "b10"]


def test_glas_missing_pairs(glas_copy):
    (glas_copy / "train_2_anno.bmp").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_2\.bmp' has no annotation '.*train_2_anno\.bmp'"):
        glas_datalist(glas_copy)
    (glas_copy / "train_2.bmp").unlink()
    (glas_copy / "train_3.bmp").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_3_anno\.bmp' has no image '.*train_3\.bmp'"):
        glas_datalist(glas_copy)


def test_glas_size_mismatch(glas_copy):
    _save(glas_copy / "train_1_anno.bmp", np.zeros((10, 12), np.uint8))
    with pytest.raises(ValueError, match=r"train_1_anno\.bmp' is 10 x 12 .* image '.*train_1\.bmp' is"):
        glas_datalist(glas_copy)
    entry = glas_datalist(glas_copy, verify=False)[0]
    with pytest.raises(ValueError, match=r"train_1_anno\.bmp' is 10 x 12 .* image '.*train_1\.bmp' is"):
        LoadInstanceMaskd("label")(entry)


def test_glas_missing_and_empty_folder(tmp_path, glas_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        glas_datalist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no GlaS train images"):
        glas_datalist(tmp_path)
    shutil.copytree(glas_root, tmp_path / "Warwick QU")
    with pytest.raises(FileNotFoundError, match="subfolder '.*Warwick QU' holds GlaS files"):
        glas_datalist(tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        glas_datalist(glas_root, "val")


# ---------------------------------------------------------------------------------------- MoNuSeg


@pytest.mark.parametrize("split, count", [("train", 2), ("test", 1)])
def test_monuseg_datalist_exact_instances(monuseg_root, split, count):
    datalist = monuseg_datalist(monuseg_root, split)
    assert len(datalist) == count
    assert [e["name"] for e in datalist] == sorted(e["name"] for e in datalist)
    tiles = [make_sample("monuseg", split, i, size=MONUSEG_SIZE, seed=0).instances for i in range(1, count + 1)]
    matched = []
    load = LoadInstanceMaskd("label")
    for entry in datalist:
        assert set(entry) == {"image", "label", "name"}
        assert Path(entry["image"]).stem == Path(entry["label"]).stem == entry["name"]
        out = load(entry)
        inst = out["label_instances"][0]
        assert inst.dtype == np.int32 and inst.max() > 0
        hits = [i for i, t in enumerate(tiles) if np.array_equal(t, inst)]
        assert len(hits) == 1, "the rasterised XML must reproduce the synthetic instance map exactly"
        matched += hits
        np.testing.assert_array_equal(out["label"][0], inst > 0)
    assert sorted(matched) == list(range(count))


def test_monuseg_direct_folders(monuseg_root):
    train = monuseg_datalist(monuseg_root, "train")
    assert monuseg_datalist(monuseg_root / "MoNuSeg 2018 Training Data") == train
    test = monuseg_datalist(monuseg_root, "test")
    assert monuseg_datalist(monuseg_root / "MoNuSegTestData") == test


def test_monuseg_after_loadimaged(monuseg_root):
    from monai.transforms import Compose, LoadImaged

    entry = monuseg_datalist(monuseg_root, "test")[0]
    # the image already loaded: its file is taken from the MetaTensor
    out = Compose([LoadImaged("image", image_only=True), LoadInstanceMaskd("label")])(entry)
    assert out["label_instances"].shape == (1, *MONUSEG_SIZE)


def test_monuseg_missing_pairs_and_folders(monuseg_copy, tmp_path):
    test_dir = monuseg_copy / "MoNuSegTestData"
    xml = next(test_dir.glob("*.xml"))
    moved = xml.rename(tmp_path / xml.name)
    with pytest.raises(FileNotFoundError, match=rf"{xml.stem}\.tif' has no annotation '.*{xml.stem}\.xml'"):
        monuseg_datalist(monuseg_copy, "test")
    moved.rename(xml)
    next(test_dir.glob("*.tif")).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{xml.stem}\.xml' has no image '.*{xml.stem}\.tif'"):
        monuseg_datalist(monuseg_copy, "test")
    xml.unlink()
    with pytest.raises(FileNotFoundError, match="no MoNuSeg images"):
        monuseg_datalist(monuseg_copy, "test")
    shutil.rmtree(monuseg_copy / "MoNuSeg 2018 Training Data" / "Annotations")
    with pytest.raises(FileNotFoundError, match="Annotations' is missing"):
        monuseg_datalist(monuseg_copy, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        monuseg_datalist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="it is empty"):
        monuseg_datalist(tmp_path / "empty")


def test_rasterize_overlap_and_clipping(tmp_path):
    path = tmp_path / "a.xml"
    square = [(1, 1), (6, 1), (6, 6), (1, 6)]
    later = [(4, 4), (9, 4), (9, 9), (4, 9)]
    outside = [(-5, -5), (2, -5), (2, 2), (-5, 2)]  # crosses the top-left corner
    gone = [(20, 20), (30, 20), (30, 30)]  # entirely outside
    path.write_text(_xml([square, later, outside, gone]))
    inst = rasterize_monuseg_xml(path, (10, 10))
    assert inst.dtype == np.int32 and inst.shape == (10, 10)
    assert inst[2, 2] == 3 and inst[0, 0] == 3  # the part inside the image is kept
    assert inst[5, 5] == 2  # later regions overwrite earlier ones
    assert inst[3, 5] == 1
    assert set(np.unique(inst)) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "regions, message",
    [
        ([], "no <Region>"),
        ([[(1, 1), (5, None), (5, 5)]], r"Region Id=1, Vertex 2: Y is missing"),
        ([[(1, 1), (5, 1), (5, 5)], [(1, 1), ("abc", 2), (3, 3)]], r"Region Id=2, Vertex 2: X is non-numeric"),
        ([[(1, 1), (5, "nan"), (5, 5)]], r"Region Id=1, Vertex 2: Y is non-numeric"),
        ([[(1, 1), (5, 5)]], r"Region Id=1 has 2 vertices"),
    ],
)
def test_rasterize_bad_xml(tmp_path, regions, message):
    path = tmp_path / "bad.xml"
    path.write_text(_xml(regions))
    with pytest.raises(ValueError, match=message) as err:
        rasterize_monuseg_xml(path, (8, 8))
    assert "bad.xml" in str(err.value)


def test_rasterize_malformed_xml(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<Annotations><Region>")
    with pytest.raises(ValueError, match="broken.xml' is not well-formed"):
        rasterize_monuseg_xml(path, (8, 8))
    with pytest.raises(ValueError, match="pass the image"):
        read_instance_map(path)


# ------------------------------------------------------------------------------------ preprocessed


@pytest.mark.parametrize("suffix", ["_anno", ""])
def test_preprocessed_layout(tmp_path, suffix):
    mask = np.zeros((12, 12), np.uint8)
    mask[1:4, 1:4] = 255
    mask[7:11, 6:10] = 255
    for name in ("img_10", "img_2"):
        _save(tmp_path / "img" / f"{name}.png", np.full((12, 12, 3), 200, np.uint8))
        _save(tmp_path / "labelcol" / f"{name}{suffix}.png", mask)
    datalist = preprocessed_datalist(tmp_path)
    assert [e["name"] for e in datalist] == ["img_2", "img_10"]
    assert datalist[0]["label"].endswith(f"img_2{suffix}.png") and datalist[0]["label_format"] == "binary"
    out = LoadInstanceMaskd("label")(datalist[0])  # binarises from the entry's label_format
    np.testing.assert_array_equal(out["label"][0], (mask > 0).astype(np.uint8))
    assert out["label_instances"].max() == 2  # the two blobs become two instances
    # as instance ids, 255 would be a single object: the format matters
    assert read_instance_map(datalist[0]["label"]).max() == 255


def test_preprocessed_split_folder_and_errors(tmp_path):
    base = tmp_path / "Train_Folder"
    _save(base / "img" / "a.png", np.zeros((6, 6, 3), np.uint8))
    _save(base / "labelcol" / "a.png", np.zeros((6, 6), np.uint8))
    assert [e["name"] for e in preprocessed_datalist(tmp_path, split="train")] == ["a"]
    _save(base / "img" / "b.png", np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"b\.png' has no label '.*labelcol/b\.png'"):
        preprocessed_datalist(base)
    (base / "img" / "b.png").unlink()
    _save(base / "labelcol" / "c.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"c\.png' has no image '.*img/c\.png'"):
        preprocessed_datalist(base)
    with pytest.raises(FileNotFoundError, match="labelcol' is missing"):
        _save(tmp_path / "other" / "img" / "a.png", np.zeros((6, 6, 3), np.uint8))
        preprocessed_datalist(tmp_path / "other")
    (tmp_path / "empty" / "img").mkdir(parents=True)
    (tmp_path / "empty" / "labelcol").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        preprocessed_datalist(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocessed_datalist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        preprocessed_datalist(tmp_path, split="test")


# ----------------------------------------------------------------------------------- label values


def test_read_instance_map_formats_and_bad_values(tmp_path):
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[4, 5] = (0, 0, 255)
    rgb[2, 2] = (255, 0, 0)
    inst = read_instance_map(_save(tmp_path / "colour.png", rgb))
    assert inst.dtype == np.int32 and inst[0, 0] == inst[2, 2] > 0 and inst[4, 5] > 0 and inst[0, 0] != inst[4, 5]
    assert (inst == 0).sum() == 27
    grey16 = np.array([[0, 300], [70000, 0]], np.int32)
    tifffile.imwrite(tmp_path / "ids.tif", grey16)
    np.testing.assert_array_equal(read_instance_map(tmp_path / "ids.tif", shape=(2, 2)), grey16)
    with pytest.raises(ValueError, match=r"ids\.tif' is 2 x 2 .* expected size is 3 x 3"):
        read_instance_map(tmp_path / "ids.tif", shape=(3, 3))
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0.0, 0.5]], np.float32))
    with pytest.raises(ValueError, match=r"frac\.tif' holds non-integer values"):
        read_instance_map(tmp_path / "frac.tif")
    assert read_instance_map(tmp_path / "frac.tif", binarize=True).tolist() == [[0, 1]]
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[0, -1]], np.int16))
    with pytest.raises(ValueError, match=r"neg\.tif' holds negative values"):
        read_instance_map(tmp_path / "neg.tif")
    with pytest.raises(FileNotFoundError, match="missing.png' does not exist"):
        read_instance_map(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="annotation path"):
        LoadInstanceMaskd("label")({"label": np.zeros((2, 2))})


# ------------------------------------------------------------------------------------------ budget


def _named(n: int, prefix: str = "train") -> list[dict]:
    return [{"image": f"/d/{prefix}_{i}.bmp", "name": f"{prefix}_{i}"} for i in range(1, n + 1)]


def test_budget_fractions_match_the_paper():
    assert budget_count(0.1, 85) == 8
    assert budget_count(0.1, 30) == 3
    assert budget_count(0.29, 100) == 29  # no binary-rounding loss
    assert budget_count(0.001, 30) == 1
    assert budget_count(1.0, 30) == 30
    assert budget_count(1, 30) == 1  # an int is a count
    assert len(select_labelled(_named(85), 0.1)) == 8
    assert len(select_labelled(_named(30), 0.1, seed=3)) == 3


def test_budget_determinism_seeds_order_and_nesting():
    data = _named(85)
    a, b = select_labelled(data, 0.1, seed=0), select_labelled(data, 0.1, seed=0)
    assert a == b
    assert select_labelled(data, 0.1, seed=1) != a
    positions = [data.index(e) for e in a]
    assert positions == sorted(positions)  # datalist order kept
    bigger = select_labelled(data, 0.5, seed=0)
    assert all(e in bigger for e in a)  # smaller budgets are subsets for one seed
    assert all(e in a for e in select_labelled(data, 5, seed=0))


def test_budget_names_and_record():
    data = _named(12)
    chosen = select_labelled(data, ["train_10", "train_2"])
    assert [e["name"] for e in chosen] == ["train_2", "train_10"]
    assert select_labelled(data, "train_3") == [data[2]]
    record = budget_record(select_labelled(data, np.float64(0.25), seed=np.int64(4)), np.float64(0.25), np.int64(4))
    assert json.loads(json.dumps(record)) == record
    assert record["budget"] == 0.25 and record["seed"] == 4 and record["count"] == 3
    assert select_labelled(data, record["names"]) == select_labelled(data, 0.25, seed=4)
    assert budget_record([{"image": "/x/a.png"}], 1, 0)["names"] == ["a"]


@pytest.mark.parametrize(
    "budget, error, message",
    [
        (13, ValueError, "--label_budget 13 is larger than the 12 labelled images"),
        (0, ValueError, ">= 1"),
        (0.0, ValueError, r"in \(0, 1\]"),
        (1.5, ValueError, r"in \(0, 1\]"),
        (-0.1, ValueError, r"in \(0, 1\]"),
        (["train_1", "trian_11"], ValueError, "unknown image 'trian_11'.*Close names: .*train_11"),
        (["train_1", "train_1"], ValueError, "twice"),
        ([], ValueError, "empty list"),
        (True, TypeError, "budget must be"),
    ],
)
def test_budget_errors(budget, error, message):
    with pytest.raises(error, match=message):
        select_labelled(_named(12), budget)


def test_budget_empty_datalist():
    with pytest.raises(ValueError, match="empty"):
        select_labelled([], 0.1)


def test_package_exports():
    import monai_mdm.data as data

    for name in (
        "glas_datalist",
        "monuseg_datalist",
        "rasterize_monuseg_xml",
        "preprocessed_datalist",
        "select_labelled",
        "budget_record",
        "image_folder_datalist",
        "FeatureCache",
        "holdout_split",
        "heldout_cache",
    ):
        assert callable(getattr(data, name)), name


def test_two_files_with_one_stem_are_named(tmp_path):
    from monai_mdm.data.folder import files_by_stem

    for name in ("a.png", "a.tif", "b.png", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"two images named 'a': 'a.png' and 'a.tif'; keep one"):
        files_by_stem(tmp_path, (".png", ".tif"), kind="images")
    assert list(files_by_stem(tmp_path, (".png",))) == ["a", "b"]


def test_pretraining_folder_skips_the_label_folders_of_every_layout(tmp_path, caplog):
    """A preprocessed layout (img/ + labelcol/) or GlaS's *_anno files: only the images are pretrained on."""
    import logging

    from PIL import Image

    from monai_mdm.data import image_folder_datalist

    tile = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    for name in ("img/a.png", "img/b.png", "labelcol/a_anno.png", "labelcol/b_anno.png", "train_1.bmp",
                 "train_1_anno.bmp", "Task/imagesTr/c.png", "Task/labelsTr/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        tile.save(tmp_path / name)
    with caplog.at_level(logging.INFO, logger="monai_mdm.data.folder"):
        datalist = image_folder_datalist(tmp_path, min_size=32)
    used = sorted(Path(d["image"]).relative_to(tmp_path).as_posix() for d in datalist)
    assert used == ["Task/imagesTr/c.png", "img/a.png", "img/b.png", "train_1.bmp"]
    message = caplog.text
    print(message)
    assert "using 4 images" in message and "2 in 'img'" in message and "skipped 4 label images" in message


def test_inference_folder_takes_its_own_images_not_an_output_folder_inside_it(tmp_path):
    """inference.json lists the folder without sub-folders: earlier predictions in eval/ are never re-read."""
    from PIL import Image

    from monai_mdm.data import image_folder_datalist

    tile = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    for name in ("slide_1.png", "slide_2.tif", "slide_1_anno.png", "eval/slide_1_seg.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        tile.save(tmp_path / name)
    listed = image_folder_datalist(tmp_path, verify=False, recursive=False)
    assert [Path(d["image"]).name for d in listed] == ["slide_1.png", "slide_2.tif"]
    assert len(image_folder_datalist(tmp_path)) == 3  # pretraining searches sub-folders


def test_preprocessed_labels_keep_instance_ids_when_the_file_has_them(tmp_path):
    """Two touching nuclei stored as ids 1 and 2 stay two instances; a 0/255 mask is still split by components."""
    from PIL import Image

    from monai_mdm.data.instances import read_instance_map

    ids = np.zeros((20, 20), np.uint8)
    ids[5:10, 2:8], ids[5:10, 8:14] = 1, 2  # touching: one connected component
    Image.fromarray(ids).save(tmp_path / "ids.png")
    Image.fromarray((ids > 0).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    assert np.unique(read_instance_map(tmp_path / "ids.png", binarize=True)).tolist() == [0, 1, 2]
    assert np.unique(read_instance_map(tmp_path / "mask.png", binarize=True)).tolist() == [0, 1]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_named_before_loading(tmp_path, suffix):
    """The header of a cut-off volume reads fine; the check reads the data through and names the file."""
    import nibabel as nib

    from monai_mdm.data.volumes import check_volume

    whole = tmp_path / f"whole{suffix}"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 24, 24)).astype(np.float32), np.eye(4)), whole)
    assert check_volume(whole)[0] == (24, 24, 24)
    cut = tmp_path / f"vol_002{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"NIfTI '.*vol_002\.nii(\.gz)?' is truncated"):
        check_volume(cut)
