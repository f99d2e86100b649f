"""3D volumes end to end on tiny generated NIfTI sets: data, conversion, 3D pretraining, few-shot bundle, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run, verify_net_in_out
from PIL import Image

from helpers import BUNDLES, error_chain
from monai_mdm.data.synthetic import synthesize_volume, write_volumes
from monai_mdm.data.volumes import check_volume, convert_to_nifti, main, volume_datalist

PRETRAIN = [str(BUNDLES / "mdm_pretrain" / "configs" / n) for n in ("train.json", "volume3d.json")]
VOLUME = BUNDLES / "mdm_volume_fewshot" / "configs"
SIZE = (16, 16, 12)  # 1.5 x 1.5 x 2 mm voxels: a 24 mm cube, 16^3 once resampled to 1.5 mm
CUBE = 16  # crops and windows: the smallest cube that holds two 8^3 mask patches per axis


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("volumes"), n_train=2, n_test=2, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def pretrained(volumes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain3d")
    run(config_file=PRETRAIN, dataset_dir=str(volumes), output_dir=str(out), max_iterations=2, image_size=CUBE,
        num_workers=0, progress_bar=False, save_interval=2, grid_interval=2)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def fewshot(volumes, pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fewshot3d")
    run(config_file=str(VOLUME / "train.json"), dataset_dir=str(volumes), output_dir=str(out),
        pretrained_weights=str(pretrained / "models" / "model_ema.pt"), label_budget=1, crop_size=CUBE,
        crops_per_image=2, max_steps=4, epoch_length=2, warmup_epochs=0)  # fmt: skip
    return out


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


# ---------------------------------------------------------------------------------------------- data


def test_synthetic_volumes_are_deterministic_and_labelled(volumes, tmp_path):
    image, label, affine = synthesize_volume(1, SIZE, seed=0)
    again = synthesize_volume(1, SIZE, seed=0)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1]) and np.array_equal(affine, again[2])
    assert not np.array_equal(image, synthesize_volume(2, SIZE, seed=0)[0])
    assert image.dtype == np.int16 and image.shape == SIZE and set(np.unique(label)) == {0, 1, 2}
    # organ brighter than the surrounding tissue, lesions darker than the organ (a learnable contrast)
    assert image[label == 1].mean() > image[label == 0][image[label == 0] > -500].mean()
    assert image[label == 2].mean() < image[label == 1].mean()
    # a rotated affine with the anisotropic spacing: not the identity a careless writer would leave
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.5, 1.5, 2.0]) and affine[0, 1] != 0
    copy = tmp_path / "again"
    assert main(["synthetic", "--out", str(copy), "--n-train", "2", "--n-test", "2", "--size", *map(str, SIZE)]) == 0
    for path in sorted(volumes.rglob("*.nii.gz")):
        assert (copy / path.relative_to(volumes)).read_bytes() == path.read_bytes()
    written = nib.load(str(volumes / "labelsTr" / "vol_001.nii.gz"))
    assert np.allclose(written.affine, synthesize_volume(1, SIZE, seed=0)[2], atol=1e-5)
    from monai.data import load_decathlon_datalist

    decathlon = load_decathlon_datalist(str(volumes / "dataset.json"), data_list_key="training")
    ours = volume_datalist(volumes, "train")
    assert [d["image"] for d in decathlon] == [d["image"] for d in ours]
    assert [d["label"] for d in decathlon] == [d["label"] for d in ours]


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
def test_monai_readers_see_the_written_voxels_and_affine(volumes, reader):
    from monai.transforms import LoadImaged

    entry = volume_datalist(volumes, "train")[0]
    loaded = LoadImaged(["image", "label"], reader=reader, ensure_channel_first=True)(entry)
    image, label, affine = synthesize_volume(1, SIZE, seed=0)
    assert loaded["image"].shape == (1, *SIZE) and np.array_equal(loaded["image"][0].numpy(), image)
    assert np.array_equal(loaded["label"][0].numpy(), label)
    assert np.allclose(loaded["image"].affine.numpy(), affine, atol=1e-4)


def test_datalist_names_cases_and_skips_macos_forks(volumes):
    (volumes / "imagesTs" / "._vol_test_001.nii.gz").write_bytes(b"resource fork")
    test = volume_datalist(volumes, "test")
    assert [d["name"] for d in test] == ["vol_test_001", "vol_test_002"]
    assert all(Path(d["label"]).parent.name == "labelsTs" for d in test)
    unlabelled = volume_datalist(volumes, "train", labels=False)
    assert [sorted(d) for d in unlabelled] == [["image", "name"]] * 2


def _singular(path: Path) -> Path:
    """A volume whose sform collapses the y axis (zero spacing): nibabel cannot even build it from an affine."""
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.5, 0.0, 2.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(np.zeros(SIZE, np.int16), None, header=header), str(path))
    return path


BAD_INPUTS = {
    "missing label": (lambda root: (root / "labelsTr" / "vol_002.nii.gz").unlink(), r"labelsTr/vol_002\.nii\.gz.*missing"),
    "shape mismatch": (
        lambda root: _nifti(root / "labelsTr" / "vol_002.nii.gz", np.zeros((16, 16, 10), np.uint8)),
        r"labelsTr/vol_002\.nii\.gz.*shape \(16, 16, 10\).*\(16, 16, 12\)",
    ),
    "4D image": (
        lambda root: _nifti(root / "imagesTr" / "vol_002.nii.gz", np.zeros((*SIZE, 2), np.int16)),
        r"imagesTr/vol_002\.nii\.gz' is 4D.*3D volume",
    ),
    "non-invertible affine": (
        lambda root: _singular(root / "imagesTr" / "vol_002.nii.gz"),
        r"imagesTr/vol_002\.nii\.gz' has a non-invertible affine",
    ),
    "label on another grid": (
        lambda root: _nifti(root / "labelsTr" / "vol_002.nii.gz", np.zeros(SIZE, np.uint8)),
        r"labelsTr/vol_002\.nii\.gz.*different affines",
    ),
    "truncated file": (
        lambda root: (root / "imagesTr" / "vol_002.nii.gz").write_bytes(b"\x1f\x8b not really"),
        r"cannot read NIfTI '.*imagesTr/vol_002\.nii\.gz'",
    ),
    "no Decathlon layout": (lambda root: __import__("shutil").rmtree(root / "imagesTr"), r"imagesTr.*Decathlon"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_volume_sets_get_clear_errors(tmp_path, case):
    root = write_volumes(tmp_path / "set", n_train=2, n_test=0, size=SIZE)
    damage, pattern = BAD_INPUTS[case]
    damage(root)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        volume_datalist(root, "train")
    assert re.search(pattern, str(info.value), re.S), str(info.value)


def _sitk_volume():
    import SimpleITK as sitk

    array = np.random.default_rng(0).integers(-100, 200, (5, 7, 6)).astype(np.int16)  # (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    return image, array


def _expected_ras_affine(image) -> np.ndarray:
    """ITK geometry is LPS; NIfTI's is RAS: flip the first two world axes."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _write_dicom_series(image, folder: Path) -> Path:
    import SimpleITK as sitk

    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.42"
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    for z in range(image.GetDepth()):
        piece = image[:, :, z]
        for tag, value in {
            "0020|000e": uid, "0020|000d": uid + ".1", "0008|0060": "CT", "0020|0013": str(z),
            "0020|0037": "\\".join(str(v) for v in (*direction[:, 0], *direction[:, 1])),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
        }.items():  # fmt: skip
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(piece)
    return folder


@pytest.mark.parametrize("kind", ["mha", "nrrd", "dicom"])
def test_simpleitk_conversion_keeps_voxels_and_geometry(tmp_path, kind):
    import SimpleITK as sitk

    image, array = _sitk_volume()
    if kind == "dicom":
        source = _write_dicom_series(image, tmp_path / "series")
    else:
        source = tmp_path / f"scan.{kind}"
        sitk.WriteImage(image, str(source))
    target = tmp_path / "out" / "scan.nii.gz"
    assert main(["convert", str(source), str(target)]) == 0
    converted = nib.load(str(target))
    assert np.array_equal(np.asarray(converted.dataobj), array.transpose(2, 1, 0))  # (x, y, z) in NIfTI
    assert np.allclose(converted.affine, _expected_ras_affine(image), atol=1e-4)
    assert check_volume(target)[0] == (6, 7, 5)
    assert [p.name for p in target.parent.iterdir()] == ["scan.nii.gz"]  # no temporary file left


def test_conversion_refuses_bad_input_and_keeps_the_existing_output(tmp_path):
    import SimpleITK as sitk

    image, _ = _sitk_volume()
    series = sitk.JoinSeries([image, image])  # 4D: two time points
    source = tmp_path / "series.mha"
    sitk.WriteImage(series, str(source))
    target = tmp_path / "scan.nii.gz"
    target.write_bytes(b"an earlier conversion")
    with pytest.raises(ValueError, match=r"series\.mha' is 4D"):
        convert_to_nifti(source, target)
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\nnot a header")
    with pytest.raises(ValueError, match=r"SimpleITK cannot read '.*broken\.nrrd'"):
        convert_to_nifti(tmp_path / "broken.nrrd", target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no DICOM series found in folder '.*empty'"):
        convert_to_nifti(tmp_path / "empty", target)
    with pytest.raises(ValueError, match=r"must end with \.nii or \.nii\.gz"):
        convert_to_nifti(source, tmp_path / "scan.mha")
    assert target.read_bytes() == b"an earlier conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.nrrd", "empty", "scan.nii.gz", "series.mha"]


# ---------------------------------------------------------------------------------------------- bundles


def test_pretraining_on_volumes_writes_3d_checkpoints_and_grids(pretrained):
    models = pretrained / "models"
    assert [p.name for p in models.glob("checkpoint_*.pt")] == ["checkpoint_2.pt"]
    ckpt = torch.load(models / "checkpoint_2.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 2
    ema = torch.load(models / "model_ema.pt", weights_only=True)["model"]
    assert ema["input_blocks.0.0.weight"].shape == (32, 1, 3, 3, 3)  # tiny3d: one channel in, 3D kernels
    grid = np.asarray(Image.open(pretrained / "grids" / "recon_0000002.png"))
    # two 16^3 samples shown by their middle slices: rows of (masked | reconstruction | target), 2 px gaps
    assert grid.shape == (CUBE * 2 + 2, CUBE * 3 + 4, 3)


def test_fewshot_training_saves_a_3d_segmenter(fewshot):
    from monai_mdm.inferers import MDMSegmenter, load_segmentation_model

    model = load_segmentation_model(fewshot / "models" / "model.pt")
    assert isinstance(model, MDMSegmenter) and model.class_names == ["background", "organ", "lesion"]
    assert model.extractor.spatial_dims == 3 and model.head.config()["spatial_dims"] == 3
    assert list(model.extractor.blocks) == list(range(len(model.extractor.network.output_blocks)))
    budget = json.loads((fewshot / "label_budget.json").read_text())
    assert budget["count"] == 1 and re.fullmatch(r"vol_\d{3}", budget["names"][0])


def _bundle_with_model(fewshot: Path, root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes((fewshot / "models" / "model.pt").read_bytes())
    return root


def test_inference_writes_nifti_predictions_on_the_input_affine(fewshot, volumes, tmp_path):
    bundle = _bundle_with_model(fewshot, tmp_path / "bundle")
    run(config_file=str(VOLUME / "inference.json"), bundle_root=str(bundle), dataset_dir=str(volumes / "imagesTs"),
        window_size=CUBE, overlap=0.0)  # fmt: skip
    outputs = sorted((bundle / "eval").iterdir())
    assert [p.name for p in outputs] == ["vol_test_001_seg.nii.gz", "vol_test_002_seg.nii.gz"]
    for out in outputs:
        source = nib.load(str(volumes / "imagesTs" / out.name.replace("_seg", "")))
        pred = nib.load(str(out))
        assert pred.shape == source.shape  # back on the input grid, not the 1.5 mm resampled one
        assert np.allclose(pred.affine, source.affine, atol=1e-5)
        assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_evaluation_reports_dice_per_case(fewshot, volumes):
    run(config_file=[str(VOLUME / "train.json"), str(VOLUME / "evaluate.json")], dataset_dir=str(volumes), output_dir=str(fewshot),
        window_size=CUBE, overlap=0.0)  # fmt: skip
    doc = json.loads((fewshot / "evaluation" / "metrics.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["vol_test_001", "vol_test_002"]
    for row in doc["rows"]:
        assert 0.0 <= row["dice_organ"] <= 1.0 and 0.0 <= row["dice_lesion"] <= 1.0
        assert row["mean_dice"] == pytest.approx((row["dice_organ"] + row["dice_lesion"]) / 2)
    header = (fewshot / "evaluation" / "metrics.csv").read_text().splitlines()[0]
    assert header == "name,run,dice_organ,dice_lesion,mean_dice"


def test_verify_net_in_out_passes_with_a_trained_model(fewshot, tmp_path):
    bundle = _bundle_with_model(fewshot, tmp_path / "bundle")
    verify_net_in_out(net_id="network_def", meta_file=str(VOLUME / "metadata.json"),
                      config_file=str(VOLUME / "inference.json"), bundle_root=str(bundle), device="cpu")  # fmt: skip


def test_dice_report_scores_each_class():
    from monai_mdm.handlers import DiceReport

    report = DiceReport("unused", ["background", "organ", "lesion"])
    truth = np.zeros((4, 4, 4), np.int64)
    truth[0, 0, :2] = 1
    pred = np.zeros_like(truth)
    pred[0, 0, :3] = 1
    truth[3, 3, 3] = 255  # ignored, whatever is predicted there
    pred[3, 3, 3] = 2
    scores = report.case_dice(pred, truth)
    assert scores["dice_organ"] == pytest.approx(2 * 2 / (2 + 3))
    assert scores["dice_lesion"] == 1.0  # absent from both
    assert scores["mean_dice"] == pytest.approx((scores["dice_organ"] + 1.0) / 2)


def test_bad_volume_stops_inference_before_anything_is_written(fewshot, volumes, tmp_path):
    bundle = _bundle_with_model(fewshot, tmp_path / "bundle")
    folder = tmp_path / "scans"
    folder.mkdir()
    for p in (volumes / "imagesTs").glob("vol_*.nii.gz"):
        (folder / p.name).write_bytes(p.read_bytes())
    _nifti(folder / "vol_test_003.nii.gz", np.zeros((*SIZE, 3), np.int16))  # a 4D series among 3D scans
    earlier = _nifti(bundle / "eval" / "vol_test_001_seg.nii.gz", np.ones(SIZE, np.uint8)).read_bytes()
    with pytest.raises(Exception) as info:
        run(config_file=str(VOLUME / "inference.json"), bundle_root=str(bundle), dataset_dir=str(folder),
            window_size=CUBE)  # fmt: skip
    assert re.search(r"vol_test_003\.nii\.gz' is 4D", error_chain(info.value))
    assert [p.name for p in (bundle / "eval").iterdir()] == ["vol_test_001_seg.nii.gz"]
    assert (bundle / "eval" / "vol_test_001_seg.nii.gz").read_bytes() == earlier


def test_non_invertible_affine_stops_pretraining_before_training(volumes, tmp_path):
    import shutil

    root = tmp_path / "set"
    shutil.copytree(volumes, root)
    _singular(root / "imagesTr" / "vol_002.nii.gz")
    with pytest.raises(Exception) as info:
        run(config_file=PRETRAIN, dataset_dir=str(root), output_dir=str(tmp_path / "out"), max_iterations=2,
            image_size=CUBE, num_workers=0, progress_bar=False)  # fmt: skip
    assert re.search(r"vol_002\.nii\.gz' has a non-invertible affine", error_chain(info.value))
    assert not (tmp_path / "out" / "models").exists()
