"""The DDPM-seg face layout (<n>.png + <n>.npy), its checks, the palette and the set-level mIoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from monai_mdm.data import (
    CELEBA19_CLASSES,
    FFHQ34_CLASSES,
    face_palette,
    faces_datalist,
)
from monai_mdm.metrics import MultiClassIoU, mean_iou, per_class_iou
from monai_mdm.transforms import LoadClassMapd


def _write(folder, name, size=(8, 12), max_class=5, label_size=None, seed=0, extra_value=None):
    """One <name>.png (RGB, size H x W) and its <name>.npy map (int64; a 255 pixel; optional extra value)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    lh, lw = label_size or size
    label = rng.integers(0, max_class + 1, (lh, lw)).astype(np.int64)
    label[0, 0] = 255
    if extra_value is not None:
        label[-1, -1] = extra_value
    np.save(folder / f"{name}.npy", label)
    return label


def test_datalist_natural_order_and_loading(tmp_path):
    labels = {n: _write(tmp_path, n, seed=int(n)) for n in ("10", "2", "1")}
    dl = faces_datalist(tmp_path, 34)
    assert [e["name"] for e in dl] == ["1", "2", "10"]
    assert set(dl[0]) == {"image", "label", "name"}
    assert dl[2]["image"].endswith("10.png") and dl[2]["label"].endswith("10.npy")
    out = LoadClassMapd("label", num_classes=34)(dl[1])
    assert out["label"].shape == (1, 8, 12) and out["label"].dtype == np.uint8
    np.testing.assert_array_equal(out["label"][0], labels["2"])  # 255 = ignore kept as it is
    assert out["image"] == dl[1]["image"]
    wide = LoadClassMapd("label", num_classes=34, dtype=np.int64)(dl[1])
    assert wide["label"].dtype == np.int64
    # the map is found next to the image when the entry has no label
    derived = LoadClassMapd("label", num_classes=34)({"image": dl[0]["image"]})
    np.testing.assert_array_equal(derived["label"][0], labels["1"])


def test_datalist_split_layout(tmp_path):
    _write(tmp_path / "real" / "train", "0")
    _write(tmp_path / "real" / "test", "0")
    _write(tmp_path / "real" / "test", "1")
    assert len(faces_datalist(tmp_path, 19, split="test")) == 2
    with pytest.raises(FileNotFoundError, match="split 'val'"):
        faces_datalist(tmp_path, 19, split="val")
    with pytest.raises(FileNotFoundError, match="no images"):
        faces_datalist(tmp_path / "real", 19)


def test_missing_npy_names_image_and_expected_path(tmp_path):
    _write(tmp_path, "0")
    _write(tmp_path, "1")
    (tmp_path / "1.npy").unlink()
    with pytest.raises(FileNotFoundError) as e:
        faces_datalist(tmp_path, 34)
    msg = str(e.value)
    assert str(tmp_path / "1.png") in msg and str(tmp_path / "1.npy") in msg
    entry = {"image": str(tmp_path / "1.png"), "label": str(tmp_path / "1.npy")}
    with pytest.raises(FileNotFoundError) as e:
        LoadClassMapd("label", num_classes=34)(entry)
    assert str(tmp_path / "1.png") in str(e.value) and str(tmp_path / "1.npy") in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"1\.npy"):
        LoadClassMapd("label", num_classes=34)({"image": str(tmp_path / "1.png")})


def test_size_mismatch_names_both_sizes_and_files(tmp_path):
    _write(tmp_path, "0", size=(8, 12), label_size=(12, 8))
    entry = {"image": str(tmp_path / "0.png"), "label": str(tmp_path / "0.npy")}
    with pytest.raises(ValueError) as e:
        LoadClassMapd("label", num_classes=34)(entry)
    msg = str(e.value)
    assert "12 x 8" in msg and "8 x 12" in msg
    assert str(tmp_path / "0.png") in msg and str(tmp_path / "0.npy") in msg
    with pytest.raises(ValueError, match="8 x 12"):
        faces_datalist(tmp_path, 34)


def test_out_of_range_values_suggest_the_data_set(tmp_path):
    # an FFHQ-34 map (classes up to 30) read with the CelebA-19 setting
    _write(tmp_path, "0", max_class=18, extra_value=30)
    entry = {"image": str(tmp_path / "0.png"), "label": str(tmp_path / "0.npy")}
    with pytest.raises(ValueError) as e:
        LoadClassMapd("label", num_classes=19)(entry)
    msg = str(e.value)
    assert str(tmp_path / "0.npy") in msg
    assert "values 30" in msg and "19 classes" in msg
    assert "FFHQ-34" in msg and "num_classes=34" in msg
    with pytest.raises(ValueError, match="num_classes=34"):
        faces_datalist(tmp_path, 19)
    assert len(faces_datalist(tmp_path, 34)) == 1  # fine with the right setting
    # beyond both known sets: ask for enough classes
    np.save(tmp_path / "0.npy", np.full((8, 12), 40, dtype=np.int64))
    with pytest.raises(ValueError, match="at least 41"):
        LoadClassMapd("label", num_classes=34)(entry)
    np.save(tmp_path / "0.npy", np.full((8, 12), -1, dtype=np.int64))
    with pytest.raises(ValueError, match="Negative"):
        LoadClassMapd("label", num_classes=34)(entry)
    np.save(tmp_path / "0.npy", np.full((8, 12), 0.5))
    with pytest.raises(ValueError, match="non-integer"):
        LoadClassMapd("label", num_classes=34)(entry)
    with pytest.raises(ValueError, match="ignore_index"):
        LoadClassMapd("label", num_classes=300)


def test_class_names_and_palette():
    assert len(FFHQ34_CLASSES) == 34 and len(set(FFHQ34_CLASSES)) == 34
    assert len(CELEBA19_CLASSES) == 19 and len(set(CELEBA19_CLASSES)) == 19
    assert FFHQ34_CLASSES[0] == CELEBA19_CLASSES[0] == "background"
    for k in (19, 34, 256):
        pal = face_palette(k)
        assert pal.shape == (k, 3) and pal.dtype == np.uint8
        assert len({tuple(c) for c in pal}) == k  # pairwise distinct
        np.testing.assert_array_equal(pal, face_palette(k))  # deterministic
    assert face_palette(34)[0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(face_palette(19), face_palette(34)[:19])  # same colour per id whatever K
    for bad in (0, 257):
        with pytest.raises(ValueError):
            face_palette(bad)


def test_mean_iou_hand_computed():
    preds = [np.array([[0, 0], [1, 2]]), torch.tensor([[2, 2], [0, 1]])]
    labels = [np.array([[0, 1], [1, 255]]), np.array([[2, 0], [0, 1]])]
    # summed over both images, the ignored pixel (pred 2) counts for nothing:
    # class 0: I = 1 + 1, U = 2 + 2; class 1: I = 1 + 1, U = 2 + 1; class 2: I = 0 + 1, U = 0 + 2
    per_class, miou = mean_iou(preds, labels, num_classes=4)
    np.testing.assert_allclose(per_class[:3], [2 / 4, 2 / 3, 1 / 2])
    assert math.isnan(per_class[3])  # class 3 absent from prediction and label: excluded from the mean
    assert miou == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    np.testing.assert_array_equal(np.isnan(per_class_iou(preds, labels, 4)), [False, False, False, True])
    # the running accumulator gives the same, and a stacked (N, H, W) array too
    acc = MultiClassIoU(4)
    for p, g in zip(preds, labels):
        acc.update(p, g)
    np.testing.assert_allclose(acc.compute()[0], per_class)
    stacked = mean_iou(np.stack([preds[0], preds[1].numpy()]), np.stack(labels), 4)
    np.testing.assert_allclose(stacked[0], per_class)
    # set-level, not a mean of per-image IoUs: class 1 is 1/2 in image 1 and 1 in image 2 (mean 3/4), 2/3 overall
    assert per_class_iou(preds[:1], labels[:1], 4)[1] == 0.5
    assert per_class_iou(preds[1:], labels[1:], 4)[1] == 1.0
    # only the ignored pixel predicted class 2 in image 1: class 2 has no IoU there
    assert math.isnan(per_class_iou(preds[:1], labels[:1], 4)[2])


def test_mean_iou_errors():
    with pytest.raises(ValueError, match="prediction"):
        mean_iou([np.array([[0, 5]])], [np.array([[0, 1]])], 3)
    with pytest.raises(ValueError, match="label"):
        mean_iou([np.array([[0, 1]])], [np.array([[0, 7]])], 3)
    with pytest.raises(ValueError, match="same shape"):
        mean_iou([np.zeros((2, 2), int)], [np.zeros((2, 3), int)], 3)
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        mean_iou([np.zeros((2, 2), int)] * 2, [np.zeros((2, 2), int)], 3)
    empty = mean_iou([np.full((2, 2), 0)], [np.full((2, 2), 255)], 2)
    assert np.isnan(empty[0]).all() and math.isnan(empty[1])


def test_face_class_names_follow_the_dataset_setting_and_refuse_others():
    from monai_mdm.data import CELEBA19_CLASSES, FFHQ34_CLASSES, face_class_names

    assert face_class_names("ffhq34") == list(FFHQ34_CLASSES) and face_class_names("celeba19") == list(CELEBA19_CLASSES)
    with pytest.raises(ValueError, match=r"dataset 'celeba' is not a face-parts data set; set --dataset to one of"):
        face_class_names("celeba")
